// The service worker's handling of content-free push wake-ups, in Chromium: a push (delivered
// through the DevTools protocol, as the push service would) shows one "New message"
// notification that says nothing else, several pushes do not pile up, and open pages are told
// to wake up (reconnect and fetch); a click on the notification closes it and wakes/focuses
// the page. (Chromium's own push transport cannot be reached offline, so the subscription to
// a push service is not exercised here.)

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startBroker, launchBrowser, newUser, waitFor, WAIT_MS } from './harness.mjs';

let broker;
let browser;

before(async () => {
  broker = await startBroker();
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
});

test('a push shows "New message" (nothing else), wakes the open page, and a click focuses it', async () => {
  const alice = await newUser(browser, broker, 'alice@localhost');
  const { context, page } = alice;
  await context.grantPermissions(['notifications'], { origin: broker.base });
  await page.waitForFunction(() => navigator.serviceWorker.ready.then(() => !!navigator.serviceWorker.controller
    || window.sealpostDebug.serviceWorker), null, { timeout: WAIT_MS });
  const scope = await page.evaluate(async () => (await navigator.serviceWorker.ready).scope);
  assert.equal(scope, `${broker.base}/web/`);

  // The registration id, from the DevTools protocol, to deliver a push to it.
  const cdp = await context.newCDPSession(page);
  const registrations = [];
  cdp.on('ServiceWorker.workerRegistrationUpdated', (e) => registrations.push(...e.registrations));
  await cdp.send('ServiceWorker.enable');
  const reg = await waitFor('the service worker registration', () =>
    registrations.find((r) => r.scopeURL === scope && !r.isDeleted));

  const notifications = () => page.evaluate(async () => (await (await navigator.serviceWorker.ready)
    .getNotifications()).map((n) => ({ title: n.title, body: n.body, tag: n.tag })));
  for (let i = 1; i <= 2; i++) {
    await cdp.send('ServiceWorker.deliverPushMessage', {
      origin: broker.base, registrationId: reg.registrationId, data: '',
    });
    await page.waitForFunction((n) => window.sealpostDebug.wakeups >= n, i, { timeout: WAIT_MS });
    const shown = await waitFor('the notification', async () => {
      const list = await notifications();
      return list.length ? list : null;
    });
    assert.deepEqual(shown, [{ title: 'New message', body: '', tag: 'sealpost-new-message' }],
      'one content-free notification, however many pushes');
  }

  // A click on it: closed, and the open page is woken (and focused).
  const worker = context.serviceWorkers().find((w) => w.url().endsWith('/web/sw.js'))
    || await context.waitForEvent('serviceworker', { timeout: WAIT_MS });
  const before = await page.evaluate(() => window.sealpostDebug.wakeups);
  await worker.evaluate(async () => {
    const [n] = await self.registration.getNotifications();
    self.dispatchEvent(new NotificationEvent('notificationclick', { notification: n }));
  });
  await page.waitForFunction((n) => window.sealpostDebug.wakeups > n, before, { timeout: WAIT_MS });
  await waitFor('the notification to close', async () => (await notifications()).length === 0);
  assert.deepEqual(await page.evaluate(() => window.sealpostDebug.errors), []);
});

test('turning notifications on subscribes with the broker\'s VAPID key and registers the subscription for this device', async () => {
  const bob = await newUser(browser, broker, 'bob@localhost');
  const { context, page } = bob;
  await context.grantPermissions(['notifications'], { origin: broker.base });
  // Chromium's push service cannot be reached offline: the browser's subscribe() is stood in
  // for by one that answers what a push service would (a public https endpoint, real keys),
  // and records the applicationServerKey it was given.
  await page.evaluate(async () => {
    const pair = await crypto.subtle.generateKey({ name: 'ECDH', namedCurve: 'P-256' }, true, ['deriveBits']);
    const raw = new Uint8Array(await crypto.subtle.exportKey('raw', pair.publicKey));
    const b64url = (b) => btoa(String.fromCharCode(...b)).replace(/\+/g, '-').replace(/\//g, '_').replace(/=+$/, '');
    let subscription = null;
    PushManager.prototype.getSubscription = async () => subscription;
    PushManager.prototype.subscribe = async (options) => {
      window.pushOptions = { userVisibleOnly: options.userVisibleOnly, key: b64url(new Uint8Array(options.applicationServerKey)) };
      subscription = {
        endpoint: 'https://push.example.net/wake/3f9a1c',
        toJSON() {
          return { endpoint: this.endpoint, keys: { p256dh: b64url(raw), auth: b64url(crypto.getRandomValues(new Uint8Array(16))) } };
        },
        async unsubscribe() { subscription = null; return true; },
      };
      return subscription;
    };
  });
  const vapid = await (await fetch(`${broker.base}/v1/push/vapid`)).json();
  const put = page.waitForRequest((r) => r.method() === 'PUT' && r.url().endsWith('/devices/1/push'), { timeout: WAIT_MS });
  await page.click('#open-settings');
  await page.waitForSelector('#push-setting:not([hidden])', { timeout: WAIT_MS });
  await page.check('#push-enabled');
  const request = await put;
  const response = await request.response();
  assert.equal(response.status(), 204, await response.text());
  assert.ok(request.headers().authorization, 'authenticated as the device');
  const body = JSON.parse(request.postData());
  assert.equal(body.endpoint, 'https://push.example.net/wake/3f9a1c');
  assert.match(body.keys.p256dh, /^[A-Za-z0-9_-]{87}$/);
  assert.match(body.keys.auth, /^[A-Za-z0-9_-]{22}$/);
  assert.deepEqual(await page.evaluate(() => window.pushOptions), { userVisibleOnly: true, key: vapid.public_key });
  assert.equal(await page.isChecked('#push-enabled'), true);
  // And off again: the broker forgets it.
  const del = page.waitForRequest((r) => r.method() === 'DELETE' && r.url().endsWith('/devices/1/push'), { timeout: WAIT_MS });
  await page.uncheck('#push-enabled');
  assert.equal((await (await del).response()).status(), 204);
  assert.deepEqual(await page.evaluate(() => window.sealpostDebug.errors), []);
});
