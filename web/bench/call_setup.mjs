// Call set-up time, offer sent → media connected (the caller's RTCPeerConnection reaches
// 'connected'), direct and relayed through coturn, measured in the real page with headless
// Chromium on 127.0.0.1. Usage (after web/build.sh and cargo build):
//
//   node web/bench/call_setup.mjs [calls per mode, default 10]
//
// Each call: the caller clicks "Video call" (getUserMedia, createOffer, the offer encrypted,
// sealed and sent through the broker), the callee's page rings, answers (getUserMedia,
// createAnswer, answer sent back), ICE and DTLS complete. The callee answers as soon as it
// rings, so the figure is the protocol's set-up time, not a person's.

import { randomBytes } from 'node:crypto';
import {
  startBroker, startCoturn, launchBrowser, newUser, addContact, callAndAnswer, waitCallState,
} from '../tests/harness.mjs';

const calls = Number(process.argv[2] || 10);

function summary(ms) {
  const s = [...ms].sort((a, b) => a - b);
  const at = (q) => s[Math.min(s.length - 1, Math.floor(q * s.length))];
  return `n=${s.length} median ${at(0.5).toFixed(0)} ms, p90 ${at(0.9).toFixed(0)} ms, min ${s[0].toFixed(0)} ms, max ${s.at(-1).toFixed(0)} ms`;
}

async function measure(label, brokerArgs, query) {
  const broker = await startBroker(brokerArgs);
  const browser = await launchBrowser();
  try {
    const alice = await newUser(browser, broker, 'alice@localhost', query);
    const bob = await newUser(browser, broker, 'bob@localhost', query);
    await addContact(alice, 'bob@localhost');
    const times = [];
    const answers = [];
    for (let i = 0; i < calls + 1; i++) {
      await callAndAnswer(alice, bob);
      await waitCallState(alice, 'connected');
      await waitCallState(bob, 'connected');
      const [ms, answerMs] = await alice.page.evaluate(
        () => [window.sealpostDebug.setupMs, window.sealpostDebug.answerMs],
      );
      if (i > 0) { // the first call also opens the sealed connection: warm-up
        times.push(ms);
        answers.push(answerMs);
      }
      await alice.page.click('#hangup');
      await waitCallState(bob, 'ended');
    }
    console.log(`${label}: offer sent -> connected ${summary(times)}`);
    console.log(`${label}: of which offer sent -> answer received ${summary(answers)}`);
  } finally {
    await browser.close();
    await broker.stop();
    broker.cleanup();
  }
}

await measure('direct (host candidates)', [], '');
const secret = randomBytes(24).toString('base64');
const coturn = await startCoturn(secret);
try {
  await measure('relayed (coturn, iceTransportPolicy relay)',
    ['--turn-urls', coturn.url, '--turn-secret', secret], '?ice=relay');
} finally {
  await coturn.stop();
}
