// What the page tells its user about trust, with a contact (bob) on the CLI: a device the broker
// lists for bob that his signed device list does not contain (being linked, never approved) is
// a calm notice in the conversation, once; a changed master key replaces the safety number with
// the old and new numbers and a way to accept. Screenshots of both go to $SEALPOST_SCREENSHOTS
// (default: a temp directory), to look at.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn, execFile } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import {
  startBroker, launchBrowser, newUser, addContact, sendText, waitFor, ROOT, WAIT_MS,
  openChatInfo,
} from './harness.mjs';

const CLI_BIN = process.env.SEALPOST_CLI_BIN || join(ROOT, 'target', 'debug', 'sealpost-cli');
const SHOTS = process.env.SEALPOST_SCREENSHOTS || join(tmpdir(), 'sealpost-screenshots');
const BOB = 'bob@localhost';

let broker;
let browser;
let alice;
let bobDir;
let bob2Dir;

/** Runs the CLI with bob's state directory; resolves to {code, stdout, stderr}. */
async function cli(dir, args) {
  try {
    const { stdout, stderr } = await promisify(execFile)(
      CLI_BIN, ['--state-dir', dir, ...args], { timeout: WAIT_MS },
    );
    return { code: 0, stdout, stderr };
  } catch (e) {
    if (typeof e.code !== 'number') throw e;
    return { code: e.code, stdout: e.stdout, stderr: e.stderr };
  }
}

/** A link code from bob's device, which then goes away (so nobody approves the new one). */
function linkCodeThenLeave() {
  return new Promise((resolve, reject) => {
    const child = spawn(CLI_BIN, ['--state-dir', bobDir, 'link-code', '--wait-secs', '20'],
      { stdio: ['ignore', 'pipe', 'ignore'] });
    let out = '';
    child.stdout.on('data', (chunk) => {
      out += chunk;
      const m = out.match(/^Link code: (\S+)\n/);
      if (m) {
        child.kill();
        resolve(m[1]);
      }
    });
    child.on('exit', () => reject(new Error(`link-code ended without a code: ${out}`)));
  });
}

async function sendsTo(user, to) {
  return user.page.evaluate((t) => window.sealpostDebug.sends.filter((s) => s.to === t).length, to);
}

/** Alice sends `text` to the selected contact and waits until it is accepted. */
async function sendAndWait(text) {
  const before = await sendsTo(alice, BOB);
  await sendText(alice, text);
  await waitFor(`"${text}" accepted`, async () => (await sendsTo(alice, BOB)) > before);
}

before(async () => {
  mkdirSync(SHOTS, { recursive: true });
  bobDir = mkdtempSync(join(tmpdir(), 'sealpost-cli-bob-'));
  bob2Dir = mkdtempSync(join(tmpdir(), 'sealpost-cli-bob2-'));
  broker = await startBroker();
  browser = await launchBrowser();
  alice = await newUser(browser, broker, 'alice@localhost');
  const reg = await cli(bobDir, ['register', '--server', broker.base, '--handle', BOB]);
  assert.equal(reg.code, 0, reg.stderr);
  // Lists are fetched on every use here, so a change at the broker shows at once.
  await alice.page.evaluate(() => { window.sealpostDebug.listMaxAgeMs = 0; });
  await alice.page.setViewportSize({ width: 1000, height: 760 });
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
  for (const d of [bobDir, bob2Dir]) if (d) rmSync(d, { recursive: true, force: true });
});

test('a device not in the contact\'s signed list is a calm notice when sending, once', async () => {
  await addContact(alice, BOB);
  await sendAndWait('hello bob');
  await openChatInfo(alice);
  await alice.page.click('#verify');
  await alice.page.waitForSelector('#verified-badge:not([hidden])', { timeout: WAIT_MS });
  assert.equal(await alice.page.locator('#notices li').count(), 0, 'nothing to say yet');
  // Bob's list came with a proof from localhost's key-transparency log, which the page checked.
  assert.match(await alice.page.textContent('#kt-status'), /in localhost's public key log/);

  // Bob starts linking a second device; the device that showed the code is gone, so the broker
  // has device 2 and bob's signed list does not.
  const code = await linkCodeThenLeave();
  const linking = await cli(bob2Dir, [
    'link', '--server', broker.base, '--handle', BOB, '--code', code, '--wait-secs', '1',
  ]);
  assert.notEqual(linking.code, 0, 'nobody approved it');

  await sendAndWait('are you there?');
  const notice = alice.page.locator('#notices li');
  try {
    await notice.waitFor({ timeout: WAIT_MS });
  } catch (e) {
    const seen = await alice.page.evaluate(() => ({
      sends: window.sealpostDebug.sends,
      notices: window.sealpostDebug.notices,
      error: document.getElementById('error')?.textContent,
    }));
    throw new Error(`no notice: ${JSON.stringify(seen)}; link said: ${linking.stdout} ${linking.stderr}`);
  }
  const text = await notice.textContent();
  assert.match(text, /bob@localhost has a new device that is not confirmed yet \(device 2\)/);
  assert.match(text, /got only an unreadable placeholder, not your message/);
  assert.match(text, /usually means bob@localhost is linking a new device/);
  assert.match(text, /If they are not adding a device, let them know/);
  await alice.page.screenshot({ path: join(SHOTS, 'unlisted-device.png'), fullPage: true });

  // Told once: the next send says nothing new.
  await sendAndWait('one more');
  assert.equal(await alice.page.evaluate(() => window.sealpostDebug.notices.length), 1);
  await alice.page.click('#notices li button');
  assert.equal(await alice.page.locator('#notices li').count(), 0, 'dismissed');
});

test('a changed master key replaces the safety number with the change and a way to accept', async () => {
  const verifiedNumber = await alice.page.textContent('#safety-number');
  const rotated = await cli(bobDir, ['rotate-master-key', '--yes']);
  assert.equal(rotated.code, 0, rotated.stderr);

  await sendText(alice, 'still there?');
  await alice.page.waitForSelector('#key-change:not([hidden])', { timeout: WAIT_MS });
  // The new list came with a newer root of localhost's key log, which the page checked only
  // adds to the one it had seen (akd's append-only proof, verified in the page).
  assert.ok(await alice.page.evaluate(() => window.sealpostDebug.rootsVerified >= 1),
    'the newer root was verified');
  assert.equal(await alice.page.isHidden('#safety'), true, 'no "verified" while it is pending');
  assert.equal(await alice.page.isVisible('#key-changed-badge'), true);
  assert.equal(await alice.page.textContent('#kc-old'), verifiedNumber);
  const newNumber = await alice.page.textContent('#kc-new');
  assert.notEqual(newNumber, verifiedNumber);
  assert.equal(newNumber.split(' ').length, 12);
  assert.equal(await alice.page.isVisible('#kc-was-verified'), true);
  // The panel shows as soon as the list is refused; the send's failure says "not sent" a
  // moment later (CI once looked in between).
  await alice.page.waitForSelector('#kc-not-sent:not([hidden])', { timeout: WAIT_MS })
    .catch(() => assert.fail('says the message was not sent'));
  assert.equal(await alice.page.isHidden('#error'), true, 'explained, not shouted');
  assert.equal(await alice.page.inputValue('#message-input'), 'still there?', 'the text is kept');
  await alice.page.screenshot({ path: join(SHOTS, 'key-changed.png'), fullPage: true });

  // Accepted after comparing: the new number is the safety number, not verified yet.
  await alice.page.click('#kc-accept');
  await alice.page.waitForSelector('#key-change[hidden]', { state: 'attached', timeout: WAIT_MS });
  assert.equal(await alice.page.textContent('#safety-number'), newNumber);
  assert.equal(await alice.page.isHidden('#verified-badge'), true);
  assert.equal(await alice.page.isHidden('#key-changed-badge'), true);
  await sendAndWait('still there?');
});
