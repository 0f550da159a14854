// Unlocking with a passkey (WebAuthn PRF), on a virtual authenticator (DevTools protocol): the
// user adds a passkey in Settings (the page is unlocked: it wraps the same local key); after a
// reload "Unlock with passkey" opens the account without the passphrase. WebAuthn needs a
// domain, not an IP address, so the page is opened as http://localhost:port.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startBroker, launchBrowser, screenshots, PASSPHRASE, WAIT_MS } from './harness.mjs';

let broker;
let browser;

before(async () => {
  broker = await startBroker();
  browser = await launchBrowser();
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
});

test('a passkey with PRF unlocks the account after a reload; the passphrase still works', async () => {
  const base = broker.base.replace('127.0.0.1', 'localhost');
  const context = await browser.newContext();
  const page = await context.newPage();
  const cdp = await context.newCDPSession(page);
  await cdp.send('WebAuthn.enable', { enableUI: false });
  await cdp.send('WebAuthn.addVirtualAuthenticator', {
    options: {
      protocol: 'ctap2', transport: 'internal', hasResidentKey: true, hasUserVerification: true,
      isUserVerified: true, hasPrf: true, automaticPresenceSimulation: true,
    },
  });
  await page.goto(`${base}/web/`);
  await page.waitForSelector('body[data-ready="true"]', { timeout: WAIT_MS });
  await page.fill('#handle', 'erin@localhost');
  await page.fill('#passphrase', PASSPHRASE);
  await page.click('#register');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });

  await page.click('#open-settings');
  await page.waitForSelector('#passkey-setting:not([hidden])', { timeout: WAIT_MS });
  await page.click('#add-passkey');
  await page.waitForSelector('#remove-passkey:not([hidden])', { timeout: WAIT_MS });
  const stored = await page.evaluate(() => JSON.stringify(localStorage));
  assert.ok(!stored.includes('erin'), 'the passkey entry names no one');
  await screenshots(page, 'settings');
  await page.click('#settings-close');

  await page.reload();
  await page.waitForSelector('#unlock-with-passkey:not([hidden])', { timeout: WAIT_MS });
  await screenshots(page, 'unlock-passkey');
  await page.click('#unlock-with-passkey');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  assert.equal(await page.textContent('#me'), 'erin@localhost');

  await page.reload();
  await page.waitForSelector('#unlock:not([hidden])', { timeout: WAIT_MS });
  await page.fill('#unlock-passphrase', PASSPHRASE);
  await page.click('#unlock-button');
  await page.waitForFunction(() => window.sealpostDebug.online, null, { timeout: WAIT_MS });
  assert.deepEqual(await page.evaluate(() => window.sealpostDebug.errors), []);
  await context.close();
});
