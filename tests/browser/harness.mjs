// The browser tests' harness: a redis-server of their own, the real dispatchd
// binary with its own configuration and ports, Debian's chromium through
// playwright-core (never a browser download), and real SIP calls placed with
// `dispatchd simulate call`.

import { spawn, spawnSync } from 'node:child_process';
import { createHash } from 'node:crypto';
import { mkdtempSync, writeFileSync, openSync } from 'node:fs';
import { createServer } from 'node:net';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const ROOT = resolve(fileURLToPath(new URL('.', import.meta.url)), '..', '..');
export const BIN = process.env.DISPATCHD_BIN || join(ROOT, 'target', 'debug', 'dispatchd');
export const ADMIN_TOKEN = 'browser-admin-token';
// Phone screenshots: into target/ on every run; into docs/console/ (the
// README's) with UPDATE_SCREENSHOTS=1.
export const SCREENSHOTS = process.env.UPDATE_SCREENSHOTS ? join(ROOT, 'docs', 'console') : join(ROOT, 'target', 'console-screenshots');

const sha256 = (s) => createHash('sha256').update(s).digest('hex');
export const tokenOf = (id) => `token-${id}`;
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

/** A port free on 127.0.0.1 (TCP; the SIP line is UDP on the same number). */
export function freePort() {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.on('error', fail);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address();
      s.close(() => ok(port));
    });
  });
}

export async function waitUntil(what, ms, f) {
  const end = Date.now() + ms;
  for (;;) {
    try {
      if (await f()) return;
    } catch {
      // not yet
    }
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

export class Redis {
  static async start() {
    const r = new Redis();
    r.port = await freePort();
    r.dir = mkdtempSync(join(tmpdir(), 'dispatchd-browser-redis-'));
    r.proc = spawn('redis-server', ['--port', String(r.port), '--bind', '127.0.0.1', '--save', '',
      '--appendonly', 'yes', '--appendfsync', 'always', '--dir', r.dir], { stdio: 'ignore' });
    await waitUntil('redis', 10_000, () => spawnSync('redis-cli', ['-p', String(r.port), 'PING']).stdout.toString().includes('PONG'));
    return r;
  }
  get url() { return `redis://127.0.0.1:${this.port}/0`; }
  stop() { this.proc.kill('SIGKILL'); }
}

/** The real binary, with the roster `[[id, tier]]` (skills "*", token `token-<id>`). */
export class Daemon {
  static async start(redis, { roster = [['r-alpha', 1]], ackTimeout = '30s', extra = '' } = {}) {
    const d = new Daemon();
    d.dir = mkdtempSync(join(tmpdir(), 'dispatchd-browser-'));
    [d.sipPort, d.wsPort, d.httpPort] = [await freePort(), await freePort(), await freePort()];
    const responders = roster.map(([id, tier]) =>
      `[[responder]]\nid = "${id}"\nname = "${id}"\ntoken_sha256 = "${sha256(tokenOf(id))}"\nskills = ["*"]\ntier = ${tier}\n`).join('\n');
    const escalation = ['critical', 'high', 'medium', 'low']
      .map((s) => `[escalation.${s}]\nack_timeout = "${ackTimeout}"\nmax_rounds = 3\n`).join('\n');
    d.config = join(d.dir, 'dispatchd.toml');
    writeFileSync(d.config, `
[sip]
udp = "127.0.0.1:${d.sipPort}"
tcp = ""
allow = ["127.0.0.0/8"]
[redis]
url = "${redis.url}"
prefix = "b"
[responders]
listen = "127.0.0.1:${d.wsPort}"
heartbeat = "2s"
[http]
listen = "127.0.0.1:${d.httpPort}"
admin_token_sha256 = "${sha256(ADMIN_TOKEN)}"
[privacy]
caller_key = "browser-test-caller-key-0123"
[log]
level = "info"
[shutdown]
drain = "3s"
[[ivr]]
path = "2"
category = "outage"
severity = "high"
instructions = "Confirm the affected area."
[[ivr]]
path = "2,1"
category = "outage"
severity = "critical"
instructions = "Isolate the affected feeder and report to the duty manager."
[correlation.repeat]
enabled = false
[correlation.surge]
enabled = false
${escalation}
${responders}
${extra}
`);
    await d.spawn();
    return d;
  }

  get consoleBase() { return `http://127.0.0.1:${this.wsPort}`; }
  link(id) { return `${this.consoleBase}/#token=${tokenOf(id)}`; }

  async spawn() {
    const log = openSync(join(this.dir, 'dispatchd.log'), 'a');
    this.proc = spawn(BIN, ['run', '--config', this.config], { stdio: ['ignore', log, log] });
    await waitUntil('dispatchd ready', 20_000, async () => (await this.http('GET', '/readyz')).status === 200);
  }

  /** kill -9: no goodbye. */
  kill9() {
    this.proc.kill('SIGKILL');
    return new Promise((r) => this.proc.once('exit', r));
  }

  async restart() { await this.spawn(); }

  async stop() {
    if (this.proc.exitCode === null) {
      this.proc.kill('SIGTERM');
      await new Promise((r) => this.proc.once('exit', r));
    }
  }

  async http(method, path, body) {
    const res = await fetch(`http://127.0.0.1:${this.httpPort}${path}`, {
      method,
      headers: { Authorization: `Bearer ${ADMIN_TOKEN}`, ...(body ? { 'Content-Type': 'application/json' } : {}) },
      body: body ? JSON.stringify(body) : undefined,
    });
    const text = await res.text();
    let json = null;
    try { json = JSON.parse(text); } catch { /* not JSON */ }
    return { status: res.status, json, text };
  }

  async incident(id) {
    const r = await this.http('GET', `/v1/incidents/${id}`);
    if (r.status !== 200) throw new Error(`GET ${id}: ${r.status} ${r.text}`);
    return r.json;
  }

  /** A real SIP call (decline mode: INVITE, 603 with the id, ACK); returns the incident id. */
  call(ivr = '2,1', caller = '+442071234567') {
    const out = spawnSync(BIN, ['simulate', 'call', '--to', `127.0.0.1:${this.sipPort}`, '--ivr', ivr, '--caller', caller]);
    const text = out.stdout.toString() + out.stderr.toString();
    const m = text.match(/incident (INC-[0-9A-Z]+)/);
    if (out.status !== 0 || !m) throw new Error(`simulate call failed: ${text}`);
    return m[1];
  }
}

/** Debian's chromium, headless, as the machine's probe ran it. */
export async function browser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
      '--disable-component-update', '--disable-sync', '--autoplay-policy=no-user-gesture-required'],
  });
}

/** Spies the console's alarm (Web Audio oscillators started) and system
 * notifications (ServiceWorkerRegistration.showNotification), and lets a test
 * make the page look hidden. Installed before any of the page's scripts. */
export const SPIES = () => {
  window.__spy = { tones: 0, notifications: [], vibrations: 0 };
  const start = OscillatorNode.prototype.start;
  OscillatorNode.prototype.start = function (...a) { window.__spy.tones += 1; return start.apply(this, a); };
  const show = ServiceWorkerRegistration.prototype.showNotification;
  ServiceWorkerRegistration.prototype.showNotification = function (title, options) {
    window.__spy.notifications.push({ title, ...options, data: options && options.data });
    return show.call(this, title, options).catch(() => undefined);
  };
  if (navigator.vibrate) {
    const vib = navigator.vibrate.bind(navigator);
    navigator.vibrate = (p) => { window.__spy.vibrations += 1; return vib(p); };
  }
  let hidden = false;
  Object.defineProperty(Document.prototype, 'visibilityState', { get: () => (hidden ? 'hidden' : 'visible'), configurable: true });
  Object.defineProperty(Document.prototype, 'hidden', { get: () => hidden, configurable: true });
  window.__setHidden = (h) => { hidden = h; document.dispatchEvent(new Event('visibilitychange')); };
};

export { sleep };
