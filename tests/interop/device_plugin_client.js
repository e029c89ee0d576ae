// A DevicePlugin client on @grpc/grpc-js: gRPC over Node's own HTTP/2 (nghttp2), an implementation
// apart from grpc core's, which grpcio shares with the C++ client. tests/unit/test_h2grpc_interop.py
// runs it against common/h2grpc.py.
//
//   node device_plugin_client.js <unix socket> <api.proto> <step>...
//
// Steps, run in order, each printing one JSON line {step, code, details, result}:
//   options                       GetDevicePluginOptions
//   allocate:<id>[,<id>...]       Allocate one container request (with metadata x-caller: node, trace-bin)
//   deadline:<ms>:<id>            Allocate with a deadline of <ms>
//   watch:<n>                     ListAndWatch: the first <n> messages (their device counts and sizes), then cancel
'use strict';

const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const [socket, proto, ...steps] = process.argv.slice(2);
const api = grpc.loadPackageDefinition(protoLoader.loadSync(proto, {keepCase: true, defaults: true})).v1beta1;
const client = new api.DevicePlugin(`unix:${socket}`, grpc.credentials.createInsecure());

function report(step, error, result) {
  const line = {step, code: error ? error.code : 0, details: error ? error.details : '', result: result ?? null};
  process.stdout.write(JSON.stringify(line) + '\n');
}

function unary(step, method, request, options = {}) {
  const metadata = new grpc.Metadata();
  metadata.set('x-caller', 'node');
  metadata.set('trace-bin', Buffer.from([0, 255, 16]));
  return new Promise((resolve) => {
    client[method](request, metadata, options, (error, answer) => {
      report(step, error, answer);
      resolve();
    });
  });
}

function watch(step, n) {
  return new Promise((resolve) => {
    const seen = [];
    const call = client.ListAndWatch({});
    call.on('data', (message) => {
      seen.push({devices: message.devices.length, first: message.devices[0]?.ID ?? ''});
      if (seen.length === n) {
        call.cancel();
      }
    });
    call.on('error', (error) => {  // a cancel of ours ends the call with CANCELLED
      report(step, error.code === grpc.status.CANCELLED && seen.length === n ? null : error, seen);
      resolve();
    });
    call.on('end', () => resolve());
  });
}

async function main() {
  for (const step of steps) {
    const [name, arg, more] = step.split(':');
    if (name === 'options') {
      await unary(step, 'GetDevicePluginOptions', {});
    } else if (name === 'allocate') {
      await unary(step, 'Allocate', {container_requests: [{devices_ids: arg.split(',')}]});
    } else if (name === 'deadline') {
      await unary(step, 'Allocate', {container_requests: [{devices_ids: [more]}]},
                  {deadline: new Date(Date.now() + Number(arg))});
    } else if (name === 'watch') {
      await watch(step, Number(arg));
    } else {
      throw new Error(`unknown step ${step}`);
    }
  }
  client.close();
}

main().catch((error) => {
  process.stderr.write(`${error.stack}\n`);
  process.exit(1);
});
