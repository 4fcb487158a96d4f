// The platform around the page: service worker, system notifications, wake lock.
// Everything is optional (http on a LAN has none of it): feature-check, never throw.

const hasSW = () => 'serviceWorker' in navigator;

export async function registerWorker() {
  if (!hasSW()) return null;
  try {
    return await navigator.serviceWorker.register('/sw.js');
  } catch {
    return null;
  }
}

/** Call from a user gesture. */
export function requestNotifications() {
  try {
    if ('Notification' in window && Notification.permission === 'default') {
      const p = Notification.requestPermission();
      if (p && p.catch) p.catch(() => {});
    }
  } catch { /* ignore */ }
}

const canNotify = () =>
  hasSW() && 'Notification' in window && Notification.permission === 'granted';

/** The active registration, or null after a while (ready never settles without one). */
async function ready() {
  if (!hasSW()) return null;
  const timeout = new Promise((resolve) => setTimeout(() => resolve(null), 10000));
  try {
    return await Promise.race([navigator.serviceWorker.ready, timeout]);
  } catch {
    return null;
  }
}

/** Shows a system notification; `stillWanted()` is asked again once it is up
 * (the offer may have ended meanwhile: then it is closed at once). */
export async function notify(title, body, tag, data, stillWanted = () => true) {
  if (!canNotify()) return;
  const reg = await ready();
  if (!reg || !stillWanted()) return;
  try {
    await reg.showNotification(title, {
      body, tag, data, requireInteraction: true, renotify: true, icon: '/icon.svg', badge: '/icon.svg',
    });
    if (!stillWanted()) await closeNotification(tag);
  } catch { /* ignore */ }
}

export async function closeNotification(tag) {
  if (!hasSW()) return;
  const reg = await ready();
  if (!reg || !reg.getNotifications) return;
  try {
    for (const n of await reg.getNotifications({ tag })) n.close();
  } catch { /* ignore */ }
}

// Screen wake lock while the shift is on (browsers drop it when the page is hidden).
let lock = null;
let wanted = false;

export async function acquireWakeLock() {
  wanted = true;
  if (!('wakeLock' in navigator) || (lock && !lock.released)) return;
  try {
    lock = await navigator.wakeLock.request('screen');
    lock.addEventListener('release', () => { lock = null; });
  } catch {
    lock = null;
  }
}

/** On visibilitychange to visible: take it again if the shift wants it. */
export function reacquireWakeLock() {
  if (wanted && document.visibilityState === 'visible') acquireWakeLock();
}

export function releaseWakeLock() {
  wanted = false;
  const l = lock;
  lock = null;
  if (l) l.release().catch(() => {});
}
