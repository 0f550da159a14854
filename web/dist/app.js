// Sealpost browser client. Networking (fetch, WebSockets, WebRTC) happens here; everything that
// touches a key or a plaintext happens in the wasm engine (web/src/lib.rs): this script never
// holds a secret key and sends the broker only what the engine sealed.
//
// Calls: offer/answer/ICE/hang-up travel as sealed, Olm-encrypted envelopes (urgent class, 60 s
// TTL). Media is WebRTC (DTLS-SRTP) end to end. The DTLS certificate fingerprint of each side
// travels inside the encrypted offer/answer, from a device in the peer's verified signed device
// list; the page checks (1) that the SDP it applies carries that fingerprint and (2) once
// connected, that the DTLS peer certificate (getStats) has it. Any mismatch ends the call with
// an identity error.

import init, {
  PendingAccount, Engine, FileUpload, FileDownload, sdp_fingerprint, fingerprints_match, unbatch,
} from './pkg/sealpost_web.js';
import { drawQr } from './qr.js';

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SERVER = location.origin;
const WS_BASE = SERVER.replace(/^http/, 'ws');
const LIST_MAX_AGE_MS = 60_000;
const CALL_RING_MS = 60_000;
const SEND_TIMEOUT_MS = 20_000;

let engine = null;
let localKey = null;
let ws = null;
let sealedWs = null;
let current = null; // the selected contact
let currentGroup = null; // the selected group (hex id), when a group is shown
let wsBackoff = 250;
const pendingResults = new Map(); // envelope id (hex) -> resolve
const contacts = new Set();
let engineVersion = 0; // bumped whenever the conversations may have changed
const notices = []; // shown in the conversation until dismissed: {user, devices, own_account}

// Observable state for people (the page) and for tests (window.sealpostDebug).
const debug = {
  online: false,
  messages: [],
  errors: [],
  call: null,
  callState: 'idle',
  fingerprintCheck: null,
  setupMs: null,
  tamperOutgoingFingerprint: false,
  // Every accepted send: its recipient and whether it went sealed (on /v1/sealed).
  sends: [],
  // What sends found to tell the user (devices not in an account's signed list), as shown.
  notices: [],
  // How long a fetched device list is used before it is fetched again (tests shorten it).
  listMaxAgeMs: LIST_MAX_AGE_MS,
  // Whether this device's MLS KeyPackages are published (others can add it to groups).
  keyPackages: false,
  // The device the history was sent to (on the approving device), and how many messages the
  // history added (on the new one).
  historySent: null,
  historyImported: null,
  // Files received ({from, name}), sent ({to, name}) and opened (names).
  files: [],
  sentFiles: [],
  opened: [],
  // Calls as logged in the conversations: {peer, outcome, duration_ms, …}.
  callLog: [],
  // Group texts received: {group, from, text}.
  groupMessages: [],
  // Receipts received ({peer, ids, state}), and the connection banner ('offline',
  // 'reconnected' or null).
  receipts: [],
  banner: null,
  // Wake-ups the service worker passed on (a push came).
  wakeups: 0,
};
window.sealpostDebug = debug;
// Whether the engine has a method (newer engines add receipts, typing, disappearing messages).
debug.engineHas = (name) => !!engine && typeof engine[name] === 'function';
// For tests: receipts go without their random delay.
debug.quickReceipts = () => engine.set_receipt_delay(0, 0);
// For tests: the refresh a held envelope brings forward comes within a second (the default is
// a random 5 to 60 s, so that the fetch of a sender's list does not follow its message).
debug.quickHeldRefresh = () => engine.set_timing(1000, 5000, 3_600_000, 100, 1000);

// ------------------------------------------------------------------------------------------
// Helpers

function showError(message) {
  const text = humanize(message);
  debug.errors.push(text);
  $('error-text').textContent = text;
  $('error').hidden = false;
}

function clearError() {
  $('error').hidden = true;
}

// Errors in words a person understands: what happened, and what to do about it. Technical
// detail stays in the console.
function humanize(e) {
  if (e && e.friendly) return e.friendly;
  const text = String(e && e.message ? e.message : e);
  if (e && e.message) console.warn(text);
  if (/^timed out waiting for an existing device/.test(text)) {
    return 'Your other device did not confirm this one in time. Keep Sealpost open there and try again.';
  }
  if (/not connected to the broker|connection_lost/.test(text)) {
    return "You're offline, so that wasn't sent. Try again once you're reconnected.";
  }
  if (/did not answer the send/.test(text)) return 'The server did not answer in time. Check your connection and try again.';
  return text.replace(/\bthe broker\b/g, 'the server');
}

// What an HTTP status means to the person using the app (callers say more where they know).
function friendlyStatus(status) {
  if (status === 401) return 'This device is no longer signed in to its account. Was it removed from another device?';
  if (status === 403) return "The server didn't allow that.";
  if (status === 404) return "That wasn't found on the server.";
  if (status === 409) return 'That name is taken — try another.';
  if (status === 413) return 'That is too large to send.';
  if (status === 429) return 'Too many tries in a short time. Wait a minute, then try again.';
  if (status >= 500) return 'The server is having trouble right now. Try again in a moment.';
  return "The server didn't accept that. Check what you typed and try again.";
}

function b64ToBytes(b64) {
  const bin = atob(b64);
  const out = new Uint8Array(bin.length);
  for (let i = 0; i < bin.length; i++) out[i] = bin.charCodeAt(i);
  return out;
}

function bytesToB64(bytes) {
  let bin = '';
  for (let i = 0; i < bytes.length; i += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  }
  return btoa(bin);
}

// One task at a time: multi-step protocol flows (claim, encrypt, send; open, save, ack) never
// interleave. Answers to sends (send_result) bypass the queue.
let queue = Promise.resolve();
function serial(task) {
  const run = queue.then(task, task);
  queue = run.catch(() => {});
  return run;
}

// Two channels, never mixed: `anon` requests (contacts' device lists, key claims with a
// delivery token) name no sender and go without credentials; Chromium serves requests with
// `credentials: 'omit'` from a separate socket pool, so they never share a connection with
// this account's authenticated requests. Sealed sends go on /v1/sealed, the rest on /v1/ws.
async function api(method, path, { body, headers = {}, auth = false, anon = false } = {}) {
  const h = { ...headers };
  if (auth) h.authorization = engine.bearer();
  if (body !== undefined) h['content-type'] = 'application/json';
  let resp;
  try {
    resp = await fetch(SERVER + path, {
      method, headers: h, body, credentials: anon ? 'omit' : 'same-origin',
    });
  } catch (e) {
    const err = new Error(`cannot reach the broker (${e.message})`);
    err.friendly = "Can't reach the Sealpost server. Check your connection and try again.";
    throw err;
  }
  if (!resp.ok) {
    let detail = '';
    let code = '';
    try {
      const j = await resp.json();
      detail = `${j.error}: ${j.message}`;
      code = j.error;
    } catch (_) { /* not JSON */ }
    const err = new Error(`the broker refused (${resp.status}${detail ? ' ' + detail : ''})`);
    err.status = resp.status;
    err.code = code;
    err.friendly = friendlyStatus(resp.status);
    throw err;
  }
  const text = await resp.text();
  return text ? JSON.parse(text) : null;
}

// ------------------------------------------------------------------------------------------
// Storage: locked under the user's passphrase.
//
// The engine's state is encrypted (ChaCha20-Poly1305) under a random local key. That key is
// stored only wrapped: AES-GCM under a key derived from the passphrase (PBKDF2-SHA256, 310,000
// iterations, random salt), so neither a plaintext key nor a plaintext state is ever in
// localStorage. The little the page keeps for itself (when each conversation was last read,
// the call history) is AES-GCM encrypted under a key derived (HKDF) from the local key. No
// storage key names the account.

const VAULT = 'sealpost:vault';
const STATE = 'sealpost:state';
const UI_STATE = 'sealpost:ui';
const PBKDF2_ITERATIONS = 310_000;
const VAULT_AAD = new TextEncoder().encode('sealpost web vault v1');
const MIN_PASSPHRASE = 8;

// The page's own (encrypted) state: last read time per conversation, call history.
let ui = { lastRead: {}, calls: {}, added: {} };
let uiKey = null;

async function passphraseKey(passphrase, salt, iterations) {
  const base = await crypto.subtle.importKey(
    'raw', new TextEncoder().encode(passphrase), 'PBKDF2', false, ['deriveKey'],
  );
  return crypto.subtle.deriveKey(
    { name: 'PBKDF2', hash: 'SHA-256', salt, iterations },
    base, { name: 'AES-GCM', length: 256 }, false, ['encrypt', 'decrypt'],
  );
}

async function sealVault(passphrase) {
  const salt = crypto.getRandomValues(new Uint8Array(16));
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const key = await passphraseKey(passphrase, salt, PBKDF2_ITERATIONS);
  const wrapped = new Uint8Array(await crypto.subtle.encrypt(
    { name: 'AES-GCM', iv, additionalData: VAULT_AAD }, key, new TextEncoder().encode(localKey),
  ));
  localStorage.setItem(VAULT, JSON.stringify({
    v: 1, kdf: 'PBKDF2-SHA256', iterations: PBKDF2_ITERATIONS,
    salt: bytesToB64(salt), iv: bytesToB64(iv), key: bytesToB64(wrapped),
  }));
}

async function openVault(passphrase) {
  const v = JSON.parse(localStorage.getItem(VAULT));
  const key = await passphraseKey(passphrase, b64ToBytes(v.salt), v.iterations);
  try {
    const raw = await crypto.subtle.decrypt(
      { name: 'AES-GCM', iv: b64ToBytes(v.iv), additionalData: VAULT_AAD }, key, b64ToBytes(v.key),
    );
    return new TextDecoder().decode(raw);
  } catch (_) {
    const e = new Error('wrong passphrase');
    e.friendly = "That passphrase isn't right. Check it (and Caps Lock) and try again.";
    throw e;
  }
}

// ------------------------------------------------------------------------------------------
// A passkey (WebAuthn with the PRF extension), where the browser and authenticator offer it:
// a second way to unlock. The PRF output for a random salt, through HKDF, is an AES-GCM key
// that wraps the same local key; stored are only the credential id, the salt and the wrapped
// key. The passphrase stays (it is needed to add a passkey, and works without one).

const PASSKEY = 'sealpost:passkey';
const PASSKEY_AAD = new TextEncoder().encode('sealpost web passkey v1');

function passkeyOffered() {
  return !!(window.PublicKeyCredential && navigator.credentials && window.isSecureContext);
}

async function prfWrappingKey(secret) {
  const base = await crypto.subtle.importKey('raw', secret, 'HKDF', false, ['deriveKey']);
  return crypto.subtle.deriveKey(
    { name: 'HKDF', hash: 'SHA-256', salt: new Uint8Array(0), info: PASSKEY_AAD },
    base, { name: 'AES-GCM', length: 256 }, false, ['encrypt', 'decrypt'],
  );
}

async function prfEvaluate(rawId, salt) {
  const assertion = await navigator.credentials.get({
    publicKey: {
      challenge: crypto.getRandomValues(new Uint8Array(32)),
      allowCredentials: [{ type: 'public-key', id: rawId }],
      userVerification: 'required',
      extensions: { prf: { eval: { first: salt } } },
    },
  });
  const first = assertion.getClientExtensionResults().prf?.results?.first;
  if (!first) {
    const e = new Error('no PRF result');
    e.friendly = 'This passkey cannot unlock Sealpost. Use your passphrase.';
    throw e;
  }
  return first;
}

async function addPasskey() {
  const salt = crypto.getRandomValues(new Uint8Array(32));
  let cred;
  try {
    cred = await navigator.credentials.create({
      publicKey: {
        rp: { name: 'Sealpost' },
        user: { id: crypto.getRandomValues(new Uint8Array(16)), name: engine.handle(), displayName: engine.handle() },
        challenge: crypto.getRandomValues(new Uint8Array(32)),
        pubKeyCredParams: [{ type: 'public-key', alg: -7 }, { type: 'public-key', alg: -257 }],
        authenticatorSelection: { residentKey: 'preferred', userVerification: 'required' },
        extensions: { prf: { eval: { first: salt } } },
      },
    });
  } catch (e) {
    e.friendly = 'No passkey was made (cancelled, or this browser cannot make one here).';
    throw e;
  }
  const ext = cred.getClientExtensionResults().prf;
  if (!ext || ext.enabled === false) {
    const e = new Error('no PRF');
    e.friendly = "This passkey can't unlock Sealpost (its authenticator has no PRF support). Keep using your passphrase.";
    throw e;
  }
  const rawId = new Uint8Array(cred.rawId);
  const secret = ext.results?.first || await prfEvaluate(rawId, salt);
  const key = await prfWrappingKey(secret);
  const iv = crypto.getRandomValues(new Uint8Array(12));
  const wrapped = new Uint8Array(await crypto.subtle.encrypt(
    { name: 'AES-GCM', iv, additionalData: PASSKEY_AAD }, key, new TextEncoder().encode(localKey),
  ));
  localStorage.setItem(PASSKEY, JSON.stringify({
    v: 1, id: bytesToB64(rawId), salt: bytesToB64(salt), iv: bytesToB64(iv), key: bytesToB64(wrapped),
  }));
  renderPasskey();
}

async function unlockWithPasskey() {
  const p = JSON.parse(localStorage.getItem(PASSKEY));
  let secret;
  try {
    secret = await prfEvaluate(b64ToBytes(p.id), b64ToBytes(p.salt));
  } catch (e) {
    if (!e.friendly) e.friendly = 'The passkey did not unlock Sealpost (cancelled?). Try again, or use your passphrase.';
    throw e;
  }
  const key = await prfWrappingKey(secret);
  let raw;
  try {
    raw = await crypto.subtle.decrypt(
      { name: 'AES-GCM', iv: b64ToBytes(p.iv), additionalData: PASSKEY_AAD }, key, b64ToBytes(p.key),
    );
  } catch (_) {
    const e = new Error('passkey key mismatch');
    e.friendly = "That passkey doesn't open this browser's Sealpost. Use your passphrase.";
    throw e;
  }
  const local = new TextDecoder().decode(raw);
  engine = Engine.load(b64ToBytes(localStorage.getItem(STATE)), local);
  localKey = local;
  await deriveUiKey();
  await loadUi();
}

function renderPasskey() {
  const has = !!localStorage.getItem(PASSKEY);
  $('passkey-setting').hidden = !passkeyOffered();
  $('add-passkey').hidden = has;
  $('remove-passkey').hidden = !has;
  $('passkey-state').textContent = has ? 'This browser can be unlocked with your passkey (or your passphrase).'
    : 'Unlock with your fingerprint, face or security key instead of typing the passphrase.';
}

function hasVault() {
  return !!localStorage.getItem(VAULT) && !!localStorage.getItem(STATE);
}

async function deriveUiKey() {
  const base = await crypto.subtle.importKey('raw', b64ToBytes(localKey), 'HKDF', false, ['deriveKey']);
  uiKey = await crypto.subtle.deriveKey(
    { name: 'HKDF', hash: 'SHA-256', salt: new Uint8Array(0), info: new TextEncoder().encode('sealpost web ui state v1') },
    base, { name: 'AES-GCM', length: 256 }, false, ['encrypt', 'decrypt'],
  );
}

async function loadUi() {
  const stored = localStorage.getItem(UI_STATE);
  if (!stored) return;
  try {
    const [iv, ct] = stored.split('.').map(b64ToBytes);
    const plain = await crypto.subtle.decrypt({ name: 'AES-GCM', iv }, uiKey, ct);
    ui = { ...ui, ...JSON.parse(new TextDecoder().decode(plain)) };
  } catch (e) {
    console.warn(`the page's own state could not be read: ${e.message}`);
  }
}

// Saved a moment later, in order; the last state wins.
let uiDirty = false;
let uiSaving = null;
function saveUi() {
  uiDirty = true;
  if (uiSaving || !uiKey) return;
  uiSaving = (async () => {
    while (uiDirty) {
      uiDirty = false;
      const iv = crypto.getRandomValues(new Uint8Array(12));
      const ct = new Uint8Array(await crypto.subtle.encrypt(
        { name: 'AES-GCM', iv }, uiKey, new TextEncoder().encode(JSON.stringify(ui)),
      ));
      localStorage.setItem(UI_STATE, `${bytesToB64(iv)}.${bytesToB64(ct)}`);
    }
  })().catch((e) => console.warn(e)).finally(() => { uiSaving = null; });
}

function persist() {
  if (!engine) return;
  const bytes = engine.save(localKey);
  localStorage.setItem(STATE, bytesToB64(bytes));
  engineVersion++;
}

function checkHandle(handle) {
  if (!/^[^@\s]+@[^@\s]+$/.test(handle)) {
    const e = new Error('bad handle');
    e.friendly = `Write the full name with its server, like alice@${engine ? engine.handle().split('@')[1] : 'example.org'}.`;
    throw e;
  }
}

function checkPassphrase(passphrase) {
  if (passphrase.length < MIN_PASSPHRASE) {
    const e = new Error('short passphrase');
    e.friendly = `Choose a passphrase of at least ${MIN_PASSPHRASE} characters.`;
    throw e;
  }
}

// ------------------------------------------------------------------------------------------
// Account

async function register(handle, passphrase) {
  checkHandle(handle);
  checkPassphrase(passphrase);
  const pending = PendingAccount.create(handle);
  let created;
  try {
    created = await api('POST', '/v1/accounts', {
      body: JSON.stringify({ handle, identity_keys: pending.identity_keys() }),
    });
  } catch (e) {
    if (e.status === 409) e.friendly = 'That name is taken — try another.';
    else if (e.status === 400) e.friendly = `“${handle}” can't be used as a name here. Check the part after @ is this server's domain, and use letters and digits before it.`;
    else if (e.status === 403) e.friendly = 'This server is not accepting new accounts.';
    throw e;
  }
  engine = pending.finish(created.device_id, created.token);
  localKey = Engine.new_local_key();
  await sealVault(passphrase);
  await deriveUiKey();
  persist();
  const h = encodeURIComponent(handle);
  const keys = engine.key_upload();
  await api('PUT', `/v1/accounts/${h}/devices/${engine.device_id()}/keys`, { body: keys, auth: true });
  engine.mark_keys_published();
  const ownList = engine.own_device_list();
  await api('PUT', `/v1/accounts/${h}/device-list`, { body: ownList, auth: true });
  engine.confirm_own_list(ownList);
  await api('PUT', `/v1/accounts/${h}/delivery-token`, { body: engine.delivery_token_body(), auth: true });
  persist();
}

// This browser joins an existing account with a code shown by one of its devices.
async function link(handle, code, passphrase) {
  checkHandle(handle);
  const dot = code.lastIndexOf('.');
  if (dot < 0) {
    const e = new Error('malformed link code');
    e.friendly = 'That link code is incomplete. Copy it again from your other device (Settings → Link a device).';
    throw e;
  }
  checkPassphrase(passphrase);
  const pending = PendingAccount.create(handle);
  const h = encodeURIComponent(handle);
  let created;
  try {
    created = await api('POST', `/v1/accounts/${h}/devices`, {
      body: JSON.stringify({ identity_keys: pending.identity_keys(), link_code: code.slice(0, dot) }),
    });
  } catch (e) {
    if (e.status === 403 || e.status === 401 || e.status === 404 || e.status === 400) {
      e.friendly = 'That link code is wrong or has expired. Show a new one on your other device and try again.';
    }
    throw e;
  }
  engine = pending.finish_link(created.device_id, created.token, code.slice(dot + 1));
  localKey = Engine.new_local_key();
  await sealVault(passphrase);
  await deriveUiKey();
  persist();
  await api('PUT', `/v1/accounts/${h}/devices/${engine.device_id()}/keys`, { body: engine.key_upload(), auth: true });
  engine.mark_keys_published();
  await serial(() => fetchList(handle)); // pins the account's master key; the grant must match it
  await connect();
  await until(() => debug.online, 'the connection to the broker');
  await sendPayload(handle, { kind: 'link_request' });
  await until(() => debug.linked, 'an existing device to accept this one (keep it open)', 120_000);
  persist();
}

function until(check, what, ms = 30_000) {
  return new Promise((resolve, reject) => {
    const deadline = Date.now() + ms;
    const tick = () => {
      if (check()) return resolve();
      if (Date.now() > deadline) return reject(new Error(`timed out waiting for ${what}`));
      setTimeout(tick, 50);
    };
    tick();
  });
}

async function createLinkCode() {
  const issued = await api('POST', `/v1/accounts/${encodeURIComponent(engine.handle())}/link-codes`, { auth: true });
  const code = engine.link_code(issued.code, issued.expires_ms);
  persist();
  $('link-code').textContent = code;
  drawQr($('link-qr'), code);
  $('link-panel').hidden = false;
  const minutes = Math.max(1, Math.round((issued.expires_ms - Date.now()) / 60_000));
  $('link-status').textContent = `Waiting for the new device… This code works once, for about ${minutes} min.`;
}

// Opens the saved state with the passphrase.
async function unlock(passphrase) {
  const key = await openVault(passphrase);
  engine = Engine.load(b64ToBytes(localStorage.getItem(STATE)), key);
  localKey = key;
  await deriveUiKey();
  await loadUi();
}

// A browser that holds an account saved by an earlier version (its key next to its state,
// in the clear): the user chooses a passphrase, the key is wrapped, the old entries go.
function legacyAccount() {
  for (let i = 0; i < localStorage.length; i++) {
    const m = /^sealpost:(.+):state$/.exec(localStorage.key(i));
    if (m && localStorage.getItem(`sealpost:${m[1]}:key`)) return m[1];
  }
  return null;
}

async function migrateLegacy(handle, passphrase) {
  checkPassphrase(passphrase);
  const key = localStorage.getItem(`sealpost:${handle}:key`);
  engine = Engine.load(b64ToBytes(localStorage.getItem(`sealpost:${handle}:state`)), key);
  localKey = key;
  await sealVault(passphrase);
  await deriveUiKey();
  persist();
  localStorage.removeItem(`sealpost:${handle}:key`);
  localStorage.removeItem(`sealpost:${handle}:state`);
}

function forgetAccount() {
  for (const k of [VAULT, STATE, UI_STATE, PASSKEY]) localStorage.removeItem(k);
  location.reload();
}

async function topUpKeys() {
  const h = encodeURIComponent(engine.handle());
  const path = `/v1/accounts/${h}/devices/${engine.device_id()}/keys`;
  const count = await api('GET', path, { auth: true });
  engine.top_up_keys(count.one_time);
  const body = engine.key_upload();
  if (body) {
    await api('PUT', path, { body, auth: true });
    engine.mark_keys_published();
    persist();
  }
}

// ------------------------------------------------------------------------------------------
// Device lists, sessions, sending

// A signed device list: our own on the authenticated channel, anyone else's anonymously.
async function getList(user) {
  const own = user === engine.handle();
  return api('GET', `/v1/accounts/${encodeURIComponent(user)}/device-list`,
    { auth: own, anon: !own });
}

async function fetchList(user) {
  let answer;
  try {
    answer = await getList(user);
  } catch (e) {
    if (e.status === 404) {
      const missing = new Error(`${user} does not exist or has no devices`);
      missing.status = 404;
      missing.friendly = `There is no one called ${user}. Check the spelling, including the part after @.`;
      throw missing;
    }
    throw e;
  }
  let summary;
  try {
    await checkInLog(user, answer);
    summary = JSON.parse(engine.accept_device_list(user, answer.signed));
  } finally {
    // A changed master key is remembered, and shown, until the user accepts it.
    persist();
    if (user === current) renderSafety();
  }
  return summary;
}

// Key transparency: the list must be the one its domain's log publishes (the proof comes with
// it), and no auditor may have co-signed another root of that log for the same epoch.
async function checkInLog(user, answer) {
  const root = engine.check_transparency(user, answer.signed, answer.evidence || '');
  if (!root) return;
  const { domain, epoch, audit, awaited } = JSON.parse(root);
  if (awaited !== undefined) {
    let c = null;
    try {
      c = await api('GET',
        `/v1/transparency/cosignatures?domain=${encodeURIComponent(domain)}&epoch=${awaited}`,
        { anon: true });
    } catch (_) { /* unreachable: it stays pending */ }
    // Throws on a split view.
    if (c) engine.check_awaited_cosignatures(user, JSON.stringify(c));
  }
  if (audit) {
    // A newer root: the log must prove it only added to the newest one this page saw.
    let at = audit.from;
    while (at < audit.to) {
      const to = Math.min(at + 64, audit.to);
      const proof = await api('GET',
        `/v1/transparency/audit?domain=${encodeURIComponent(domain)}&from=${at}&to=${to}`,
        { anon: true });
      at = engine.verify_roots(domain, JSON.stringify(proof));
      if (at < to) throw new Error(`the key log of ${domain} did not prove epochs ${at}..${to}`);
    }
    engine.accept_verified_root(domain);
    debug.rootsVerified = (debug.rootsVerified || 0) + 1;
  }
  let cosignatures;
  try {
    cosignatures = await api('GET',
      `/v1/transparency/cosignatures?domain=${encodeURIComponent(domain)}&epoch=${epoch}`,
      { anon: true });
  } catch (_) {
    return; // not audited yet, as far as this page can tell
  }
  engine.check_cosignatures(user, JSON.stringify(cosignatures));
}

// This account's own entry in its domain's log: a key none of its devices made is a warning.
async function checkOwnLog() {
  let answer;
  try {
    answer = await api('GET',
      `/v1/accounts/${encodeURIComponent(engine.handle())}/transparency-history`, { auth: true });
  } catch (e) {
    if (e.status === 404) return; // the server keeps no log
    throw e;
  }
  for (const event of JSON.parse(engine.check_own_history(JSON.stringify(answer)))) onEvent(event);
  persist();
}

async function ensureList(user) {
  const known = engine.known_list(user);
  if (known) {
    const k = JSON.parse(known);
    if (Date.now() - k.fetched_ms < debug.listMaxAgeMs) return k;
  }
  return fetchList(user);
}

// Our own account's list as we hold it (any age); fetched (authenticated) only if there is
// none. It is kept fresh at connect and on a timer, never fetched right after a send.
async function ownList() {
  const known = engine.known_list(engine.handle());
  return known ? JSON.parse(known) : fetchList(engine.handle());
}

async function ensureSessions(user) {
  for (const device of JSON.parse(engine.devices_without_session(user))) {
    const headers = JSON.parse(engine.claim_headers(user));
    // With a delivery token the claim names nobody: anonymous channel.
    const anon = !headers.authorization;
    const claimed = await api('POST',
      `/v1/accounts/${encodeURIComponent(user)}/devices/${device}/keys/claim`, { headers, anon });
    engine.create_session(user, device, claimed.key);
  }
  persist();
}

function openSocket(path, onFrame) {
  return new Promise((resolve, reject) => {
    const sock = new WebSocket(WS_BASE + path);
    sock.binaryType = 'arraybuffer';
    sock.onmessage = (ev) => onFrame(new Uint8Array(ev.data));
    sock.onopen = () => resolve(sock);
    sock.onerror = () => reject(new Error(`cannot connect to ${path}`));
  });
}

// Answers to `send` (0x82) and `group_send` (0x88), matched to the waiting send by id.
const RESULT_KINDS = new Set([0x82, 0x88]);

function onSendResult(bytes) {
  const r = JSON.parse(engine.receive(bytes, false));
  const resolve = pendingResults.get(r.id);
  if (resolve) {
    pendingResults.delete(r.id);
    resolve(r);
  }
}

async function sealedSocket() {
  if (sealedWs && sealedWs.readyState === WebSocket.OPEN) return sealedWs;
  sealedWs = await openSocket('/v1/sealed', (bytes) => {
    if (RESULT_KINDS.has(bytes[1])) onSendResult(bytes);
  });
  sealedWs.onclose = () => { sealedWs = null; };
  return sealedWs;
}

async function transmit(out) {
  const sock = out.sealed ? await sealedSocket() : ws;
  if (!sock || sock.readyState !== WebSocket.OPEN) throw new Error('not connected to the broker');
  const answer = new Promise((resolve, reject) => {
    pendingResults.set(out.id, resolve);
    setTimeout(() => {
      if (pendingResults.delete(out.id)) reject(new Error('the broker did not answer the send'));
    }, SEND_TIMEOUT_MS);
  });
  sock.send(b64ToBytes(out.frame));
  return answer;
}

// Payloads that are not messages: not counted in debug.sends.
const QUIET_KINDS = new Set(['typing', 'receipt']);

async function sendOne(to, payload) {
  const sent = { id: '' };
  try {
    return await sendOneTry(to, payload, sent);
  } catch (e) {
    // Given up: what this message named of earlier ones goes with the next (the engine's
    // withheld-message chains).
    if (sent.id && typeof engine.send_given_up === 'function') {
      engine.send_given_up(to, sent.id);
      persist();
    }
    throw e;
  }
}

async function sendOneTry(to, payload, sent) {
  let id = '';
  let devices = '';
  for (let attempt = 0; attempt < 4; attempt++) {
    await ensureSessions(to);
    const out = JSON.parse(engine.encrypt(to, JSON.stringify(payload), id, devices));
    takeNotices();
    id = out.id;
    sent.id = id;
    persist(); // the ratchets advanced: save before anything leaves
    const result = await transmit(out);
    if (result.accepted) {
      if (!QUIET_KINDS.has(payload.kind)) debug.sends.push({ to, sealed: !!out.sealed });
      if (result.receipt) onEvent(result.receipt);
      return id;
    }
    if (result.code === 'stale_devices') {
      await fetchList(to);
      devices = JSON.stringify(result.current_devices);
      continue;
    }
    throw new Error(`the broker refused the message: ${result.code}`);
  }
  throw new Error(`the devices of ${to} kept changing; try again`);
}

// Sends `payload` to every device of `to`, sharing our delivery token first if needed.
function sendPayload(to, payload) {
  return serial(() => sendPayloadNow(to, payload));
}

// The same, for callers already inside a serial task.
async function sendPayloadNow(to, payload) {
  if (to === engine.handle()) await ownList();
  else await ensureList(to);
  if (to !== engine.handle() && !engine.token_shared(to)) {
    await sendOne(to, { kind: 'delivery_token' });
    engine.mark_token_shared(to);
    persist();
  }
  await sendOne(to, payload);
}

// Tells this account's other devices (if any) that a call was handled here.
async function stopRingingElsewhere(callId) {
  const own = engine.handle();
  const list = await serial(() => ownList());
  if (list.devices.length > 1) {
    await sendPayload(own, { kind: 'answered_elsewhere', call_id: callId });
  }
}

// ------------------------------------------------------------------------------------------
// Timed jobs (see sealpost_client::engine::schedule): transcripts go after a random delay,
// authenticated; contacts' lists are refreshed all together, in random order, anonymously,
// periodically or soon after something was held; our own list at connect and every 15 min.

const OWN_LIST_REFRESH_MS = 15 * 60_000;
let ownListDue = 0;
let jobsTimer = null;

function scheduleJobs() {
  if (!engine) return;
  clearTimeout(jobsTimer);
  const t = engine.next_transcript_due_ms();
  let due = Math.min(engine.lists_refresh_due_ms(), ownListDue || Infinity);
  if (t >= 0) due = Math.min(due, t);
  // Re-evaluated at least every minute (a long timer may be throttled).
  const wait = Math.min(Math.max(0, due - Date.now()), 60_000);
  jobsTimer = setTimeout(() => {
    serial(runJobs).catch(showError).finally(scheduleJobs);
  }, wait);
}

async function runJobs() {
  if (!ws || ws.readyState !== WebSocket.OPEN) return;
  // Transcripts that are due, oldest first; each leaves the queue once the broker has it.
  for (let p = engine.due_transcript(); p; p = engine.due_transcript()) {
    const own = engine.handle();
    const mine = await ownList();
    if (mine.devices.length > 1) await sendOne(own, JSON.parse(p));
    engine.transcript_sent();
    persist();
  }
  if (ownListDue && Date.now() >= ownListDue) {
    ownListDue = Date.now() + OWN_LIST_REFRESH_MS * (1 + Math.random() / 2);
    try { await fetchList(engine.handle()); } catch (e) { if (e.status && e.status < 500) throw e; }
    // A busy log (5xx) is asked again at the next refresh.
    try { await checkOwnLog(); } catch (e) { if (!e.status || e.status < 500) showError(e); }
  }
  if (Date.now() >= engine.lists_refresh_due_ms()) {
    for (const user of JSON.parse(engine.lists_to_refresh())) {
      try {
        const answer = await api('GET', `/v1/accounts/${encodeURIComponent(user)}/device-list`,
          { anon: true });
        await checkInLog(user, answer);
        const why = engine.refresh_list(user, answer.signed);
        if (why) showError(why);
      } catch (e) {
        engine.refresh_failed(user, !e.status || e.status >= 500 || e.status === 429);
      }
    }
    for (const event of JSON.parse(engine.read_held())) onEvent(event);
    persist();
    flushReceipts();
  }
}

// ------------------------------------------------------------------------------------------
// Receiving

async function connect() {
  let ticket;
  try {
    // The token goes on a short request (its connection closes); the socket gets a ticket.
    ({ ticket } = await api('POST', `/v1/accounts/${encodeURIComponent(engine.handle())}/session-ticket`, { auth: true }));
    // A backlog (or a burst) comes as one `batch` message of frames.
    ws = await openSocket('/v1/ws?batch=1', onMessage);
  } catch (e) {
    setOnline(false);
    retryConnect();
    return;
  }
  ws.onclose = () => {
    setOnline(false);
    for (const [id, resolve] of pendingResults) {
      resolve({ accepted: false, code: 'connection_lost', id });
    }
    pendingResults.clear();
    retryConnect();
  };
  ws.send(engine.auth_frame(ticket));
}

// Reconnection, with its progress in a banner: "Reconnecting in 4 s…", then "Reconnected".
let retryTimer = null;
let retryAt = 0;
let bannerTicker = null;
let wasOffline = false;

function retryConnect(now = false) {
  clearTimeout(retryTimer);
  wsBackoff = now ? 250 : Math.min(wsBackoff * 2, 8000);
  const wait = now ? 0 : wsBackoff;
  retryAt = Date.now() + wait;
  retryTimer = setTimeout(() => { retryTimer = null; connect(); }, wait);
  // A blip shorter than a second is not worth a banner.
  if (wasOffline) showOfflineBanner();
  else setTimeout(() => { if (!debug.online) showOfflineBanner(); }, 800);
}

function showOfflineBanner() {
  if (debug.online) return;
  wasOffline = true;
  debug.banner = 'offline';
  const banner = $('banner');
  banner.className = '';
  banner.hidden = false;
  document.body.classList.add('banner-shown');
  const tick = () => {
    const left = Math.ceil((retryAt - Date.now()) / 1000);
    $('banner-text').textContent = left > 0
      ? `Can't reach the server. Reconnecting in ${left} s…`
      : "Can't reach the server. Reconnecting…";
  };
  tick();
  clearInterval(bannerTicker);
  bannerTicker = setInterval(tick, 250);
}

function setOnline(online) {
  debug.online = online;
  const s = $('status');
  s.textContent = online ? 'Online' : 'Offline';
  s.className = `status ${online ? 'online' : 'offline'}`;
  if (online && wasOffline) {
    wasOffline = false;
    clearInterval(bannerTicker);
    debug.banner = 'reconnected';
    const banner = $('banner');
    banner.className = 'ok';
    $('banner-text').textContent = 'Reconnected';
    setTimeout(() => {
      if (debug.online && debug.banner === 'reconnected') {
        banner.hidden = true;
        document.body.classList.remove('banner-shown');
        debug.banner = null;
      }
    }, 2500);
  }
}

// A `batch` message (kind 0x8f) holds several frames, in order; anything else is one frame.
const BATCH_KIND = 0x8f;

function onMessage(bytes) {
  if (bytes[1] !== BATCH_KIND) return onFrame(bytes);
  let frames;
  try {
    frames = unbatch(bytes);
  } catch (e) {
    // Nothing in it is acknowledged: it comes again on the next connection.
    showError(e);
    if (ws && ws.readyState === WebSocket.OPEN) ws.close();
    return;
  }
  for (const frame of frames) onFrame(frame);
}

function onFrame(bytes) {
  if (RESULT_KINDS.has(bytes[1])) return onSendResult(bytes);
  const sock = ws;
  serial(() => handleFrame(bytes, sock)).catch((e) => {
    showError(e);
    // Not acked: it comes again on the next connection.
    if (sock && sock.readyState === WebSocket.OPEN) sock.close();
  });
}

// Transient failures to get a sender's list in a row. The envelope is redelivered first on
// the next connection, so everything else waits behind it: after a few tries it is judged
// with what we have. (The Rust SDK keeps such envelopes and reads them later instead.)
let listFailures = 0;
const MAX_LIST_FAILURES = 3;

async function handleFrame(bytes, sock) {
  let r = JSON.parse(engine.receive(bytes, false));
  if (r.need_list) {
    try {
      await fetchList(r.need_list);
      listFailures = 0;
    } catch (e) {
      // The broker unreachable, unavailable (5xx: e.g. the sender's broker behind it is
      // down) or asking us to slow down (429): transient, the envelope comes again, a few
      // times. Anything else (no such user, a list that does not verify, a changed master
      // key) will not get better by redelivery: the envelope is judged with what we have
      // (rejected unless verified).
      const transient = !e.status || e.status >= 500 || e.status === 429;
      if (transient && !/master key changed|does not verify/.test(e.message)
          && ++listFailures < MAX_LIST_FAILURES) throw e;
      listFailures = 0;
      showError(e);
    }
    r = JSON.parse(engine.receive(bytes, true));
  }
  if (r.need_broker_keys) {
    // A device of our account that the signed list does not vouch for: a link request?
    const own = engine.handle();
    const devices = await api('GET', `/v1/accounts/${encodeURIComponent(own)}/devices`);
    r = JSON.parse(engine.receive_link_request(bytes, JSON.stringify(devices)));
    if (r.event.event === 'link_request') {
      // A new version of our signed list, unless it lists the device already.
      if (r.event.signed) {
        await api('PUT', `/v1/accounts/${encodeURIComponent(own)}/device-list`, { body: r.event.signed, auth: true });
        engine.confirm_own_list(r.event.signed);
      }
      persist();
      await sendPayloadNow(own, { kind: 'link_grant' });
      // The user chose (the box under "Link another device") whether the new device gets
      // the conversations this one holds: an encrypted archive, sent like a file.
      if ($('send-history').checked) {
        const archive = new Blob([engine.history_archive()]);
        const file = await uploadFile(archive, 'history', 'application/x-sealpost-history', '');
        await sendPayloadNow(own, { kind: 'history', device: r.event.device, file });
        debug.historySent = r.event.device;
      }
    }
  }
  switch (r.type) {
    case 'auth_ok':
      wsBackoff = 250;
      setOnline(true);
      // A new connection: our own list is fetched again (authenticated), as a timed job.
      ownListDue = Date.now();
      scheduleJobs();
      flushReceipts();
      return;
    case 'deliver':
    case 'deliver_ephemeral':
      persist(); // save before acknowledging: a crash redelivers, ids deduplicate
      if (r.type === 'deliver' && sock.readyState === WebSocket.OPEN) {
        sock.send(engine.ack_frame(JSON.stringify([r.seq])));
      }
      onEvent(r.event);
      // Held for its sender's list: the refresh of contacts' lists comes sooner.
      if (r.event.event === 'held') scheduleJobs();
      if (r.event.event === 'message' || r.event.event === 'file') flushReceipts();
      return;
    case 'notice':
      if (r.notice === 'keys_low') await topUpKeys();
      if (r.notice === 'key_packages_low') await publishKeyPackages();
      if (r.notice === 'mailbox_full') showError('Your mailbox on the server is full. New messages to you are refused until this device catches up.');
      return;
    case 'error':
      if (r.code === 'bad_token') showError('This device was removed from your account, so it can no longer send or receive. Link it again to keep using it here.');
      return;
    default:
  }
}

function onEvent(event) {
  switch (event.event) {
    case 'foreign_key_published':
      debug.foreignKeys = (debug.foreignKeys || 0) + 1;
      $('foreign-key').hidden = false;
      break;
    case 'message':
      addContact(event.from);
      debug.messages.push({ from: event.from, text: event.text });
      stopTyping(event.from);
      conversationChanged(event.from, true);
      break;
    case 'contact':
      addContact(event.from);
      break;
    case 'sent_elsewhere':
      addContact(event.to);
      conversationChanged(event.to, false);
      break;
    case 'history':
      importHistory(event.file).catch(showError);
      break;
    case 'file':
      addContact(event.from);
      debug.files.push({ from: event.from, name: event.file.name });
      conversationChanged(event.from, true);
      break;
    case 'link_request':
      $('link-status').textContent = `Device ${event.device} is now linked to your account.`;
      $('link-code').textContent = `device ${event.device} linked`;
      debug.linkedDevice = event.device;
      break;
    case 'linked':
      debug.linked = true;
      break;
    case 'call':
      onCallSignal(event).catch(showError);
      break;
    case 'rejected':
      showError(`A message could not be opened and was dropped (${event.reason}).`);
      break;
    case 'group':
      for (const e of event.events) onGroupEvent(e);
      // Some group messages change what is shown without an event (the group's name).
      renderConversations();
      if (currentGroup) renderGroup();
      break;
    case 'receipt':
      debug.receipts.push(event);
      conversationChanged(event.peer, false);
      break;
    case 'typing':
      if (event.on) showTyping(event.from);
      else stopTyping(event.from);
      break;
    case 'disappearing':
      addContact(event.with);
      conversationChanged(event.with, false);
      if (event.with === current) {
        renderChatSub();
        renderDisappearing();
      }
      scheduleExpiry();
      break;
    default:
  }
}

// ------------------------------------------------------------------------------------------
// Conversations: contacts and groups in one list, most recent first, with the last message,
// its time and how many are unread.

const wide = () => window.matchMedia('(min-width: 721px)').matches;
const hasReceipts = () => engine && typeof engine.take_receipts === 'function';

function initials(name) {
  const local = String(name || '?').split('@')[0];
  return local.slice(0, 1) || '?';
}

// A colour per name, so that conversations are easy to tell apart (all dark enough for white text).
const AVATAR_COLOURS = ['#2f6fb5', '#8a4fb0', '#b0481f', '#207a6b', '#a3386a', '#5a6e1c', '#6b5a9e', '#1f6f92'];
function avatar(el, name) {
  let h = 0;
  for (const ch of String(name)) h = (h * 31 + ch.codePointAt(0)) >>> 0;
  el.textContent = initials(name);
  el.style.background = AVATAR_COLOURS[h % AVATAR_COLOURS.length];
}

function shortName(handle) {
  if (!handle || !engine) return handle;
  const [local, domain] = handle.split('@');
  return domain === engine.handle().split('@')[1] ? local : handle;
}

function clock(ms) {
  return new Date(ms).toLocaleTimeString([], { hour: 'numeric', minute: '2-digit' });
}

// "14:05" today, "Yesterday", a weekday this week, else a date.
function listTime(ms) {
  if (!ms) return '';
  const d = new Date(ms);
  const today = new Date();
  const days = Math.floor((new Date(today.toDateString()) - new Date(d.toDateString())) / 86_400_000);
  if (days === 0) return clock(ms);
  if (days === 1) return 'Yesterday';
  if (days < 7) return d.toLocaleDateString([], { weekday: 'short' });
  return d.toLocaleDateString([], { day: 'numeric', month: 'short' });
}

function dayLabel(ms) {
  const days = Math.floor((new Date(new Date().toDateString()) - new Date(new Date(ms).toDateString())) / 86_400_000);
  if (days === 0) return 'Today';
  if (days === 1) return 'Yesterday';
  return new Date(ms).toLocaleDateString([], { weekday: 'long', day: 'numeric', month: 'long' });
}

function duration(ms) {
  const s = Math.max(0, Math.round(ms / 1000));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${sec}` : `${m}:${sec}`;
}

function timerLabel(secs) {
  if (!secs) return 'off';
  const units = [[604800, 'week'], [86400, 'day'], [3600, 'hour'], [60, 'minute'], [1, 'second']];
  for (const [n, name] of units) {
    if (secs % n === 0) {
      const k = secs / n;
      return `${k} ${name}${k === 1 ? '' : 's'}`;
    }
  }
  return `${secs} seconds`;
}

function callText(c) {
  const kind = c.video ? 'Video call' : 'Call';
  if (c.outcome === 'connected') return `${kind}, ${duration(c.duration_ms)}`;
  if (c.outcome === 'missed') return `Missed ${c.video ? 'video call' : 'call'}`;
  if (c.outcome === 'declined') return c.outgoing ? `${kind} declined` : `${kind} declined by you`;
  if (c.outcome === 'busy') return `${kind}: busy`;
  if (c.outcome === 'elsewhere') return `${kind} answered on another device`;
  if (c.outcome === 'failed') return `${kind} failed`;
  return c.outgoing ? `${kind}, no answer` : `Missed ${c.video ? 'video call' : 'call'}`;
}

function timerText(m) {
  const who = m.outgoing ? 'You' : shortName(current);
  return m.timer_secs ? `${who} set messages to disappear after ${timerLabel(m.timer_secs)}`
    : `${who} turned off disappearing messages`;
}

function messagePreview(m) {
  if (m.timer_secs !== undefined && m.timer_secs !== null) {
    return m.timer_secs ? `Disappearing messages: ${timerLabel(m.timer_secs)}` : 'Disappearing messages off';
  }
  const body = m.file ? `📎 ${m.file.name}` : m.text;
  return m.outgoing ? `You: ${body}` : body;
}

function addContact(handle) {
  if (!handle || contacts.has(handle) || handle === engine.handle()) return;
  contacts.add(handle);
  if (!ui.added[handle]) {
    ui.added[handle] = Date.now();
    saveUi();
  }
  renderConversations();
  if (!current && !currentGroup && wide()) selectContact(handle);
}

// Something in the conversation with `peer` changed (a message came or its state moved on).
function conversationChanged(peer, incoming) {
  scheduleExpiry();
  if (peer === current) {
    renderMessages();
    if (incoming && document.visibilityState === 'visible') markRead(peer);
  }
  renderConversations();
}

function conversationItems() {
  const items = [];
  const seen = new Set();
  for (const c of JSON.parse(engine.conversations())) {
    if (c.with === engine.handle()) continue;
    seen.add(c.with);
    const last = c.messages.at(-1);
    const lastCall = (ui.calls[c.with] || []).at(-1);
    const lastRead = ui.lastRead[c.with] || 0;
    let time = last ? last.time_ms : ui.added[c.with] || 0;
    let preview = last ? messagePreview(last) : 'No messages yet';
    if (lastCall && lastCall.time_ms >= time) {
      time = lastCall.time_ms;
      preview = callText(lastCall);
    }
    let unread = typeof c.unread === 'number' ? c.unread
      : c.messages.filter((m) => !m.outgoing && m.time_ms > lastRead).length;
    unread += (ui.calls[c.with] || []).filter((x) => x.outcome === 'missed' && x.time_ms > lastRead).length;
    if (c.with === current) unread = 0;
    items.push({ kind: 'contact', id: c.with, name: c.with, time, preview, unread, verified: c.verified });
  }
  for (const handle of contacts) {
    if (seen.has(handle)) continue;
    items.push({ kind: 'contact', id: handle, name: handle, time: ui.added[handle] || 0, preview: 'No messages yet', unread: 0 });
  }
  for (const g of JSON.parse(engine.groups())) {
    const lastRead = ui.lastRead[`group:${g.id}`] || 0;
    let unread = 0;
    if (g.last && g.last.sent_ms > lastRead && g.id !== currentGroup) {
      unread = JSON.parse(engine.group_messages(g.id)).filter((m) => !m.outgoing && m.sent_ms > lastRead).length;
    }
    const members = new Set(g.members.map((m) => m.user)).size;
    const preview = g.left ? 'You are no longer in this group'
      : g.last ? `${g.last.from === engine.handle() ? 'You' : shortName(g.last.from)}: ${g.last.text}`
        : `${members} members`;
    items.push({
      kind: 'group', id: g.id, name: g.name || 'New group', time: g.last ? g.last.sent_ms : ui.added[`group:${g.id}`] || 0,
      preview, unread,
    });
  }
  items.sort((x, y) => y.time - x.time);
  return items;
}

function renderConversations() {
  if (!engine) return;
  const list = $('conversations');
  const items = conversationItems();
  debug.conversationList = items.map(({ kind, id, preview, unread }) => ({ kind, id, preview, unread }));
  list.replaceChildren();
  for (const item of items) {
    const li = document.createElement('li');
    const b = document.createElement('button');
    b.className = 'conv';
    if (item.kind === 'group') b.dataset.group = item.id;
    else b.dataset.handle = item.id;
    const active = item.kind === 'group' ? item.id === currentGroup : item.id === current;
    b.classList.toggle('active', active);
    b.classList.toggle('has-unread', item.unread > 0);
    if (active) b.setAttribute('aria-current', 'true');
    const av = document.createElement('span');
    av.className = `avatar${item.kind === 'group' ? ' group' : ''}`;
    av.setAttribute('aria-hidden', 'true');
    avatar(av, item.name);
    const body = document.createElement('span');
    body.className = 'body';
    const top = document.createElement('span');
    top.className = 'top';
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = item.kind === 'group' ? item.name : shortName(item.name);
    name.title = item.name;
    const time = document.createElement('span');
    time.className = 'time';
    time.textContent = listTime(item.time);
    top.append(name, time);
    const bottom = document.createElement('span');
    bottom.className = 'bottom';
    const preview = document.createElement('span');
    preview.className = 'preview';
    preview.textContent = item.preview; // text, never HTML
    bottom.appendChild(preview);
    if (item.unread > 0) {
      const badge = document.createElement('span');
      badge.className = 'unread';
      badge.textContent = item.unread > 99 ? '99+' : String(item.unread);
      badge.setAttribute('aria-label', `${item.unread} unread`);
      bottom.appendChild(badge);
    }
    body.append(top, bottom);
    b.append(av, body);
    b.onclick = () => (item.kind === 'group' ? selectGroup(item.id) : selectContact(item.id));
    li.appendChild(b);
    list.appendChild(li);
  }
  $('no-conversations').hidden = items.length > 0;
  const total = items.reduce((n, i) => n + i.unread, 0);
  document.title = total ? `(${total}) Sealpost` : 'Sealpost';
}

// The user has seen the conversation: unread cleared, read receipts (if on) sent.
function markRead(peer) {
  ui.lastRead[peer] = Date.now();
  saveUi();
  if (hasReceipts() && typeof engine.mark_read === 'function') {
    try {
      engine.mark_read(peer);
      persist();
      flushReceipts();
    } catch (e) {
      console.warn(`mark_read: ${e.message}`);
    }
  }
}

// Receipts the engine owes (delivered on receipt, read on mark_read): each waits a random
// delay in the engine (so that the broker cannot pair a delivery with the receipt answering
// it), then goes quietly. Taken only while connected (a taken receipt is not queued again).
let receiptsTimer = null;
function flushReceipts() {
  if (!hasReceipts()) return;
  if (!debug.online) return; // again at the next auth_ok
  let queued;
  try {
    queued = JSON.parse(engine.take_receipts());
  } catch (e) {
    console.warn(`take_receipts: ${e.message}`);
    return;
  }
  if (queued.length) persist();
  for (const r of queued) sendPayload(r.to, r.payload).catch((e) => console.warn(`receipt: ${e.message}`));
  scheduleReceipts();
}

function scheduleReceipts() {
  if (!hasReceipts() || typeof engine.next_receipts_due_ms !== 'function') return;
  clearTimeout(receiptsTimer);
  const due = engine.next_receipts_due_ms();
  if (due < 0) return;
  receiptsTimer = setTimeout(flushReceipts, Math.min(Math.max(0, due - Date.now()) + 20, 60_000));
}

// Disappearing messages: removed when they expire.
let expiryTimer = null;
function scheduleExpiry() {
  if (!engine || typeof engine.next_expiry_ms !== 'function') return;
  clearTimeout(expiryTimer);
  const due = engine.next_expiry_ms();
  if (due < 0) return;
  expiryTimer = setTimeout(() => {
    const removed = JSON.parse(engine.expire_messages());
    if (removed.length) {
      persist();
      for (const r of removed) conversationChanged(r.peer, false);
    }
    scheduleExpiry();
  }, Math.min(Math.max(0, due - Date.now()) + 50, 60_000));
}

// Typing: shown for a contact while they type (hidden after 10 s without news); sent at most
// every 4 s while this user types, and "off" after 5 s idle or on send.
const typingShown = new Map(); // handle -> timer
function showTyping(from) {
  clearTimeout(typingShown.get(from));
  typingShown.set(from, setTimeout(() => stopTyping(from), 10_000));
  renderTyping();
}
function stopTyping(from) {
  clearTimeout(typingShown.get(from));
  typingShown.delete(from);
  renderTyping();
}
function renderTyping() {
  const on = current && typingShown.has(current);
  $('typing').hidden = !on;
  $('typing').textContent = on ? `${shortName(current)} is typing…` : '';
  renderChatSub();
}

let typingSentAt = 0;
let typingTo = null;
let typingIdle = null;
function typed() {
  if (!hasReceipts() || !current || !$('message-input').value) return;
  const to = current;
  if (engine.key_change(to)) return;
  clearTimeout(typingIdle);
  typingIdle = setTimeout(() => sendTyping(to, false), 5000);
  if (typingTo === to && Date.now() - typingSentAt < 4000) return;
  sendTyping(to, true);
}
function sendTyping(to, on) {
  if (!hasReceipts()) return;
  if (!on) {
    clearTimeout(typingIdle);
    if (typingTo !== to) return;
    typingTo = null;
  } else {
    typingTo = to;
    typingSentAt = Date.now();
  }
  sendPayload(to, { kind: 'typing', on }).catch(() => {});
}

// Devices the broker has for an account that its signed list does not contain: each is told
// once (the engine remembers), in the conversation, calmly: usually a device being linked.
function takeNotices() {
  for (const n of JSON.parse(engine.take_notices())) {
    notices.push(n);
    debug.notices.push(n);
  }
  renderNotices();
}

function noticeText(n) {
  const ids = n.devices.join(', ');
  const one = n.devices.length === 1;
  const [it, It] = one ? ['it', 'It'] : ['them', 'They'];
  if (n.own_account) {
    return [
      `Your account has ${one ? 'a new device' : 'new devices'} that ${one ? 'is' : 'are'} not confirmed yet (${one ? 'device' : 'devices'} ${ids}).`,
      `${It} did not get your message. If you are linking a new device right now, that is ${it}: finish linking it and all is well.`,
      `If you are not, someone may have added ${it} with a stolen device token: remove ${it} from one of your other devices (with the CLI: sealpost-cli remove-device ${ids}).`,
    ];
  }
  return [
    `${n.user} has ${one ? 'a new device' : 'new devices'} that ${one ? 'is' : 'are'} not confirmed yet (${one ? 'device' : 'devices'} ${ids}).`,
    `${It} got only an unreadable placeholder, not your message. This usually means ${n.user} is linking a new device; once one of their other devices confirms it, it gets your next messages.`,
    `If they are not adding a device, let them know: someone may have added ${it} to their account, and they can remove ${it}.`,
  ];
}

function renderNotices() {
  const list = $('notices');
  list.replaceChildren();
  for (const n of notices) {
    if (!n.own_account && n.user !== current) continue;
    const [title, what, otherwise] = noticeText(n);
    const li = document.createElement('li');
    li.className = 'notice';
    const b = document.createElement('b');
    b.textContent = title; // text, never HTML
    const p1 = document.createElement('p');
    p1.textContent = what;
    const p2 = document.createElement('p');
    p2.textContent = otherwise;
    const ok = document.createElement('button');
    ok.className = 'secondary';
    ok.textContent = 'OK';
    ok.onclick = () => {
      notices.splice(notices.indexOf(n), 1);
      renderNotices();
    };
    li.append(b, p1, p2, ok);
    list.appendChild(li);
  }
}

function showPane(id) {
  for (const pane of ['placeholder', 'chat', 'group']) $(pane).hidden = pane !== id;
  document.body.classList.toggle('in-chat', id !== 'placeholder');
  // On a phone an open conversation is a step in the history: the system back goes to the list.
  if (id !== 'placeholder' && !wide() && !(history.state && history.state.sealpostChat)) {
    history.pushState({ sealpostChat: true }, '');
  }
}

window.addEventListener('popstate', () => {
  if (document.body.classList.contains('in-chat') && !wide()) backToList(true);
});

function backToList(fromHistory = false) {
  if (!fromHistory && history.state && history.state.sealpostChat) {
    history.back(); // comes back as popstate
    return;
  }
  current = null;
  currentGroup = null;
  showPane('placeholder');
  renderConversations();
}

function selectContact(handle) {
  if (current !== handle) {
    $('chat-info').hidden = true;
    $('chat-info-toggle').setAttribute('aria-expanded', 'false');
  }
  current = handle;
  currentGroup = null;
  showPane('chat');
  $('chat-with').textContent = shortName(handle);
  $('chat-with').title = handle;
  avatar($('chat-avatar'), handle);
  for (const id of ['message-input', 'send', 'attach', 'record', 'verify', 'call-audio', 'call-video']) $(id).disabled = false;
  if (debug.call) for (const id of ['call-audio', 'call-video']) $(id).disabled = true;
  markRead(handle);
  renderSafety();
  renderNotices();
  renderMessages();
  renderTyping();
  renderDisappearing();
  renderConversations();
}

// The line under the name: typing, or the safety state and the disappearing timer.
function renderChatSub() {
  if (!current) return;
  const sub = $('chat-sub');
  if (typingShown.has(current)) {
    sub.textContent = 'typing…';
    return;
  }
  const known = engine.known_list(current);
  const verified = known && JSON.parse(known).verified;
  const changed = !!engine.key_change(current);
  const parts = [current, changed ? 'Safety number changed: check it' : verified ? 'Verified ✓' : 'End-to-end encrypted'];
  const secs = typeof engine.disappearing === 'function' ? engine.disappearing(current) : 0;
  if (secs) parts.push(`Messages disappear after ${timerLabel(secs)}`);
  sub.textContent = parts.join(' · ');
}

function renderDisappearing() {
  const supported = engine && typeof engine.set_disappearing === 'function';
  $('disappearing-setting').hidden = !supported;
  if (!supported || !current) return;
  const ms = String(engine.disappearing(current) * 1000);
  const select = $('disappearing');
  if (![...select.options].some((o) => o.value === ms)) {
    const o = document.createElement('option');
    o.value = ms;
    o.textContent = timerLabel(Number(ms) / 1000);
    select.appendChild(o);
  }
  select.value = ms;
}

async function setDisappearing(secs) {
  const peer = current;
  const out = JSON.parse(engine.set_disappearing(peer, secs));
  persist();
  conversationChanged(peer, false);
  renderDisappearing();
  renderChatSub();
  for (const m of out) await sendPayload(m.to, m.payload);
  scheduleExpiry();
}

function renderSafety() {
  // A changed master key not accepted yet: shown instead of the safety number.
  const change = current ? engine.key_change(current) : '';
  $('key-change').hidden = !change;
  $('safety').hidden = !!change;
  $('key-changed-badge').hidden = !change;
  if (!change) $('kc-not-sent').hidden = true;
  if (change) {
    const c = JSON.parse(change);
    for (const el of document.querySelectorAll('#key-change .kc-with')) el.textContent = current;
    $('kc-old').textContent = c.old_safety_number;
    $('kc-new').textContent = c.new_safety_number;
    $('kc-was-verified').hidden = !c.was_verified;
    $('key-change').dataset.newKey = c.new_master_key;
    renderChatSub();
    return;
  }
  const known = current && engine.known_list(current);
  if (!known) {
    $('safety-number').textContent = '–';
    $('verified-badge').hidden = true;
    $('verify').hidden = false;
    renderChatSub();
    return;
  }
  const k = JSON.parse(known);
  $('safety-number').textContent = k.safety_number;
  renderLogStatus();
  $('verified-badge').hidden = !k.verified;
  $('unverified-label').hidden = !!k.verified;
  // Once verified, the button gives way to the "Verified ✓" state.
  $('verify').hidden = !!k.verified;
  renderChatSub();
}

// What the contact's domain's key-transparency log says (in the contact panel).
const AUDIT_GRACE_MS = 10 * 60 * 1000;
function renderLogStatus() {
  const el = $('kt-status');
  if (!current || !el) return;
  const domain = current.split('@')[1];
  const s = JSON.parse(engine.log_status(current, AUDIT_GRACE_MS));
  el.classList.toggle('warn', s.status === 'unaudited');
  el.textContent = {
    none: `${domain} keeps no key-transparency log.`,
    cosigned: `Their key is in ${domain}'s public key log, checked by ${(s.by || []).join(', ')}.`,
    pending: `Their key is in ${domain}'s public key log (not checked by other servers yet).`,
    unaudited: `Their key is in ${domain}'s key log, but no other server has checked that log lately. Treat it as unverified until you compare safety numbers.`,
  }[s.status] || '';
}

// sending: not yet on the server; sent: the server has it; delivered: on one of their
// devices; read: they opened it (only if both sides send read receipts).
const STATE_MARKS = {
  sending: ['○', 'Sending', 'Sending…'],
  sent: ['✓', 'Sent (on the server)', 'Sent'],
  delivered: ['✓✓', 'Delivered to their device', 'Delivered'],
  read: ['✓✓', 'Read', 'Read'],
};

function bubble(li, { text, file, time, sender, state, word }) {
  const box = document.createElement('div');
  box.className = 'bubble';
  if (sender) {
    const who = document.createElement('span');
    who.className = 'sender';
    who.textContent = sender;
    box.appendChild(who);
  }
  if (file) box.appendChild(fileView(file));
  else {
    const t = document.createElement('div');
    t.className = 'text';
    t.textContent = text; // text, never HTML
    box.appendChild(t);
  }
  const meta = document.createElement('span');
  meta.className = 'meta';
  const when = document.createElement('time');
  when.dateTime = new Date(time).toISOString();
  when.textContent = clock(time);
  meta.appendChild(when);
  if (state && STATE_MARKS[state]) {
    const [mark, label, short] = STATE_MARKS[state];
    if (word) {
      // The newest own message says its state in a word too.
      const w = document.createElement('span');
      w.className = 'state-word';
      w.textContent = short;
      meta.appendChild(w);
    }
    const s = document.createElement('span');
    s.className = `state ${state}`;
    s.textContent = mark;
    s.title = label;
    s.setAttribute('aria-label', label);
    meta.appendChild(s);
    li.dataset.state = state;
  }
  box.appendChild(meta);
  li.appendChild(box);
}

function eventLine(list, text, time, cls = '') {
  const li = document.createElement('li');
  li.className = `event ${cls}`.trim();
  li.textContent = time === null ? text : `${text} · ${clock(time)}`;
  list.appendChild(li);
  return li;
}

function dayLine(list, time, lastDay) {
  const day = new Date(time).toDateString();
  if (day === lastDay) return lastDay;
  const li = document.createElement('li');
  li.className = 'day';
  li.textContent = dayLabel(time);
  list.appendChild(li);
  return day;
}

function renderMessages() {
  const list = $('messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren();
  const conv = JSON.parse(engine.conversations()).find((c) => c.with === current);
  const entries = (conv ? conv.messages : []).map((m) => ({ t: m.time_ms, m }));
  for (const c of ui.calls[current] || []) entries.push({ t: c.time_ms, call: c });
  entries.sort((a, b) => a.t - b.t);
  const lastOwn = entries.filter((e) => e.m && e.m.outgoing && (e.m.timer_secs === undefined || e.m.timer_secs === null)).at(-1);
  let lastDay = null;
  for (const e of entries) {
    lastDay = dayLine(list, e.t, lastDay);
    if (e.call) {
      eventLine(list, callText(e.call), e.t, e.call.outcome === 'missed' ? 'missed' : 'call');
      continue;
    }
    const m = e.m;
    if (m.timer_secs !== undefined && m.timer_secs !== null) {
      eventLine(list, timerText(m), m.time_ms, 'timer');
      continue;
    }
    const li = document.createElement('li');
    li.className = `message ${m.outgoing ? 'outgoing' : 'incoming'}`;
    if (m.id) li.dataset.id = m.id;
    bubble(li, {
      text: m.text, file: m.file, time: m.time_ms,
      state: m.outgoing ? (m.state || 'sent') : null,
      word: e === lastOwn,
    });
    list.appendChild(li);
  }
  // A later message of theirs named one that has not arrived (the engine's chains): the
  // server may be holding it back. Shown until it arrives.
  if (conv && conv.missing > 0) {
    const who = shortName(current);
    const text = conv.missing === 1
      ? `A message from ${who} may be missing: a later one mentions it. It may still arrive; if it doesn't, the server may have held it back.`
      : `${conv.missing} messages from ${who} may be missing: later ones mention them. They may still arrive; if they don't, the server may have held them back.`;
    eventLine(list, text, null, 'missing').id = 'missing-notice';
  }
  if (atBottom || list.dataset.for !== current) list.scrollTop = list.scrollHeight;
  list.dataset.for = current;
}

// ------------------------------------------------------------------------------------------
// Attachments (web/src/files.rs seals and opens; this moves bytes). A file is sealed chunk by
// chunk under a fresh key, uploaded in pieces of at most 4 MiB (each answered once durable),
// and announced in an encrypted message with its key, digest and, for a picture, a small
// preview made here. The recipient fetches it anonymously (another domain's through our own
// broker), and opens and checks it chunk by chunk.

const PIECE_LIMIT = 4 * 1024 * 1024;
const THUMB_PX = 240;

function concatBytes(parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

function showTransfer(text, done, total) {
  $('transfer').hidden = false;
  $('transfer-text').textContent = text;
  $('transfer-progress').value = total ? done / total : 0;
}

function hideTransfer() {
  $('transfer').hidden = true;
}

// A small JPEG preview of a picture (base64), or '' if the browser cannot decode it.
async function thumbnail(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, THUMB_PX / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement('canvas');
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext('2d').drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/jpeg', 0.7));
    return blob ? bytesToB64(new Uint8Array(await blob.arrayBuffer())) : '';
  } catch (_) {
    return '';
  }
}

async function sendFile(to, file) {
  const thumb = file.type.startsWith('image/') ? await thumbnail(file) : '';
  const ref = await uploadFile(file, file.name, file.type || 'application/octet-stream', thumb);
  await sendPayload(to, { kind: 'file', file: ref });
  engine.queue_file_transcript(to, JSON.stringify(ref));
  persist();
  scheduleJobs();
  debug.sentFiles.push({ to, name: file.name });
  renderMessages();
}

// Seals and uploads a Blob piece by piece; resolves to its reference (for a payload).
async function uploadFile(file, name, type, thumb) {
  const h = encodeURIComponent(engine.handle());
  const up = new FileUpload(file.size);
  const total = up.sealed_size();
  const started = await api('POST', `/v1/accounts/${h}/blobs`,
    { body: JSON.stringify({ size: total }), auth: true });
  const chunk = FileUpload.chunk_size();
  const perPiece = Math.floor(PIECE_LIMIT / FileDownload.chunk_size());
  let parts = [];
  let at = 0;
  let read = 0;
  showTransfer(`Sending ${name}`, 0, total);
  for (;;) {
    const slice = new Uint8Array(await file.slice(read, read + chunk).arrayBuffer());
    read += slice.length;
    parts.push(up.seal(slice));
    const last = read >= file.size;
    if (last || parts.length >= perPiece) {
      const resp = await fetch(`${SERVER}/v1/accounts/${h}/blobs/${started.id}`, {
        method: 'PATCH',
        headers: { authorization: engine.bearer(), 'upload-offset': String(at) },
        body: concatBytes(parts),
      });
      if (resp.status !== 204) throw new Error(`the broker refused the upload of ${name} (${resp.status})`);
      at = Number(resp.headers.get('upload-offset'));
      parts = [];
      showTransfer(`Sending ${name}`, at, total);
    }
    if (last) break;
  }
  const domain = engine.handle().split('@')[1];
  const ref = JSON.parse(up.file_ref(started.id, name, type, domain, thumb));
  up.free();
  hideTransfer();
  return ref;
}

// The history another device of the account sent this one (just linked): fetched, opened,
// checked and merged into the conversations.
async function importHistory(file) {
  const blob = await fetchFile(file);
  const added = engine.import_history(new Uint8Array(await blob.arrayBuffer()));
  persist();
  for (const c of JSON.parse(engine.conversations())) addContact(c.with);
  if (current) renderMessages();
  debug.historyImported = added;
}

// Fetches and opens a file; resolves to a Blob of its bytes (checked).
async function fetchFile(file) {
  const own = engine.handle().split('@')[1];
  const path = file.domain === own ? `/v1/blobs/${file.id}` : `/v1/domains/${file.domain}/blobs/${file.id}`;
  const resp = await fetch(SERVER + path, { credentials: 'omit' });
  if (!resp.ok) throw new Error(`${file.name} cannot be fetched (${resp.status}); it may have expired`);
  const down = new FileDownload(JSON.stringify(file));
  const size = FileDownload.chunk_size();
  const reader = resp.body.getReader();
  const opened = [];
  let pending = new Uint8Array(0);
  let got = 0;
  try {
    for (;;) {
      const { done, value } = await reader.read();
      if (value) {
        pending = concatBytes([pending, value]);
        got += value.length;
        showTransfer(`Receiving ${file.name}`, got, file.size);
      }
      // Every whole chunk but a possible last one opens as it comes.
      while (pending.length > size || (done && pending.length > 0)) {
        const take = Math.min(size, pending.length);
        opened.push(down.open(pending.subarray(0, take)));
        pending = pending.slice(take);
      }
      if (done) break;
    }
    down.finish();
  } finally {
    down.free();
    hideTransfer();
  }
  return new Blob(opened, { type: file.media_type });
}

// A voice note: recorded here (MediaRecorder, Opus in WebM), sent as a file.
let recorder = null;
async function toggleRecording() {
  if (recorder) {
    recorder.stop();
    return;
  }
  if (!current) return;
  const to = current;
  const stream = await navigator.mediaDevices.getUserMedia({ audio: true });
  const parts = [];
  recorder = new MediaRecorder(stream, { mimeType: 'audio/webm' });
  recorder.ondataavailable = (e) => { if (e.data.size) parts.push(e.data); };
  recorder.onstop = () => {
    for (const t of stream.getTracks()) t.stop();
    recorder = null;
    $('record').querySelector('.label').textContent = 'Voice note';
    $('record').classList.remove('recording');
    const when = new Date().toISOString().slice(11, 19).replace(/:/g, '-');
    const note = new File(parts, `voice note ${when}.webm`, { type: 'audio/webm' });
    sendFile(to, note).catch(showError);
  };
  recorder.start();
  $('record').querySelector('.label').textContent = 'Stop and send';
  $('record').classList.add('recording');
}

async function openFile(file) {
  const blob = await fetchFile(file);
  const url = URL.createObjectURL(blob);
  if (file.media_type.startsWith('audio/')) {
    // Played in place, in the message's own player.
    const player = document.querySelector(`audio[data-file="${file.id}"]`);
    if (player) {
      player.src = url;
      player.hidden = false;
      await player.play().catch(() => {});
    }
    debug.opened.push(file.name);
    return;
  }
  if (file.media_type.startsWith('image/')) {
    $('viewer-img').src = url;
    $('viewer-img').alt = file.name;
    $('viewer').hidden = false;
    debug.opened.push(file.name);
    return;
  }
  const a = document.createElement('a');
  a.href = url;
  a.download = file.name;
  a.click();
  debug.opened.push(file.name);
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

// How a file shows in a conversation: its preview (pictures), name and size, and a button.
function fileView(file) {
  const box = document.createElement('div');
  box.className = 'file';
  if (file.thumbnail) {
    const img = document.createElement('img');
    img.className = 'thumbnail';
    img.src = `data:image/jpeg;base64,${file.thumbnail}`;
    img.alt = file.name;
    img.onclick = guarded(() => openFile(file));
    box.appendChild(img);
  }
  const line = document.createElement('div');
  const kib = Math.max(1, Math.round(file.size / 1024));
  line.textContent = `${file.name} · ${kib} KiB`;
  box.appendChild(line);
  if (file.media_type.startsWith('audio/')) {
    const player = document.createElement('audio');
    player.controls = true;
    player.hidden = true;
    player.dataset.file = file.id;
    box.appendChild(player);
  }
  const open = document.createElement('button');
  open.className = 'open-file';
  open.textContent = file.media_type.startsWith('image/') ? 'Open'
    : file.media_type.startsWith('audio/') ? 'Play' : 'Save';
  open.onclick = guarded(() => openFile(file));
  box.appendChild(open);
  return box;
}

// ------------------------------------------------------------------------------------------
// Groups (MLS in the engine; see sealpost_client::engine::groups). A group message goes as
// "parts", each a group_send: sealed (on /v1/sealed) to the members whose delivery token we
// hold, the rest on /v1/ws. Commits are ordered at the group's hub: the first of an epoch
// wins, a loser is refused stale_epoch and made again once the winner arrived.

const KEY_PACKAGES = 20;

function groupOf(id) {
  return JSON.parse(engine.groups()).find((g) => g.id === id);
}

async function publishKeyPackages() {
  const h = encodeURIComponent(engine.handle());
  const body = engine.key_package_upload(KEY_PACKAGES);
  persist(); // the private halves are kept before the public ones leave
  await api('PUT', `/v1/accounts/${h}/devices/${engine.device_id()}/key-packages`, { body, auth: true });
  debug.keyPackages = true;
}

async function claimKeyPackage(user, device) {
  const headers = JSON.parse(engine.claim_headers(user));
  const anon = !headers.authorization;
  return api('POST',
    `/v1/accounts/${encodeURIComponent(user)}/devices/${device}/key-packages/claim`, { headers, anon });
}

// Sends the parts of one group message; answers {code, epoch} of a part refused whole
// (then the rest is not sent), else {stale: [accounts whose devices changed]}. Those get the
// same envelope on their current devices.
async function sendParts(parts) {
  const stale = new Set();
  for (const part of parts) {
    const r = await transmit(part);
    if (r.code) return { code: r.code, epoch: r.epoch };
    const again = engine.group_resend(JSON.stringify(part), JSON.stringify(r));
    if (again) {
      const r2 = await transmit(JSON.parse(again));
      if (r2.code) return { code: r2.code, epoch: r2.epoch };
    }
    for (const x of r.refused || []) if (x.code === 'stale_devices') stale.add(x.to);
    const refused = (r.refused || []).filter((x) => x.code !== 'stale_devices');
    if (refused.length) {
      throw new Error(`the broker refused the group message for ${refused.map((x) => `${x.to} (${x.code})`).join(', ')}`);
    }
  }
  return { stale: [...stale] };
}

// Adds every device of `users` that is not a member yet.
async function addToGroup(group, users) {
  const members = groupOf(group).members;
  const wanted = [];
  for (const user of users) {
    const list = await serial(() => fetchList(user));
    for (const device of list.devices) {
      if (!members.some((m) => m.user === user && m.device === device)) wanted.push({ user, device });
    }
  }
  await addDevices(group, wanted);
}

// Adds devices ([{user, device}]): a KeyPackage of each (checked by the engine against the
// verified device list), a Commit, then the Welcome and the name.
async function addDevices(group, wanted) {
  const claimed = [];
  for (const { user, device } of wanted) {
    const c = await claimKeyPackage(user, device);
    claimed.push({ user, device, key: c.key });
  }
  if (!claimed.length) return;
  const change = await commitChange(group, () => engine.group_add(group, JSON.stringify(claimed)));
  await sendParts(change.welcome);
  const name = JSON.parse(engine.group_name_parts(group));
  persist();
  await sendParts(name);
}

// Commits `plan()`'s change (a fresh plan per attempt: another member's change may take the
// epoch first, and ours then goes on top of it).
async function commitChange(group, plan) {
  for (let attempt = 0; attempt < 8; attempt++) {
    const change = JSON.parse(plan());
    persist();
    // The first part is the one the hub orders: its answer decides; the rest only delivers.
    const [ordered, ...rest] = change.commit;
    const r = ordered ? await sendParts([ordered]) : {};
    if (!r.code) {
      engine.group_commit_answer(group, true);
      persist();
      await sendParts(rest).catch(() => {});
      return change;
    }
    engine.group_commit_answer(group, false);
    persist();
    if (r.code !== 'stale_epoch') throw new Error(`the broker refused the group change: ${r.code}`);
    await until(() => groupOf(group).epoch >= r.epoch, "the other member's change");
  }
  throw new Error("other members' changes kept taking the group's epoch; try again");
}

// Brings `user`'s devices in the group in line with its verified device list: a device linked
// since is added (it reads from then on), a removed one removed.
async function syncMember(group, user, list) {
  const drift = JSON.parse(engine.group_device_drift(group, user, JSON.stringify(list.devices)));
  if (drift.gone.length) {
    await commitChange(group, () => engine.group_remove_devices(group, user, JSON.stringify(drift.gone)));
  }
  await addDevices(group, drift.new.map((device) => ({ user, device })));
}

// Before a text: every member account's devices as its verified list has them (fetched once
// older than the list cache; our own account's as we hold it). A list that cannot be had now,
// or a device that cannot be added yet (no KeyPackage published), changes nothing: the next
// text tries again.
async function syncMembers(group) {
  const users = [...new Set(groupOf(group).members.map((m) => m.user))];
  for (const user of users) {
    try {
      const list = await serial(() => (user === engine.handle() ? ownList() : ensureList(user)));
      await syncMember(group, user, list);
    } catch (e) {
      console.warn(`the group's devices of ${user} stay as they are for now: ${e.message}`);
    }
  }
}

async function removeFromGroup(group, user) {
  await commitChange(group, () => engine.group_remove(group, user));
  renderGroup();
}

async function leaveGroup(group) {
  const parts = JSON.parse(engine.group_leave(group));
  persist();
  await sendParts(parts);
}

async function shareGroupToken(group) {
  const parts = JSON.parse(engine.group_token_share(group));
  persist();
  await sendParts(parts);
}

async function createGroup(name, members) {
  if (!name) {
    const e = new Error('no group name');
    e.friendly = 'Give the group a name first.';
    throw e;
  }
  const group = engine.create_group(name);
  ui.added[`group:${group}`] = Date.now();
  saveUi();
  persist();
  renderGroups();
  await addToGroup(group, [engine.handle(), ...members.filter((m) => m !== engine.handle())]);
  await shareGroupToken(group);
  renderGroups();
  selectGroup(group);
}

function onGroupEvent(e) {
  switch (e.event) {
    case 'group_maybe_missing':
      debug.groupMissing = e;
      if (e.count > 0) {
        showError(`${e.count === 1 ? 'A message' : `${e.count} messages`} from ${e.from} in this group may be missing: a later one mentions ${e.count === 1 ? 'it' : 'them'}. If it doesn't arrive, the server may have held it back.`);
      }
      break;
    case 'group_message':
      debug.groupMessages.push({ group: e.group, from: e.from, text: e.text });
      break;
    case 'group_leave':
      // One member (the remover) commits the removal of an account that asked to leave.
      if (engine.is_group_remover(e.group, e.user)) {
        setTimeout(() => removeFromGroup(e.group, e.user).catch(showError), 0);
      }
      break;
    case 'group_unverified':
      // A member whose account's list we do not hold yet: fetched, then shown as it is.
      setTimeout(() => serial(() => ensureList(e.user)).then(renderGroup).catch(() => {}), 0);
      break;
    default:
  }
  if (e.group === currentGroup) {
    renderGroup();
    if (e.event === 'group_message' && document.visibilityState === 'visible') {
      ui.lastRead[`group:${e.group}`] = Date.now();
      saveUi();
    }
  }
  renderConversations();
}

function renderGroups() {
  renderConversations();
}

function selectGroup(group) {
  if (currentGroup !== group) {
    $('group-info').hidden = true;
    $('group-info-toggle').setAttribute('aria-expanded', 'false');
  }
  currentGroup = group;
  current = null;
  showPane('group');
  ui.lastRead[`group:${group}`] = Date.now();
  saveUi();
  renderGroup();
  renderConversations();
}

function renderGroup() {
  const g = currentGroup && groupOf(currentGroup);
  if (!g) return;
  $('group-title').textContent = g.name || 'New group';
  avatar($('group-avatar'), g.name || 'New group');
  const accounts = [...new Set(g.members.map((m) => m.user))];
  $('group-sub').textContent = g.left ? 'You are no longer in this group'
    : accounts.map((u) => (u === engine.handle() ? 'you' : shortName(u))).join(', ');
  const members = $('group-member-list');
  members.replaceChildren();
  for (const m of g.members) {
    const li = document.createElement('li');
    const you = m.user === engine.handle() && m.device === engine.device_id() ? ' (this device)' : '';
    li.textContent = `${m.user}, device ${m.device}${you}`;
    const mark = document.createElement('span');
    mark.className = m.verified ? 'member-ok' : 'member-unverified';
    mark.textContent = m.verified ? ' ✓ in their signed device list' : ' ⚠ not confirmed by their device list';
    li.appendChild(mark);
    const shown = [...members.querySelectorAll('button.remove')].some((b) => b.dataset.user === m.user);
    if (!g.left && m.user !== engine.handle() && !shown) {
      const remove = document.createElement('button');
      remove.className = 'remove danger';
      remove.dataset.user = m.user;
      remove.textContent = 'Remove';
      remove.title = `Remove ${m.user} (all their devices) from the group`;
      remove.onclick = guarded(() => removeFromGroup(g.id, m.user));
      li.appendChild(remove);
    }
    members.appendChild(li);
  }
  $('group-leave').disabled = g.left;
  for (const id of ['group-input', 'group-send', 'group-add-handle', 'group-add']) $(id).disabled = g.left;
  const list = $('group-messages');
  const atBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 40;
  list.replaceChildren();
  let lastDay = null;
  let lastFrom = null;
  for (const m of JSON.parse(engine.group_messages(currentGroup))) {
    const day = lastDay;
    lastDay = dayLine(list, m.sent_ms, lastDay);
    const li = document.createElement('li');
    li.className = `message ${m.outgoing ? 'outgoing' : 'incoming'}`;
    // A run of messages from one sender is named once.
    if (m.from === lastFrom && day === lastDay) li.classList.add('cont');
    lastFrom = m.from;
    bubble(li, { text: m.text, time: m.sent_ms, sender: m.outgoing ? null : shortName(m.from) });
    list.appendChild(li);
  }
  if (g.left) {
    const li = document.createElement('li');
    li.className = 'notice';
    li.textContent = 'You were removed from this group: nothing sent to it from now on reaches you.';
    list.appendChild(li);
  }
  if (atBottom || list.dataset.for !== currentGroup) list.scrollTop = list.scrollHeight;
  list.dataset.for = currentGroup;
}

async function sendGroupText() {
  const text = $('group-input').value;
  if (!text || !currentGroup) return;
  const group = currentGroup;
  // Writing to a group is taking part in it: its members may now send to us sealed.
  if (!engine.group_token_shared(group)) await shareGroupToken(group);
  await syncMembers(group);
  const parts = JSON.parse(engine.group_text(group, text));
  persist(); // the group's ratchet advanced: save before anything leaves
  $('group-input').value = '';
  renderGroup();
  renderGroups();
  const r = await sendParts(parts);
  if (r.code) throw new Error(`the broker refused the group message: ${r.code}`);
  // Taken for every member device: the next text names it (a text some devices missed is
  // never named, so it never looks missing).
  if (!r.stale.length && parts.length) {
    engine.group_text_accepted(parts[0].id);
    persist();
  }
  // The broker named accounts whose devices changed: the group follows their lists now.
  for (const user of r.stale) await syncMember(group, user, await serial(() => fetchList(user)));
}

// ------------------------------------------------------------------------------------------
// Calls

const CALL_WORDS = {
  calling: 'Calling…', ringing: 'Ringing…', connecting: 'Connecting…', connected: '',
  incoming: 'Incoming call',
};

// The call screen is there only during a call (not while an incoming call rings: that is the
// incoming dialog).
function setCallState(state, detail = '') {
  debug.callState = state;
  const inCall = !['idle', 'ended', 'failed', 'declined', 'busy', 'answered elsewhere'].includes(state);
  $('call-state').textContent = CALL_WORDS[state] ?? state;
  $('hangup').disabled = !inCall;
  $('call-audio').disabled = inCall || !current;
  $('call-video').disabled = inCall || !current;
  const call = debug.call;
  const screen = $('call-screen');
  screen.hidden = !inCall || state === 'incoming';
  if (!screen.hidden && call) {
    $('call-peer').textContent = call.peer;
    avatar($('call-avatar'), call.peer);
    screen.classList.toggle('audio-only', !call.video);
    $('camera').hidden = !call.video;
  }
  if (state === 'connected' && call) {
    call.connectedAt = Date.now();
    clearInterval(callTimer);
    const tick = () => { $('call-timer').textContent = duration(Date.now() - call.connectedAt); };
    tick();
    callTimer = setInterval(tick, 500);
  }
  if (!inCall) {
    clearInterval(callTimer);
    $('call-timer').textContent = '';
    $('mute').setAttribute('aria-pressed', 'false');
    $('camera').setAttribute('aria-pressed', 'false');
  }
}
let callTimer = null;

function toggleTrack(kind, button) {
  const call = debug.call;
  if (!call || !call.media) return;
  const off = button.getAttribute('aria-pressed') !== 'true';
  for (const t of call.media.getTracks()) if (t.kind === kind) t.enabled = !off;
  button.setAttribute('aria-pressed', String(off));
  button.querySelector('.label').textContent = kind === 'audio' ? (off ? 'Unmute' : 'Mute') : (off ? 'Camera on' : 'Camera');
  button.setAttribute('aria-label', kind === 'audio' ? (off ? 'Unmute microphone' : 'Mute microphone') : (off ? 'Turn camera on' : 'Turn camera off'));
}

// A line in the conversation's history for a call that ended.
function logCall(call, state, detail) {
  let outcome;
  if (call.connectedAt) outcome = 'connected';
  else if (state === 'declined') outcome = 'declined';
  else if (state === 'busy') outcome = 'busy';
  else if (state === 'answered elsewhere') outcome = 'elsewhere';
  else if (state === 'failed') outcome = 'failed';
  else outcome = call.outgoing ? 'no_answer' : 'missed';
  const entry = {
    time_ms: call.startedAt || Date.now(), outgoing: !!call.outgoing, video: !!call.video, outcome,
    duration_ms: call.connectedAt ? Date.now() - call.connectedAt : 0,
  };
  (ui.calls[call.peer] = ui.calls[call.peer] || []).push(entry);
  saveUi();
  debug.callLog.push({ peer: call.peer, ...entry, detail });
  if (call.peer === current) {
    renderMessages();
    if (outcome === 'missed' && document.visibilityState === 'visible') markRead(call.peer);
  }
  renderConversations();
}

// TURN credentials are reused while they have a minute or more left (the broker rate-limits
// minting them per device).
let turnCache = null;
async function turnCredentials() {
  if (turnCache && turnCache.until - Date.now() > 60_000) return turnCache.creds;
  const creds = await api('GET', `/v1/accounts/${encodeURIComponent(engine.handle())}/turn`, { auth: true });
  turnCache = { creds, until: Date.now() + creds.ttl * 1000 };
  return creds;
}
debug.turnCredentials = turnCredentials;

async function iceConfig() {
  const policy = params.get('ice') === 'relay' ? 'relay' : 'all';
  let iceServers = [];
  try {
    const turn = await turnCredentials();
    iceServers = [{ urls: turn.urls, username: turn.username, credential: turn.credential }];
  } catch (e) {
    if (e.status !== 404) throw new Error(`cannot get relay credentials: ${e.message}`);
    if (policy === 'relay') throw new Error('relay-only calls need a TURN relay, and the broker has none');
  }
  return { iceServers, iceTransportPolicy: policy };
}

function identityError(call, why) {
  debug.fingerprintCheck = 'failed';
  const el = $('fingerprint-state');
  el.textContent = 'identity error';
  el.className = 'bad';
  el.title = '';
  showError(`Identity error: ${why}. The call was ended: someone may be intercepting it.`);
  endCall(call, 'failed', 'identity error', true);
}

// The fingerprint the encrypted channel vouches for must be the one in the SDP we apply.
function checkSdpFingerprint(call, sdp, vouched) {
  if (!fingerprints_match(sdp_fingerprint(sdp), vouched)) {
    identityError(call, 'the media key in the call set-up does not match the one sent by your contact\'s verified device');
    return false;
  }
  return true;
}

// Once connected: the DTLS peer certificate must be the one vouched for.
async function checkDtlsFingerprint(call) {
  const stats = await call.pc.getStats();
  let transport = null;
  stats.forEach((s) => { if (s.type === 'transport' && s.remoteCertificateId) transport = s; });
  const cert = transport && stats.get(transport.remoteCertificateId);
  if (!cert) return identityError(call, 'the connection has no verifiable peer certificate');
  const actual = `${cert.fingerprintAlgorithm.toLowerCase()} ${cert.fingerprint.toUpperCase()}`;
  if (!fingerprints_match(actual, call.remoteFingerprint)) {
    return identityError(call, 'the peer\'s DTLS certificate is not the one sent by your contact\'s verified device');
  }
  debug.fingerprintCheck = 'passed';
  const el = $('fingerprint-state');
  el.textContent = 'Media key verified ✓';
  el.className = 'ok';
  el.title = 'The encryption key of this call\'s audio and video is the one your contact\'s verified device sent inside your encrypted chat: no one is in the middle.';
}

async function newPeerConnection(call) {
  const pc = new RTCPeerConnection(await iceConfig());
  call.pc = pc;
  pc.onicecandidate = (ev) => {
    const c = ev.candidate;
    if (!c || !c.candidate) return;
    sendPayload(call.peer, {
      kind: 'ice_candidate', call_id: call.id, candidate: c.candidate,
      sdp_mid: c.sdpMid || '', sdp_m_line_index: c.sdpMLineIndex || 0,
    }).catch(showError);
  };
  pc.ontrack = (ev) => {
    const [stream] = ev.streams;
    if (stream) $('remote-video').srcObject = stream;
  };
  pc.onconnectionstatechange = () => {
    if (debug.call !== call) return;
    const s = pc.connectionState;
    if (s === 'connected' && call.state !== 'connected') {
      call.state = 'connected';
      if (call.offerSentAt) debug.setupMs = performance.now() - call.offerSentAt;
      setCallState('connected');
      checkDtlsFingerprint(call).catch((e) => identityError(call, e.message));
    } else if (s === 'failed') {
      endCall(call, 'failed', 'media connection failed', true);
    }
  };
  const media = await navigator.mediaDevices.getUserMedia({ audio: true, video: call.video });
  call.media = media;
  for (const track of media.getTracks()) pc.addTrack(track, media);
  $('local-video').srcObject = media;
  return pc;
}

function ourFingerprint(call) {
  const fp = sdp_fingerprint(call.pc.localDescription.sdp);
  if (!debug.tamperOutgoingFingerprint) return fp;
  // Test hook: vouch for a different certificate than the one we use.
  return fp.slice(0, -1) + (fp.endsWith('0') ? '1' : '0');
}

async function flushCandidates(call) {
  for (const c of call.queued.splice(0)) {
    await call.pc.addIceCandidate(c).catch(() => {});
  }
}

async function startCall(video) {
  if (debug.call) return;
  const peer = current;
  const call = {
    id: Engine.new_call_id(), peer, video, outgoing: true, state: 'calling', startedAt: Date.now(),
    peerDevice: null, remoteFingerprint: null, queued: [], pc: null,
  };
  debug.call = call;
  debug.fingerprintCheck = null;
  debug.setupMs = null;
  $('fingerprint-state').textContent = '';
  $('fingerprint-state').className = '';
  setCallState('calling', peer);
  try {
    const pc = await newPeerConnection(call);
    await pc.setLocalDescription(await pc.createOffer());
    call.offerSentAt = performance.now();
    await sendPayload(peer, {
      kind: 'call_offer', call_id: call.id, sdp: pc.localDescription.sdp,
      fingerprint: ourFingerprint(call), video,
    });
    setCallState('ringing', peer);
    call.ringTimer = setTimeout(() => {
      if (debug.call === call && call.state !== 'connected' && !call.peerDevice) {
        endCall(call, 'ended', 'no answer', true);
      }
    }, CALL_RING_MS);
  } catch (e) {
    showError(e);
    endCall(call, 'failed', e.message, false);
  }
}

async function answerCall() {
  const call = debug.call;
  if (!call || call.state !== 'incoming') return;
  $('incoming').hidden = true;
  call.state = 'answering';
  setCallState('connecting', call.peer);
  try {
    if (!checkSdpFingerprint(call, call.offerSdp, call.remoteFingerprint)) return;
    const pc = await newPeerConnection(call);
    await pc.setRemoteDescription({ type: 'offer', sdp: call.offerSdp });
    await flushCandidates(call);
    await pc.setLocalDescription(await pc.createAnswer());
    await sendPayload(call.peer, {
      kind: 'call_answer', call_id: call.id, sdp: pc.localDescription.sdp,
      fingerprint: ourFingerprint(call),
    });
    await stopRingingElsewhere(call.id);
  } catch (e) {
    showError(e);
    endCall(call, 'failed', e.message, true);
  }
}

function declineCall() {
  const call = debug.call;
  if (!call || call.state !== 'incoming') return;
  $('incoming').hidden = true;
  sendPayload(call.peer, { kind: 'decline', call_id: call.id })
    .then(() => stopRingingElsewhere(call.id))
    .catch(showError);
  endCall(call, 'declined', '', false);
}

function endCall(call, state, detail, notify) {
  if (!call || debug.call !== call) return;
  clearTimeout(call.ringTimer);
  if (notify) sendPayload(call.peer, { kind: 'hang_up', call_id: call.id }).catch(() => {});
  if (call.pc) call.pc.close();
  if (call.media) for (const t of call.media.getTracks()) t.stop();
  debug.lastCall = call;
  debug.call = null;
  $('incoming').hidden = true;
  setCallState(state, detail);
  logCall(call, state, detail);
}

async function onCallSignal(event) {
  const p = event.payload;
  const call = debug.call;
  const ours = call && call.id === p.call_id && call.peer === event.from;
  switch (p.kind) {
    case 'call_offer': {
      if (Date.now() - event.sent_ms > CALL_RING_MS) return; // rang out while we were away
      if (call) {
        if (!ours) sendPayload(event.from, { kind: 'busy', call_id: p.call_id }).catch(() => {});
        return;
      }
      addContact(event.from);
      debug.call = {
        id: p.call_id, peer: event.from, peerDevice: event.device, video: p.video,
        outgoing: false, state: 'incoming', offerSdp: p.sdp, remoteFingerprint: p.fingerprint,
        queued: [], pc: null, startedAt: Date.now(),
      };
      debug.fingerprintCheck = null;
      $('fingerprint-state').textContent = '';
      $('incoming-text').textContent = `${event.from} is calling you (${p.video ? 'video' : 'audio'})`;
      avatar($('incoming-avatar'), event.from);
      $('incoming').hidden = false;
      $('answer').focus();
      setCallState('incoming', event.from);
      return;
    }
    case 'call_answer': {
      if (!ours || !call.outgoing || call.peerDevice !== null) return;
      call.peerDevice = event.device;
      call.remoteFingerprint = p.fingerprint;
      if (call.offerSentAt) debug.answerMs = performance.now() - call.offerSentAt;
      clearTimeout(call.ringTimer);
      if (!checkSdpFingerprint(call, p.sdp, p.fingerprint)) return;
      setCallState('connecting', call.peer);
      await call.pc.setRemoteDescription({ type: 'answer', sdp: p.sdp });
      await flushCandidates(call);
      return;
    }
    case 'ice_candidate': {
      if (!ours || (call.peerDevice !== null && call.peerDevice !== event.device)) return;
      const c = { candidate: p.candidate, sdpMid: p.sdp_mid, sdpMLineIndex: p.sdp_m_line_index };
      if (call.pc && call.pc.remoteDescription) await call.pc.addIceCandidate(c).catch(() => {});
      else call.queued.push(c);
      return;
    }
    case 'hang_up':
      if (ours) endCall(call, 'ended', 'hung up', false);
      return;
    case 'busy':
      if (ours) endCall(call, 'busy', '', false);
      return;
    case 'decline':
      if (ours) endCall(call, 'declined', '', false);
      return;
    case 'answered_elsewhere':
      if (call && call.id === p.call_id && call.state === 'incoming') {
        endCall(call, 'answered elsewhere', '', false);
      }
      return;
    default:
  }
}

// ------------------------------------------------------------------------------------------
// Wiring

async function enter(connected = false) {
  $('account').hidden = true;
  $('unlock').hidden = true;
  $('app').hidden = false;
  $('me').textContent = engine.handle();
  avatar($('me-avatar'), engine.handle());
  $('contact-handle').placeholder = `New chat: name@${engine.handle().split('@')[1]}`;
  $('me-device').textContent = `Signed in as ${engine.handle()} on this browser (device ${engine.device_id()}).`;
  if (hasReceipts() && typeof engine.read_receipts === 'function') {
    $('read-receipts').checked = engine.read_receipts();
  } else {
    $('read-receipts').closest('label').hidden = true;
  }
  for (const c of JSON.parse(engine.conversations())) addContact(c.with);
  renderConversations();
  if (!current && !currentGroup) showPane('placeholder');
  scheduleExpiry();
  offerPush().catch((e) => console.warn(`push: ${e.message}`));
  renderPasskey();
  if (!connected) await connect();
  // KeyPackages, so that others can add this device to groups.
  if (!engine.has_key_packages()) await publishKeyPackages();
}

function guarded(fn) {
  return () => {
    clearError();
    Promise.resolve().then(fn).catch(showError);
  };
}

// For the forms before the app (sign-up, link, unlock): errors show under the form; the
// button is busy meanwhile.
function formAction(button, errorBox, fn) {
  return async () => {
    errorBox.hidden = true;
    clearError();
    const label = button.textContent;
    button.disabled = true;
    try {
      await fn();
    } catch (e) {
      const text = humanize(e);
      debug.errors.push(text);
      errorBox.textContent = text;
      errorBox.hidden = false;
    } finally {
      button.disabled = false;
      button.textContent = label;
    }
  };
}

function showTab(linking) {
  $('tab-new').classList.toggle('active', !linking);
  $('tab-link').classList.toggle('active', linking);
  $('tab-new').setAttribute('aria-selected', String(!linking));
  $('tab-link').setAttribute('aria-selected', String(linking));
  $('link-code-field').hidden = !linking;
  $('register').hidden = linking;
  $('link').hidden = !linking;
  $('account-error').hidden = true;
}

// ------------------------------------------------------------------------------------------
// Push wake-ups (content-free): a service worker shows "New message" and tells open pages to
// reconnect. Subscribing needs the broker's VAPID key; `window.sealpostPush.subscribe()`.

let swRegistration = null;

async function registerServiceWorker() {
  if (!('serviceWorker' in navigator)) return null;
  navigator.serviceWorker.addEventListener('message', (ev) => {
    if (!ev.data || ev.data.type !== 'wake') return;
    debug.wakeups++;
    // Something is waiting at the broker: reconnect now if the connection is down.
    if (engine && !debug.online && retryTimer) retryConnect(true);
  });
  try {
    swRegistration = await navigator.serviceWorker.register('sw.js', { scope: './' });
    debug.serviceWorker = true;
  } catch (e) {
    console.warn(`no service worker: ${e.message}`);
  }
  return swRegistration;
}

function b64urlToBytes(s) {
  const b64 = s.replace(/-/g, '+').replace(/_/g, '/');
  return b64ToBytes(b64 + '='.repeat((4 - (b64.length % 4)) % 4));
}

async function subscribePush() {
  if (!engine) throw new Error('sign in first');
  const reg = swRegistration || await navigator.serviceWorker.ready;
  if (!reg.pushManager) throw new Error('this browser has no push');
  const { public_key: key } = await api('GET', '/v1/push/vapid');
  const sub = await reg.pushManager.subscribe({ userVisibleOnly: true, applicationServerKey: b64urlToBytes(key) });
  const j = sub.toJSON();
  const h = encodeURIComponent(engine.handle());
  await api('PUT', `/v1/accounts/${h}/devices/${engine.device_id()}/push`, {
    body: JSON.stringify({ endpoint: j.endpoint, keys: { p256dh: j.keys.p256dh, auth: j.keys.auth } }),
    auth: true,
  });
  return j.endpoint;
}
window.sealpostPush = { subscribe: subscribePush };

// Offered when the browser can do push and the broker has it on.
async function offerPush() {
  if (!('PushManager' in window) || !('serviceWorker' in navigator)) return;
  try {
    await api('GET', '/v1/push/vapid');
  } catch (_) {
    return; // push is off on this broker
  }
  $('push-setting').hidden = false;
  const reg = swRegistration || await navigator.serviceWorker.ready;
  $('push-enabled').checked = !!(await reg.pushManager.getSubscription());
}

async function togglePush() {
  const box = $('push-enabled');
  if (!box.checked) {
    const reg = swRegistration || await navigator.serviceWorker.ready;
    const sub = await reg.pushManager.getSubscription();
    if (sub) await sub.unsubscribe();
    const h = encodeURIComponent(engine.handle());
    await api('DELETE', `/v1/accounts/${h}/devices/${engine.device_id()}/push`, { auth: true }).catch(() => {});
    return;
  }
  try {
    if (await Notification.requestPermission() !== 'granted') {
      const e = new Error('notifications denied');
      e.friendly = 'Notifications are blocked for this site. Allow them in the browser\'s site settings, then try again.';
      throw e;
    }
    await subscribePush();
  } catch (e) {
    box.checked = false;
    if (!e.friendly && !e.status) e.friendly = 'This browser could not set up notifications right now. Try again later.';
    throw e;
  }
}

function openSettings(open) {
  $('settings').hidden = !open;
  if (open) $('settings-close').focus();
}

async function main() {
  // A reload starts at the list: a conversation step left in the history is dropped.
  if (history.state && history.state.sealpostChat) history.replaceState(null, '');
  await init();
  registerServiceWorker();
  $('error-close').onclick = clearError;
  $('foreign-key-close').onclick = () => { $('foreign-key').hidden = true; };
  $('tab-new').onclick = () => showTab(false);
  $('tab-link').onclick = () => showTab(true);
  $('register').onclick = formAction($('register'), $('account-error'), async () => {
    $('register').textContent = 'Creating your keys…';
    await register($('handle').value.trim(), $('passphrase').value);
    await enter();
  });
  $('link').onclick = formAction($('link'), $('account-error'), async () => {
    $('link').textContent = 'Waiting for your other device…';
    await link($('handle').value.trim(), $('link-code-input').value.trim(), $('passphrase').value);
    await enter(true);
  });
  $('unlock-button').onclick = formAction($('unlock-button'), $('unlock-error'), async () => {
    $('unlock-button').textContent = 'Unlocking…';
    await unlock($('unlock-passphrase').value);
    $('unlock-passphrase').value = '';
    await enter();
  });
  $('unlock-with-passkey').onclick = formAction($('unlock-with-passkey'), $('unlock-error'), async () => {
    await unlockWithPasskey();
    await enter();
  });
  $('add-passkey').onclick = guarded(addPasskey);
  $('remove-passkey').onclick = () => { localStorage.removeItem(PASSKEY); renderPasskey(); };
  $('unlock-passphrase').onkeydown = (ev) => { if (ev.key === 'Enter') $('unlock-button').click(); };
  $('passphrase').onkeydown = (ev) => {
    if (ev.key === 'Enter') ($('link').hidden ? $('register') : $('link')).click();
  };
  $('forget').onclick = () => { $('forget-confirm').hidden = false; };
  $('forget-no').onclick = () => { $('forget-confirm').hidden = true; };
  $('forget-yes').onclick = forgetAccount;
  $('open-settings').onclick = () => openSettings(true);
  $('settings-close').onclick = () => openSettings(false);
  $('settings').onclick = (ev) => { if (ev.target === $('settings')) openSettings(false); };
  document.addEventListener('keydown', (ev) => {
    if (ev.key === 'Escape' && !$('settings').hidden) openSettings(false);
  });
  $('lock-now').onclick = () => location.reload();
  $('link-device').onclick = guarded(createLinkCode);
  $('copy-link-code').onclick = guarded(async () => {
    await navigator.clipboard.writeText($('link-code').textContent);
    $('copy-link-code').textContent = 'Copied ✓';
    setTimeout(() => { $('copy-link-code').textContent = 'Copy'; }, 2000);
  });
  $('push-enabled').onchange = guarded(togglePush);
  $('read-receipts').onchange = guarded(() => {
    engine.set_read_receipts($('read-receipts').checked);
    persist();
  });
  for (const b of document.querySelectorAll('.back')) b.onclick = () => backToList();
  $('chat-info-toggle').onclick = () => {
    const open = $('chat-info').hidden;
    $('chat-info').hidden = !open;
    $('chat-info-toggle').setAttribute('aria-expanded', String(open));
  };
  $('group-info-toggle').onclick = () => {
    const open = $('group-info').hidden;
    $('group-info').hidden = !open;
    $('group-info-toggle').setAttribute('aria-expanded', String(open));
  };
  $('disappearing').onchange = guarded(() => setDisappearing(Number($('disappearing').value) / 1000));
  $('message-input').addEventListener('input', typed);
  $('mute').onclick = () => toggleTrack('audio', $('mute'));
  $('camera').onclick = () => toggleTrack('video', $('camera'));
  document.addEventListener('visibilitychange', () => {
    if (document.visibilityState === 'visible' && current && engine) {
      markRead(current);
      renderConversations();
    }
  });
  const legacy = hasVault() ? null : legacyAccount();
  if (legacy) {
    // Saved by an earlier version: locked now, with a passphrase the user chooses.
    $('unlock-title').textContent = 'Choose a passphrase';
    $('unlock-lead').textContent = `${legacy} is kept in this browser without a lock. Choose a passphrase (at least ${MIN_PASSPHRASE} characters): you will type it when you come back.`;
    $('unlock-button').textContent = 'Lock and continue';
    $('unlock-passphrase').autocomplete = 'new-password';
    $('forget').hidden = true;
    $('unlock-button').onclick = formAction($('unlock-button'), $('unlock-error'), async () => {
      await migrateLegacy(legacy, $('unlock-passphrase').value);
      $('unlock-passphrase').value = '';
      await enter();
    });
    $('unlock').hidden = false;
    $('unlock-passphrase').focus();
  } else if (hasVault()) {
    $('unlock').hidden = false;
    $('unlock-with-passkey').hidden = !(localStorage.getItem(PASSKEY) && passkeyOffered());
    $('unlock-passphrase').focus();
  } else {
    $('account').hidden = false;
  }
  $('contact-handle').onkeydown = (ev) => { if (ev.key === 'Enter') $('add-contact').click(); };
  $('add-contact').onclick = guarded(async () => {
    const handle = $('contact-handle').value.trim();
    if (!handle) return;
    checkHandle(handle);
    await serial(() => fetchList(handle));
    addContact(handle);
    selectContact(handle);
    $('contact-handle').value = '';
  });
  const send = guarded(async () => {
    const text = $('message-input').value;
    if (!text || !current) return;
    $('message-input').value = '';
    const to = current;
    sendTyping(to, false);
    try {
      await sendPayload(to, { kind: 'text', body: text });
    } catch (e) {
      if (!/^master key changed/.test(e.message)) throw e;
      // Not an error to shout about: the conversation explains it and says what to do.
      $('message-input').value = text;
      renderSafety();
      $('kc-not-sent').hidden = false;
      return;
    }
    conversationChanged(to, false);
    // A transcript for this account's other devices, so each shows the whole conversation:
    // queued, and sent a moment later over /v1/ws, not in the same burst as the sealed send.
    engine.queue_transcript(to, text);
    persist();
    scheduleJobs();
  });
  $('send').onclick = send;
  $('attach').onclick = () => $('attach-input').click();
  $('record').onclick = guarded(toggleRecording);
  $('attach-input').onchange = guarded(async () => {
    const files = [...$('attach-input').files];
    $('attach-input').value = '';
    if (!current) return;
    const to = current;
    for (const file of files) await sendFile(to, file);
  });
  $('viewer-close').onclick = () => {
    URL.revokeObjectURL($('viewer-img').src);
    $('viewer-img').removeAttribute('src');
    $('viewer').hidden = true;
  };
  $('create-group').onclick = guarded(async () => {
    const members = $('group-new-members').value.split(/[\s,]+/).filter(Boolean);
    await createGroup($('group-name').value.trim(), members);
    $('new-group').open = false;
    $('group-name').value = '';
    $('group-new-members').value = '';
  });
  $('group-send').onclick = guarded(sendGroupText);
  $('group-leave').onclick = guarded(async () => {
    if (currentGroup) await leaveGroup(currentGroup);
  });
  $('group-input').onkeydown = (ev) => { if (ev.key === 'Enter') guarded(sendGroupText)(); };
  $('group-add').onclick = guarded(async () => {
    const handle = $('group-add-handle').value.trim();
    if (!handle || !currentGroup) return;
    await addToGroup(currentGroup, [handle]);
    $('group-add-handle').value = '';
    renderGroup();
  });
  $('message-input').onkeydown = (ev) => { if (ev.key === 'Enter') send(); };
  $('verify').onclick = guarded(() => {
    engine.mark_verified(current);
    persist();
    renderSafety();
  });
  $('kc-accept').onclick = guarded(async () => {
    const who = current;
    engine.accept_key_change(who, $('key-change').dataset.newKey);
    persist();
    await serial(() => fetchList(who));
    renderSafety();
  });
  $('call-audio').onclick = guarded(() => startCall(false));
  $('call-video').onclick = guarded(() => startCall(true));
  $('hangup').onclick = guarded(() => endCall(debug.call, 'ended', 'you hung up', true));
  $('answer').onclick = guarded(answerCall);
  $('decline').onclick = guarded(declineCall);
  document.body.dataset.ready = 'true';
}

main().catch(showError);
