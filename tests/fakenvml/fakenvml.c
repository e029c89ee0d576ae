/* A stand-in libnvidia-ml.so.1 for tests that must go through the product's REAL NVML backend
 * (common/nvml/real.py, over pynvml) without a GPU: the library-path tests, the integration tests
 * of tests/integration/test_fake_driver.py, and the container image run with a driver root
 * mounted at /driver-root. Built by tests/fakenvml/__init__.py into a driver root; never shipped.
 *
 * Why C and not the simulated backend: the image has no simulator (devtools/ stays out of it), and
 * what is under test there is exactly the path a node takes: the library found under the driver
 * root, loaded by ctypes, and every pynvml wrapper's C symbol, argument and struct layout.
 *
 * WHAT IT MODELS: a DGX H100 on driver 580.159.04 with the first N of its 8 GPUs (N read at the
 * first nvmlInit from <control dir>/gpus; absent: 0). Per GPU, the values of
 * devtools/fleets/dgx-h100-8.json (UUID, name, minor, PCI bus id, memory total, PCIe topology:
 * switch pairs 0-1, 2-3, 4-5, 6-7 PXB, same NUMA node NODE, across SYS) and, where an H100 answer
 * was not recorded, the recorded H200 on the same driver (/work/shared/fixtures/nvml): supported
 * events 0xFF9F, MIG mode [0, 0] with 0 MIG devices (nvmlDeviceGetMaxMigDeviceCount is 0 while MIG
 * is off, as recorded; the fleet file's 7 is what MIG on would give), NOT_FOUND for a MIG device
 * index, ECC on with counters 0, remapped rows 0/0/no/no, retired pages NOT_SUPPORTED (Hopper
 * remaps rows instead), recovery action none (field 230), memory used as recorded at idle. Each GPU
 * has 18 active NVLinks to the four NVSwitches (5+4+4+5 links, remote PCI ids as in the fleet file).
 * PCI device ids are an H100 SXM5's (0x2330, DGX subsystem 0x16C1) and a third-generation
 * NVSwitch's (0x22A3): nothing reads them, they only keep the structs plausible.
 * Handles are stable pointers; answers check their arguments in the order NVML documents:
 * UNINITIALIZED before and after nvmlInit/nvmlShutdown (init is reference counted),
 * INVALID_ARGUMENT for a bad index, handle, NULL pointer or enum, INSUFFICIENT_SIZE for a short
 * buffer, NOT_SUPPORTED for a link past the GPU's 18 (assumed: the recording has no H100; NVML's
 * INVALID_ARGUMENT from link 36 on) and for instance ids of a GPU that is not a MIG device.
 *
 * FAULTS, injected from outside the process (and from outside a container, through the mounted
 * driver root): lines appended to <control dir>/events. The control dir is $FAKENVML_DIR, else
 * <driver root>/run/fakenvml, the driver root being where this library sits, FAKE_ROOT_FROM_LIB
 * above it (set at build time from the library directory). One line per fault, `<gpu>` being an
 * NVML index or a UUID:
 *     xid <gpu> <n>       an XID critical error event (data n); XID 79 (fallen off the bus) also
 *                         makes every later call on that GPU, nvmlDeviceGetHandleByIndex included,
 *                         answer GPU_IS_LOST, as a real one does, until a reset
 *     dbe <gpu>           an uncorrected (double-bit) ECC error: counters +1 and its event
 *     sbe <gpu>           a corrected (single-bit) ECC error: counters +1 and its event
 *     action <gpu> <n>    the driver's recovery advice (NVML_FI_DEV_GET_GPU_RECOVERY_ACTION) is n
 *     reset <gpu>         a GPU reset: answers again, volatile ECC counters 0, advice none
 * Blank lines and lines starting with # are skipped; anything else is ignored with a trace line.
 * The file is append-only; write each line whole, in one write (a line without its newline waits).
 * Device state (lost, counters, advice) is the driver's, not the process's: every process applies
 * every line from the start of the file, so a monitor started after an XID 79 finds the GPU lost.
 * Events are the process's: an event set delivers each line written after the set was created
 * once, and only to a set registered for that event type on that GPU (lines for other types or
 * GPUs are passed over); several sets each get their copy, as NVML does.
 *
 * A trace of what the library did, for tests to wait on instead of sleeping (no driver writes
 * one): <control dir>/trace, lines "<pid> init gpus=<n>", "<pid> register gpu=<i> mask=0x<hex>",
 * "<pid> event gpu=<i> type=0x<hex> data=<n>", "<pid> ignored: <line>"; silently skipped when the
 * directory cannot be written.
 *
 * WHAT IT DOES NOT MODEL: MIG (on), vGPU, NUMA affinity (the backend reads sysfs, not NVML),
 * clocks, power, processes, the row remapping and XID 48 a real DBE brings, the recovery advice a
 * real driver derives from an XID (inject it with `action`), a GPU that vanishes from the count,
 * calls that hang, nvmlInit's failure without NVML_INIT_FLAG_NO_GPUS on a driver with no GPUs (0
 * GPUs initialises, for the library-path tests; nvidia.ko would not even load), and every symbol
 * the product does not call: pynvml then raises FUNCTION_NOT_FOUND, as with an older driver.
 * Dependency-free C: cc -shared -fPIC -pthread. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#ifndef FAKE_DRIVER_VERSION
#define FAKE_DRIVER_VERSION "580.159.04"
#endif
#ifndef FAKE_ROOT_FROM_LIB
#define FAKE_ROOT_FROM_LIB "../../.."  /* usr/lib/x86_64-linux-gnu */
#endif

/* nvml.h return codes */
#define NVML_SUCCESS 0
#define NVML_ERROR_UNINITIALIZED 1
#define NVML_ERROR_INVALID_ARGUMENT 2
#define NVML_ERROR_NOT_SUPPORTED 3
#define NVML_ERROR_NOT_FOUND 6
#define NVML_ERROR_INSUFFICIENT_SIZE 7
#define NVML_ERROR_TIMEOUT 10
#define NVML_ERROR_GPU_IS_LOST 15
#define NVML_ERROR_UNKNOWN 999

#define EVENT_SINGLE_BIT_ECC 0x1ULL
#define EVENT_DOUBLE_BIT_ECC 0x2ULL
#define EVENT_XID_CRITICAL 0x8ULL
#define SUPPORTED_EVENTS 0xFF9FULL /* recorded (H200, 580.159.04) */
#define WHOLE_GPU 0xFFFFFFFFu
#define XID_FALLEN_OFF_THE_BUS 79
#define FI_DEV_GET_GPU_RECOVERY_ACTION 230
#define FI_MAX 1024 /* field ids at or past it are not valid ids at all */
#define VALUE_TYPE_UNSIGNED_INT 1
#define NVLINK_MAX_LINKS 36 /* 580's nvml.h */
#define H100_NVLINKS 18
#define MAX_GPUS 8

/* pynvml's layouts (nvidia-ml-py 13.x), which are nvml.h's */
typedef struct {
    char busIdLegacy[16];
    unsigned int domain, bus, device, pciDeviceId, pciSubSystemId;
    char busId[32];
} nvmlPciInfo_t;
typedef struct { unsigned long long total, free, used; } nvmlMemory_t;
typedef union {
    double dVal;
    unsigned int uiVal;
    unsigned long ulVal;
    unsigned long long ullVal;
    long long sllVal;
    int siVal;
    unsigned short usVal;
} nvmlValue_t;
typedef struct {
    unsigned int fieldId, scopeId;
    long long timestamp, latencyUsec;
    int valueType, nvmlReturn;
    nvmlValue_t value;
} nvmlFieldValue_t;

struct fake_gpu {
    int index;
    int lost;
    unsigned long long ecc[2][2]; /* [corrected, uncorrected][volatile, aggregate] */
    unsigned int action;
};
typedef struct fake_gpu *nvmlDevice_t;

typedef struct {
    nvmlDevice_t device;
    unsigned long long eventType, eventData;
    unsigned int gpuInstanceId, computeInstanceId;
} nvmlEventData_t;

struct fake_set {
    long long offset; /* of the events file: the next line this set looks at */
    unsigned long long mask[MAX_GPUS];
    struct fake_set *next;
};
typedef struct fake_set *nvmlEventSet_t;

/* A DGX H100 (devtools/fleets/dgx-h100-8.json). */
static const struct {
    const char *uuid;
    unsigned int bus;
} DGX_H100[MAX_GPUS] = {
    {"GPU-f039c560-d7cc-5c7c-54f1-dd371541d642", 0x18}, {"GPU-395dbbc6-d6a1-da57-04f2-774967777cb0", 0x2A},
    {"GPU-a627da9f-778c-8baa-0df9-4f3cd37978a4", 0x3A}, {"GPU-6854711e-8b65-7cae-6d7d-cbbcb4c31190", 0x5D},
    {"GPU-1fe1bcc1-2f65-dab2-db25-4d055ee56c43", 0x9A}, {"GPU-91c6aa6e-4fcc-1a95-64ab-dbed86afa4d1", 0xAB},
    {"GPU-930bc548-4e27-0432-876f-a3553ef2f53f", 0xBA}, {"GPU-5a20cdd2-88f7-7505-15b6-a96180636b05", 0xDB},
};
static const char H100_NAME[] = "NVIDIA H100 80GB HBM3";
static const unsigned long long H100_MEMORY = 85520809984ULL;
static const unsigned long long IDLE_USED = 644939776ULL; /* recorded H200 at idle, same driver */
static const unsigned int H100_SXM_PCI_ID = 0x233010DE, DGX_H100_SUBSYS_ID = 0x16C110DE;
static const unsigned int NVSWITCH_PCI_ID = 0x22A310DE;
static const unsigned int NVSWITCH_BUS[] = {0x05, 0x06, 0x07, 0x08};
static const int NVSWITCH_LINKS[] = {5, 4, 4, 5};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static int init_count;
static int gpu_count;
static struct fake_gpu gpus[MAX_GPUS];
static struct fake_set *sets;
static char control[PATH_MAX];
static long long state_offset; /* how far this process applied the events file to device state */

/* -- the control directory ---------------------------------------------------------------- */
static void control_path(char *out, size_t size, const char *name) {
    snprintf(out, size, "%s/%s", control, name);
}

static void trace(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void trace(const char *fmt, ...) {
    char path[PATH_MAX + 16], line[512];
    int n = snprintf(line, sizeof line, "%d ", (int)getpid());
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(line + n, sizeof line - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    if (!control[0]) return;
    control_path(path, sizeof path, "trace");
    int fd = open(path, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0) return;
    /* One write of a line under PIPE_BUF with O_APPEND: lines of several processes never mix. */
    if (write(fd, line, (size_t)n) < 0) { /* nothing to do: the trace is best effort */ }
    close(fd);
}

static void find_control(void) {
    const char *env = getenv("FAKENVML_DIR");
    control[0] = 0;
    if (env && env[0]) {
        snprintf(control, sizeof control, "%s", env);
        return;
    }
    Dl_info info;
    if (!dladdr((void *)find_control, &info) || !info.dli_fname) return;
    char dir[PATH_MAX], root[PATH_MAX];
    snprintf(dir, sizeof dir, "%s", info.dli_fname);
    char *slash = strrchr(dir, '/');
    if (!slash) return;
    *slash = 0;
    char resolved[PATH_MAX];
    if (snprintf(root, sizeof root, "%s/%s", dir, FAKE_ROOT_FROM_LIB) >= (int)sizeof root ||
        snprintf(control, sizeof control, "%s/run/fakenvml", realpath(root, resolved) ? resolved : root) >=
            (int)sizeof control)
        control[0] = 0; /* too long to be a path: no control directory */
}

static int read_gpu_count(void) {
    char path[PATH_MAX + 16], text[32] = {0};
    control_path(path, sizeof path, "gpus");
    int fd = control[0] ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return 0;
    ssize_t n = read(fd, text, sizeof text - 1);
    close(fd);
    char *end;
    long value = strtol(text, &end, 10);
    if (n <= 0 || end == text || value < 0 || value > MAX_GPUS) return -1;
    return (int)value;
}

/* -- the events file ------------------------------------------------------------------------ */
enum op { OP_NONE, OP_XID, OP_DBE, OP_SBE, OP_ACTION, OP_RESET, OP_BAD };
struct fault {
    enum op op;
    int gpu;
    unsigned long long value;
};

static int parse_gpu(const char *token) {
    if (!token) return -1;
    if (strncmp(token, "GPU-", 4) == 0) {
        for (int i = 0; i < gpu_count; i++)
            if (strcmp(token, DGX_H100[i].uuid) == 0) return i;
        return -1;
    }
    char *end;
    long index = strtol(token, &end, 10);
    return (*token && !*end && index >= 0 && index < gpu_count) ? (int)index : -1;
}

static int parse_number(const char *token, unsigned long long *out) {
    if (!token || !*token || *token == '-') return -1;
    char *end;
    *out = strtoull(token, &end, 10);
    return *end ? -1 : 0;
}

static struct fault parse_line(const char *line) {
    struct fault f = {OP_BAD, -1, 0};
    char copy[256];
    while (*line == ' ' || *line == '\t') line++;
    if (!*line || *line == '#') return (struct fault){OP_NONE, -1, 0};
    if (strlen(line) >= sizeof copy) return f;
    strcpy(copy, line);
    char *save, *word = strtok_r(copy, " \t\r", &save);
    char *gpu = strtok_r(NULL, " \t\r", &save), *arg = strtok_r(NULL, " \t\r", &save);
    char *extra = strtok_r(NULL, " \t\r", &save);
    if (!word || extra || (f.gpu = parse_gpu(gpu)) < 0) return (struct fault){OP_BAD, -1, 0};
    int wants_arg = strcmp(word, "xid") == 0 || strcmp(word, "action") == 0;
    if (wants_arg ? parse_number(arg, &f.value) < 0 || f.value > 0xFFFFFFFFULL : arg != NULL)
        return (struct fault){OP_BAD, -1, 0};
    if (strcmp(word, "xid") == 0) f.op = OP_XID;
    else if (strcmp(word, "dbe") == 0) f.op = OP_DBE;
    else if (strcmp(word, "sbe") == 0) f.op = OP_SBE;
    else if (strcmp(word, "action") == 0) f.op = OP_ACTION;
    else if (strcmp(word, "reset") == 0) f.op = OP_RESET;
    else f.op = OP_BAD;
    return f;
}

typedef int (*line_fn)(const char *line, void *context); /* non-zero: stop after this line */

/* Calls fn on each whole line of the events file from *offset on, moving *offset past it. */
static void each_new_line(long long *offset, line_fn fn, void *context) {
    char path[PATH_MAX + 16], buf[4096];
    control_path(path, sizeof path, "events");
    int fd = control[0] ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return;
    long long size = lseek(fd, 0, SEEK_END); /* lseek, not fstat: loads with a glibc older than 2.33 */
    if (size >= 0 && size < *offset) *offset = size; /* truncated: start over at its end */
    for (;;) {
        ssize_t n = pread(fd, buf, sizeof buf - 1, *offset);
        if (n <= 0) break;
        buf[n] = 0;
        char *start = buf, *newline;
        int stop = 0;
        while (!stop && (newline = memchr(start, '\n', (size_t)(buf + n - start)))) {
            *newline = 0;
            *offset += newline - start + 1;
            stop = fn(start, context);
            start = newline + 1;
        }
        if (stop) break;
        if (start == buf) {
            if (n < (ssize_t)sizeof buf - 1) break; /* a line still being written */
            *offset += n; /* a line longer than any fault: skipped (its tail then fails to parse) */
            trace("ignored: a line longer than %zu bytes", sizeof buf - 1);
        }
    }
    close(fd);
}

static int apply_line(const char *line, void *context) {
    (void)context;
    struct fault f = parse_line(line);
    if (f.op == OP_NONE) return 0;
    if (f.op == OP_BAD) {
        trace("ignored: %.200s", line);
        return 0;
    }
    struct fake_gpu *g = &gpus[f.gpu];
    switch (f.op) {
    case OP_XID:
        if (f.value == XID_FALLEN_OFF_THE_BUS) g->lost = 1;
        break;
    case OP_DBE:
    case OP_SBE: {
        int type = f.op == OP_DBE; /* nvmlMemoryErrorType_t: 0 corrected, 1 uncorrected */
        g->ecc[type][0]++;
        g->ecc[type][1]++;
        break;
    }
    case OP_ACTION:
        g->action = (unsigned int)f.value;
        break;
    case OP_RESET:
        g->lost = 0;
        g->ecc[0][0] = g->ecc[1][0] = 0;
        g->action = 0;
        break;
    default:
        break;
    }
    return 0;
}

/* Brings this process's view of the devices up to the events file. Under the lock. */
static void sync_state(void) { each_new_line(&state_offset, apply_line, NULL); }

/* -- common checks ------------------------------------------------------------------------- */
static int valid_device(nvmlDevice_t d) {
    for (int i = 0; i < gpu_count; i++)
        if (d == &gpus[i]) return 1;
    return 0;
}

/* The checks every device query makes, in NVML's order; returns with the lock held on success. */
static int enter_device(nvmlDevice_t d, const void *out) {
    pthread_mutex_lock(&lock);
    int rc = NVML_SUCCESS;
    if (!init_count) rc = NVML_ERROR_UNINITIALIZED;
    else if (!valid_device(d) || !out) rc = NVML_ERROR_INVALID_ARGUMENT;
    else {
        sync_state();
        if (d->lost) rc = NVML_ERROR_GPU_IS_LOST;
    }
    if (rc != NVML_SUCCESS) pthread_mutex_unlock(&lock);
    return rc;
}

static int leave(int rc) {
    pthread_mutex_unlock(&lock);
    return rc;
}

static int copy_string(char *out, unsigned int length, const char *value) {
    if (strlen(value) + 1 > length) return NVML_ERROR_INSUFFICIENT_SIZE;
    memcpy(out, value, strlen(value) + 1);
    return NVML_SUCCESS;
}

static void pci_info(nvmlPciInfo_t *pci, unsigned int bus, unsigned int id, unsigned int subsys) {
    memset(pci, 0, sizeof *pci);
    pci->domain = 0;
    pci->bus = bus;
    pci->device = 0;
    pci->pciDeviceId = id;
    pci->pciSubSystemId = subsys;
    snprintf(pci->busIdLegacy, sizeof pci->busIdLegacy, "0000:%02X:00.0", bus);
    snprintf(pci->busId, sizeof pci->busId, "00000000:%02X:00.0", bus);
}

/* -- init and shutdown ----------------------------------------------------------------------- */
int nvmlInitWithFlags(unsigned int flags) {
    (void)flags;
    pthread_mutex_lock(&lock);
    if (!init_count) {
        find_control();
        int count = read_gpu_count();
        if (count < 0) {
            fprintf(stderr, "fakenvml: %s/gpus must hold a GPU count from 0 to %d\n", control, MAX_GPUS);
            return leave(NVML_ERROR_UNKNOWN);
        }
        if (count != gpu_count) {
            /* A driver root rebuilt with another count: a new machine, so a clean one. */
            memset(gpus, 0, sizeof gpus);
            state_offset = 0;
        }
        gpu_count = count;
        for (int i = 0; i < MAX_GPUS; i++) gpus[i].index = i;
        trace("init gpus=%d", gpu_count);
    }
    init_count++;
    return leave(NVML_SUCCESS);
}

int nvmlInit_v2(void) { return nvmlInitWithFlags(0); }

int nvmlShutdown(void) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    if (--init_count == 0) {
        while (sets) {
            struct fake_set *next = sets->next;
            free(sets);
            sets = next;
        }
    }
    return leave(NVML_SUCCESS);
}

const char *nvmlErrorString(int result) {
    switch (result) {
    case NVML_SUCCESS: return "Success";
    case NVML_ERROR_UNINITIALIZED: return "Uninitialized";
    case NVML_ERROR_INVALID_ARGUMENT: return "Invalid Argument";
    case NVML_ERROR_NOT_SUPPORTED: return "Not Supported";
    case NVML_ERROR_NOT_FOUND: return "Not Found";
    case NVML_ERROR_INSUFFICIENT_SIZE: return "Insufficient Size";
    case NVML_ERROR_TIMEOUT: return "Timeout";
    case NVML_ERROR_GPU_IS_LOST: return "GPU is lost";
    case NVML_ERROR_UNKNOWN: return "Unknown Error";
    default: return "Unknown Error";
    }
}

/* -- system and device queries --------------------------------------------------------------- */
int nvmlSystemGetDriverVersion(char *version, unsigned int length) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    if (!version) return leave(NVML_ERROR_INVALID_ARGUMENT);
    return leave(copy_string(version, length, FAKE_DRIVER_VERSION));
}

int nvmlDeviceGetCount_v2(unsigned int *count) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    if (!count) return leave(NVML_ERROR_INVALID_ARGUMENT);
    *count = (unsigned int)gpu_count; /* a lost GPU is still counted: nvidia-smi lists it as lost */
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetHandleByIndex_v2(unsigned int index, nvmlDevice_t *device) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    if (index >= (unsigned int)gpu_count || !device) return leave(NVML_ERROR_INVALID_ARGUMENT);
    sync_state();
    /* "Unable to determine the device handle for GPU ...: GPU is lost", as nvidia-smi says. */
    if (gpus[index].lost) return leave(NVML_ERROR_GPU_IS_LOST);
    *device = &gpus[index];
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetUUID(nvmlDevice_t device, char *uuid, unsigned int length) {
    int rc = enter_device(device, uuid);
    return rc ? rc : leave(copy_string(uuid, length, DGX_H100[device->index].uuid));
}

int nvmlDeviceGetName(nvmlDevice_t device, char *name, unsigned int length) {
    int rc = enter_device(device, name);
    return rc ? rc : leave(copy_string(name, length, H100_NAME));
}

int nvmlDeviceGetMinorNumber(nvmlDevice_t device, unsigned int *minor) {
    int rc = enter_device(device, minor);
    if (rc) return rc;
    *minor = (unsigned int)device->index;
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetPciInfo_v3(nvmlDevice_t device, nvmlPciInfo_t *pci) {
    int rc = enter_device(device, pci);
    if (rc) return rc;
    pci_info(pci, DGX_H100[device->index].bus, H100_SXM_PCI_ID, DGX_H100_SUBSYS_ID);
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetMemoryInfo(nvmlDevice_t device, nvmlMemory_t *memory) {
    int rc = enter_device(device, memory);
    if (rc) return rc;
    memory->total = H100_MEMORY;
    memory->used = IDLE_USED;
    memory->free = H100_MEMORY - IDLE_USED;
    return leave(NVML_SUCCESS);
}

/* What gpu-feature-discovery asks besides the plugin: the CUDA version the driver supports and each
 * GPU's compute capability (both as recorded: 13.0 and 9.0), and the fabric, which a GPU outside an
 * NVLink domain does not have (nvidia-smi -q: "Fabric ... N/A"; NVML: not supported). */
static int cuda_driver_version(int *version) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    if (!version) return leave(NVML_ERROR_INVALID_ARGUMENT);
    *version = 13000;
    return leave(NVML_SUCCESS);
}
int nvmlSystemGetCudaDriverVersion(int *version) { return cuda_driver_version(version); }
int nvmlSystemGetCudaDriverVersion_v2(int *version) { return cuda_driver_version(version); }

int nvmlDeviceGetCudaComputeCapability(nvmlDevice_t device, int *major, int *minor) {
    int rc = enter_device(device, major && minor ? major : NULL);
    if (rc) return rc;
    *major = 9;
    *minor = 0;
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetGpuFabricInfo(nvmlDevice_t device, void *info) {
    int rc = enter_device(device, info);
    return rc ? rc : leave(NVML_ERROR_NOT_SUPPORTED);
}
int nvmlDeviceGetGpuFabricInfoV(nvmlDevice_t device, void *info) { return nvmlDeviceGetGpuFabricInfo(device, info); }

int nvmlDeviceGetMigMode(nvmlDevice_t device, unsigned int *current, unsigned int *pending) {
    int rc = enter_device(device, current && pending ? current : NULL);
    if (rc) return rc;
    *current = *pending = 0;
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetMaxMigDeviceCount(nvmlDevice_t device, unsigned int *count) {
    int rc = enter_device(device, count);
    if (rc) return rc;
    *count = 0; /* "zero if MIG is not supported or enabled" (nvml.h), as recorded */
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetMigDeviceHandleByIndex(nvmlDevice_t device, unsigned int index, nvmlDevice_t *mig) {
    (void)index;
    int rc = enter_device(device, mig);
    return rc ? rc : leave(NVML_ERROR_NOT_FOUND); /* recorded for index 0 with MIG off */
}

int nvmlDeviceGetGpuInstanceId(nvmlDevice_t device, unsigned int *id) {
    int rc = enter_device(device, id);
    return rc ? rc : leave(NVML_ERROR_NOT_SUPPORTED); /* not a MIG device handle */
}

int nvmlDeviceGetComputeInstanceId(nvmlDevice_t device, unsigned int *id) {
    int rc = enter_device(device, id);
    return rc ? rc : leave(NVML_ERROR_NOT_SUPPORTED);
}

int nvmlDeviceGetSupportedEventTypes(nvmlDevice_t device, unsigned long long *types) {
    int rc = enter_device(device, types);
    if (rc) return rc;
    *types = SUPPORTED_EVENTS;
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetTotalEccErrors(nvmlDevice_t device, unsigned int errorType, unsigned int counterType,
                                unsigned long long *count) {
    int rc = enter_device(device, count);
    if (rc) return rc;
    if (errorType > 1 || counterType > 1) return leave(NVML_ERROR_INVALID_ARGUMENT);
    *count = device->ecc[errorType][counterType];
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetRemappedRows(nvmlDevice_t device, unsigned int *corrected, unsigned int *uncorrected,
                              unsigned int *pending, unsigned int *failure) {
    int rc = enter_device(device, corrected && uncorrected && pending && failure ? corrected : NULL);
    if (rc) return rc;
    *corrected = *uncorrected = *pending = *failure = 0;
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetRetiredPagesPendingStatus(nvmlDevice_t device, unsigned int *pending) {
    int rc = enter_device(device, pending);
    return rc ? rc : leave(NVML_ERROR_NOT_SUPPORTED); /* recorded: Hopper remaps rows instead */
}

int nvmlDeviceGetFieldValues(nvmlDevice_t device, int count, nvmlFieldValue_t *values) {
    int rc = enter_device(device, values);
    if (rc) return rc;
    if (count <= 0) return leave(NVML_ERROR_INVALID_ARGUMENT);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    for (int i = 0; i < count; i++) {
        nvmlFieldValue_t *v = &values[i];
        v->timestamp = (long long)now.tv_sec * 1000000 + now.tv_nsec / 1000;
        v->latencyUsec = 0;
        memset(&v->value, 0, sizeof v->value);
        /* The call succeeds and each field carries its own answer. */
        if (v->fieldId == FI_DEV_GET_GPU_RECOVERY_ACTION) {
            v->valueType = VALUE_TYPE_UNSIGNED_INT;
            v->value.uiVal = device->action;
            v->nvmlReturn = NVML_SUCCESS;
        } else {
            v->nvmlReturn = v->fieldId >= FI_MAX ? NVML_ERROR_INVALID_ARGUMENT : NVML_ERROR_NOT_SUPPORTED;
        }
    }
    return leave(NVML_SUCCESS);
}

/* -- topology ---------------------------------------------------------------------------------- */
static int nvswitch_of(unsigned int link) {
    int first = 0;
    for (int s = 0; s < 4; s++) {
        if ((int)link < first + NVSWITCH_LINKS[s]) return s;
        first += NVSWITCH_LINKS[s];
    }
    return -1;
}

int nvmlDeviceGetNvLinkState(nvmlDevice_t device, unsigned int link, unsigned int *active) {
    int rc = enter_device(device, active);
    if (rc) return rc;
    if (link >= NVLINK_MAX_LINKS) return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (link >= H100_NVLINKS) return leave(NVML_ERROR_NOT_SUPPORTED);
    *active = 1;
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetNvLinkRemotePciInfo_v2(nvmlDevice_t device, unsigned int link, nvmlPciInfo_t *pci) {
    int rc = enter_device(device, pci);
    if (rc) return rc;
    if (link >= NVLINK_MAX_LINKS) return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (link >= H100_NVLINKS) return leave(NVML_ERROR_NOT_SUPPORTED);
    pci_info(pci, NVSWITCH_BUS[nvswitch_of(link)], NVSWITCH_PCI_ID, DGX_H100_SUBSYS_ID);
    return leave(NVML_SUCCESS);
}

int nvmlDeviceGetTopologyCommonAncestor(nvmlDevice_t device1, nvmlDevice_t device2, unsigned int *level) {
    int rc = enter_device(device1, level);
    if (rc) return rc;
    if (!valid_device(device2)) return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (device2->lost) return leave(NVML_ERROR_GPU_IS_LOST);
    int a = device1->index, b = device2->index;
    /* nvmlGpuTopologyLevel_t: INTERNAL 0, MULTIPLE (PXB) 20, NODE 40, SYSTEM 50 */
    *level = a == b ? 0 : a / 2 == b / 2 ? 20 : a / 4 == b / 4 ? 40 : 50;
    return leave(NVML_SUCCESS);
}

/* -- events ------------------------------------------------------------------------------------ */
static int valid_set(nvmlEventSet_t set) {
    for (struct fake_set *s = sets; s; s = s->next)
        if (s == set) return 1;
    return 0;
}

static long long events_size(void) {
    char path[PATH_MAX + 16];
    control_path(path, sizeof path, "events");
    int fd = control[0] ? open(path, O_RDONLY | O_CLOEXEC) : -1;
    if (fd < 0) return 0;
    long long size = lseek(fd, 0, SEEK_END);
    close(fd);
    return size > 0 ? size : 0;
}

int nvmlEventSetCreate(nvmlEventSet_t *set) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    if (!set) return leave(NVML_ERROR_INVALID_ARGUMENT);
    struct fake_set *s = calloc(1, sizeof *s);
    if (!s) return leave(NVML_ERROR_UNKNOWN);
    s->offset = events_size(); /* events from before the set existed are never its */
    s->next = sets;
    sets = s;
    *set = s;
    return leave(NVML_SUCCESS);
}

int nvmlEventSetFree(nvmlEventSet_t set) {
    pthread_mutex_lock(&lock);
    if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
    for (struct fake_set **p = &sets; *p; p = &(*p)->next) {
        if (*p == set) {
            *p = set->next;
            free(set);
            return leave(NVML_SUCCESS);
        }
    }
    return leave(NVML_ERROR_INVALID_ARGUMENT);
}

int nvmlDeviceRegisterEvents(nvmlDevice_t device, unsigned long long types, nvmlEventSet_t set) {
    int rc = enter_device(device, set);
    if (rc) return rc;
    if (!valid_set(set)) return leave(NVML_ERROR_INVALID_ARGUMENT);
    if (types & ~SUPPORTED_EVENTS) return leave(NVML_ERROR_NOT_SUPPORTED);
    set->mask[device->index] |= types;
    trace("register gpu=%d mask=0x%llx", device->index, set->mask[device->index]);
    return leave(NVML_SUCCESS);
}

struct delivery {
    nvmlEventSet_t set;
    nvmlEventData_t *data;
    int found;
};

static int deliver_line(const char *line, void *context) {
    struct delivery *d = context;
    struct fault f = parse_line(line);
    unsigned long long type = f.op == OP_XID ? EVENT_XID_CRITICAL
                              : f.op == OP_DBE ? EVENT_DOUBLE_BIT_ECC
                              : f.op == OP_SBE ? EVENT_SINGLE_BIT_ECC : 0;
    if (!type || !(d->set->mask[f.gpu] & type)) return 0;
    d->data->device = &gpus[f.gpu];
    d->data->eventType = type;
    d->data->eventData = f.op == OP_XID ? f.value : 0;
    d->data->gpuInstanceId = d->data->computeInstanceId = WHOLE_GPU;
    d->found = 1;
    trace("event gpu=%d type=0x%llx data=%llu", f.gpu, type, d->data->eventData);
    return 1;
}

static long long now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

int nvmlEventSetWait_v2(nvmlEventSet_t set, nvmlEventData_t *data, unsigned int timeout_ms) {
    long long deadline = now_ms() + timeout_ms;
    for (;;) {
        pthread_mutex_lock(&lock);
        if (!init_count) return leave(NVML_ERROR_UNINITIALIZED);
        if (!valid_set(set) || !data) return leave(NVML_ERROR_INVALID_ARGUMENT);
        sync_state(); /* device state first: a lost GPU's event arrives with the GPU lost */
        struct delivery d = {set, data, 0};
        each_new_line(&set->offset, deliver_line, &d);
        pthread_mutex_unlock(&lock);
        if (d.found) return NVML_SUCCESS;
        long long left = deadline - now_ms();
        if (left <= 0) return NVML_ERROR_TIMEOUT;
        struct timespec pause = {0, (left < 10 ? left : 10) * 1000000L}; /* a driver is woken; we poll */
        nanosleep(&pause, NULL);
    }
}
