// Small pure helpers: safe field access, severity words, time formatting.

const SEVERITIES = {
  critical: { word: 'CRITICAL', icon: '‼' },
  high: { word: 'HIGH', icon: '▲' },
  medium: { word: 'MEDIUM', icon: '◆' },
  low: { word: 'LOW', icon: '○' },
};

/** Severity as { key, word, icon }; unknown values get a neutral "UNKNOWN". */
export function sevInfo(s) {
  const key = typeof s === 'string' ? s.toLowerCase() : '';
  return SEVERITIES[key] ? { key, ...SEVERITIES[key] } : { key: 'unknown', word: 'UNKNOWN', icon: '?' };
}

/** A string field from a frame, or '' (never throws on odd types). */
export function str(v, max = 2000) {
  if (typeof v === 'string') return v.slice(0, max);
  if (typeof v === 'number' && Number.isFinite(v)) return String(v);
  return '';
}

/** RFC 3339 text to epoch ms, or NaN. */
export function parseTime(v) {
  const t = typeof v === 'string' ? Date.parse(v) : NaN;
  return Number.isFinite(t) ? t : NaN;
}

const p2 = (n) => String(n).padStart(2, '0');

/** HH:MM:SS, local time. */
export function clock(ms) {
  const d = new Date(ms);
  return `${p2(d.getHours())}:${p2(d.getMinutes())}:${p2(d.getSeconds())}`;
}

/** HH:MM, local time. */
export function hm(ms) {
  const d = new Date(ms);
  return `${p2(d.getHours())}:${p2(d.getMinutes())}`;
}

/** m:ss for a remaining duration (rounded up, never negative). */
export function countdown(ms) {
  const s = Math.max(0, Math.ceil(ms / 1000));
  return `${Math.floor(s / 60)}:${p2(s % 60)}`;
}

/** "just now", "45 s ago", "2 min ago", "1 h 5 min ago". */
export function ago(ms) {
  const s = Math.max(0, Math.floor(ms / 1000));
  if (s < 10) return 'just now';
  if (s < 60) return `${s} s ago`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ago`;
  const h = Math.floor(m / 60);
  if (h < 48) return `${h} h ${m % 60} min ago`;
  return `${Math.floor(h / 24)} days ago`;
}

/** Fills a severity badge: icon (decorative) + the word; colour/pattern via class. */
export function fillSeverity(el, severity) {
  const s = sevInfo(severity);
  el.className = `sev sev-${s.key}`;
  el.textContent = '';
  const icon = document.createElement('span');
  icon.className = 'sev-icon';
  icon.setAttribute('aria-hidden', 'true');
  icon.textContent = s.icon;
  el.append(icon, document.createTextNode(` ${s.word}`));
}

/** A fresh id for a client frame (crypto.getRandomValues works without https too). */
let seq = 0;
export function newId() {
  seq += 1;
  let r = Math.floor(Math.random() * 0xffffffff);
  try {
    r = crypto.getRandomValues(new Uint32Array(1))[0];
  } catch { /* keep Math.random */ }
  return `c${Date.now().toString(36)}-${seq}-${r.toString(36)}`;
}
