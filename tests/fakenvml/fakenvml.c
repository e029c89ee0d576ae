/* A stand-in libnvidia-ml.so.1 for tests of *where* the library is loaded from: a driver root
 * (containerized driver) versus the loader's path. It answers as a driver with no GPUs would, so
 * that the real backend and the health-monitor run through init, discovery and the event loop.
 * Built by tests/fakenvml/build.py into a temporary driver root; never shipped. */
#include <string.h>
#include <unistd.h>

#define NVML_SUCCESS 0
#define NVML_ERROR_TIMEOUT 10

static char dummy_set;

int nvmlInitWithFlags(unsigned int flags) { (void)flags; return NVML_SUCCESS; }
int nvmlInit_v2(void) { return NVML_SUCCESS; }
int nvmlShutdown(void) { return NVML_SUCCESS; }
const char *nvmlErrorString(int result) { (void)result; return "fake NVML error"; }
int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    strncpy(version, FAKE_DRIVER_VERSION, length);
    if (length) version[length - 1] = 0;
    return NVML_SUCCESS;
}
int nvmlDeviceGetCount_v2(unsigned int *count) { *count = 0; return NVML_SUCCESS; }
int nvmlEventSetCreate(void **set) { *set = &dummy_set; return NVML_SUCCESS; }
int nvmlEventSetFree(void *set) { (void)set; return NVML_SUCCESS; }
int nvmlEventSetWait_v2(void *set, void *data, unsigned int timeout_ms) {
    (void)set; (void)data;
    usleep(timeout_ms * 1000u);
    return NVML_ERROR_TIMEOUT;
}
