// A message the broker withholds is noticed end to end: the broker (a test-only hook of debug
// builds) answers Alice's second message as taken and drops it; her third names it, and Bob's
// page says a message from Alice may be missing. Before that, with nothing dropped, it says
// nothing. Screenshots at 1280 and 390 px.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import {
  startBroker, launchBrowser, newUser, addContact, sendText, waitForMessage, waitFor,
  screenshots, WAIT_MS,
} from './harness.mjs';

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
  await browser?.close();
  await broker?.stop();
  broker?.cleanup();
});

test('a message the broker withholds is shown as possibly missing; nothing is when none was dropped', async () => {
  await addContact(alice, 'bob@localhost');
  await sendText(alice, 'one');
  await bob.page.click('#conversations button[data-handle="alice@localhost"]');
  await waitForMessage(bob, 'one');
  await sendText(alice, 'two');
  await waitForMessage(bob, 'two');
  assert.equal(await bob.page.locator('#missing-notice').count(), 0, 'nothing dropped, nothing missing');

  broker.withholdNext();
  await sendText(alice, 'three');
  await waitFor('the broker to drop "three"', () => broker.withheld());
  // "four" goes once the broker took "three" (its link names what the broker accepted).
  await alice.page.waitForFunction(() => {
    const mine = [...document.querySelectorAll('#messages li.outgoing')];
    return mine.length === 3 && !mine.at(-1).querySelector('.state.sending');
  }, null, { timeout: WAIT_MS });
  await sendText(alice, 'four');
  await waitForMessage(bob, 'four');
  const notice = await bob.page.waitForSelector('#missing-notice', { timeout: WAIT_MS });
  assert.match(await notice.textContent(), /A message from alice may be missing/);
  const texts = await bob.page.$$eval('#messages li.incoming .text', (els) => els.map((e) => e.textContent));
  assert.deepEqual(texts, ['one', 'two', 'four']);
  await screenshots(bob.page, 'missing');
});
