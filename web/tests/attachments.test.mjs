// Attachments in the browser: alice sends bob a picture (sealed in her page, uploaded in
// pieces, announced with a preview made in her page), a text file and a voice note; bob's page
// shows the preview, opens the picture full size, saves the file and plays the voice note,
// each opened and checked in his page.
// Screenshots go to $SEALPOST_SCREENSHOTS.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync, readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startBroker, launchBrowser, newUser, addContact, waitFor, WAIT_MS } from './harness.mjs';

const SHOTS = process.env.SEALPOST_SCREENSHOTS || join(tmpdir(), 'sealpost-screenshots');

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

test('a picture and a file go from one page to another, end to end encrypted', async () => {
  await addContact(alice, 'bob@localhost');
  // A real picture: a screenshot of alice's page, 400 × 300.
  const picture = await alice.page.screenshot({ clip: { x: 0, y: 0, width: 400, height: 300 } });
  await alice.page.setInputFiles('#attach-input', { name: 'beach.png', mimeType: 'image/png', buffer: picture });
  await waitFor('alice sent it', () => alice.page.evaluate(() => window.sealpostDebug.sentFiles.length === 1));
  await waitFor('alice sees her picture', () => alice.page.evaluate(() =>
    document.querySelectorAll('#messages .message.outgoing .thumbnail').length === 1));

  await waitFor('bob is told', () => bob.page.evaluate(() =>
    window.sealpostDebug.files.some((f) => f.name === 'beach.png')));
  await bob.page.click('#conversations button[data-handle="alice@localhost"]');
  await bob.page.waitForSelector('#messages .message.incoming .thumbnail', { timeout: WAIT_MS });
  await bob.page.click('#messages .message.incoming .open-file');
  await waitFor('bob sees it full size', () => bob.page.evaluate(() => {
    if (window.sealpostDebug.errors.length) throw new Error(JSON.stringify(window.sealpostDebug.errors));
    const img = document.getElementById('viewer-img');
    return !document.getElementById('viewer').hidden && img.complete && img.naturalWidth === 400
      && img.naturalHeight === 300;
  }));
  mkdirSync(SHOTS, { recursive: true });
  await bob.page.setViewportSize({ width: 1280, height: 800 });
  await bob.page.screenshot({ path: join(SHOTS, 'attachment-open-1280.png') });
  await bob.page.click('#viewer-close');

  // A text file: bob saves it, and it is the same bytes.
  const notes = Buffer.from('meet at the north entrance, 9:00\n'.repeat(5000));
  await alice.page.setInputFiles('#attach-input', { name: 'notes.txt', mimeType: 'text/plain', buffer: notes });
  await waitFor('alice sent the file', () => alice.page.evaluate(() => window.sealpostDebug.sentFiles.length === 2));
  await waitFor('bob has it', () => bob.page.evaluate(() =>
    document.querySelectorAll('#messages .message.incoming .open-file').length === 2));
  const [download] = await Promise.all([
    bob.page.waitForEvent('download', { timeout: WAIT_MS }),
    bob.page.click('#messages .message.incoming:last-child .open-file'),
  ]);
  assert.equal(download.suggestedFilename(), 'notes.txt');
  assert.deepEqual(readFileSync(await download.path()), notes);

  // A voice note: recorded in alice's page (the fake microphone), played in bob's.
  await alice.page.click('#record');
  await alice.page.waitForFunction(() => document.getElementById('record').textContent === 'Stop and send');
  await new Promise((r) => setTimeout(r, 1500));
  await alice.page.click('#record');
  await waitFor('alice sent the voice note', () => alice.page.evaluate(() => window.sealpostDebug.sentFiles.length === 3));
  await waitFor('bob has it', () => bob.page.evaluate(() =>
    document.querySelectorAll('#messages .message.incoming .open-file').length === 3));
  await bob.page.click('#messages .message.incoming:last-child .open-file');
  await waitFor('bob plays it', () => bob.page.evaluate(() => {
    const player = document.querySelector('#messages .message.incoming:last-child audio');
    return player && !player.hidden && player.readyState >= 1 && !player.error;
  }));

  await bob.page.screenshot({ path: join(SHOTS, 'attachment-1280.png'), fullPage: true });
  await bob.page.setViewportSize({ width: 390, height: 844 });
  await bob.page.screenshot({ path: join(SHOTS, 'attachment-390.png'), fullPage: true });
  for (const u of [alice, bob]) {
    assert.deepEqual(await u.page.evaluate(() => window.sealpostDebug.errors), [], `${u.handle}'s page shows no error`);
  }
});
