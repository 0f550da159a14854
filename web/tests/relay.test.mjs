// Calls through a real coturn relay (`turnserver`, use-auth-secret) with the broker's TURN
// credentials: both pages use iceTransportPolicy 'relay'. Wrong and expired credentials are
// refused by the relay.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHmac, randomBytes } from 'node:crypto';
import {
  startBroker, startCoturn, launchBrowser, newUser, addContact, waitFor, inboundPackets,
  callAndAnswer, waitCallState, selectedCandidateType, WAIT_MS,
} from './harness.mjs';

const SECRET = randomBytes(24).toString('base64');
let coturn;
let broker;
let browser;
let alice;
let bob;

before(async () => {
  coturn = await startCoturn(SECRET);
  broker = await startBroker([
    '--turn-urls', coturn.url, '--turn-secret', SECRET, '--turn-ttl-secs', '600',
  ]);
  browser = await launchBrowser();
  alice = await newUser(browser, broker, 'alice@localhost', '?ice=relay');
  bob = await newUser(browser, broker, 'bob@localhost', '?ice=relay');
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
  if (coturn) await coturn.stop();
});

/** Gathers candidates in `user`'s page with the given ICE servers, relay only. */
function gather(user, iceServers) {
  return user.page.evaluate(async (servers) => {
    const pc = new RTCPeerConnection({ iceServers: servers, iceTransportPolicy: 'relay' });
    const out = { relay: 0, errors: [] };
    pc.onicecandidate = (ev) => {
      if (ev.candidate && ev.candidate.type === 'relay') out.relay += 1;
    };
    pc.onicecandidateerror = (ev) => out.errors.push(ev.errorCode);
    pc.createDataChannel('probe');
    await pc.setLocalDescription(await pc.createOffer());
    await new Promise((resolve) => {
      if (pc.iceGatheringState === 'complete') return resolve();
      pc.onicegatheringstatechange = () => { if (pc.iceGatheringState === 'complete') resolve(); };
      setTimeout(resolve, 20_000);
    });
    pc.close();
    return out;
  }, iceServers);
}

function brokerCredentials(user) {
  return user.page.evaluate(() => window.sealpostDebug.turnCredentials());
}

test('the broker\'s credentials get a relay allocation; wrong or expired ones are refused', async () => {
  const creds = await brokerCredentials(alice);
  assert.deepEqual(creds.urls, [coturn.url]);
  assert.match(creds.username, /^\d+:[A-Za-z0-9_-]{22}$/);
  const good = await gather(alice, [{ urls: creds.urls, username: creds.username, credential: creds.credential }]);
  assert.ok(good.relay > 0, `valid credentials: ${JSON.stringify(good)}`);

  const wrong = await gather(alice, [{ urls: creds.urls, username: creds.username, credential: 'd3JvbmcgcGFzc3dvcmQ=' }]);
  assert.equal(wrong.relay, 0, `wrong credential: ${JSON.stringify(wrong)}`);
  assert.ok(wrong.errors.includes(401), `wrong credential: ${JSON.stringify(wrong)}`);

  // Correctly signed with the shared secret, but expired a minute ago.
  const expiredName = `${Math.floor(Date.now() / 1000) - 60}:${randomBytes(16).toString('base64url')}`;
  const expiredCred = createHmac('sha1', SECRET).update(expiredName).digest('base64');
  const expired = await gather(alice, [{ urls: creds.urls, username: expiredName, credential: expiredCred }]);
  assert.equal(expired.relay, 0, `expired credential: ${JSON.stringify(expired)}`);
  assert.ok(expired.errors.includes(401), `expired credential: ${JSON.stringify(expired)}`);
});

test('a relayed video call connects through coturn with the fingerprint check', async () => {
  await addContact(alice, 'bob@localhost');
  await callAndAnswer(alice, bob);
  await waitCallState(alice, 'connected');
  await waitCallState(bob, 'connected');
  for (const user of [alice, bob]) {
    await user.page.waitForFunction(() => window.sealpostDebug.fingerprintCheck === 'passed', null, { timeout: WAIT_MS });
    assert.equal(await selectedCandidateType(user), 'relay');
  }
  for (const user of [alice, bob]) {
    let prev = { ...(await inboundPackets(user)), at: Date.now() };
    for (let i = 0; i < 3; i++) {
      prev = await waitFor('relayed packets to grow for a second', async () => {
        const now = await inboundPackets(user);
        return Date.now() - prev.at >= 1000 && now.audio > prev.audio && now.video > prev.video
          ? { ...now, at: Date.now() } : null;
      });
    }
    assert.ok(prev.audio > 50 && prev.video > 30, JSON.stringify(prev));
  }
  const setupMs = await alice.page.evaluate(() => window.sealpostDebug.setupMs);
  console.log(`# relayed call set-up (offer sent -> connected): ${setupMs.toFixed(0)} ms`);
  await alice.page.click('#hangup');
  await waitCallState(bob, 'ended');
  // The relay saw opaque usernames only: no handle, no device.
  const log = coturn.log();
  assert.match(log, /\d+:[A-Za-z0-9_-]{22}/);
  assert.ok(!log.includes('alice') && !log.includes('bob'), 'the relay log names a user');
});
