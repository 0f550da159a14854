// The browser client as a messenger: sign-up errors in words, the conversation list (preview,
// time, unread), bubbles with delivery state, the phone layout (list and chat views, no
// sideways scrolling at 360 and 390 px), the link code as a QR code plus text, the call screen
// (only during a call; labelled self-view; "media key verified"; call events in the history),
// the banner while the broker is unreachable, and a reload that asks for the passphrase and
// keeps everything (nothing readable in localStorage or IndexedDB). Screenshots of each screen
// at 1280 and 390 px go to $SEALPOST_SCREENSHOTS (default /tmp/sealpost-screenshots).

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import jsQR from 'jsqr';
import {
  startBroker, launchBrowser, newUser, addContact, sendText, waitForMessage, waitFor,
  callAndAnswer, waitCallState, screenshots, overflowsSideways, openChatInfo, PASSPHRASE, WAIT_MS,
} from './harness.mjs';

// Receipts wait a random 2-15 s (engine default) before they go; then a moment to travel.
const RECEIPT_WAIT_MS = 45_000;
let broker;
let browser;
let alice;
let bob;

before(async () => {
  broker = await startBroker();
  browser = await launchBrowser();
  alice = await newUser(browser, broker, 'alice@localhost');
  bob = await newUser(browser, broker, 'bob@localhost');
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
});

async function freshPage() {
  const context = await browser.newContext();
  const page = await context.newPage();
  await page.goto(`${broker.base}/web/`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  return { context, page };
}

async function noErrors(...users) {
  for (const u of users) {
    assert.deepEqual(await u.page.evaluate(() => window.sealpostDebug.errors), [], `${u.handle}'s page shows no error`);
  }
}

test('sign-up: errors in words, and the screen fits a phone', async () => {
  const { context, page } = await freshPage();
  await screenshots(page, 'signup');
  for (const width of [360, 390]) {
    await page.setViewportSize({ width, height: 780 });
    assert.equal(await overflowsSideways(page), false, `sign-up at ${width} px`);
  }
  await page.setViewportSize({ width: 1280, height: 800 });
  // A name that is taken.
  await page.fill('#handle', 'alice@localhost');
  await page.fill('#passphrase', PASSPHRASE);
  await page.click('#register');
  await page.waitForSelector('#account-error:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await page.textContent('#account-error'), 'That name is taken — try another.');
  // A passphrase that is too short, and a name without its server.
  await page.fill('#handle', 'carol@localhost');
  await page.fill('#passphrase', 'short');
  await page.click('#register');
  await page.waitForFunction(() => /at least 8 characters/.test(document.getElementById('account-error').textContent));
  await page.fill('#handle', 'carol');
  await page.fill('#passphrase', PASSPHRASE);
  await page.click('#register');
  await page.waitForFunction(() => /full name with its server/.test(document.getElementById('account-error').textContent));
  await screenshots(page, 'signup-error');
  // A contact that does not exist.
  await alice.page.fill('#contact-handle', 'nobody@localhost');
  await alice.page.click('#add-contact');
  await alice.page.waitForSelector('#error:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await alice.page.textContent('#error-text'),
    'There is no one called nobody@localhost. Check the spelling, including the part after @.');
  await alice.page.click('#error-close');
  await alice.page.evaluate(() => { window.sealpostDebug.errors.length = 0; });
  await context.close();
});

test('the conversation list shows the last message, its time and the unread count; opening it clears them', async () => {
  // Bob is on a phone: the list is what he sees, nothing opens by itself.
  await bob.page.setViewportSize({ width: 390, height: 844 });
  await addContact(alice, 'bob@localhost');
  await sendText(alice, 'Are you free tonight?');
  await sendText(alice, 'Dinner at 8?');
  const item = '#conversations button[data-handle="alice@localhost"]';
  await bob.page.waitForFunction((sel) => {
    const b = document.querySelector(sel);
    return b && b.querySelector('.unread')?.textContent === '2'
      && b.querySelector('.preview').textContent === 'Dinner at 8?';
  }, item, { timeout: WAIT_MS });
  assert.match(await bob.page.textContent(`${item} .time`), /^\d{1,2}:\d{2}/);
  assert.equal(await bob.page.isVisible('#chat'), false, 'the list, not a chat, on a phone');
  assert.equal(await overflowsSideways(bob.page), false);
  await bob.page.setViewportSize({ width: 360, height: 740 });
  assert.equal(await overflowsSideways(bob.page), false, 'the list at 360 px');
  await screenshots(bob.page, 'conversations');
  await bob.page.setViewportSize({ width: 390, height: 844 });

  // Opening it: the chat view with a back button; unread cleared.
  await bob.page.click(item);
  await waitForMessage(bob, 'Dinner at 8?');
  assert.equal(await bob.page.isVisible('#sidebar'), false, 'the chat alone on a phone');
  assert.equal(await bob.page.isVisible('#chat .back'), true);
  await bob.page.waitForFunction(() => window.sealpostDebug.conversationList
    .find((c) => c.id === 'alice@localhost').unread === 0);
  assert.equal(await bob.page.locator(`${item} .unread`).count(), 0);
  await sendText(bob, 'Yes! See you there.');
  await waitForMessage(alice, 'Yes! See you there.');
  for (const width of [360, 390]) {
    await bob.page.setViewportSize({ width, height: 780 });
    assert.equal(await overflowsSideways(bob.page), false, `the chat at ${width} px`);
  }
  await bob.page.click('#chat .back');
  await bob.page.waitForSelector('#sidebar', { state: 'visible' });
  // The system back does the same.
  await bob.page.click(item);
  await bob.page.waitForSelector('#chat', { state: 'visible' });
  await bob.page.goBack();
  await bob.page.waitForSelector('#sidebar', { state: 'visible' });
  assert.equal(await bob.page.isVisible('#chat'), false);
  assert.equal(await bob.page.textContent(`${item} .preview`), 'You: Yes! See you there.');
  await bob.page.setViewportSize({ width: 1280, height: 800 });
  await bob.page.click(item);

  // Bubbles: own on the right, theirs on the left, each with its time; own ones with their
  // delivery state.
  const layout = await alice.page.evaluate(() => {
    const list = document.getElementById('messages').getBoundingClientRect();
    return [...document.querySelectorAll('#messages li.message')].map((li) => {
      const r = li.querySelector('.bubble').getBoundingClientRect();
      return {
        outgoing: li.classList.contains('outgoing'), left: r.left - list.left, right: list.right - r.right,
        time: li.querySelector('time').textContent, state: li.dataset.state || null,
        text: li.querySelector('.text').textContent,
      };
    });
  });
  assert.equal(layout.length, 3);
  for (const b of layout) {
    assert.match(b.time, /^\d{1,2}:\d{2}/);
    if (b.outgoing) {
      assert.ok(b.right < 40 && b.left > 100, `own bubble on the right: ${JSON.stringify(b)}`);
      assert.ok(['sent', 'delivered', 'read'].includes(b.state), `delivery state: ${JSON.stringify(b)}`);
    } else {
      assert.ok(b.left < 40 && b.right > 100, `their bubble on the left: ${JSON.stringify(b)}`);
    }
  }
  const receipts = await alice.page.evaluate(() => typeof window.sealpostDebug.engineHas === 'function'
    && window.sealpostDebug.engineHas('take_receipts'));
  if (receipts) {
    // Bob has read both: end-to-end encrypted read receipts move them to "read".
    // (Receipts wait a random 2-15 s in the engine, so that the broker cannot pair them.)
    await alice.page.waitForFunction(() => [...document.querySelectorAll('#messages li.outgoing')]
      .every((li) => li.dataset.state === 'read'), null, { timeout: RECEIPT_WAIT_MS });
  }
  await screenshots(alice.page, 'chat', async (width) => {
    if (width < 721) await alice.page.waitForSelector('#chat', { state: 'visible' });
  });
  await noErrors(alice, bob);
});

test('typing shows, read receipts can be turned off, and a disappearing-messages timer removes messages on both sides', async () => {
  // bob has alice's chat open (desktop), alice has bob's.
  await alice.page.type('#message-input', 'Shall I bring');
  await bob.page.waitForFunction(() => !document.getElementById('typing').hidden
    && document.getElementById('typing').textContent === 'alice is typing…', null, { timeout: WAIT_MS });
  assert.equal(await bob.page.textContent('#chat-sub'), 'typing…');
  await screenshots(bob.page, 'typing', async (width) => {
    if (width < 721) await bob.page.waitForSelector('#chat', { state: 'visible' });
  });
  await alice.page.fill('#message-input', 'Shall I bring dessert?');
  await alice.page.click('#send');
  await waitForMessage(bob, 'Shall I bring dessert?');
  await bob.page.waitForSelector('#typing', { state: 'hidden' });
  await alice.page.waitForFunction(() => document.querySelector('#messages li.outgoing:last-of-type')?.dataset.state === 'read',
    null, { timeout: RECEIPT_WAIT_MS });

  // Bob turns read receipts off: alice's next message stays "delivered" although he reads it.
  await bob.page.click('#open-settings');
  await bob.page.uncheck('#read-receipts');
  await bob.page.click('#settings-close');
  await sendText(alice, 'Or wine?');
  await waitForMessage(bob, 'Or wine?');
  await alice.page.waitForFunction(() => [...document.querySelectorAll('#messages li.outgoing')].at(-1).dataset.state === 'delivered',
    null, { timeout: RECEIPT_WAIT_MS });
  await sendText(bob, 'Wine please');
  await waitForMessage(alice, 'Wine please');
  assert.equal(await alice.page.evaluate(() => [...document.querySelectorAll('#messages li.outgoing')].at(-1).dataset.state), 'delivered');
  await bob.page.click('#open-settings');
  await bob.page.check('#read-receipts');
  await bob.page.click('#settings-close');

  // Disappearing messages: alice sets 30 seconds; both sides show it and honour it.
  await openChatInfo(alice);
  await alice.page.selectOption('#disappearing', '30000');
  await alice.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event')]
    .some((li) => li.textContent.startsWith('You set messages to disappear after 30 seconds')), null, { timeout: WAIT_MS });
  await bob.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event')]
    .some((li) => li.textContent.startsWith('alice set messages to disappear after 30 seconds')), null, { timeout: WAIT_MS });
  assert.match(await bob.page.textContent('#chat-sub'), /Messages disappear after 30 seconds/);
  await sendText(alice, 'This one vanishes');
  await waitForMessage(bob, 'This one vanishes');
  await screenshots(alice.page, 'disappearing');
  for (const user of [alice, bob]) {
    await user.page.waitForFunction(() => ![...document.querySelectorAll('#messages .text')]
      .some((el) => el.textContent === 'This one vanishes'), null, { timeout: 60_000 });
  }
  assert.ok(await bob.page.evaluate(() => [...document.querySelectorAll('#messages .text')]
    .some((el) => el.textContent === 'Dinner at 8?')), 'messages from before the timer stay');
  await alice.page.selectOption('#disappearing', '0');
  await bob.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event')]
    .some((li) => li.textContent.startsWith('alice turned off disappearing messages')), null, { timeout: WAIT_MS });
  await alice.page.click('#chat-info-toggle');
  await noErrors(alice, bob);
});

test('the link code is a QR code that scans to the text, which can be copied', async () => {
  await alice.context.grantPermissions(['clipboard-read', 'clipboard-write'], { origin: broker.base });
  await alice.page.click('#open-settings');
  await alice.page.click('#link-device');
  await alice.page.waitForSelector('#link-panel:not([hidden])', { timeout: WAIT_MS });
  const code = await alice.page.textContent('#link-code');
  assert.ok(code.includes('.'), code);
  assert.match(await alice.page.textContent('#link-instruction'), /On the new device/);
  assert.equal(await alice.page.isVisible('#link-qr'), true);
  const { width, height, pixels } = await alice.page.evaluate(() => {
    const c = document.getElementById('link-qr');
    const d = c.getContext('2d').getImageData(0, 0, c.width, c.height);
    return { width: c.width, height: c.height, pixels: Array.from(d.data) };
  });
  const scanned = jsQR(new Uint8ClampedArray(pixels), width, height);
  assert.ok(scanned, 'the QR code scans');
  assert.equal(scanned.data, code);
  await alice.page.click('#copy-link-code');
  await alice.page.waitForFunction(() => document.getElementById('copy-link-code').textContent === 'Copied ✓');
  assert.equal(await alice.page.evaluate(() => navigator.clipboard.readText()), code);
  for (const w of [360, 390]) {
    await alice.page.setViewportSize({ width: w, height: 780 });
    assert.equal(await overflowsSideways(alice.page), false, `link code at ${w} px`);
  }
  await screenshots(alice.page, 'link');
  await alice.page.click('#settings-close');
  await noErrors(alice);
});

test('the call screen is there only during a call, with a labelled self-view, and calls go in the history', async () => {
  assert.equal(await alice.page.isVisible('#call-screen'), false, 'no call screen before a call');
  assert.equal(await alice.page.isVisible('video'), false, 'no video tiles before a call');
  await alice.page.click('#call-video');
  await bob.page.waitForSelector('#incoming:not([hidden])', { timeout: WAIT_MS });
  assert.match(await bob.page.textContent('#incoming-text'), /alice@localhost is calling you/);
  await screenshots(bob.page, 'incoming-call');
  await bob.page.click('#answer');
  await waitCallState(alice, 'connected');
  await waitCallState(bob, 'connected');
  for (const user of [alice, bob]) {
    await user.page.waitForSelector('#call-screen', { state: 'visible' });
    await user.page.waitForFunction(() => document.getElementById('fingerprint-state').textContent === 'Media key verified ✓', null, { timeout: WAIT_MS });
    assert.equal(await user.page.textContent('#self-view figcaption'), 'You');
    const [remote, self] = await user.page.evaluate(() => ['remote-video', 'self-view']
      .map((id) => { const r = document.getElementById(id).getBoundingClientRect(); return r.width * r.height; }));
    assert.ok(remote > self * 4, `the remote video is large, the self-view small (${remote} vs ${self})`);
    await user.page.waitForFunction(() => /^\d+:\d\d$/.test(document.getElementById('call-timer').textContent));
  }
  // Mute and camera act on this side's tracks.
  await alice.page.click('#mute');
  assert.equal(await alice.page.getAttribute('#mute', 'aria-pressed'), 'true');
  assert.equal(await alice.page.evaluate(() => window.sealpostDebug.call.media.getAudioTracks()[0].enabled), false);
  await alice.page.click('#mute');
  await alice.page.click('#camera');
  assert.equal(await alice.page.evaluate(() => window.sealpostDebug.call.media.getVideoTracks()[0].enabled), false);
  await alice.page.click('#camera');
  await alice.page.waitForFunction(() => document.getElementById('call-timer').textContent >= '0:01');
  for (const w of [360, 390]) {
    await bob.page.setViewportSize({ width: w, height: 780 });
    assert.equal(await overflowsSideways(bob.page), false, `call screen at ${w} px`);
  }
  await screenshots(bob.page, 'call');
  await alice.page.click('#hangup');
  await waitCallState(bob, 'ended');
  for (const user of [alice, bob]) {
    await user.page.waitForSelector('#call-screen', { state: 'hidden' });
    await user.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event')]
      .some((li) => /^Video call, \d+:\d\d · /.test(li.textContent)), null, { timeout: WAIT_MS });
  }
  // A call bob does not answer is a missed call in his history.
  await alice.page.click('#call-audio');
  await bob.page.waitForSelector('#incoming:not([hidden])', { timeout: WAIT_MS });
  await alice.page.waitForFunction(() => window.sealpostDebug.callState === 'ringing', null, { timeout: WAIT_MS });
  await screenshots(alice.page, 'call-audio-ringing');
  await alice.page.click('#hangup');
  await bob.page.waitForSelector('#incoming', { state: 'hidden' });
  await bob.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event.missed')]
    .some((li) => li.textContent.startsWith('Missed call')), null, { timeout: WAIT_MS });
  await alice.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event')]
    .some((li) => li.textContent.startsWith('Call, no answer')), null, { timeout: WAIT_MS });
  await noErrors(alice, bob);
});

test('while the broker is unreachable a banner says so and counts down; then "Reconnected"', async () => {
  await broker.stop();
  await alice.page.waitForFunction(() => /^Can't reach the server\. Reconnecting( in \d+ s)?…$/
    .test(document.getElementById('banner-text').textContent)
    && !document.getElementById('banner').hidden, null, { timeout: WAIT_MS });
  await alice.page.waitForFunction(() => /Reconnecting in \d+ s…/.test(document.getElementById('banner-text').textContent), null, { timeout: WAIT_MS });
  await screenshots(alice.page, 'banner');
  await broker.restart();
  for (const user of [alice, bob]) {
    await user.page.waitForFunction(() => window.sealpostDebug.online
      && document.getElementById('banner-text').textContent === 'Reconnected', null, { timeout: WAIT_MS });
  }
  await alice.page.waitForSelector('#banner', { state: 'hidden', timeout: WAIT_MS });
  // And messages flow again.
  await sendText(alice, 'back online');
  await waitForMessage(bob, 'back online');
  await noErrors(alice, bob);
});

test('a reload asks for the passphrase, refuses a wrong one, and keeps the account and its conversations', async () => {
  await bob.page.reload();
  await bob.page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  await bob.page.waitForSelector('#unlock:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await bob.page.isVisible('#app'), false);
  // What the browser keeps: no handle, no message, no key in the clear.
  const stored = await bob.page.evaluate(async () => {
    const out = {};
    for (let i = 0; i < localStorage.length; i++) {
      const k = localStorage.key(i);
      out[k] = localStorage.getItem(k);
    }
    const dbs = indexedDB.databases ? await indexedDB.databases() : [];
    return { local: out, dbs: dbs.map((d) => d.name) };
  });
  const all = JSON.stringify(stored);
  for (const needle of ['bob@localhost', 'alice@localhost', 'Dinner at 8', 'See you there', 'back online', 'bob%40localhost']) {
    assert.ok(!all.includes(needle), `"${needle}" is not stored in the clear`);
    // Nor base64-encoded.
    assert.ok(!all.includes(Buffer.from(needle).toString('base64').slice(0, 12)), `"${needle}" is not stored base64-encoded`);
  }
  const vault = JSON.parse(stored.local['sealpost:vault']);
  assert.equal(vault.kdf, 'PBKDF2-SHA256');
  assert.ok(vault.iterations >= 310_000);
  assert.deepEqual(Object.keys(stored.local).sort(), ['sealpost:state', 'sealpost:ui', 'sealpost:vault']);
  assert.deepEqual(stored.dbs, []);
  for (const w of [360, 390]) {
    await bob.page.setViewportSize({ width: w, height: 780 });
    assert.equal(await overflowsSideways(bob.page), false, `unlock at ${w} px`);
  }
  await bob.page.setViewportSize({ width: 1280, height: 800 });
  await bob.page.fill('#unlock-passphrase', 'not my passphrase');
  await bob.page.click('#unlock-button');
  await bob.page.waitForSelector('#unlock-error:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await bob.page.textContent('#unlock-error'),
    "That passphrase isn't right. Check it (and Caps Lock) and try again.");
  await screenshots(bob.page, 'unlock');
  await bob.page.evaluate(() => { window.sealpostDebug.errors.length = 0; });
  // While Bob is away Alice writes three times; the broker has them all.
  for (const text of ['One', 'Two', 'Three']) await sendText(alice, text);
  await alice.page.waitForFunction(() => {
    const own = [...document.querySelectorAll('#messages li.outgoing')].slice(-3);
    return own.map((li) => li.querySelector('.text')?.textContent).join() === 'One,Two,Three'
      && own.every((li) => li.dataset.state && li.dataset.state !== 'sending');
  }, null, { timeout: WAIT_MS });
  // His backlog comes as one `batch` message on his socket.
  const batches = [];
  bob.page.on('websocket', (socket) => {
    if (!socket.url().endsWith('/v1/ws?batch=1')) return;
    socket.on('framereceived', ({ payload }) => {
      if (typeof payload !== 'string' && payload[1] === 0x8f) batches.push(payload.length);
    });
  });
  await bob.page.fill('#unlock-passphrase', PASSPHRASE);
  await bob.page.click('#unlock-button');
  await bob.page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  assert.equal(await bob.page.textContent('#me'), 'bob@localhost');
  await bob.page.waitForFunction(() => document.querySelector('#conversations button[data-handle="alice@localhost"] .preview')
    ?.textContent === 'Three');
  assert.ok(batches.length >= 1, 'the backlog came batched');
  await bob.page.click('#conversations button[data-handle="alice@localhost"]');
  await waitForMessage(bob, 'Dinner at 8?');
  // Handled in the order sent (the chat view sorts by time, so ask the page what it handled).
  const handled = await bob.page.evaluate(() => window.sealpostDebug.messages.map((m) => m.text));
  assert.deepEqual(handled.slice(-3), ['One', 'Two', 'Three'], 'in order');
  // The call history is kept too (encrypted, with the page's own state).
  await bob.page.waitForFunction(() => [...document.querySelectorAll('#messages li.event')]
    .some((li) => li.textContent.startsWith('Missed call')));
  // Verifying: the button gives way to "Verified ✓".
  await openChatInfo(bob);
  await bob.page.click('#verify');
  await bob.page.waitForSelector('#verified-badge:not([hidden])');
  assert.equal(await bob.page.textContent('#verified-badge'), 'Verified ✓');
  assert.equal(await bob.page.isVisible('#verify'), false, 'no "Mark as verified" once verified');
  await noErrors(bob);
});

test('an account saved by an earlier version (key in the clear) is locked with a passphrase the user chooses', async () => {
  const { context, page } = await freshPage();
  // What the earlier version kept: the state and, next to it, its key.
  await page.evaluate(async () => {
    const m = await import('./pkg/sealpost_web.js');
    const pending = m.PendingAccount.create('dave@localhost');
    const resp = await fetch('/v1/accounts', {
      method: 'POST', headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ handle: 'dave@localhost', identity_keys: pending.identity_keys() }),
    });
    const created = await resp.json();
    const engine = pending.finish(created.device_id, created.token);
    const key = m.Engine.new_local_key();
    const bytes = engine.save(key);
    let bin = '';
    for (const b of bytes) bin += String.fromCharCode(b);
    localStorage.setItem('sealpost:dave@localhost:state', btoa(bin));
    localStorage.setItem('sealpost:dave@localhost:key', key);
  });
  await page.reload();
  await page.waitForSelector('#unlock:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await page.textContent('#unlock-title'), 'Choose a passphrase');
  await page.fill('#unlock-passphrase', PASSPHRASE);
  await page.click('#unlock-button');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  assert.equal(await page.textContent('#me'), 'dave@localhost');
  const keys = await page.evaluate(() => Object.keys(localStorage).sort());
  assert.deepEqual(keys.filter((k) => k !== 'sealpost:ui'), ['sealpost:state', 'sealpost:vault']);
  await page.reload();
  await page.waitForSelector('#unlock:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await page.textContent('#unlock-title'), 'Welcome back');
  await page.fill('#unlock-passphrase', PASSPHRASE);
  await page.click('#unlock-button');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  await context.close();
});
