// localStorage: the token, and the shift's data (history, answered offers,
// the outgoing queue, the current incident, availability). Never throws.

const TOKEN_KEY = 'dispatchd.token';
const SHIFT_KEY = 'dispatchd.shift';
const MAX_HISTORY = 200;
const MAX_ANSWERED = 500;

function get(key) {
  try { return localStorage.getItem(key); } catch { return null; }
}
function set(key, value) {
  try { localStorage.setItem(key, value); } catch { /* private mode or full: keep going in memory */ }
}
function remove(key) {
  try { localStorage.removeItem(key); } catch { /* ignore */ }
}

export const getToken = () => get(TOKEN_KEY) || '';
export const setToken = (t) => set(TOKEN_KEY, t);
export const clearToken = () => remove(TOKEN_KEY);

export function emptyShift() {
  return {
    responderId: null, // whose shift this is (a new responder starts afresh)
    answered: {}, // dispatch_id -> ms: offers already answered/ended, never shown again
    history: [], // [{dispatch_id, incident_id, severity, category, at, outcome}], oldest first
    queue: [], // outgoing frames not yet confirmed by the server, in order
    current: null, // the incident in hand
    availability: null, // last availability chosen
  };
}

const isObj = (v) => v !== null && typeof v === 'object' && !Array.isArray(v);

export function loadShift() {
  const shift = emptyShift();
  let raw;
  try { raw = JSON.parse(get(SHIFT_KEY) || 'null'); } catch { raw = null; }
  if (!isObj(raw)) return shift;
  if (typeof raw.responderId === 'string') shift.responderId = raw.responderId;
  if (isObj(raw.answered)) shift.answered = raw.answered;
  if (Array.isArray(raw.history)) shift.history = raw.history.filter(isObj);
  if (Array.isArray(raw.queue)) shift.queue = raw.queue.filter((i) => isObj(i) && isObj(i.frame) && typeof i.id === 'string');
  if (isObj(raw.current) && typeof raw.current.incident_id === 'string') shift.current = raw.current;
  if (typeof raw.availability === 'string') shift.availability = raw.availability;
  return shift;
}

export function saveShift(shift) {
  // Keep it bounded: a long shift must not fill the storage.
  if (shift.history.length > MAX_HISTORY) shift.history = shift.history.slice(-MAX_HISTORY);
  const ids = Object.keys(shift.answered);
  if (ids.length > MAX_ANSWERED) {
    ids.sort((a, b) => shift.answered[a] - shift.answered[b]);
    for (const id of ids.slice(0, ids.length - MAX_ANSWERED)) delete shift.answered[id];
  }
  set(SHIFT_KEY, JSON.stringify(shift));
}

export const clearShift = () => remove(SHIFT_KEY);
