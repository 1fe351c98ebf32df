// Emit→REST round trips next to direct REST calls from the same Node process.
// Run with: cargo run --release --example added_latency   (it starts this script)
//   node examples/added_latency.js <sidecar-url> <upstream-url> <apikey> <calls>
// Calls alternate (emit, direct, emit, direct, ...) so drift affects both alike. Prints one
// JSON object with the samples' median and p99 in ms.
'use strict';
const http = require('http');
const path = require('path');
const { io } = require(path.join(__dirname, '../tests/js/node_modules/socket.io-client'));

const [sidecar, upstream, apikey, callsArg] = process.argv.slice(2);
const calls = Number(callsArg || 1000);
const body = JSON.stringify({ number: '5511900000002', text: 'latency probe' });
const agent = new http.Agent({ keepAlive: true, maxSockets: 1 });

function stats(samples) {
  const sorted = [...samples].sort((a, b) => a - b);
  const at = (q) => sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
  return { median_ms: +at(0.5).toFixed(3), p99_ms: +at(0.99).toFixed(3), n: sorted.length };
}

function direct() {
  return new Promise((resolve, reject) => {
    const started = process.hrtime.bigint();
    const request = http.request(`${upstream}/message/sendText/bench`, {
      method: 'POST', agent, headers: { 'content-type': 'application/json', apikey },
    }, (response) => {
      response.resume();
      response.on('end', () => resolve(Number(process.hrtime.bigint() - started) / 1e6));
    });
    request.on('error', reject);
    request.end(body);
  });
}

async function emit(socket) {
  const started = process.hrtime.bigint();
  const reply = await socket.timeout(10000).emitWithAck('message/sendText', JSON.parse(body));
  if (reply.status !== 201) throw new Error(`unexpected ack ${JSON.stringify(reply)}`);
  return Number(process.hrtime.bigint() - started) / 1e6;
}

(async () => {
  const socket = io(`${sidecar}/bench`, { transports: ['websocket'], query: { apikey } });
  await new Promise((resolve, reject) => { socket.on('connect', resolve); socket.on('connect_error', reject); });
  for (let i = 0; i < 300; i++) { await emit(socket); await direct(); } // warm-up
  const emitted = []; const directs = [];
  for (let i = 0; i < calls; i++) { emitted.push(await emit(socket)); directs.push(await direct()); }
  socket.close(); agent.destroy();
  console.log(JSON.stringify({ calls, direct: stats(directs), emitted: stats(emitted) }));
})().catch((err) => { console.error(err); process.exit(1); });
