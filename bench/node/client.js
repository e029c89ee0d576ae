// Allocate, GetPreferredAllocation and the no-op PreStartContainer against one plugin socket, timed
// from a client whose own cost per call is small (Node's event loop, no GIL): the figures are the
// server's round trip. Usage: node client.js <socket> <proto> <n> <id>... ; prints one JSON line.
"use strict";
const grpc = require("@grpc/grpc-js");
const loader = require("@grpc/proto-loader");

const [socket, proto, nText, ...ids] = process.argv.slice(2);
const n = Number(nText);
const pkg = grpc.loadPackageDefinition(loader.loadSync(proto, { keepCase: true }));
const Stub = pkg.v1beta1.DevicePlugin;
const client = new Stub(`unix:${socket}`, grpc.credentials.createInsecure());

function call(method, request) {
  return new Promise((resolve, reject) => {
    const t0 = process.hrtime.bigint();
    client[method](request, (err) => {
      if (err) reject(err);
      else resolve(Number(process.hrtime.bigint() - t0) / 1e9);
    });
  });
}

async function series(method, make, count) {
  for (let i = 0; i < 50; i++) await call(method, make(i));  // warm-up: connection, first-call paths
  const out = [];
  for (let i = 0; i < count; i++) out.push(await call(method, make(i)));
  return out;
}

(async () => {
  const alloc = await series("Allocate", (i) => ({
    container_requests: [{ devices_ids: [ids[i % ids.length]] }],
  }), n);
  const noop = await series("PreStartContainer", () => ({ devices_ids: [ids[0]] }), n);
  const preferred = {};
  for (const size of [1, 2, 4, 8].filter((s) => s <= ids.length)) {
    preferred[size] = await series("GetPreferredAllocation", () => ({
      container_requests: [{ available_deviceIDs: ids, must_include_deviceIDs: [], allocation_size: size }],
    }), Math.max(200, Math.floor(n / 5)));
  }
  process.stdout.write(JSON.stringify({ allocate: alloc, noop, preferred }) + "\n");
  client.close();
})().catch((e) => { process.stderr.write(`${e.stack || e}\n`); process.exit(1); });
