// Sealpost service worker: content-free push wake-ups. A push says only "you have mail" (the
// payload carries nothing else, and nothing here reads it): a notification "New message" is
// shown, and open pages are told to reconnect and fetch. A click on the notification focuses
// an open page, or opens the app.

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

async function pages() {
  return self.clients.matchAll({ type: 'window', includeUncontrolled: true });
}

async function onPush() {
  for (const page of await pages()) page.postMessage({ type: 'wake' });
  // One notification at a time (same tag): several pushes do not pile up.
  await self.registration.showNotification('New message', {
    tag: 'sealpost-new-message',
    body: '',
    renotify: false,
  });
}

async function onNotificationClick(notification) {
  notification.close();
  const open = await pages();
  if (open.length) {
    const page = open[0];
    page.postMessage({ type: 'wake' });
    if ('focus' in page) await page.focus().catch(() => {});
    return;
  }
  await self.clients.openWindow(self.registration.scope);
}

// The work starts first, then the event is kept alive until it is done.
function keepAlive(event, work) {
  try {
    event.waitUntil(work);
  } catch (_) {
    // An event made by a page or a test (not trusted) cannot be extended; the work goes on.
  }
}

self.addEventListener('push', (event) => keepAlive(event, onPush()));
self.addEventListener('notificationclick', (event) => keepAlive(event, onNotificationClick(event.notification)));
