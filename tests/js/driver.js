// Drives the official socket.io-client for the Rust integration tests.
// Run with: node tests/js/driver.js   (the tests spawn it; it speaks JSON lines)
//
// stdin, one command per line:
//   {"op":"connect","id":"a","url":"http://127.0.0.1:1234/acme","opts":{...}}
//   {"op":"emit","id":"a","req":"r1","event":"message/sendText","args":[{...}],"ack":true,"timeout":5000}
//   {"op":"close","id":"a"}
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
const out = (report) => process.stdout.write(JSON.stringify(report) + '\n');

// What Evolution API's built-in socket.io integration emits for a webhook body: the
// known keys in its order, `destination` dropped, absent keys absent.
function evolutionEmit(body) {
  const message = {};
  for (const key of ['event', 'instance', 'data', 'server_url', 'date_time', 'sender', 'apikey']) {
    if (key in body) message[key] = body[key];
  }
  return message;
}

function connect({ id, url, opts }) {
  const options = Object.assign({ reconnection: false, forceNew: true, timeout: 5000 }, opts || {});
  const socket = io(url, options);
  sockets.set(id, socket);
  socket.on('connect', () => out({ id, type: 'connect' }));
  socket.on('connect_error', (err) => out({ id, type: 'connect_error', message: String(err && err.message), data: err && err.data }));
  socket.on('disconnect', (reason) => out({ id, type: 'disconnect', reason }));
  socket.onAny((event, ...args) => out({ id, type: 'event', event, text: JSON.stringify(args) }));
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
