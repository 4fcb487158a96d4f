// The responder console in a real browser (Debian's chromium, playwright-core)
// against the real dispatchd binary, a real redis-server and real SIP calls.
// Run by tests/console.rs (cargo test), or here: `node --test` with
// DISPATCHD_BIN pointing at a built binary.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import { Redis, Daemon, browser, SPIES, SCREENSHOTS, waitUntil, sleep } from './harness.mjs';

const require = createRequire(import.meta.url);
const AXE = require.resolve('axe-core/axe.min.js');
const PHONE = { viewport: { width: 390, height: 844 }, deviceScaleFactor: 2, isMobile: true, hasTouch: true };
const T = 10_000;

let chrome;
before(async () => {
  chrome = await browser();
  mkdirSync(SCREENSHOTS, { recursive: true });
});
after(async () => chrome && chrome.close());

/** A console page signed in by link as `id`, with the spies installed. */
async function signedIn(d, id, { clock = false, context: ctxOptions = PHONE } = {}) {
  const context = await chrome.newContext({ ...ctxOptions, permissions: ['notifications'] });
  const page = await context.newPage();
  page.on('pageerror', (e) => console.error(`[${id}] page error: ${e.message}`));
  await page.addInitScript(SPIES);
  if (clock) await page.clock.install();
  await page.goto(d.link(id));
  await page.getByText('Connected', { exact: true }).first().waitFor({ timeout: T });
  return { context, page };
}

async function startShift(page) {
  await page.getByRole('button', { name: 'Start shift', exact: true }).click();
  await page.getByRole('button', { name: 'Available', exact: true }).waitFor({ timeout: T });
}

const dialog = (page) => page.getByRole('alertdialog');

async function axeScan(page, what) {
  // Evaluated through the DevTools protocol: the page's CSP refuses script tags.
  await page.evaluate(readFileSync(AXE, 'utf8'));
  const result = await page.evaluate(async () => window.axe.run(document, { resultTypes: ['violations'] }));
  const bad = result.violations.filter((v) => v.impact === 'serious' || v.impact === 'critical');
  assert.deepEqual(bad.map((v) => `${v.id}: ${v.help} (${v.nodes.length})`), [], `${what}: accessibility violations`);
}

test('sign in by link, a call becomes a dispatch with its alarm, and the crew works it to resolved', async () => {
  const redis = await Redis.start();
  const d = await Daemon.start(redis);
  try {
    const { context, page } = await signedIn(d, 'r-alpha');
    assert.ok(!page.url().includes('token='), `the token is gone from the address bar: ${page.url()}`);
    await page.getByText('r-alpha').first().waitFor({ timeout: T });
    await startShift(page);
    await axeScan(page, 'waiting');
    await page.screenshot({ path: `${SCREENSHOTS}/waiting.png` });

    // A call while the page is hidden: the system notification, the alarm, the dialog.
    await page.evaluate(() => window.__setHidden(true));
    const id = d.call('2,1');
    const dlg = dialog(page);
    await dlg.waitFor({ timeout: T });
    await dlg.getByText(/critical/i).first().waitFor();
    await dlg.getByText('Isolate the affected feeder', { exact: false }).waitFor();
    await dlg.getByText(/answer within/i).waitFor();
    await waitUntil('the alarm', T, () => page.evaluate(() => window.__spy.tones > 0));
    await waitUntil('a notification', T, () => page.evaluate(() => window.__spy.notifications.length > 0));
    const note = await page.evaluate(() => window.__spy.notifications[0]);
    assert.equal(note.tag, `${id}.1`, `tagged by dispatch_id: ${JSON.stringify(note)}`);
    assert.equal(note.requireInteraction, true);
    await page.evaluate(() => window.__setHidden(false));
    const countdown = async () => (await dlg.getByText(/answer within/i).textContent()).trim();
    const first = await countdown();
    // It ticks every second; a loaded machine may delay a tick, not stop it.
    await waitUntil('the countdown moves', 5000, async () => (await countdown()) !== first);
    await axeScan(page, 'dispatch dialog');
    await page.screenshot({ path: `${SCREENSHOTS}/dispatch.png` });

    // Accept: acknowledged in the record; the alarm stops.
    await page.getByRole('button', { name: 'Accept', exact: true }).click();
    await dlg.waitFor({ state: 'hidden', timeout: T });
    await waitUntil('acknowledged', T, async () => (await d.incident(id)).state === 'acknowledged');
    const tones = await page.evaluate(() => window.__spy.tones);
    await sleep(2000);
    assert.equal(await page.evaluate(() => window.__spy.tones), tones, 'no more alarm after Accept');

    // En route with an ETA: in the record, and the caller can be told.
    await page.getByRole('button', { name: 'En route', exact: true }).click();
    await page.getByRole('button', { name: /^10 min/ }).click();
    await waitUntil('en route', T, async () => (await d.incident(id)).state === 'en_route');
    const inc = await d.incident(id);
    const enRoute = inc.timeline.find((e) => e.event === 'en_route');
    assert.equal(enRoute.detail.eta_s, 600, JSON.stringify(enRoute));
    const status = await d.http('GET', `/v1/callers/${encodeURIComponent('+442071234567')}/status`);
    assert.match(status.json.message, /about 10 minutes/, JSON.stringify(status.json));
    await page.screenshot({ path: `${SCREENSHOTS}/en-route.png` });

    await page.getByRole('button', { name: 'On scene', exact: true }).click();
    await waitUntil('on scene', T, async () => (await d.incident(id)).state === 'on_scene');
    await page.getByRole('button', { name: 'Resolved', exact: true }).click();
    await page.getByLabel(/note/i).fill('Feeder isolated, power back.');
    await page.getByRole('button', { name: /send resolved/i }).click();
    await waitUntil('resolved', T, async () => (await d.incident(id)).state === 'resolved');
    const resolved = (await d.incident(id)).timeline.find((e) => e.event === 'resolved');
    assert.equal(resolved.detail.note, 'Feeder isolated, power back.');
    await page.getByRole('heading', { name: 'This shift' }).waitFor();
    await page.getByText(id).first().waitFor();
    await context.close();
  } finally {
    await d.stop();
    redis.stop();
  }
});

test('decline with a reason goes to the next responder; a cancel closes the dialog and says why', async () => {
  const redis = await Redis.start();
  const d = await Daemon.start(redis, { roster: [['r-alpha', 1], ['r-bravo', 2]] });
  try {
    const a = await signedIn(d, 'r-alpha');
    await startShift(a.page);
    const b = await signedIn(d, 'r-bravo');
    await startShift(b.page);
    const id = d.call('2');
    await dialog(a.page).waitFor({ timeout: T });
    await a.page.getByRole('button', { name: 'Decline', exact: true }).click();
    await a.page.getByRole('button', { name: /too far away/i }).click();
    await dialog(a.page).waitFor({ state: 'hidden', timeout: T });
    await dialog(b.page).waitFor({ timeout: T });
    const inc = await d.incident(id);
    const declined = inc.timeline.find((e) => e.event === 'declined');
    assert.match(declined.detail.reason, /too far/i, JSON.stringify(declined));
    assert.equal(inc.assigned_to, 'r-bravo');

    // The control room cancels it while it is offered to bravo.
    const r = await d.http('POST', `/v1/incidents/${id}/cancel`, { note: 'duplicate report' });
    assert.equal(r.status, 200, r.text);
    await dialog(b.page).waitFor({ state: 'hidden', timeout: T });
    await b.page.getByText(/control room closed the incident/i).first().waitFor({ timeout: T });
    await a.context.close();
    await b.context.close();
  } finally {
    await d.stop();
    redis.stop();
  }
});

test('an offer left unanswered shows as expired (the browser clock moved on)', async () => {
  const redis = await Redis.start();
  const d = await Daemon.start(redis, { ackTimeout: '5m' });
  try {
    const { context, page } = await signedIn(d, 'r-alpha', { clock: true });
    await startShift(page);
    d.call('2,1');
    await dialog(page).waitFor({ timeout: T });
    await page.clock.fastForward('05:05');
    await dialog(page).getByText(/expired/i).first().waitFor({ timeout: T });
    assert.equal(await page.getByRole('button', { name: 'Accept', exact: true }).isDisabled(), true);
    await context.close();
  } finally {
    await d.stop();
    redis.stop();
  }
});

test('kill -9 of the daemon with an offer open: the console reconnects by itself and shows the offer once', async () => {
  const redis = await Redis.start();
  const d = await Daemon.start(redis);
  try {
    const { context, page } = await signedIn(d, 'r-alpha');
    await startShift(page);
    const id = d.call('2,1');
    await dialog(page).waitFor({ timeout: T });
    await d.kill9();
    await page.getByText(/reconnecting|offline/i).first().waitFor({ timeout: T });
    await d.restart();
    await page.getByText('Connected', { exact: true }).first().waitFor({ timeout: 30_000 });
    await sleep(3000); // the daemon re-sends the offer on reconnect (and resyncs every 2 s)
    assert.equal(await page.getByRole('alertdialog').count(), 1, 'one dialog');
    await dialog(page).getByText(id).first().waitFor();
    await page.getByRole('button', { name: 'Accept', exact: true }).click();
    await waitUntil('acknowledged', T, async () => (await d.incident(id)).state === 'acknowledged');
    await context.close();
  } finally {
    await d.stop();
    redis.stop();
  }
});

test('a status tapped while the daemon is down is delivered when it is back', async () => {
  const redis = await Redis.start();
  const d = await Daemon.start(redis);
  try {
    const { context, page } = await signedIn(d, 'r-alpha');
    await startShift(page);
    const id = d.call('2,1');
    await dialog(page).waitFor({ timeout: T });
    await page.getByRole('button', { name: 'Accept', exact: true }).click();
    await waitUntil('acknowledged', T, async () => (await d.incident(id)).state === 'acknowledged');
    await d.kill9();
    await page.getByText(/reconnecting|offline/i).first().waitFor({ timeout: T });
    await page.getByRole('button', { name: 'On scene', exact: true }).click();
    await page.getByText(/will be sent when connected/i).first().waitFor({ timeout: T });
    await d.restart();
    await waitUntil('on scene after the restart', 30_000, async () => (await d.incident(id)).state === 'on_scene');
    await context.close();
  } finally {
    await d.stop();
    redis.stop();
  }
});
