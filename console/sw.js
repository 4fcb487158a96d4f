// dispatchd console service worker: shows the notifications the page asks
// for, brings the console to the front when one is tapped, and keeps a copy
// of the console's files so a reload without network still opens it.

const CACHE = 'dispatchd-console-v1';
const SHELL = [
  '/', '/index.html', '/style.css', '/app.js', '/connection.js', '/offer.js', '/alarm.js',
  '/system.js', '/store.js', '/format.js', '/manifest.webmanifest', '/icon.svg',
];

self.addEventListener('install', () => {
  self.skipWaiting();
});

self.addEventListener('activate', (event) => {
  event.waitUntil((async () => {
    for (const key of await caches.keys()) if (key !== CACHE) await caches.delete(key);
    await self.clients.claim();
  })());
});

// Network first (a new binary's console is used at once), the cache when offline.
self.addEventListener('fetch', (event) => {
  const req = event.request;
  const url = new URL(req.url);
  if (req.method !== 'GET' || url.origin !== self.location.origin) return;
  const path = req.mode === 'navigate' ? '/' : url.pathname;
  if (!SHELL.includes(path)) return;
  event.respondWith((async () => {
    try {
      const resp = await fetch(req);
      if (resp.ok) {
        const copy = resp.clone();
        caches.open(CACHE).then((c) => c.put(path, copy)).catch(() => {});
      }
      return resp;
    } catch (e) {
      const cached = await caches.match(path);
      if (cached) return cached;
      throw e;
    }
  })());
});

// The page may also ask by message: {type:'notify', title, options} or {type:'close', tag}.
self.addEventListener('message', (event) => {
  const m = event.data;
  if (!m || typeof m !== 'object') return;
  if (m.type === 'notify' && typeof m.title === 'string') {
    event.waitUntil(self.registration.showNotification(m.title, m.options || {}).catch(() => {}));
  } else if (m.type === 'close' && typeof m.tag === 'string') {
    event.waitUntil(self.registration.getNotifications({ tag: m.tag })
      .then((list) => list.forEach((n) => n.close())).catch(() => {}));
  }
});

// Tapping a notification: close it, focus the console (or open it).
self.addEventListener('notificationclick', (event) => {
  event.notification.close();
  const data = event.notification.data || {};
  event.waitUntil((async () => {
    const windows = await self.clients.matchAll({ type: 'window', includeUncontrolled: true });
    const scope = self.registration.scope;
    const mine = windows.find((c) => c.url.startsWith(scope)) || windows[0];
    if (mine) {
      try { mine.postMessage({ type: 'notificationclick', dispatch_id: data.dispatch_id || null }); } catch { /* ignore */ }
      try { return await mine.focus(); } catch { /* fall through: open one */ }
    }
    return self.clients.openWindow ? self.clients.openWindow('/') : undefined;
  })());
});
