// dispatchd responder console: the shift's state, the frames from dispatchd,
// the outgoing queue, and the page. See connection.js (websocket), offer.js
// (the offer dialog), alarm.js (sound), system.js (notifications, wake lock),
// store.js (localStorage), format.js (helpers).

import * as store from './store.js';
import * as alarm from './alarm.js';
import * as sys from './system.js';
import { Connection } from './connection.js';
import { OfferDialog } from './offer.js';
import { clock, fillSeverity, hm, newId, parseTime, sevInfo, str } from './format.js';

const $ = (id) => document.getElementById(id);
const WS_URL = `${location.protocol === 'https:' ? 'wss' : 'ws'}://${location.host}/v1/responders/ws`;

const CANCEL_TEXT = {
  ack_timeout: 'Offer withdrawn: not answered in time',
  declined: 'Offer withdrawn: declined',
  incident_cancelled: 'Offer withdrawn: the control room closed the incident',
  reassigned: 'Offer withdrawn: reassigned',
  released: 'Released: no progress was reported, the incident was offered again',
};
// The current incident's states, in order ('accepting' until the ack is confirmed,
// 'resolving' until resolved is).
const STEP_RANK = { accepting: 0, acknowledged: 1, en_route: 2, on_scene: 3, resolving: 4 };
const STATE_TEXT = { accepting: 'Accepted', acknowledged: 'Accepted', en_route: 'En route', on_scene: 'On scene', resolving: 'Resolved' };
const OUTCOME = { accepting: 'accepted', acknowledged: 'accepted', en_route: 'en route', on_scene: 'on scene', resolving: 'resolved' };
const STATUS_TEXT = { en_route: 'En route', on_scene: 'On scene', resolved: 'Resolved' };
const AVAIL_TEXT = { available: 'Available', busy: 'Busy', off_duty: 'Off duty' };
const UNAVAILABLE_RETRIES = 3;

// ---- State ----------------------------------------------------------------

let token = '';
let shift = store.loadShift(); // persisted for the shift (cleared by Sign out)
const ui = { view: 'signin', conn: 'closed', responderId: null, onShift: false, lastMessageAt: 0, panel: null };
const offers = new Map(); // open, unanswered offers by dispatch_id (arrival order)
const save = () => store.saveShift(shift);

const conn = new Connection(WS_URL, { onState, onMessage, onWelcome, onFrame, onStop });
const dialog = new OfferDialog({ onAccept: accept, onDecline: decline, onDismiss: dismiss }, [$('top'), $('main')]);

// ---- Messages (the aria-live region) -----------------------------------------

function say(text, kind = 'info') {
  const box = $('messages');
  const p = document.createElement('p');
  p.className = `msg msg-${kind}`;
  const t = document.createElement('span');
  t.className = 'msg-time';
  t.textContent = hm(Date.now());
  p.append(t, document.createTextNode(` ${text}`));
  box.prepend(p);
  while (box.children.length > 3) box.lastElementChild.remove();
}

// ---- Sign-in, sign-out, views ------------------------------------------------

function showView(name) {
  ui.view = name;
  $('signin-view').hidden = name !== 'signin';
  $('elsewhere-view').hidden = name !== 'elsewhere';
  $('console-view').hidden = name !== 'console';
  $('signout').hidden = name === 'signin';
}

function signIn(t) {
  token = t;
  store.setToken(t);
  $('signin-error').hidden = true;
  showView('console');
  render();
  conn.start(token);
}

/** Back to the sign-in form, token forgotten (shift data kept unless signing out). */
function toSignIn(message) {
  conn.stop();
  token = '';
  store.clearToken();
  endAllOffers();
  ui.responderId = null;
  ui.onShift = false;
  ui.panel = null;
  sys.releaseWakeLock();
  const err = $('signin-error');
  err.textContent = message || '';
  err.hidden = !message;
  showView('signin');
  render();
  $('token').focus();
}

function signOut() {
  toSignIn('');
  shift = store.emptyShift();
  store.clearShift();
  $('messages').textContent = '';
  render();
}

function tokenFromHash() {
  const h = location.hash.replace(/^#/, '');
  for (const part of h.split('&')) {
    if (!part.startsWith('token=')) continue;
    const raw = part.slice(6);
    try { return decodeURIComponent(raw).trim(); } catch { return raw.trim(); }
  }
  return null;
}

// ---- Connection events --------------------------------------------------------

function onState(s) {
  ui.conn = s;
  render();
}

function onMessage() {
  ui.lastMessageAt = Date.now();
  renderConn();
}

function onWelcome(f) {
  const rid = str(f.responder_id, 200);
  if (rid && shift.responderId && shift.responderId !== rid) {
    shift = store.emptyShift(); // another responder's shift was left here: start afresh
  }
  if (rid) shift.responderId = rid;
  ui.responderId = rid || shift.responderId;
  if (ui.view !== 'console') showView('console');
  // Whatever the server has not confirmed goes (again), in order.
  for (const item of shift.queue) item.sent = false;
  save();
  pump();
  render();
}

function onStop(reason) {
  if (reason === 'refused') {
    toSignIn('That token was refused');
  } else if (reason === 'removed') {
    toSignIn('Removed from the roster: this token no longer works. Ask the control room.');
  } else if (reason === 'replaced') {
    endAllOffers();
    showView('elsewhere');
    render();
    $('use-here').focus();
  }
}

function onFrame(f) {
  try {
    switch (f.type) {
      case 'dispatch': return onDispatch(f);
      case 'cancel': return onCancel(f);
      case 'ok': return onReply(f, true);
      case 'error': return onReply(f, false);
      case 'reminder': return onReminder(f);
      default: return undefined; // unknown frames are ignored
    }
  } catch (e) {
    console.error('dispatchd: frame not handled', e);
    return undefined;
  }
}

// ---- Offers -------------------------------------------------------------------

function onDispatch(f) {
  const id = str(f.dispatch_id, 200);
  if (!id) return;
  // Shown once: not again after an answer, a reconnect or a reload.
  if (shift.answered[id] || offers.has(id) || shift.current?.dispatch_id === id) return;
  const now = Date.now();
  const o = {
    dispatch_id: id,
    incident_id: str(f.incident_id, 200) || id.replace(/\.\d+$/, ''),
    attempt: Number.isFinite(f.attempt) ? f.attempt : 1,
    severity: sevInfo(f.severity).key,
    category: str(f.category, 200),
    summary: str(f.summary),
    instructions: str(f.instructions),
    caller: str(f.caller, 200),
    queue: str(f.queue, 200),
    openedAt: parseTime(f.opened_at),
    ackBy: parseTime(f.ack_by),
    major: f.major === true,
    firstSeen: now,
    notified: false,
  };
  addHistory(o);
  if (o.ackBy <= now) {
    // Sent again after its deadline (e.g. a long reconnect): nothing left to answer.
    answered(id);
    setOutcome(id, 'expired');
    say(`Missed offer ${o.incident_id}: it had expired`);
  } else {
    offers.set(id, o);
    if (!dialog.isOpen() || dialog.expired) showOffer(o);
    if (document.visibilityState === 'hidden') notifyOffer(o);
  }
  save();
  renderHistory();
}

function showOffer(o) {
  dialog.show(o);
  alarm.startAlarm(o.major);
}

function notifyOffer(o) {
  if (o.notified) return;
  o.notified = true;
  const title = `${o.major ? 'MAJOR INCIDENT · ' : ''}${sevInfo(o.severity).word} dispatch: ${o.category || o.incident_id}`;
  const body = [o.summary, Number.isFinite(o.ackBy) ? `Answer by ${clock(o.ackBy)}` : ''].filter(Boolean).join('\n');
  sys.notify(title, body || o.incident_id, o.dispatch_id, { dispatch_id: o.dispatch_id }, () => offers.has(o.dispatch_id));
}

/** An offer is over (answered, cancelled, dismissed): show the next one or close. */
function offerEnded(id, focusTarget) {
  offers.delete(id);
  sys.closeNotification(id);
  if (dialog.offer?.dispatch_id !== id) return;
  const next = offers.values().next().value;
  if (next) {
    showOffer(next);
  } else {
    alarm.stopAlarm();
    dialog.close(focusTarget);
  }
}

function endAllOffers() {
  for (const id of offers.keys()) sys.closeNotification(id);
  offers.clear();
  alarm.stopAlarm();
  dialog.close();
}

function expireOffer(o) {
  offers.delete(o.dispatch_id);
  answered(o.dispatch_id);
  setOutcome(o.dispatch_id, 'expired');
  sys.closeNotification(o.dispatch_id);
  if (dialog.offer?.dispatch_id === o.dispatch_id) {
    const next = offers.values().next().value;
    if (next) {
      say(`Offer ${o.incident_id} expired`);
      showOffer(next);
    } else {
      alarm.stopAlarm();
      dialog.expire();
    }
  }
  save();
  renderHistory();
}

function accept(o) {
  if (Date.now() >= o.ackBy) return; // too late (the tick shows it expired)
  answered(o.dispatch_id);
  shift.current = {
    dispatch_id: o.dispatch_id,
    incident_id: o.incident_id,
    severity: o.severity,
    category: o.category,
    summary: o.summary,
    instructions: o.instructions,
    caller: o.caller,
    queue: o.queue,
    major: o.major,
    state: 'accepting',
    eta_s: null,
    etaAt: null,
    reminder: null,
  };
  ui.panel = null;
  setOutcome(o.dispatch_id, OUTCOME.accepting);
  enqueue({
    kind: 'ack',
    frame: { type: 'ack', dispatch_id: o.dispatch_id },
    label: `Accept ${o.incident_id}`,
    dispatch_id: o.dispatch_id,
    incident_id: o.incident_id,
    ack_by: Number.isFinite(o.ackBy) ? o.ackBy : null,
  });
  render();
  offerEnded(o.dispatch_id, $('current-title'));
}

function decline(o, reason) {
  answered(o.dispatch_id);
  setOutcome(o.dispatch_id, `declined (${reason})`);
  enqueue({
    kind: 'decline',
    frame: { type: 'decline', dispatch_id: o.dispatch_id, reason },
    label: `Decline ${o.incident_id}`,
    dispatch_id: o.dispatch_id,
    incident_id: o.incident_id,
  });
  render();
  offerEnded(o.dispatch_id);
}

function dismiss(o) {
  offerEnded(o.dispatch_id);
}

function onCancel(f) {
  const id = str(f.dispatch_id, 200);
  const reason = str(f.reason, 100);
  const text = CANCEL_TEXT[reason] || (reason ? `Offer withdrawn: ${reason.replace(/_/g, ' ')}` : 'Offer withdrawn');
  if (id) {
    answered(id);
    const h = shift.history.find((e) => e.dispatch_id === id);
    const was = h ? String(h.outcome) : '';
    const keep = was === 'resolved' || (reason === 'declined' && was.startsWith('declined'));
    if (h && !keep) h.outcome = reason === 'released' ? 'released' : text.replace(/^Offer withdrawn/, 'withdrawn');
    if (shift.current?.dispatch_id === id) {
      const hadFocus = $('current-card').contains(document.activeElement);
      dropStatuses(id);
      shift.current = null;
      ui.panel = null;
      renderCurrent();
      if (hadFocus) $('current-title').focus();
    }
    offerEnded(id);
  }
  say(text);
  save();
  render();
}

// ---- The current incident -------------------------------------------------------

function report(status, { eta_s: eta, note } = {}) {
  const c = shift.current;
  if (!c || !STATUS_TEXT[status]) return;
  const prev = c.state;
  c.state = status === 'resolved' ? 'resolving' : status;
  const frame = { type: 'status', incident_id: c.incident_id, status };
  if (status === 'en_route' && Number.isFinite(eta)) {
    frame.eta_s = eta;
    c.eta_s = eta;
    c.etaAt = Date.now();
  }
  if (note) frame.note = note;
  if (c.reminder && STEP_RANK[c.state] >= (STEP_RANK[c.reminder.due] ?? 0)) c.reminder = null;
  ui.panel = null;
  setOutcome(c.dispatch_id, OUTCOME[c.state]);
  enqueue({
    kind: 'status',
    frame,
    label: `${STATUS_TEXT[status]} ${c.incident_id}`,
    dispatch_id: c.dispatch_id,
    incident_id: c.incident_id,
    prev,
  });
  render();
  focusSteps();
}

/** Focus the next step offered, else the section heading. */
function focusSteps() {
  const b = [...$('steps').querySelectorAll('button')].find((x) => x.getClientRects().length > 0);
  (b || $('current-title')).focus();
}

function onReminder(f) {
  const inc = str(f.incident_id, 200);
  const due = STATUS_TEXT[f.due] && f.due !== 'resolved' ? f.due : '';
  const what = due ? `report ${STATUS_TEXT[due]}` : 'report your progress';
  const c = shift.current;
  if (c && c.incident_id === inc) {
    if (due && STEP_RANK[c.state] >= STEP_RANK[due]) return; // already done: a late nudge
    const since = parseTime(f.since);
    c.reminder = { due, since: Number.isFinite(since) ? since : Date.now() };
    save();
    renderCurrent();
    alarm.reminderTone();
    if (document.visibilityState === 'hidden') {
      sys.notify(`Reminder: ${what}`, inc, `reminder-${inc}`, { incident_id: inc }, () => !!shift.current?.reminder);
    }
  }
  say(`Reminder for ${inc || 'your incident'}: ${what}`);
}

// ---- Availability and the shift -------------------------------------------------

function setAvailability(status) {
  if (!AVAIL_TEXT[status]) return;
  const prev = shift.availability;
  shift.availability = status;
  enqueue({ kind: 'availability', frame: { type: 'availability', status }, label: `Availability: ${AVAIL_TEXT[status]}`, prev });
  render();
}

function startShift() {
  // All in the click handler: these need a user gesture.
  alarm.unlockAudio();
  sys.requestNotifications();
  sys.acquireWakeLock();
  sys.registerWorker();
  ui.onShift = true;
  setAvailability('available');
  render();
  $('on-shift').focus();
}

// ---- The outgoing queue ------------------------------------------------------------
// Every frame stays queued (and persisted) until the server's ok/error for its id;
// unsent ones go in order after the next welcome.

function enqueue(item) {
  item.id = newId();
  item.frame.id = item.id;
  item.sent = false;
  item.everSent = false;
  item.tries = 0;
  if (item.kind === 'availability') {
    // Only the latest availability matters.
    shift.queue = shift.queue.filter((i) => i.kind !== 'availability' || i.sent);
  }
  shift.queue.push(item);
  save();
  pump();
}

function pump() {
  if (conn.ready) {
    const now = Date.now();
    for (const item of [...shift.queue]) {
      if (item.sent) continue;
      if (lateAck(item, now)) {
        tooLate(item);
        continue;
      }
      if (!conn.send(item.frame)) break;
      item.sent = true;
      item.everSent = true;
    }
    save();
  }
  renderQueue();
  renderCurrent();
}

/** An ack never sent whose offer's deadline has passed. */
const lateAck = (item, now) => item.kind === 'ack' && !item.everSent && item.ack_by != null && now >= item.ack_by;

function tooLate(item) {
  removeItem(item);
  dropStatuses(item.dispatch_id);
  if (shift.current?.dispatch_id === item.dispatch_id) {
    shift.current = null;
    ui.panel = null;
  }
  setOutcome(item.dispatch_id, 'expired (accepted too late)');
  say('Too late: the offer had expired', 'error');
  save();
  render();
}

function removeItem(item) {
  shift.queue = shift.queue.filter((i) => i !== item);
}

/** Drops queued status reports for a dispatch that is no longer ours. */
function dropStatuses(dispatchId) {
  shift.queue = shift.queue.filter((i) => !(i.kind === 'status' && i.dispatch_id === dispatchId));
}

function onReply(f, ok) {
  const ref = f.ref == null ? '' : String(f.ref);
  const item = ref ? shift.queue.find((i) => i.id === ref) : null;
  const message = str(f.message, 500) || str(f.code, 100) || 'refused';
  if (!item) {
    if (!ok) say(`Error: ${message}`, 'error');
    return;
  }
  if (!ok && f.code === 'unavailable' && item.tries < UNAVAILABLE_RETRIES) {
    // "try again": a little later, a few times.
    item.tries += 1;
    item.sent = false;
    save();
    setTimeout(pump, 2000 * item.tries);
    return;
  }
  removeItem(item);
  if (ok) confirmed(item);
  else refused(item, message);
  save();
  render();
}

function confirmed(item) {
  const c = shift.current;
  const mine = c && c.dispatch_id === item.dispatch_id;
  if (item.kind === 'ack' && mine) {
    if (c.state === 'accepting') c.state = 'acknowledged';
    setOutcome(c.dispatch_id, OUTCOME[c.state]);
    say(`Accepted ${item.incident_id}`);
  } else if (item.kind === 'status' && item.frame.status === 'resolved') {
    if (mine) {
      const hadFocus = $('current-card').contains(document.activeElement);
      shift.current = null;
      ui.panel = null;
      renderCurrent();
      if (hadFocus) $('current-title').focus();
    }
    setOutcome(item.dispatch_id, 'resolved');
    say(`Resolved ${item.incident_id}`);
  }
}

function refused(item, message) {
  const c = shift.current;
  const mine = c && c.dispatch_id === item.dispatch_id;
  if (item.kind === 'ack') {
    if (mine) {
      shift.current = null;
      ui.panel = null;
    }
    dropStatuses(item.dispatch_id);
    setOutcome(item.dispatch_id, `not accepted: ${message}`);
    say(`Accept not taken for ${item.incident_id}: ${message}`, 'error');
  } else if (item.kind === 'status') {
    const after = item.frame.status === 'resolved' ? 'resolving' : item.frame.status;
    if (mine && c.state === after && item.prev) {
      c.state = item.prev;
      setOutcome(c.dispatch_id, OUTCOME[c.state] || c.state);
    }
    say(`${item.label} not taken: ${message}`, 'error');
  } else if (item.kind === 'decline') {
    say(`Decline not taken for ${item.incident_id}: ${message}`, 'error');
  } else if (item.kind === 'availability') {
    if (shift.availability === item.frame.status) shift.availability = item.prev ?? null;
    say(`Availability not changed: ${message}`, 'error');
  }
}

// ---- History ------------------------------------------------------------------------

function answered(id) {
  shift.answered[id] = Date.now();
}

function addHistory(o) {
  if (shift.history.some((h) => h.dispatch_id === o.dispatch_id)) return;
  shift.history.push({
    dispatch_id: o.dispatch_id,
    incident_id: o.incident_id,
    severity: o.severity,
    category: o.category,
    major: o.major,
    at: Date.now(),
    outcome: 'offered',
  });
}

function setOutcome(id, outcome) {
  const h = shift.history.find((e) => e.dispatch_id === id);
  if (h) h.outcome = String(outcome).slice(0, 300);
}

// ---- Rendering ------------------------------------------------------------------------

function render() {
  renderConn();
  renderShift();
  renderQueue();
  renderCurrent();
  renderHistory();
}

function renderConn() {
  let text = 'Offline';
  let state = 'offline';
  if (conn.ready) {
    text = 'Connected';
    state = 'connected';
  } else if (navigator.onLine !== false && ui.conn === 'connecting') {
    text = 'Reconnecting…';
    state = 'reconnecting';
  }
  $('conn').dataset.state = state;
  $('conn-text').textContent = text;
  $('last-msg').textContent = ui.lastMessageAt ? `last message ${clock(ui.lastMessageAt)}` : '';
}

function renderShift() {
  $('responder-id').textContent = ui.responderId || shift.responderId || '—';
  $('start-shift').hidden = ui.onShift;
  $('on-shift').hidden = !ui.onShift;
  $('sound-hint').hidden = !ui.onShift || alarm.audioReady();
  for (const b of document.querySelectorAll('[data-avail]')) {
    b.setAttribute('aria-pressed', String(shift.availability === b.dataset.avail));
  }
}

function renderQueue() {
  const pending = conn.ready ? [] : shift.queue;
  $('queued').hidden = pending.length === 0;
  const list = $('queued-list');
  list.textContent = '';
  for (const item of pending) {
    const li = document.createElement('li');
    li.textContent = str(item.label, 300) || str(item.frame.type, 50);
    list.append(li);
  }
}

function setField(id, value) {
  const text = str(value);
  $(id).textContent = text;
  $(`${id}-row`).hidden = text === '';
}

function renderCurrent() {
  const c = shift.current;
  $('no-current').hidden = !!c;
  $('current-card').hidden = !c;
  if (!c) {
    ui.panel = null;
    return;
  }
  fillSeverity($('cur-sev'), c.severity);
  $('cur-major').hidden = !c.major;

  const pending = shift.queue.some((i) => i.dispatch_id === c.dispatch_id && (i.kind === 'ack' || i.kind === 'status'));
  let state = STATE_TEXT[c.state] || str(c.state);
  if (pending) state += conn.ready ? ' — sending…' : ' — will be sent when connected';
  $('cur-state').textContent = state;

  const r = $('cur-reminder');
  r.hidden = !c.reminder;
  r.textContent = '';
  if (c.reminder) {
    const due = STATUS_TEXT[c.reminder.due] ? `report ${STATUS_TEXT[c.reminder.due]}` : 'report your progress';
    r.textContent = `Reminder: ${due} (due since ${hm(c.reminder.since)})`;
  }

  $('cur-incident').textContent = str(c.incident_id);
  setField('cur-category', c.category);
  setField('cur-summary', c.summary);
  setField('cur-instructions', c.instructions);
  setField('cur-caller', c.caller);
  setField('cur-queue', c.queue);
  setField('cur-eta', c.eta_s != null && c.etaAt
    ? `${Math.round(c.eta_s / 60)} min (reported ${hm(c.etaAt)}, on scene about ${hm(c.etaAt + c.eta_s * 1000)})`
    : '');

  // Only forward steps.
  const rank = STEP_RANK[c.state] ?? 1;
  $('steps').hidden = ui.panel !== null || rank >= 4;
  $('step-en-route').hidden = rank >= 2;
  $('step-on-scene').hidden = rank >= 3;
  $('step-resolved').hidden = rank >= 4;
  $('eta-box').hidden = ui.panel !== 'eta';
  $('resolve-form').hidden = ui.panel !== 'note';
}

function renderHistory() {
  const list = $('history');
  list.textContent = '';
  $('history-empty').hidden = shift.history.length > 0;
  for (const h of [...shift.history].reverse()) {
    const li = document.createElement('li');
    const time = document.createElement('time');
    time.className = 'h-time';
    const at = Number.isFinite(h.at) ? h.at : Date.now();
    time.dateTime = new Date(at).toISOString();
    time.textContent = hm(at);
    const id = span('h-id', h.incident_id);
    const sev = document.createElement('span');
    fillSeverity(sev, h.severity);
    const cat = span('h-cat', h.category || '—');
    const out = span('h-out', h.outcome);
    li.append(time, ' ', id, ' ', sev, ' ', cat, ' ', out);
    list.append(li);
  }
}

function span(cls, text) {
  const s = document.createElement('span');
  s.className = cls;
  s.textContent = str(text, 300);
  return s;
}

// ---- Every second: countdowns and deadlines ---------------------------------------------

function tick() {
  const now = Date.now();
  for (const o of [...offers.values()]) {
    if (Number.isFinite(o.ackBy) && now >= o.ackBy) expireOffer(o);
  }
  dialog.tick(now);
  $('sound-hint').hidden = !ui.onShift || alarm.audioReady();
  if (!conn.ready) {
    // An accept that never left: once its deadline passes it can only fail.
    for (const item of [...shift.queue]) if (lateAck(item, now)) tooLate(item);
  }
}

// ---- Wiring ---------------------------------------------------------------------------------

function wire() {
  $('signin-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('token').value.trim();
    if (!t) {
      $('signin-error').textContent = 'Enter your access token';
      $('signin-error').hidden = false;
      $('token').focus();
      return;
    }
    $('token').value = '';
    signIn(t);
  });
  $('signout').addEventListener('click', signOut);
  $('use-here').addEventListener('click', () => {
    if (!token) return toSignIn('');
    showView('console');
    render();
    conn.start(token);
    return undefined;
  });
  $('start-shift').addEventListener('click', startShift);
  for (const b of document.querySelectorAll('[data-avail]')) {
    b.addEventListener('click', () => setAvailability(b.dataset.avail));
  }

  // Current incident steps.
  $('step-en-route').addEventListener('click', () => {
    ui.panel = 'eta';
    renderCurrent();
    $('eta-box').querySelector('[data-eta]').focus();
  });
  for (const b of document.querySelectorAll('[data-eta]')) {
    b.addEventListener('click', () => report('en_route', { eta_s: Number(b.dataset.eta) * 60 }));
  }
  $('eta-back').addEventListener('click', () => {
    ui.panel = null;
    renderCurrent();
    focusSteps();
  });
  $('step-on-scene').addEventListener('click', () => report('on_scene'));
  $('step-resolved').addEventListener('click', () => {
    ui.panel = 'note';
    renderCurrent();
    $('resolve-note').focus();
  });
  $('resolve-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const note = $('resolve-note').value.trim().slice(0, 1000);
    $('resolve-note').value = '';
    report('resolved', { note });
  });
  $('resolve-back').addEventListener('click', () => {
    ui.panel = null;
    renderCurrent();
    focusSteps();
  });

  // Network and visibility.
  window.addEventListener('online', () => {
    renderConn();
    conn.kick();
  });
  window.addEventListener('offline', renderConn);
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'hidden') {
      for (const o of offers.values()) notifyOffer(o);
    } else if (ui.onShift) {
      sys.reacquireWakeLock();
    }
  });
  // Audio stays locked after a reload until the next tap.
  const unlock = () => {
    if (ui.onShift && !alarm.audioReady()) {
      alarm.unlockAudio();
      renderShift();
    }
  };
  document.addEventListener('pointerdown', unlock, true);
  document.addEventListener('keydown', unlock, true);

  if ('serviceWorker' in navigator) {
    navigator.serviceWorker.addEventListener('message', (e) => {
      if (e.data && e.data.type === 'notificationclick' && dialog.isOpen()) dialog.focusFirst();
    });
  }
}

function init() {
  wire();
  sys.registerWorker();
  const fromHash = tokenFromHash();
  if (fromHash !== null) {
    // Take the token and get it out of the address bar (and history).
    if (fromHash) store.setToken(fromHash);
    history.replaceState(null, '', location.pathname + location.search);
  }
  token = store.getToken();

  // A small surface for tests and debugging.
  window.dispatchdConsole = Object.freeze({
    state: () => ({
      connected: conn.ready,
      responderId: ui.responderId,
      currentIncident: shift.current ? { ...shift.current } : null,
      queued: shift.queue.length,
      queue: shift.queue.map((i) => ({ ...i.frame })),
      onShift: ui.onShift,
      availability: shift.availability,
      offers: [...offers.keys()],
    }),
  });

  setInterval(tick, 1000);
  if (token) {
    signIn(token);
  } else {
    showView('signin');
    render();
  }
}

init();
