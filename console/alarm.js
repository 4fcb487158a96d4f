// Sound and vibration made on the device: Web Audio tones, no audio files.

let ctx = null;
let timer = 0;
let playingMajor = null; // null when silent, else whether the major pattern plays

function audio() {
  if (!ctx) {
    const AC = window.AudioContext || window.webkitAudioContext;
    if (!AC) return null;
    try { ctx = new AC(); } catch { return null; }
  }
  if (ctx.state === 'suspended') ctx.resume().catch(() => {});
  return ctx;
}

/** Call from a user gesture: creates/resumes the context so alarms can sound later. */
export function unlockAudio() {
  const c = audio();
  if (!c) return;
  // An empty buffer played: some browsers only unlock once something actually plays.
  try {
    const src = c.createBufferSource();
    src.buffer = c.createBuffer(1, 1, 22050);
    src.connect(c.destination);
    src.start(0);
  } catch { /* ignore */ }
}

export const audioReady = () => !!ctx && ctx.state === 'running';

/** One tone at `at` seconds from now; glides to `to` Hz when given. */
function tone(c, { freq, to, at, dur, type = 'square', level = 0.2 }) {
  const t0 = c.currentTime + at;
  const osc = c.createOscillator();
  const g = c.createGain();
  osc.type = type;
  osc.frequency.setValueAtTime(freq, t0);
  if (to) osc.frequency.linearRampToValueAtTime(to, t0 + dur);
  // Short attack and release: no clicks.
  g.gain.setValueAtTime(0.0001, t0);
  g.gain.exponentialRampToValueAtTime(level, t0 + 0.015);
  g.gain.setValueAtTime(level, t0 + dur - 0.03);
  g.gain.exponentialRampToValueAtTime(0.0001, t0 + dur);
  osc.connect(g).connect(c.destination);
  osc.start(t0);
  osc.stop(t0 + dur + 0.02);
}

function playPattern(major) {
  const c = audio();
  if (!c) return;
  try {
    if (major) {
      // Major incident: three rising siren sweeps, louder.
      for (const at of [0, 0.38, 0.76]) tone(c, { freq: 550, to: 1450, at, dur: 0.33, type: 'sawtooth', level: 0.28 });
    } else {
      // Normal offer: hi-lo-hi beeps.
      tone(c, { freq: 880, at: 0, dur: 0.18 });
      tone(c, { freq: 660, at: 0.24, dur: 0.18 });
      tone(c, { freq: 880, at: 0.48, dur: 0.18 });
    }
  } catch { /* audio is a help, never a failure */ }
}

export function vibrate(pattern) {
  try { if (navigator.vibrate) navigator.vibrate(pattern); } catch { /* ignore */ }
}

/** Repeats the offer alarm every 1.5 s until stopAlarm(). */
export function startAlarm(major) {
  major = !!major;
  if (playingMajor === major) return;
  stopAlarm();
  playingMajor = major;
  const ring = () => {
    playPattern(major);
    vibrate(major ? [200, 100, 200, 100, 600] : [400, 200, 400]);
  };
  ring();
  timer = setInterval(ring, 1500);
}

export function stopAlarm() {
  clearInterval(timer);
  timer = 0;
  playingMajor = null;
  vibrate(0);
}

/** A short nudge (reminders): two soft low blips. */
export function reminderTone() {
  const c = audio();
  if (c) {
    try {
      tone(c, { freq: 523, at: 0, dur: 0.14, type: 'sine', level: 0.3 });
      tone(c, { freq: 523, at: 0.2, dur: 0.14, type: 'sine', level: 0.3 });
    } catch { /* ignore */ }
  }
  vibrate([150, 100, 150]);
}
