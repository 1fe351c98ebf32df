// The inspector page in headless Chromium, against the real binary and a fake Evolution API.
//
//   tests/browser/run.sh            (installs chromium and playwright-core, builds, runs)
//   node --test tests/browser/      (when all of that is already there)
//
// Environment: EVO_REALTIME_BIN (default target/debug/evo-realtime), CHROMIUM (default
// `command -v chromium`). Screenshots go to artifacts/: inspector.png (1280x900),
// inspector-dark.png, inspector-360.png (360x800), inspector-360-full.png (the whole page at
// 360 px), inspector-wrong-key.png (the error a wrong key shows) and inspector-instances.png
// (the Instances panel with a silent instance).

import { after, before, test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { existsSync, mkdirSync, readdirSync, readFileSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '../..');
const BIN = process.env.EVO_REALTIME_BIN || path.join(ROOT, 'target/debug/evo-realtime');
const FIXTURES = path.join(ROOT, 'tests/fixtures/webhooks');
const ARTIFACTS = path.join(ROOT, 'artifacts');
const INSTANCE = 'acme-support';
const TOKEN = 'acme-token-4567';
const GLOBAL_KEY = 'global-key-0123';
const PATIENCE = 10_000;

// ---- the fake Evolution API ----

/** Answers fetchInstances per key (401 otherwise) and sendText with a 201 echo; records calls. */
function fakeEvolution() {
  const calls = [];
  const server = http.createServer((req, res) => {
    let body = '';
    req.setEncoding('utf8');
    req.on('data', (chunk) => { body += chunk; });
    req.on('end', () => {
      const url = new URL(req.url, 'http://fake');
      const apikey = req.headers.apikey ?? '';
      calls.push({ method: req.method, path: url.pathname, apikey, body });
      const reply = (status, value) => {
        res.writeHead(status, { 'content-type': 'application/json' });
        res.end(JSON.stringify(value));
      };
      if (req.method === 'GET' && url.pathname === '/instance/fetchInstances') {
        if (apikey === TOKEN) {
          return reply(200, [{ id: 'id-acme', name: INSTANCE, connectionStatus: 'open', token: TOKEN }]);
        }
        if (apikey === GLOBAL_KEY) {
          return reply(200, [{ id: 'id-acme', name: INSTANCE, connectionStatus: 'open', token: TOKEN }]);
        }
        return reply(401, { status: 401, error: 'Unauthorized', response: { message: 'Unauthorized' } });
      }
      const send = url.pathname.match(/^\/message\/sendText\/([^/]+)$/);
      if (req.method === 'POST' && send) {
        if (apikey !== TOKEN) return reply(401, { status: 401, error: 'Unauthorized' });
        const sent = JSON.parse(body || '{}');
        return reply(201, {
          key: { remoteJid: `${sent.number}@s.whatsapp.net`, fromMe: true, id: 'BAE5TEST0000001' },
          message: { conversation: sent.text },
          messageType: 'conversation',
          status: 'PENDING',
          instance: decodeURIComponent(send[1]),
        });
      }
      reply(404, { status: 404, error: 'Not Found' });
    });
  });
  return { server, calls };
}

function listen(server) {
  return new Promise((resolve) => server.listen(0, '127.0.0.1', () => resolve(server.address().port)));
}

function freePort() {
  return new Promise((resolve, reject) => {
    const probe = net.createServer();
    probe.once('error', reject);
    probe.listen(0, '127.0.0.1', () => {
      const { port } = probe.address();
      probe.close(() => resolve(port));
    });
  });
}

async function waitFor(check, what, timeout = PATIENCE) {
  const deadline = Date.now() + timeout;
  for (;;) {
    try {
      if (await check()) return;
    } catch { /* not yet */ }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

// ---- the sidecar binary ----

async function startSidecar(upstreamPort, extraEnv = {}) {
  if (!existsSync(BIN)) throw new Error(`${BIN} is missing: run \`cargo build\` first (tests/browser/run.sh does)`);
  const port = await freePort();
  const child = spawn(BIN, [], {
    env: {
      PATH: process.env.PATH,
      RUST_LOG: process.env.RUST_LOG || 'warn',
      SIDECAR_LISTEN: `127.0.0.1:${port}`,
      SIDECAR_UPSTREAM_URL: `http://127.0.0.1:${upstreamPort}`,
      AUTHENTICATION_API_KEY: GLOBAL_KEY,
      SIDECAR_SHUTDOWN_GRACE_SECS: '1',
      ...extraEnv,
    },
    stdio: ['ignore', 'inherit', 'pipe'],
  });
  let stderr = '';
  child.stderr.on('data', (chunk) => { stderr += chunk; process.stderr.write(chunk); });
  const exited = new Promise((resolve) => child.once('exit', resolve));
  const base = `http://127.0.0.1:${port}`;
  await waitFor(async () => {
    if (child.exitCode !== null) throw new Error(`evo-realtime exited: ${stderr}`);
    return (await fetch(`${base}/_sidecar/healthz`)).ok;
  }, 'the sidecar to listen');
  return {
    base,
    async stop() {
      if (child.exitCode === null) child.kill('SIGTERM');
      await exited;
    },
  };
}

async function postWebhook(base, body) {
  const response = await fetch(`${base}/_sidecar/webhook`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body,
  });
  assert.equal(response.status, 200, `webhook answered ${response.status}: ${await response.text()}`);
}

// ---- the test ----

let evolution;
let upstreamPort;
let sidecar;
let browser;

before(async () => {
  evolution = fakeEvolution();
  upstreamPort = await listen(evolution.server);
  sidecar = await startSidecar(upstreamPort);
  const executablePath = process.env.CHROMIUM
    || execFileSync('sh', ['-c', 'command -v chromium'], { encoding: 'utf8' }).trim();
  browser = await chromium.launch({
    executablePath,
    headless: true,
    // playwright-core gives each launch a fresh, empty profile directory.
    args: [
      '--no-sandbox', // root in CI
      '--disable-background-networking',
      '--disable-component-update',
      '--disable-sync',
      '--no-first-run',
      '--disable-dev-shm-usage',
    ],
  });
});

after(async () => {
  await browser?.close();
  await sidecar?.stop();
  evolution?.server.close();
});

test('the inspector shows live events, filters, recovers, and sends a test message', async () => {
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: 'light' });
  const page = await context.newPage();
  const problems = [];
  page.on('pageerror', (err) => problems.push(`page error: ${err.message}`));
  page.on('console', (msg) => {
    if (/Content.Security.Policy|Refused to/i.test(msg.text())) problems.push(`console: ${msg.text()}`);
  });

  // Every websocket goes through a pass-through route, so the test can cut the live one.
  let liveSocket = null;
  await page.routeWebSocket(/\/socket\.io\//, (ws) => {
    const server = ws.connectToServer();
    ws.onMessage((message) => {
      if (message === '5') liveSocket = ws; // Engine.IO upgrade: this one carries the traffic
      server.send(message);
    });
  });
  // While `offline`, the socket.io reconnection attempts (long-polling first) fail.
  let offline = false;
  await page.route(/\/socket\.io\//, (route) => (offline ? route.abort('internetdisconnected') : route.continue()));

  const response = await page.goto(`${sidecar.base}/_sidecar/inspector`);
  assert.equal(response.status(), 200);
  const headers = response.headers();
  assert.match(headers['content-security-policy'], /script-src 'self'/);
  assert.doesNotMatch(headers['content-security-policy'], /unsafe-inline/);
  assert.equal(headers['x-content-type-options'], 'nosniff');
  assert.match(headers['content-type'], /^text\/html/);

  const status = page.locator('#status');
  const rows = page.locator('#events > li');
  const visibleRows = page.locator('#events > li:not([hidden])');

  // A wrong key: a clear error on the page, nothing stored.
  await page.fill('#apikey', 'not-a-real-key');
  await page.click('#list');
  const error = page.locator('#connect-error');
  await error.waitFor({ state: 'visible' });
  assert.match(await error.textContent(), /not accepted \(HTTP 401\)/);
  assert.equal(await status.getAttribute('data-state'), 'error');
  assert.equal(await page.isVisible('#instance-form'), false);
  assert.equal(await page.evaluate(() => sessionStorage.length), 0);
  mkdirSync(ARTIFACTS, { recursive: true });
  await page.screenshot({ path: path.join(ARTIFACTS, 'inspector-wrong-key.png') });

  // The right key lists the key's instances through the proxied REST API.
  await page.fill('#apikey', TOKEN);
  await page.click('#list');
  await page.locator('#instance-form').waitFor({ state: 'visible' });
  assert.equal(await error.isVisible(), false);
  assert.deepEqual(await page.$$eval('#instance option', (options) => options.map((o) => o.value)), [INSTANCE]);
  const lookups = evolution.calls.filter((c) => c.path === '/instance/fetchInstances');
  assert.deepEqual(lookups.map((c) => c.apikey).slice(0, 2), ['not-a-real-key', TOKEN]);
  // The key lives in sessionStorage only.
  assert.equal(await page.evaluate(() => Object.values(sessionStorage).includes('acme-token-4567')), true);
  assert.equal(await page.evaluate(() => localStorage.length), 0);

  await page.selectOption('#instance', INSTANCE);
  await page.click('#connect');
  await page.waitForSelector('#status[data-state="connected"]');
  assert.match(await status.textContent(), /Connected to acme-support/);
  await waitFor(() => liveSocket, 'the websocket upgrade');

  // Fixture webhooks appear with their summaries.
  // The six 2.3.6 fixtures (the 2.3.7 and 2.4 ones have their own Rust tests).
  const fixtures = ['connection-update.json', 'messages-update.json', 'messages-upsert.json',
    'presence-update.json', 'qrcode-updated.json', 'send-message.json'];
  for (const file of fixtures) assert.ok(readdirSync(FIXTURES).includes(file), file);
  for (const file of fixtures) await postWebhook(sidecar.base, readFileSync(path.join(FIXTURES, file), 'utf8'));
  await waitFor(async () => (await rows.count()) === fixtures.length, 'six events in the list');

  const summaryOf = (event) => page.locator(`#events > li[data-event="${event}"] .summary`).first().textContent();
  assert.equal(await summaryOf('messages.upsert'), 'from Maria Exemplo (+5564900000001): “Oii”');
  assert.equal(await summaryOf('send.message'), 'to +5511900000002: “Olá! Como posso ajudar?” · PENDING');
  assert.equal(await summaryOf('messages.update'), 'READ · to +5511900000002');
  assert.equal(await summaryOf('connection.update'), 'state: open · Acme Support (+5511900000001)');
  assert.equal(await summaryOf('presence.update'), '+5511900000002 composing');
  assert.match(await summaryOf('qrcode.updated'), /^new QR code/);
  assert.match(await page.locator('#events > li .time').first().textContent(), /^\d\d:\d\d:\d\d\.\d{3}$/);
  // Newest first: the last fixture posted is on top.
  assert.equal(await rows.first().getAttribute('data-event'), 'send.message');

  // Counters per event type, and the rate chart's description.
  await waitFor(async () => (await page.textContent('#total')) === '6 events', 'the total count');
  assert.equal(await page.locator('#counts button.count').count(), 6);
  assert.equal(await page.textContent('#counts button[data-event="messages.upsert"] .n'), '1');
  await waitFor(async () => /peak [1-9]/.test(await page.getAttribute('#rate', 'aria-label')), 'the chart to count');

  // Expanding an event shows its pretty JSON, with its offset.
  const upsert = page.locator('#events > li[data-event="messages.upsert"]');
  await upsert.locator('summary').click();
  const json = upsert.locator('pre.json');
  await json.waitFor({ state: 'visible' });
  const pretty = await json.textContent();
  assert.match(pretty, /\n {2}"event": "messages.upsert",\n/);
  assert.match(pretty, /"conversation": "Oii"/);
  assert.doesNotMatch(pretty, /"destination"/);
  assert.match(pretty, /\/\/ offset \S+-\d+/);
  assert.ok(await upsert.locator('pre.json .j-key').count() > 10, 'keys are highlighted');

  // Filter by event name.
  await page.selectOption('#filter', 'connection.update');
  await waitFor(async () => (await visibleRows.count()) === 1, 'the event filter');
  assert.equal(await visibleRows.first().getAttribute('data-event'), 'connection.update');
  assert.equal(await page.textContent('#shown'), '1 of 6 shown');
  await page.selectOption('#filter', '');
  await waitFor(async () => (await visibleRows.count()) === 6, 'the filter to be cleared');

  // '/' focuses the search (outside fields); free text matches summaries and JSON.
  await page.locator('h1').click();
  await page.keyboard.press('/');
  assert.equal(await page.evaluate(() => document.activeElement.id), 'search');
  await page.keyboard.type('maria');
  await waitFor(async () => (await visibleRows.count()) === 1, 'the search');
  assert.equal(await visibleRows.first().getAttribute('data-event'), 'messages.upsert');
  await page.fill('#search', '3EB0C4D2A1F0E9B8C7D6A5'); // a message id, in the JSON only
  await waitFor(async () => (await visibleRows.count()) === 2, 'a search in the JSON');
  await page.keyboard.press('Escape');
  await waitFor(async () => (await visibleRows.count()) === 6, 'Escape to clear the search');

  // Space pauses (outside fields); events wait, counters go on; Space again resumes.
  // (A space typed in the search field does not pause.)
  await page.focus('#search');
  await page.keyboard.press('Space');
  assert.equal(await page.getAttribute('#pause', 'aria-pressed'), 'false');
  await page.fill('#search', '');
  await page.locator('h1').click();
  await page.keyboard.press('Space');
  assert.equal(await page.getAttribute('#pause', 'aria-pressed'), 'true');
  const second = JSON.parse(readFileSync(path.join(FIXTURES, 'messages-upsert.json'), 'utf8'));
  second.data.key.id = 'SECOND0000000000000000000000001';
  second.data.message.conversation = 'Second message while paused';
  await postWebhook(sidecar.base, JSON.stringify(second));
  await waitFor(async () => (await page.textContent('#pause')) === 'Resume (1 new)', 'the paused count');
  assert.equal(await rows.count(), 6);
  await waitFor(async () => (await page.textContent('#total')) === '7 events', 'the count while paused');
  await page.keyboard.press('Space');
  assert.equal(await page.getAttribute('#pause', 'aria-pressed'), 'false');
  await waitFor(async () => (await rows.count()) === 7, 'the held event after resuming');
  assert.match(await rows.first().locator('.summary').textContent(), /“Second message while paused”/);

  // Recovery: cut the connection, miss two events, and see them replayed on reconnect.
  offline = true;
  await liveSocket.close();
  await page.waitForSelector('#status[data-state="reconnecting"]');
  const missed = ['Missed one', 'Missed two'].map((text, i) => {
    const body = structuredClone(second);
    body.data.key.id = `MISSED00000000000000000000000${i}`;
    body.data.message.conversation = text;
    return JSON.stringify(body);
  });
  for (const body of missed) await postWebhook(sidecar.base, body);
  offline = false;
  await page.waitForSelector('#status[data-state="recovered"]', { timeout: 15_000 });
  assert.equal(await page.textContent('#status-text'), 'Recovered: 2 missed events replayed');
  await waitFor(async () => (await rows.count()) === 9, 'the replayed events');
  assert.deepEqual(
    await page.$$eval('#events > li:nth-child(-n+2)', (items) => items.map((li) => [
      li.querySelector('.summary').textContent, Boolean(li.querySelector('.tag')),
    ])),
    [['from Maria Exemplo (+5564900000001): “Missed two”', true],
      ['from Maria Exemplo (+5564900000001): “Missed one”', true]],
  );

  // A test message through the message/sendText emit, acked from the fake upstream.
  await page.fill('#number', '5511900000002');
  await page.fill('#text', 'Hello from the inspector');
  await page.click('#send');
  const ack = page.locator('#ack-status');
  await waitFor(async () => /^Ack 201 · sent · \d+ ms$/.test(await ack.textContent()), 'the ack');
  assert.equal(await page.getAttribute('#ack', 'data-kind'), 'ok');
  assert.match(await page.textContent('#ack-body'), /"conversation": "Hello from the inspector"/);
  const sent = evolution.calls.find((c) => c.path === `/message/sendText/${INSTANCE}`);
  assert.ok(sent, 'the fake upstream got the send');
  assert.equal(sent.apikey, TOKEN);
  assert.deepEqual(
    (({ number, text }) => ({ number, text }))(JSON.parse(sent.body)),
    { number: '5511900000002', text: 'Hello from the inspector' },
  );

  // Screenshots: desktop (light and dark), then 360 px wide with nothing sticking out sideways.
  await page.evaluate(() => { document.activeElement?.blur(); window.scrollTo(0, 0); });
  await page.screenshot({ path: path.join(ARTIFACTS, 'inspector.png') });
  await page.emulateMedia({ colorScheme: 'dark' });
  await page.waitForTimeout(1100); // the chart picks up the dark colours on its next tick
  await page.screenshot({ path: path.join(ARTIFACTS, 'inspector-dark.png') });
  await page.emulateMedia({ colorScheme: 'light' });
  await page.setViewportSize({ width: 360, height: 800 });
  await page.evaluate(() => window.scrollTo(0, 0));
  await page.waitForTimeout(200); // one layout pass and a chart redraw at the new width
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth);
  assert.ok(overflow <= 360, `the page is ${overflow} px wide at 360 px`);
  await page.screenshot({ path: path.join(ARTIFACTS, 'inspector-360.png') });
  await page.screenshot({ path: path.join(ARTIFACTS, 'inspector-360-full.png'), fullPage: true });

  assert.deepEqual(problems, []);
  await context.close();
});

test('SIDECAR_INSPECTOR=false turns the page off', async () => {
  const off = await startSidecar(upstreamPort, { SIDECAR_INSPECTOR: 'false' });
  try {
    for (const p of ['/_sidecar/inspector', '/_sidecar/inspector/inspector.js']) {
      const response = await fetch(`${off.base}${p}`);
      assert.equal(response.status, 404, p);
    }
  } finally {
    await off.stop();
  }
});

test('the Instances panel shows each instance\'s last event and marks a silent one', async () => {
  const watched = await startSidecar(upstreamPort, {
    SIDECAR_SILENCE_ALERT_SECS: '2',
    WEBSOCKET_ALLOWED_HOSTS: '127.0.0.1',
    WEBSOCKET_GLOBAL_EVENTS: 'true',
  });
  const context = await browser.newContext({ viewport: { width: 1280, height: 900 }, colorScheme: 'light' });
  try {
    const page = await context.newPage();
    await postWebhook(watched.base, readFileSync(path.join(FIXTURES, 'connection-update.json')));
    await page.goto(`${watched.base}/_sidecar/inspector`);
    await page.fill('#apikey', GLOBAL_KEY);
    await page.click('#list');
    const line = page.locator('#activity-list li', { hasText: INSTANCE });
    await line.waitFor({ timeout: PATIENCE });
    assert.match(await line.innerText(), /last event \d+ s ago/);
    assert.match(await line.innerText(), /open/);
    // Nothing more is sent: past SIDECAR_SILENCE_ALERT_SECS the panel marks it silent.
    await waitFor(async () => (await line.getAttribute('class')) === 'silent', 'the silent mark', 15_000);
    assert.match(await line.innerText(), /silent/);
    await page.locator('#activity').screenshot({ path: path.join(ARTIFACTS, 'inspector-instances.png') });

    // Evolution's Manager, from this browser (127.0.0.1 is allowed): no key, namespace /.
    const received = page.evaluate(() => new Promise((resolve, reject) => {
      // eslint-disable-next-line no-undef
      const socket = io(location.origin, { transports: ['websocket', 'polling'], reconnectionAttempts: 5 });
      socket.on('connect_error', (err) => reject(new Error(err.message)));
      socket.on('connect', () => { window.managerConnected = true; });
      socket.on('messages.upsert', (payload) => { resolve(payload.instance); socket.close(); });
    }));
    await waitFor(() => page.evaluate(() => window.managerConnected === true), 'the Manager to connect');
    await postWebhook(watched.base, readFileSync(path.join(FIXTURES, 'messages-upsert.json')));
    assert.equal(await received, INSTANCE);
  } finally {
    await context.close();
    await watched.stop();
  }
});
