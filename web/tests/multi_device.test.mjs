// A callee with two devices (two browsers): the second is linked to the account with a link
// code shown by the first. A call rings both; when one answers, the other stops ringing.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startBroker, launchBrowser, newUser, linkDevice, addContact, sendText, waitForMessage,
  waitCallState, waitFor, WAIT_MS,
} from './harness.mjs';

let broker;
let browser;
let alice;
let bob1;
let bob2;

before(async () => {
  broker = await startBroker();
  browser = await launchBrowser();
  alice = await newUser(browser, broker, 'alice@localhost');
  bob1 = await newUser(browser, broker, 'bob@localhost');
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
});

test('a second browser is linked to an account with a code from the first', async () => {
  // Before the link: a conversation the new device gets as history (bob chose to send it).
  await addContact(alice, 'bob@localhost');
  await sendText(alice, 'before the second device');
  await waitForMessage(bob1, 'before the second device');
  bob2 = await linkDevice(browser, broker, bob1);
  await waitFor('the history arrives', () => bob2.page.evaluate(() =>
    window.sealpostDebug.historyImported === 1));
  // The new device knows alice (from the link) but holds no list of hers yet: her next
  // message waits for a refresh of contacts' lists, brought forward (here within a second).
  await bob2.page.evaluate(() => window.sealpostDebug.quickHeldRefresh());
  await bob2.page.click('#conversations button[data-handle="alice@localhost"]');
  await waitFor('the new device shows the conversation from before', () => bob2.page.evaluate(() =>
    [...document.querySelectorAll('#messages li .text')].some((el) => el.textContent === 'before the second device')));
  await bob2.page.waitForFunction(
    () => document.getElementById('me').textContent === 'bob@localhost'
      && document.getElementById('me-device').textContent.includes('(device 2)'), null, { timeout: WAIT_MS },
  );
  // Both of Bob's devices get Alice's messages.
  await sendText(alice, 'hello both bobs');
  await waitForMessage(bob1, 'hello both bobs');
  await waitForMessage(bob2, 'hello both bobs');
  // What one of Bob's devices sends, the other shows too (a transcript to the own account).
  // Nothing around the sealed send names Bob: the transcript goes authenticated (over
  // /v1/ws, later), and Bob's own list is only ever asked for with his credentials.
  const requests = [];
  bob1.page.on('request', (r) => requests.push({ url: r.url(), headers: r.headers() }));
  await bob1.page.click('#conversations button[data-handle="alice@localhost"]');
  await sendText(bob1, 'reply from bob1');
  await waitForMessage(alice, 'reply from bob1');
  await bob2.page.waitForFunction(
    () => [...document.querySelectorAll('#messages li.outgoing .text')].some((el) => el.textContent === 'reply from bob1'),
    null, { timeout: WAIT_MS },
  );
  const own = await bob1.page.evaluate(
    () => window.sealpostDebug.sends.filter((s) => s.to === 'bob@localhost'),
  );
  assert.ok(own.length > 0, 'the transcript was sent');
  assert.ok(own.every((s) => !s.sealed), `own-account sends went sealed: ${JSON.stringify(own)}`);
  for (const r of requests) {
    if (decodeURIComponent(r.url).includes('/v1/accounts/bob@localhost/')) {
      assert.ok(r.headers.authorization, `asked about Bob without his credentials: ${r.url}`);
    }
  }
});

test('a call rings both devices; answering on one stops the other ringing', async () => {
  await alice.page.click('#call-video');
  for (const bob of [bob1, bob2]) {
    await bob.page.waitForSelector('#incoming:not([hidden])', { timeout: WAIT_MS });
    assert.equal(await bob.page.evaluate(() => window.sealpostDebug.callState), 'incoming');
  }
  await bob1.page.click('#answer');
  await waitCallState(alice, 'connected');
  await waitCallState(bob1, 'connected');
  await waitCallState(bob2, 'answered elsewhere');
  assert.equal(await bob2.page.isHidden('#incoming'), true);
  await bob1.page.waitForFunction(() => window.sealpostDebug.fingerprintCheck === 'passed', null, { timeout: WAIT_MS });
  await alice.page.click('#hangup');
  await waitCallState(bob1, 'ended');
});
