// Allocate, GetPreferredAllocation and the no-op PreStartContainer against one plugin socket, timed
// from a C++ client (Debian's libgrpc++): its own cost per call is a few tens of microseconds, so
// the figures are the server's. `serve` runs a C++ server that answers every call with nothing: the
// client and transport floor, the least any server can show here.
//   client <socket> <n> <id>...   prints one JSON line of seconds per call
//   serve <socket>                 prints "ready", serves until killed
//   watch <socket>                 a ListAndWatch stream: per update, a line "<unix time> <unhealthy IDs>"
//                                  (the time it arrived, CLOCK_REALTIME, as the kubelet simulator stamps)
#include <grpcpp/grpcpp.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <string>
#include <vector>

#include "api.grpc.pb.h"

using v1beta1::DevicePlugin;

namespace {

class Noop final : public DevicePlugin::Service {
  grpc::Status Allocate(grpc::ServerContext*, const v1beta1::AllocateRequest*,
                        v1beta1::AllocateResponse*) override { return grpc::Status::OK; }
  grpc::Status PreStartContainer(grpc::ServerContext*, const v1beta1::PreStartContainerRequest*,
                                 v1beta1::PreStartContainerResponse*) override { return grpc::Status::OK; }
  grpc::Status GetPreferredAllocation(grpc::ServerContext*, const v1beta1::PreferredAllocationRequest*,
                                      v1beta1::PreferredAllocationResponse*) override { return grpc::Status::OK; }
};

std::vector<double> series(int count, const std::function<grpc::Status()>& call) {
  for (int i = 0; i < 50; i++) call();  // warm-up: connection, first-call paths
  std::vector<double> out;
  out.reserve(count);
  for (int i = 0; i < count; i++) {
    auto t0 = std::chrono::steady_clock::now();
    grpc::Status s = call();
    auto t1 = std::chrono::steady_clock::now();
    if (!s.ok()) {
      std::fprintf(stderr, "call failed: %d %s\n", s.error_code(), s.error_message().c_str());
      std::exit(1);
    }
    out.push_back(std::chrono::duration<double>(t1 - t0).count());
  }
  return out;
}

void print(const char* name, const std::vector<double>& v, bool last = false) {
  std::printf("\"%s\":[", name);
  for (size_t i = 0; i < v.size(); i++) std::printf(i ? ",%.9f" : "%.9f", v[i]);
  std::printf("]%s", last ? "" : ",");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc >= 3 && std::string(argv[1]) == "serve") {
    Noop service;
    grpc::ServerBuilder builder;
    builder.AddListeningPort(std::string("unix:") + argv[2], grpc::InsecureServerCredentials());
    builder.RegisterService(&service);
    auto server = builder.BuildAndStart();
    if (!server) return 1;
    std::printf("ready\n");
    std::fflush(stdout);
    server->Wait();
    return 0;
  }
  if (argc >= 3 && std::string(argv[1]) == "watch") {
    auto stub = DevicePlugin::NewStub(
        grpc::CreateChannel(std::string("unix:") + argv[2], grpc::InsecureChannelCredentials()));
    grpc::ClientContext ctx;
    auto reader = stub->ListAndWatch(&ctx, v1beta1::Empty());
    v1beta1::ListAndWatchResponse resp;
    while (reader->Read(&resp)) {
      double now = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
      std::printf("%.6f", now);
      for (const auto& d : resp.devices())
        if (d.health() != "Healthy") std::printf(" %s", d.id().c_str());
      std::printf("\n");
      std::fflush(stdout);
    }
    return reader->Finish().ok() ? 0 : 1;
  }
  if (argc < 5 || std::string(argv[1]) != "client") {
    std::fprintf(stderr, "usage: client <socket> <n> <id>... | serve <socket> | watch <socket>\n");
    return 2;
  }
  std::string socket = argv[2];
  int n = std::atoi(argv[3]);
  std::vector<std::string> ids(argv + 4, argv + argc);
  auto stub = DevicePlugin::NewStub(grpc::CreateChannel("unix:" + socket, grpc::InsecureChannelCredentials()));

  size_t next = 0;
  auto alloc = series(n, [&] {
    v1beta1::AllocateRequest req;
    req.add_container_requests()->add_devices_ids(ids[next++ % ids.size()]);
    v1beta1::AllocateResponse resp;
    grpc::ClientContext ctx;
    return stub->Allocate(&ctx, req, &resp);
  });
  auto noop = series(n, [&] {
    v1beta1::PreStartContainerRequest req;
    req.add_devices_ids(ids[0]);
    v1beta1::PreStartContainerResponse resp;
    grpc::ClientContext ctx;
    return stub->PreStartContainer(&ctx, req, &resp);
  });
  std::printf("{");
  print("allocate", alloc);
  print("noop", noop);
  std::printf("\"preferred\":{");
  bool first = true;
  for (int size : {1, 2, 4, 8}) {
    if (size > static_cast<int>(ids.size())) continue;
    v1beta1::PreferredAllocationRequest req;
    auto* c = req.add_container_requests();
    for (auto& id : ids) c->add_available_deviceids(id);
    c->set_allocation_size(size);
    auto samples = series(n / 5 > 200 ? n / 5 : 200, [&] {
      v1beta1::PreferredAllocationResponse resp;
      grpc::ClientContext ctx;
      return stub->GetPreferredAllocation(&ctx, req, &resp);
    });
    std::printf(first ? "" : ",");
    first = false;
    std::printf("\"%d\":", size);
    std::printf("[");
    for (size_t i = 0; i < samples.size(); i++) std::printf(i ? ",%.9f" : "%.9f", samples[i]);
    std::printf("]");
  }
  std::printf("}}\n");
  return 0;
}
