// Drives the official socket.io-client for the Rust integration tests.
// Run with: node tests/js/driver.js   (the tests spawn it; it speaks JSON lines)
//
// stdin, one command per line:
//   {"op":"connect","id":"a","url":"http://127.0.0.1:1234/acme","opts":{...}}
//   {"op":"emit","id":"a","req":"r1","event":"message/sendText","args":[{...}],"ack":true,"timeout":5000}
//   {"op":"close","id":"a"}
//   {"op":"connect",...,"recover":true}   opt in to recovery (auth.offset = last offset seen)
//   {"op":"connect",...,"quiet":true}   count data.n instead of reporting events
//   {"op":"summary","id":"a"} → {"type":"summary","count","unique","ordered","recoveries","connects"}
//   {"op":"blink","id":"a"}   {"op":"churn","id":"a","min":200,"max":2000}   {"op":"stop_churn","id":"a"}
//   {"op":"expect","file":"/path/fixture.json"}   Evolution's own emit of a webhook body
// stdout, one report per line:
//   {"id":"a","type":"connect"} | {"id":"a","type":"connect_error","message":"..."}
//   {"id":"a","type":"disconnect","reason":"..."}
//   {"id":"a","type":"event","event":"messages.upsert","text":"<JSON.stringify(args)>"}
//   {"id":"a","type":"ack","req":"r1","text":"<JSON.stringify(args)>"}
//   {"type":"expected","file":"...","text":"..."}
'use strict';
const fs = require('fs');
const readline = require('readline');
const { io } = require('socket.io-client');

const sockets = new Map();
const offsets = new Map();
const churners = new Map();
const tallies = new Map();
const out = (report) => process.stdout.write(JSON.stringify(report) + '\n');

// What Evolution API's built-in socket.io integration emits for a webhook body: since 2.3.7
// `{...extra, event, instance, data, server_url, date_time, sender, apikey}`, so the extra
// keys (those before `event` in the body) first, then the known keys in its order,
// `destination` dropped, absent keys absent.
function evolutionEmit(body) {
  const known = ['event', 'instance', 'data', 'server_url', 'date_time', 'sender', 'apikey'];
  const message = {};
  for (const key of Object.keys(body)) {
    if (key === 'event') break;
    if (!known.includes(key) && key !== 'destination') message[key] = body[key];
  }
  for (const key of known) {
    if (key in body) message[key] = body[key];
  }
  return message;
}

// With "recover": true the client opts in to recovery the way the README shows:
// auth is a function, re-evaluated on every reconnect, carrying the last offset seen.
function connect({ id, url, opts, recover, quiet }) {
  const options = Object.assign({ reconnection: false, forceNew: true, timeout: 5000 }, opts || {});
  if (recover) {
    const base = options.auth || {};
    const state = { last: recover === true ? null : recover };
    offsets.set(id, state);
    options.auth = (cb) => cb(Object.assign({}, base, { offset: state.last ?? '' }));
  }
  const socket = io(url, options);
  sockets.set(id, socket);
  socket.on('connect', () => out({ id, type: 'connect' }));
  socket.on('connect_error', (err) => out({ id, type: 'connect_error', message: String(err && err.message), data: err && err.data }));
  socket.on('disconnect', (reason) => out({ id, type: 'disconnect', reason }));
  const tally = { seen: [], recoveries: 0, connects: 0 };
  tallies.set(id, tally);
  socket.on('connect', () => { tally.connects += 1; });
  socket.onAny((event, ...args) => {
    const state = offsets.get(id);
    if (state && args.length === 2 && typeof args[1] === 'string') state.last = args[1];
    if (!quiet) return out({ id, type: 'event', event, text: JSON.stringify(args) });
    // Quiet clients only count: data.n of every event, and recoveries.
    if (event === 'sidecar.recovery') tally.recoveries += 1;
    else if (args[0] && args[0].data && typeof args[0].data.n === 'number') tally.seen.push(args[0].data.n);
  });
}

// Drops the transport as a network blink would; socket.io-client reconnects by itself.
function blink(id) {
  const socket = sockets.get(id);
  if (socket && socket.io.engine) socket.io.engine.close();
}

// Blinks client `id` every min..max ms until stopped.
function churn({ id, min, max }) {
  const tick = () => {
    if (!churners.has(id)) return;
    blink(id);
    churners.set(id, setTimeout(tick, min + Math.random() * (max - min)));
  };
  churners.set(id, setTimeout(tick, min + Math.random() * (max - min)));
}

function emit({ id, req, event, args, ack, timeout }) {
  const socket = sockets.get(id);
  if (!socket) return out({ id, type: 'error', req, message: 'no such client' });
  if (!ack) {
    socket.emit(event, ...(args || []));
    return out({ id, type: 'emitted', req });
  }
  socket.timeout(timeout || 10000).emit(event, ...(args || []), (err, ...reply) => {
    if (err) out({ id, type: 'ack_timeout', req });
    else out({ id, type: 'ack', req, text: JSON.stringify(reply) });
  });
}

const lines = readline.createInterface({ input: process.stdin });
lines.on('line', (line) => {
  if (!line.trim()) return;
  const command = JSON.parse(line);
  switch (command.op) {
    case 'connect': return connect(command);
    case 'emit': return emit(command);
    case 'blink': blink(command.id); return out({ id: command.id, type: 'blinked' });
    case 'summary': {
      const tally = tallies.get(command.id) || { seen: [], recoveries: 0, connects: 0 };
      const unique = new Set(tally.seen).size;
      let ordered = true;
      for (let i = 1; i < tally.seen.length; i++) if (tally.seen[i] <= tally.seen[i - 1]) ordered = false;
      return out({ id: command.id, type: 'summary', count: tally.seen.length, unique, ordered,
        recoveries: tally.recoveries, connects: tally.connects });
    }
    case 'churn': churn(command); return out({ id: command.id, type: 'churning' });
    case 'stop_churn': {
      clearTimeout(churners.get(command.id));
      churners.delete(command.id);
      return out({ id: command.id, type: 'churn_stopped' });
    }
    case 'close': {
      const socket = sockets.get(command.id);
      if (socket) socket.close();
      sockets.delete(command.id);
      return out({ id: command.id, type: 'closed' });
    }
    case 'expect': {
      const body = JSON.parse(fs.readFileSync(command.file, 'utf8'));
      return out({ type: 'expected', file: command.file, text: JSON.stringify(evolutionEmit(body)) });
    }
    default: return out({ type: 'error', message: `unknown op ${command.op}` });
  }
});
lines.on('close', () => {
  for (const socket of sockets.values()) socket.close();
  process.exit(0);
});
