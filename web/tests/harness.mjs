// Test harness for the browser tests: the real broker binary (target/debug/sealpost) on
// 127.0.0.1:0 with a temp data dir, a real coturn (`turnserver`) with its own temp config, and
// Debian's Chromium driven by playwright-core (never a downloaded browser). Waits are on
// conditions with bounded timeouts, never plain sleeps.

import { spawn } from 'node:child_process';
import { createSocket } from 'node:dgram';
import { randomBytes } from 'node:crypto';
import { mkdtempSync, mkdirSync, writeFileSync, readFileSync, readdirSync, statSync, openSync, rmSync, existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

const here = dirname(fileURLToPath(import.meta.url));
export const ROOT = resolve(here, '..', '..');
export const WEB_ROOT = resolve(here, '..', 'dist');
export const BROKER_BIN = process.env.SEALPOST_BIN || join(ROOT, 'target', 'debug', 'sealpost');
export const WAIT_MS = 30_000;
/** The passphrase test users lock their browser state with. */
export const PASSPHRASE = 'correct horse battery staple';
export const SCREENSHOTS = process.env.SEALPOST_SCREENSHOTS || '/tmp/sealpost-screenshots';

export const CHROMIUM_ARGS = [
  '--headless=new', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
  '--disable-background-networking', '--disable-component-update', '--disable-sync',
  '--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream',
  '--allow-loopback-in-peer-connection',
];

/** Polls `check` (async) until it returns a truthy value; throws after `ms`. */
export async function waitFor(what, check, ms = WAIT_MS, every = 50) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await check();
      if (last) return last;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, every));
  }
}

function readFirstLine(stream) {
  return new Promise((resolveLine, reject) => {
    let buf = '';
    const onData = (chunk) => {
      buf += chunk.toString();
      const nl = buf.indexOf('\n');
      if (nl >= 0) {
        stream.off('data', onData);
        resolveLine(buf.slice(0, nl));
      }
    };
    stream.on('data', onData);
    stream.on('end', () => reject(new Error('process ended before its first line')));
  });
}

/** Starts the broker; `extra` are more `serve` flags. */
export async function startBroker(extra = []) {
  const dir = mkdtempSync(join(tmpdir(), 'sealpost-web-test-'));
  const logPath = join(dir, 'broker.log');
  const broker = {
    dir, logPath, child: null, base: null, dataDir: join(dir, 'data'),
    async stop() {
      const { child } = broker;
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 10_000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
    },
    /** Starts it again (after `stop`) on the same address with the same data. */
    async restart() {
      await spawnBroker(broker, broker.base.replace(/^http:\/\//, ''), extra);
    },
    cleanup() { rmSync(dir, { recursive: true, force: true }); },
    /** The broker answers the next durable envelope as taken and drops it (a test-only hook
     * of debug builds): a broker withholding one message. */
    withholdNext() { writeFileSync(join(dir, 'withhold-next'), ''); },
    /** Whether the envelope `withholdNext` asked for was dropped. */
    withheld() { return !existsSync(join(dir, 'withhold-next')); },
  };
  await spawnBroker(broker, '127.0.0.1:0', extra);
  return broker;
}

async function spawnBroker(broker, listen, extra) {
  const log = openSync(broker.logPath, 'a');
  const child = spawn(BROKER_BIN, [
    'serve', '--listen', listen, '--data-dir', broker.dataDir,
    '--domain', 'localhost', '--web-root', WEB_ROOT, '--log-level', 'debug',
    '--ip-rate', '0', '--device-rate', '0', '--stranger-rate', '0', '--claim-rate', '0',
    '--shutdown-drain-ms', '200', ...extra,
  ], {
    stdio: ['ignore', 'pipe', log],
    env: { ...process.env, SEALPOST_FAILPOINT_WITHHOLD_FILE: join(broker.dir, 'withhold-next') },
  });
  const line = await readFirstLine(child.stdout);
  const addr = line.trim().replace(/^listening on /, '');
  if (!/^127\.0\.0\.1:\d+$/.test(addr)) throw new Error(`unexpected broker line ${line}; see ${broker.logPath}`);
  broker.child = child;
  broker.base = `http://${addr}`;
}

/** A free UDP port on 127.0.0.1 (bound, then released). */
async function freeUdpPort() {
  const sock = createSocket('udp4');
  await new Promise((r) => sock.bind(0, '127.0.0.1', r));
  const { port } = sock.address();
  await new Promise((r) => sock.close(r));
  return port;
}

/** Whether a STUN binding request to `port` is answered. */
function stunAnswers(port) {
  return new Promise((resolveAnswer) => {
    const sock = createSocket('udp4');
    const req = Buffer.alloc(20);
    req.writeUInt16BE(0x0001, 0); // binding request
    req.writeUInt16BE(0, 2);
    req.writeUInt32BE(0x2112a442, 4); // magic cookie
    randomBytes(12).copy(req, 8);
    const done = (ok) => { clearTimeout(timer); sock.close(); resolveAnswer(ok); };
    const timer = setTimeout(() => done(false), 300);
    sock.on('message', () => done(true));
    sock.on('error', () => done(false));
    sock.send(req, port, '127.0.0.1');
  });
}

/**
 * Starts coturn with its own temp config: use-auth-secret with `secret`, loopback only.
 * allow-loopback-peers is set HERE ONLY (both call ends are on 127.0.0.1); the shipped
 * deploy/turnserver.conf denies loopback and private peers.
 */
export async function startCoturn(secret) {
  const dir = mkdtempSync(join(tmpdir(), 'sealpost-coturn-'));
  const port = await freeUdpPort();
  const minPort = 20000 + Math.floor(Math.random() * 20000);
  const conf = join(dir, 'turnserver.conf');
  writeFileSync(conf, [
    'listening-ip=127.0.0.1',
    'relay-ip=127.0.0.1',
    `listening-port=${port}`,
    `min-port=${minPort}`,
    `max-port=${minPort + 200}`,
    'use-auth-secret',
    `static-auth-secret=${secret}`,
    'realm=sealpost.test',
    'fingerprint',
    'allow-loopback-peers',
    'no-cli',
    'no-tls',
    'no-dtls',
    'no-tcp-relay',
    `userdb=${join(dir, 'turndb')}`,
    `pidfile=${join(dir, 'turnserver.pid')}`,
    'log-file=stdout',
    'simple-log',
    'verbose',
    '',
  ].join('\n'));
  const logPath = join(dir, 'coturn.log');
  const log = openSync(logPath, 'a');
  const child = spawn('turnserver', ['-c', conf], { stdio: ['ignore', log, log] });
  await waitFor('coturn to answer STUN', async () => {
    if (child.exitCode !== null) throw new Error(`turnserver exited; see ${logPath}`);
    return stunAnswers(port);
  }, 20_000, 100);
  return {
    port, logPath, url: `turn:127.0.0.1:${port}?transport=udp`,
    log() { return readFileSync(logPath, 'utf8'); },
    async stop() {
      if (child.exitCode !== null) return;
      const exited = new Promise((r) => child.once('exit', r));
      child.kill('SIGTERM');
      await Promise.race([exited, new Promise((r) => setTimeout(r, 5000))]);
      if (child.exitCode === null) child.kill('SIGKILL');
      rmSync(dir, { recursive: true, force: true });
    },
  };
}

export async function launchBrowser() {
  return chromium.launch({
    executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
    headless: true,
    args: CHROMIUM_ARGS,
  });
}

/** A user in their own browser context: opens the page and registers `handle`. */
export async function newUser(browser, broker, handle, query = '') {
  const context = await browser.newContext();
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
  await page.goto(`${broker.base}/web/${query}`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  await page.fill('#handle', handle);
  await page.fill('#passphrase', PASSPHRASE);
  await page.click('#register');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  return { context, page, handle, consoleLines };
}

/** Opens a new page in `user`'s browser (same storage) and unlocks it with the passphrase. */
export async function reopen(user, broker) {
  const page = await user.context.newPage();
  page.on('console', (m) => user.consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => user.consoleLines.push(`pageerror: ${e.message}`));
  await page.goto(`${broker.base}/web/`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  await page.waitForSelector('#unlock:not([hidden])', { timeout: WAIT_MS });
  await page.fill('#unlock-passphrase', PASSPHRASE);
  await page.click('#unlock-button');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  return page;
}

/** Saves a screenshot of `page` at 1280 and 390 px wide as `<name>-1280.png`, `<name>-390.png`
 * (the page is put back to its size after). */
export async function screenshots(page, name, prepare = async () => {}) {
  mkdirSync(SCREENSHOTS, { recursive: true });
  const size = page.viewportSize() || { width: 1280, height: 720 };
  try {
    for (const [width, height] of [[1280, 800], [390, 844]]) {
      await page.setViewportSize({ width, height });
      await prepare(width);
      await page.screenshot({ path: join(SCREENSHOTS, `${name}-${width}.png`) });
    }
  } finally {
    await page.setViewportSize(size);
  }
}

/** Whether the page scrolls sideways (it must not, at any width). */
export function overflowsSideways(page) {
  return page.evaluate(() => document.scrollingElement.scrollWidth > window.innerWidth);
}

/** Links a new browser to `user`'s account with a link code shown by `user`'s page; resolves
 * once it is online with its KeyPackages published (others can add it to groups). */
export async function linkDevice(browser, broker, user) {
  await user.page.click('#open-settings');
  await user.page.click('#link-device');
  const code = await user.page.waitForFunction(() => {
    const t = document.getElementById('link-code').textContent;
    return t.includes('.') ? t : null;
  }, null, { timeout: WAIT_MS }).then((h) => h.jsonValue());
  await user.page.click('#settings-close');
  const context = await browser.newContext();
  const page = await context.newPage();
  const consoleLines = [];
  page.on('console', (m) => consoleLines.push(`${m.type()}: ${m.text()}`));
  page.on('pageerror', (e) => consoleLines.push(`pageerror: ${e.message}`));
  await page.goto(`${broker.base}/web/`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  await page.click('#tab-link');
  await page.fill('#handle', user.handle);
  await page.fill('#link-code-input', code);
  await page.fill('#passphrase', PASSPHRASE);
  await page.click('#link');
  await page.waitForFunction(
    () => window.sealpostDebug.linked && window.sealpostDebug.online && window.sealpostDebug.keyPackages,
    null, { timeout: WAIT_MS },
  );
  return { context, page, handle: user.handle, consoleLines };
}

export async function addContact(user, handle) {
  await user.page.fill('#contact-handle', handle);
  await user.page.click('#add-contact');
  await user.page.waitForSelector(`#conversations button[data-handle="${handle}"]`, { timeout: WAIT_MS });
  await user.page.click(`#conversations button[data-handle="${handle}"]`);
}

/** Opens the conversation's settings (safety number, verify, disappearing messages). */
export async function openChatInfo(user) {
  if (await user.page.isHidden('#chat-info')) await user.page.click('#chat-info-toggle');
}

export async function sendText(user, text) {
  await user.page.fill('#message-input', text);
  await user.page.click('#send');
}

export async function waitForMessage(user, text) {
  await user.page.waitForFunction(
    (t) => [...document.querySelectorAll('#messages li.incoming .text')].some((el) => el.textContent === t),
    text, { timeout: WAIT_MS },
  );
}

/** Inbound RTP packet counters of the current call: {audio, video}. */
export function inboundPackets(user) {
  return user.page.evaluate(async () => {
    const call = window.sealpostDebug.call;
    if (!call || !call.pc) return null;
    const out = { audio: 0, video: 0 };
    (await call.pc.getStats()).forEach((s) => {
      if (s.type === 'inbound-rtp') out[s.kind] += s.packetsReceived;
    });
    return out;
  });
}

/** The local candidate type of the selected candidate pair (host, srflx, relay). */
export function selectedCandidateType(user) {
  return user.page.evaluate(async () => {
    const call = window.sealpostDebug.call;
    const stats = await call.pc.getStats();
    let pair = null;
    stats.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    return pair ? stats.get(pair.localCandidateId).candidateType : null;
  });
}

/** Starts a video call from `caller` to `callee` (selected contact) and answers it. */
export async function callAndAnswer(caller, callee) {
  await caller.page.click('#call-video');
  await callee.page.waitForSelector('#incoming:not([hidden])', { timeout: WAIT_MS });
  await callee.page.click('#answer');
}

export async function waitCallState(user, state) {
  await user.page.waitForFunction((s) => window.sealpostDebug.callState === s, state, { timeout: WAIT_MS });
}

/** Every regular file under `dir`, recursively. */
export function filesUnder(dir) {
  const out = [];
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    const st = statSync(p);
    if (st.isDirectory()) out.push(...filesUnder(p));
    else if (st.isFile()) out.push(p);
  }
  return out;
}

/** Which of `needles` occur in any file under `dir` or in `extraFiles`. */
export function scanFor(dir, extraFiles, needles) {
  const found = [];
  for (const file of [...filesUnder(dir), ...extraFiles]) {
    const bytes = readFileSync(file);
    for (const n of needles) {
      if (bytes.includes(Buffer.from(n))) found.push(`${n} in ${file}`);
    }
  }
  return found;
}
