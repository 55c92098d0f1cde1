#!/usr/bin/env node
// Browser test of the console page (console.html, served by the broker at GET /).
//
//   node .ci/console-test.mjs ./target/release/pubsub
//
// Starts the broker on a free port, drives two pages of Debian's Chromium with playwright-core
// (create, subscribe, publish, invalid JSON, a dropped WebSocket and its resume with since_seq,
// delete) and saves a screenshot to docs/console.png. Then a second broker with API_KEY set: a
// fresh page must ask for the key, refuse a wrong one, and work with the right one. Each broker is
// stopped by its PID, on failure too.
// Environment (all optional):
//   CHROMIUM=/usr/bin/chromium   the browser to drive
//   SCREENSHOT=docs/console.png  where the desktop screenshot goes
//   KEY_SCREENSHOT=PATH          also save the API key prompt (not by default)
//   CONSOLE_HTML=console.html    serve this file at / through a small local proxy in front of
//                                the broker, instead of the copy compiled into the binary (for
//                                iterating on the page without rebuilding)
import { spawn } from 'node:child_process';
import { mkdtempSync, mkdirSync, readFileSync, rmSync } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { tmpdir } from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..');
const BINARY = process.argv[2];
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
const SCREENSHOT = resolve(ROOT, process.env.SCREENSHOT || 'docs/console.png');
const OVERALL_MS = 60_000;
const WAIT_MS = 10_000;        // any single condition
const TOPIC = 'orders';

const servers = [];             // { name, proc, log } of every broker started
const proxies = [];
let context = null, userDataDir = null;
let passed = 0, cleaning = false;

async function stopServer(srv) {
  const { proc } = srv;
  if (proc.exitCode !== null || proc.signalCode !== null) return;
  proc.removeAllListeners('exit');
  const exited = new Promise((r) => proc.once('exit', r));
  process.kill(proc.pid, 'SIGTERM');
  await Promise.race([exited, new Promise((r) => setTimeout(r, 3000))]);
  if (proc.exitCode === null && proc.signalCode === null) process.kill(proc.pid, 'SIGKILL');
}
async function cleanup() {
  if (cleaning) return;
  cleaning = true;
  if (context) await context.close().catch(() => {});
  for (const p of proxies) p.close();
  for (const srv of servers) await stopServer(srv);
  if (userDataDir) rmSync(userDataDir, { recursive: true, force: true });
}
async function fail(message) {
  if (cleaning) return;
  console.error(`\nconsole test FAILED: ${message}`);
  for (const { name, log } of servers) {
    if (log) console.error(`--- ${name} stderr (last lines) ---\n${log.split('\n').slice(-30).join('\n')}`);
  }
  console.error(`console: ${passed} passed, 1 failed`);
  await cleanup();
  process.exit(1);
}
const overall = setTimeout(() => fail(`did not finish within ${OVERALL_MS / 1000} s`), OVERALL_MS);

// One named check: runs fn, counts it, and turns its error into a clear failure.
async function check(name, fn) {
  try { await fn(); } catch (err) { await fail(`${name}: ${err.message.split('\n')[0]}`); }
  passed++;
  console.log(`ok ${passed} - ${name}`);
}
function assert(cond, message) { if (!cond) throw new Error(message); }

// ---- The broker ----
// Starts one broker on a free port (extra environment on top of the test's), and once it listens,
// turns an unexpected exit into a failure. Returns { srv, addr }.
async function startServer(name, extraEnv = {}) {
  const env = { ...process.env, HOST: '127.0.0.1', PORT: '0', LOG_LEVEL: 'info', AUTO_CREATE: 'false', ...extraEnv };
  if (!('API_KEY' in extraEnv)) delete env.API_KEY;
  const proc = spawn(BINARY, [], { env, stdio: ['ignore', 'ignore', 'pipe'] });
  const srv = { name, proc, log: '' };
  servers.push(srv);
  let addr;
  try {
    addr = await new Promise((resolveAddr, reject) => {
      const timer = setTimeout(() => reject(new Error('no "listening on" line within 10 s')), 10_000);
      proc.on('error', (err) => { clearTimeout(timer); reject(err); });
      proc.on('exit', (code, sig) => { clearTimeout(timer); reject(new Error(`broker exited early (${code ?? sig})`)); });
      proc.stderr.setEncoding('utf8');
      proc.stderr.on('data', (chunk) => {
        srv.log += chunk;
        const m = srv.log.match(/listening on (127\.0\.0\.1:\d+)/);
        if (m) { clearTimeout(timer); resolveAddr(m[1]); }
      });
    });
  } catch (err) { await fail(`starting ${BINARY} (${name}): ${err.message}`); }
  proc.removeAllListeners('exit');
  proc.on('exit', (code, sig) => fail(`${name} exited during the test (${code ?? sig})`));
  return { srv, addr };
}

// Optional: serve CONSOLE_HTML at / and pass every other request (WebSocket upgrades included)
// through to the broker, so the page stays same-origin.
// The query (?api_key=) and the headers (X-API-Key) go through unchanged, for REST and upgrades.
function startProxy(backend, file) {
  const [bhost, bport] = backend.split(':');
  const proxy = http.createServer((req, res) => {
    if (req.method === 'GET' && (req.url === '/' || req.url.startsWith('/?'))) {
      res.writeHead(200, { 'Content-Type': 'text/html; charset=utf-8' });
      return res.end(readFileSync(file));
    }
    const up = http.request({ host: bhost, port: bport, method: req.method, path: req.url, headers: req.headers },
      (r) => { res.writeHead(r.statusCode, r.headers); r.pipe(res); });
    up.on('error', () => { res.writeHead(502); res.end(); });
    req.pipe(up);
  });
  proxy.on('upgrade', (req, socket, head) => {
    const up = net.connect(Number(bport), bhost, () => {
      let lines = `${req.method} ${req.url} HTTP/1.1\r\n`;
      for (let i = 0; i < req.rawHeaders.length; i += 2) lines += `${req.rawHeaders[i]}: ${req.rawHeaders[i + 1]}\r\n`;
      up.write(lines + '\r\n'); up.write(head);
      up.pipe(socket); socket.pipe(up);
    });
    up.on('error', () => socket.destroy()); socket.on('error', () => up.destroy());
  });
  proxies.push(proxy);
  return new Promise((r) => proxy.listen(0, '127.0.0.1', () => r(`127.0.0.1:${proxy.address().port}`)));
}

// ---- Page helpers ----
const entry = (attrs) => '#log .entry' + Object.entries(attrs).map(([k, v]) => `[data-${k}="${v}"]`).join('');
const waitFor = (page, selector) => page.waitForSelector(selector, { state: 'attached', timeout: WAIT_MS });
const text = (page, selector) => page.locator(selector).innerText();

async function publishFrom(page, payload, seq) {
  await page.fill('#topic', TOPIC);
  await page.fill('#payload', payload);
  await page.click('#publish');
  await waitFor(page, entry({ dir: 'in', type: 'ack', kind: 'publish', topic: TOPIC, seq }));
}
async function eventSeqs(page) {
  return page.$$eval(entry({ dir: 'in', type: 'event', topic: TOPIC }),
    (els) => els.map((e) => ({ seq: Number(e.dataset.seq), replay: e.dataset.replay === 'true' })));
}

// ---- The test ----
if (!BINARY) await fail('usage: node .ci/console-test.mjs PATH_TO_PUBSUB_BINARY');
// The console's address for a broker: the broker itself, or a proxy serving CONSOLE_HTML.
async function consoleHost(name, addr) {
  const host = process.env.CONSOLE_HTML ? await startProxy(addr, resolve(process.env.CONSOLE_HTML)) : addr;
  console.log(`${name} at ${addr}; console at http://${host}/${process.env.CONSOLE_HTML ? ` (serving ${process.env.CONSOLE_HTML})` : ''}`);
  return host;
}
const { srv: server1, addr } = await startServer('broker');
const host = await consoleHost('broker', addr);
const base = `http://${host}/`;

userDataDir = mkdtempSync(join(tmpdir(), 'console-test-'));
try {
  context = await chromium.launchPersistentContext(userDataDir, {
    executablePath: CHROMIUM,
    headless: true,
    viewport: { width: 1280, height: 800 },
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
           '--disable-component-update', '--disable-sync'],
  });
} catch (err) { await fail(`launching ${CHROMIUM}: ${err.message.split('\n')[0]}`); }

const pageErrors = [];
// Opens the console in a new page; waits for "connected" unless told not to.
async function openConsole(name, { url = base, connected = true, onPage = () => {} } = {}) {
  const page = await context.newPage();
  page.on('pageerror', (err) => pageErrors.push(`${name}: ${err.message}`));
  // Browser console errors are shown for diagnosis (not failures); the 409 and 401s the test
  // provokes on purpose log "Failed to load resource" (and a refused WebSocket upgrade), left out.
  page.on('console', (msg) => {
    const t = msg.text();
    if (msg.type() === 'error' && !t.startsWith('Failed to load resource') && !/WebSocket connection to .* failed: (HTTP Authentication failed|.*response code: 401)/.test(t)) {
      console.log(`  [${name} console] ${t}`);
    }
  });
  onPage(page);
  const res = await page.goto(url);
  assert(res && res.ok(), `GET / answered ${res ? res.status() : 'nothing'} (does the broker serve the console?)`);
  if (connected) await waitFor(page, '#status[data-state="connected"]');
  return page;
}
let p1, p2;
await check('both pages load / and connect to /ws', async () => {
  p1 = await openConsole('page 1');
  p2 = await openConsole('page 2');
  assert(await p1.title() === 'pubsub console', `unexpected title ${await p1.title()}`);
});

await check('create a topic in the UI (201), with the curl line for the real host', async () => {
  await p1.fill('#topic', TOPIC);
  await p1.click('#create');
  await waitFor(p1, entry({ dir: 'in', type: 'rest', status: 201 }));
  const curl = await text(p1, '#teach [data-cmd="curl"] pre');
  const want = `curl -s -X POST http://${host}/topics -H 'Content-Type: application/json' -d '{"name":"${TOPIC}"}'`;
  assert(curl === want, `curl line is ${JSON.stringify(curl)}, expected ${JSON.stringify(want)}`);
  await waitFor(p1, `#topics tr[data-topic="${TOPIC}"]`);
});

await check('creating it again says TOPIC_EXISTS in words', async () => {
  await p1.click('#create');
  await waitFor(p1, entry({ dir: 'in', type: 'rest', status: 409 }));
  const notice = await text(p1, '#notice');
  assert(/already exists/.test(notice), `notice is ${JSON.stringify(notice)}`);
});

await check('subscribe in page 1: frame, websocat and SSE lines, ack', async () => {
  await p1.click('#subscribe');
  await waitFor(p1, entry({ dir: 'in', type: 'ack', kind: 'subscribe', topic: TOPIC }));
  const frame = await text(p1, '#teach [data-cmd="frame"] pre');
  assert(JSON.parse(frame).type === 'subscribe' && JSON.parse(frame).topic === TOPIC, `frame ${frame}`);
  assert(await text(p1, '#teach [data-cmd="websocat"] pre') === `websocat ws://${host}/ws`, 'websocat line');
  const sse = await text(p1, '#teach [data-cmd="sse"] pre');
  assert(sse === `curl -N http://${host}/topics/${TOPIC}/events`, `SSE line ${sse}`);
});

await check('publish from page 2 arrives in page 1 as seq 1', async () => {
  await publishFrom(p2, '{"amount": 99.5}', 1);
  const rest = await text(p2, '#teach [data-cmd="rest"] pre');
  assert(rest === `curl -s -X POST http://${host}/topics/${TOPIC}/messages -H 'Content-Type: application/json' -d '{"payload":{"amount":99.5}}'`,
    `REST publish line ${rest}`);
  await waitFor(p1, entry({ dir: 'in', type: 'event', topic: TOPIC, seq: 1 }));
  const seqs = await eventSeqs(p1);
  assert(seqs.length === 1 && !seqs[0].replay, `events ${JSON.stringify(seqs)}`);
});

await check('invalid JSON payload: a message in words, nothing sent', async () => {
  const sentBefore = await p2.evaluate(() => window.consoleState.sent);
  const outBefore = await p2.locator('#log .entry[data-dir="out"]').count();
  await p2.fill('#payload', '{"amount": }');
  await p2.click('#publish');
  await p2.waitForFunction(() => /not valid JSON/.test(document.getElementById('payload-error').textContent),
    null, { timeout: WAIT_MS });
  const words = await text(p2, '#payload-error');
  assert(/^Payload is not valid JSON: .+/.test(words), `message ${JSON.stringify(words)}`);
  assert(await p2.evaluate(() => window.consoleState.sent) === sentBefore, 'a frame was sent');
  assert(await p2.locator('#log .entry[data-dir="out"]').count() === outBefore, 'a frame was logged as sent');
});

await check('drop page 1, publish seq 2 and 3 while it is down, it resumes with since_seq 1', async () => {
  await p1.evaluate(() => { window.consoleState.pauseReconnect = true; window.consoleState.ws.close(); });
  await waitFor(p1, '#status[data-state="reconnecting"]');
  await publishFrom(p2, '{"amount": 2}', 2);
  await publishFrom(p2, '{"amount": 3}', 3);
  assert(await p1.evaluate(() => window.consoleState.ws.readyState) === 3, 'page 1 reconnected too early');
  await p1.evaluate(() => { window.consoleState.pauseReconnect = false; });
  await waitFor(p1, '#status[data-state="connected"]');
  const resume = await waitFor(p1, entry({ dir: 'note', type: 'resume', topic: TOPIC }));
  const [replayed, missed, words] = await resume.evaluate((e) => [e.dataset.replayed, e.dataset.missed, e.textContent]);
  assert(replayed === '2' && missed === '0', `resume says replayed=${replayed} missed=${missed}: ${words}`);
  assert(/2 replayed, 0 missed/.test(words), `resume note ${JSON.stringify(words)}`);
  const frames = await p1.$$eval(entry({ dir: 'out', type: 'subscribe', topic: TOPIC }), (els) => els.map((e) => e.querySelector('code').textContent));
  const resumeFrame = JSON.parse(frames[frames.length - 1]);
  assert(resumeFrame.since_seq === 1 && !('last_n' in resumeFrame), `resume frame ${frames[frames.length - 1]}`);
  await waitFor(p1, entry({ dir: 'in', type: 'event', topic: TOPIC, seq: 3, replay: 'true' }));
});

await check('after the resume, live events continue with no gap or duplicate', async () => {
  await publishFrom(p2, '{"amount": 4, "note": "live again"}', 4);
  await waitFor(p1, entry({ dir: 'in', type: 'event', topic: TOPIC, seq: 4 }));
  const seqs = await eventSeqs(p1);
  const want = [[1, false], [2, true], [3, true], [4, false]];
  assert(JSON.stringify(seqs.map((s) => [s.seq, s.replay])) === JSON.stringify(want), `page 1 saw ${JSON.stringify(seqs)}`);
  assert(await p1.locator(entry({ type: 'gap' })).count() === 0, 'the log reports a gap');
  assert(await p1.evaluate((t) => window.consoleState.lastSeq[t], TOPIC) === 4, 'lastSeq is not 4');
});

await check('the topic list shows counts from /stats', async () => {
  await p1.waitForFunction((t) => {
    const row = document.querySelector(`#topics tr[data-topic="${t}"]`);
    return row && row.cells[2].textContent === '4' && row.cells[1].textContent === '1';
  }, TOPIC, { timeout: WAIT_MS });
});

await check(`desktop screenshot saved to ${SCREENSHOT}`, async () => {
  mkdirSync(dirname(SCREENSHOT), { recursive: true });
  await p1.screenshot({ path: SCREENSHOT });
});

await check('phone width (375 px): no horizontal scrolling, controls reachable', async () => {
  await p2.setViewportSize({ width: 375, height: 740 });
  const width = await p2.evaluate(() => document.documentElement.scrollWidth);
  assert(width <= 375, `page is ${width} px wide`);
  for (const id of ['#topic', '#subscribe', '#payload', '#publish', '#log']) {
    const box = await p2.locator(id).boundingBox();
    assert(box && box.x >= 0 && box.x + box.width <= 375, `${id} is outside the screen`);
  }
  if (process.env.PHONE_SCREENSHOT) await p2.screenshot({ path: resolve(process.env.PHONE_SCREENSHOT), fullPage: true });
});

await check('delete the topic: page 1 is told and forgets the subscription', async () => {
  await p2.fill('#topic', TOPIC);
  await p2.click('#delete');
  await waitFor(p2, entry({ dir: 'in', type: 'rest', status: 200 }));
  await waitFor(p1, entry({ dir: 'in', type: 'info', msg: 'topic_deleted', topic: TOPIC }));
  assert(await p1.evaluate((t) => !(t in window.consoleState.lastSeq), TOPIC), 'page 1 still holds the subscription');
});

await check('no uncaught errors in the pages', async () => {
  assert(pageErrors.length === 0, pageErrors.join('; '));
});

// ---- Phase 2: a broker with API_KEY ----
const KEY = 'open-sesame';
await p1.close();
await p2.close();
await stopServer(server1);
const { addr: keyAddr } = await startServer('broker with API_KEY', { API_KEY: KEY });
const keyHost = await consoleHost('broker with API_KEY', keyAddr);
const keyBase = `http://${keyHost}/`;
const visible = (page, selector) => page.waitForSelector(selector, { state: 'visible', timeout: WAIT_MS });
let k;
const traffic = { requests: [], sockets: [] };    // what page k asked of the broker, in order

await check('API_KEY: REST without the key is 401 UNAUTHORIZED, with it (header or query) 200', async () => {
  for (const [how, url, headers, want] of [['no key', `${keyBase}stats`, {}, 401],
    ['X-API-Key header', `${keyBase}stats`, { 'X-API-Key': KEY }, 200],
    ['?api_key=', `${keyBase}stats?api_key=${encodeURIComponent(KEY)}`, {}, 200],
    ['health, open', `${keyBase}health`, {}, 200]]) {
    const res = await fetch(url, { headers });
    assert(res.status === want, `${how}: ${res.status}, expected ${want}`);
    if (want === 401) {
      const body = await res.json();
      assert(body.error && body.error.code === 'UNAUTHORIZED', `401 body ${JSON.stringify(body)}`);
    } else await res.arrayBuffer();
  }
});

await check('a fresh page asks for the key, in words, and loads no data', async () => {
  k = await openConsole('key page', { url: keyBase, connected: false, onPage: (page) => {
    page.on('request', (r) => traffic.requests.push(`${r.method()} ${r.url()}`));
    page.on('websocket', (ws) => traffic.sockets.push(ws.url()));
  } });
  await visible(k, '#api-key');
  await visible(k, '#api-key-save');
  const why = await text(k, '#key-panel');
  assert(why.includes('This broker requires an API key (API_KEY). Enter it to continue.'), `prompt says ${JSON.stringify(why)}`);
  assert(await text(k, '#api-key-msg') === '', 'a refusal is shown before any key was entered');
  await waitFor(k, '#status[data-state="locked"]');
  assert(await k.locator('#topics tbody tr').count() === 0, 'the topic list has rows');
  assert(await k.locator(entry({ type: 'event' })).count() === 0, 'events were logged');
  assert(/needs the API key/.test(await text(k, '#stats-error')), 'the topic list does not say why it is empty');
  assert(await k.evaluate(() => document.activeElement.id) === 'api-key', 'the key input does not have the focus');
  if (process.env.KEY_SCREENSHOT) await k.screenshot({ path: resolve(process.env.KEY_SCREENSHOT) });
});

await check('while it waits for the key it stops polling /stats and reconnecting', async () => {
  const before = [traffic.requests.length, traffic.sockets.length];
  const skipped = await k.evaluate(() => window.consoleState.skippedPolls);
  // Two ticks of the 2 s topic-list timer: a reconnect (every 0.5–5 s) or a poll would show.
  await k.waitForFunction((n) => window.consoleState.skippedPolls >= n + 2, skipped, { timeout: WAIT_MS });
  const after = [traffic.requests.length, traffic.sockets.length];
  assert(after[0] === before[0] && after[1] === before[1],
    `requests ${traffic.requests.slice(before[0]).join(', ') || 'none'}; WebSockets ${traffic.sockets.slice(before[1]).join(', ') || 'none'}`);
  assert(await k.evaluate(() => window.consoleState.ws.readyState) === 3, 'the WebSocket is not closed');
});

await check('a wrong key is refused: the prompt stays, says so, and the key is not kept', async () => {
  await k.fill('#api-key', 'wrong-key');
  await k.click('#api-key-save');
  await k.waitForFunction(() => /refused that key/.test(document.getElementById('api-key-msg').textContent), null, { timeout: WAIT_MS });
  await visible(k, '#api-key');
  assert(await k.locator('#key-panel').isVisible(), 'the key form is hidden');
  assert(await k.locator('#status[data-state="locked"]').count() === 1, `status is ${await text(k, '#status')}`);
  assert(await k.evaluate(() => window.consoleState.apiKey) === '', 'the wrong key is still in use');
  assert(await k.evaluate(() => Object.keys(sessionStorage).length) === 0, 'the wrong key is in sessionStorage');
  assert(await k.locator(entry({ type: 'key', refused: 'true' })).count() === 1, 'the log does not say the key was refused');
});

await check('the right key: the form goes, the page connects, the topic list loads', async () => {
  await k.fill('#api-key', KEY);
  await k.click('#api-key-save');
  await waitFor(k, '#status[data-state="connected"]');
  await k.waitForSelector('#key-panel', { state: 'hidden', timeout: WAIT_MS });
  await k.waitForFunction(() => /No topics yet/.test(document.querySelector('#topics tbody').textContent), null, { timeout: WAIT_MS });
  assert(await text(k, '#stats-error') === '', `stats error ${await text(k, '#stats-error')}`);
  assert(await text(k, '#stats-cmd') === `curl -s http://${keyHost}/stats -H 'X-API-Key: ${KEY}'`, `stats line ${await text(k, '#stats-cmd')}`);
  assert(traffic.sockets.at(-1) === `ws://${keyHost}/ws?api_key=${KEY}`, `WebSocket URL ${traffic.sockets.at(-1)}`);
  assert(await k.evaluate(() => Object.values(sessionStorage)) + '' === KEY, 'the key is not in sessionStorage');
  assert(await k.locator('#api-key').inputValue() === '', 'the key stays in the input');
});

await check('with the key: create, subscribe and publish; the commands carry the key; event seq 1', async () => {
  await k.fill('#topic', TOPIC);
  await k.click('#create');
  await waitFor(k, entry({ dir: 'in', type: 'rest', status: 201 }));
  const curl = await text(k, '#teach [data-cmd="curl"] pre');
  const want = `curl -s -X POST http://${keyHost}/topics -H 'X-API-Key: ${KEY}' -H 'Content-Type: application/json' -d '{"name":"${TOPIC}"}'`;
  assert(curl === want, `curl line is ${JSON.stringify(curl)}, expected ${JSON.stringify(want)}`);
  await waitFor(k, `#topics tr[data-topic="${TOPIC}"]`);
  await k.click('#subscribe');
  await waitFor(k, entry({ dir: 'in', type: 'ack', kind: 'subscribe', topic: TOPIC }));
  const websocat = await text(k, '#teach [data-cmd="websocat"] pre');
  assert(websocat === `websocat 'ws://${keyHost}/ws?api_key=${KEY}'`, `websocat line ${websocat}`);
  const sse = await text(k, '#teach [data-cmd="sse"] pre');
  assert(sse === `curl -N 'http://${keyHost}/topics/${TOPIC}/events?api_key=${KEY}'`, `SSE line ${sse}`);
  await publishFrom(k, '{"amount": 1}', 1);
  const rest = await text(k, '#teach [data-cmd="rest"] pre');
  assert(rest === `curl -s -X POST http://${keyHost}/topics/${TOPIC}/messages -H 'X-API-Key: ${KEY}' -H 'Content-Type: application/json' -d '{"payload":{"amount":1}}'`,
    `REST publish line ${rest}`);
  await waitFor(k, entry({ dir: 'in', type: 'event', topic: TOPIC, seq: 1 }));
  const seqs = await eventSeqs(k);
  assert(seqs.length === 1 && seqs[0].seq === 1 && !seqs[0].replay, `events ${JSON.stringify(seqs)}`);
  assert(!(await text(k, '#log')).includes(KEY), 'the log shows the key');
});

await check('a reload keeps the key (sessionStorage): connected with no prompt', async () => {
  await k.reload();
  await waitFor(k, '#status[data-state="connected"]');
  assert(!(await k.locator('#key-panel').isVisible()), 'the key form is shown after a reload');
  await waitFor(k, `#topics tr[data-topic="${TOPIC}"]`);
});

await check('"Forget API key" stops using it: the prompt comes back', async () => {
  await k.click('#api-key-forget');
  await visible(k, '#api-key');
  await waitFor(k, '#status[data-state="locked"]');
  assert(await text(k, '#api-key-msg') === '', 'a forgotten key is reported as refused');
  assert(await k.evaluate(() => Object.keys(sessionStorage).length) === 0, 'sessionStorage still holds the key');
});

await check('no uncaught errors in the API key page', async () => {
  assert(pageErrors.length === 0, pageErrors.join('; '));
});

clearTimeout(overall);
await cleanup();
console.log(`console: ${passed} passed, 0 failed`);
