// Posts one webhook body `attempts` times with Node's own `http` client (what Evolution's
// axios uses: the whole body given to `req.end`), one connection per attempt, and prints
// one JSON line: what each attempt saw, a status code or the error code (EPIPE, ...).
//
//   node webhook_refusal.js <url> <body bytes> <attempts> [content-type]
const http = require("node:http");

const [url, bytes, attempts, contentType = "application/json"] = process.argv.slice(2);

function body(size) {
  const head = '{"event":"messages.upsert","instance":"acme","data":{"pad":"';
  const tail = '"}}';
  const pad = Math.max(0, size - head.length - tail.length);
  return Buffer.from(head + "a".repeat(pad) + tail);
}

function attempt(payload) {
  return new Promise((resolve) => {
    let settled = false;
    const settle = (outcome) => {
      if (!settled) {
        settled = true;
        resolve(outcome);
      }
    };
    const req = http.request(url, {
      method: "POST",
      agent: false,
      headers: { "content-type": contentType, "content-length": payload.length },
    });
    req.on("response", (res) => {
      res.resume();
      res.on("end", () => settle(res.statusCode));
      res.on("error", () => settle(res.statusCode));
    });
    req.on("error", (err) => settle(err.code || String(err)));
    req.setTimeout(20000, () => {
      settle("TIMEOUT");
      req.destroy();
    });
    req.end(payload);
  });
}

(async () => {
  const payload = body(Number(bytes));
  const seen = [];
  for (let i = 0; i < Number(attempts); i++) {
    seen.push(await attempt(payload));
  }
  process.stdout.write(JSON.stringify(seen) + "\n");
})();
