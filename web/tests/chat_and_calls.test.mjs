// Two users in two browser contexts on one broker (127.0.0.1): end-to-end encrypted chat,
// a direct video call with the DTLS fingerprint check, a tampered fingerprint, and a scan of
// the broker's data directory and logs for plaintext, SDP and ICE candidates.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import {
  startBroker, launchBrowser, newUser, addContact, sendText, waitForMessage, waitFor,
  inboundPackets, callAndAnswer, waitCallState, scanFor, selectedCandidateType, reopen, WAIT_MS,
  openChatInfo,
} from './harness.mjs';

let broker;
let browser;
let alice;
let bob;
const canaries = ['canary-alice-to-bob-7f3a', 'canary-bob-to-alice-91c2', 'canary-backlog-3d05'];
const seenSdp = []; // fingerprints and ICE ufrags used in the calls, to scan for

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

async function rememberSdp(user) {
  const found = await user.page.evaluate(() => {
    const call = window.sealpostDebug.call || window.sealpostDebug.lastCall;
    const out = [];
    for (const d of [call.pc.localDescription, call.pc.remoteDescription]) {
      if (!d) continue;
      for (const m of d.sdp.matchAll(/a=(fingerprint:\S+ \S+|ice-ufrag:\S+|ice-pwd:\S+)/g)) out.push(m[1]);
    }
    return out;
  });
  seenSdp.push(...found);
}

test('two users exchange end-to-end encrypted messages and see each other\'s text', async () => {
  await addContact(alice, 'bob@localhost');
  await sendText(alice, canaries[0]);
  await waitForMessage(bob, canaries[0]);
  await bob.page.click('#conversations button[data-handle="alice@localhost"]');
  await sendText(bob, canaries[1]);
  await waitForMessage(alice, canaries[1]);
  // Both pages show the same safety number, derived from both master keys.
  const a = await alice.page.textContent('#safety-number');
  const b = await bob.page.textContent('#safety-number');
  assert.match(a, /^\d{5}( \d{5}){11}$/);
  assert.equal(a, b);
  await openChatInfo(alice);
  await alice.page.click('#verify');
  await alice.page.waitForSelector('#verified-badge:not([hidden])', { timeout: WAIT_MS });
  // Bob's reply went sealed (he holds Alice's delivery token after her first message), and
  // without an error.
  assert.equal(await bob.page.evaluate(() => !!document.querySelector('#error:not([hidden])')), false);
  const replies = await bob.page.evaluate(
    () => window.sealpostDebug.sends.filter((s) => s.to === 'alice@localhost'),
  );
  assert.ok(replies.length >= 1, 'bob sent to alice');
  assert.equal(replies.at(-1).sealed, true, 'bob\'s reply went over /v1/sealed');
});

test('a message sent while the contact is away arrives from the backlog when they sign in', async () => {
  await bob.page.close();
  await sendText(alice, canaries[2]);
  // Bob comes back: a new tab in his browser (same storage), signing in to his account.
  const page = await reopen(bob, broker);
  bob = { ...bob, page };
  await bob.page.click('#conversations button[data-handle="alice@localhost"]');
  await waitForMessage(bob, canaries[2]);
  // The earlier conversation is still there (the state is kept encrypted in the browser).
  await waitForMessage(bob, canaries[0]);
});

test('a video call connects, media flows both ways and the fingerprint check passes', async () => {
  await callAndAnswer(alice, bob);
  await waitCallState(alice, 'connected');
  await waitCallState(bob, 'connected');
  for (const user of [alice, bob]) {
    await user.page.waitForFunction(() => window.sealpostDebug.fingerprintCheck === 'passed', null, { timeout: WAIT_MS });
  }
  // Inbound audio and video RTP counters keep growing, second after second, for 4 s.
  const samples = { alice: [], bob: [] };
  for (let i = 0; i < 4; i++) {
    for (const [name, user] of [['alice', alice], ['bob', bob]]) {
      const prev = samples[name].at(-1) || { ...(await inboundPackets(user)), at: Date.now() };
      const next = await waitFor('inbound packets to grow for a second', async () => {
        const now = await inboundPackets(user);
        return Date.now() - prev.at >= 1000 && now.audio > prev.audio && now.video > prev.video
          ? { ...now, at: Date.now() } : null;
      });
      samples[name].push(next);
    }
  }
  for (const [name, s] of Object.entries(samples)) {
    const last = s.at(-1);
    assert.ok(last.audio > 100 && last.video > 50, `${name}: ${JSON.stringify(s)}`);
  }
  const type = await selectedCandidateType(alice);
  const setupMs = await alice.page.evaluate(() => window.sealpostDebug.setupMs);
  console.log(`# direct call set-up (offer sent -> connected): ${setupMs.toFixed(0)} ms, candidate ${type}`);
  await rememberSdp(alice);
  await rememberSdp(bob);
  await alice.page.click('#hangup');
  await waitCallState(bob, 'ended');
});

test('a tampered fingerprint ends the call with the identity error', async () => {
  // Alice's page vouches (inside the encrypted offer) for another certificate than the one
  // its DTLS uses: what a man in the middle substituting media keys would look like.
  await alice.page.evaluate(() => { window.sealpostDebug.tamperOutgoingFingerprint = true; });
  await callAndAnswer(alice, bob);
  await bob.page.waitForFunction(() => window.sealpostDebug.fingerprintCheck === 'failed', null, { timeout: WAIT_MS });
  assert.equal(await bob.page.evaluate(() => window.sealpostDebug.callState), 'failed');
  const error = await bob.page.textContent('#error');
  assert.match(error, /Identity error/);
  assert.equal(await bob.page.textContent('#fingerprint-state'), 'identity error');
  // The caller is told (hang-up) and its call ends too.
  await waitCallState(alice, 'ended');
  await alice.page.evaluate(() => { window.sealpostDebug.tamperOutgoingFingerprint = false; });
});

test('the broker\'s data directory and logs hold no chat plaintext, SDP or ICE candidates', async () => {
  await broker.stop(); // sled holds its files open; scan them at rest
  const logs = readFileSync(broker.logPath, 'utf8');
  assert.ok(logs.length > 0);
  const needles = [
    ...canaries,
    'a=fingerprint', 'a=ice-ufrag', 'a=candidate', 'candidate:', 'typ host', 'v=0\r\n', 'm=video',
    ...seenSdp.map((s) => s.replace(/^fingerprint:\S+ /, '')),
  ];
  assert.ok(seenSdp.length >= 4, `collected ${seenSdp.length} SDP values`);
  const found = scanFor(broker.dataDir, [broker.logPath], needles);
  assert.deepEqual(found, []);
});
