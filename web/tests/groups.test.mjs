// Group conversations in the browser: three users in their own browsers. Alice creates a
// group with bob and carol; everyone sees it in the list with its members (each confirmed by
// their signed device list) and everyone's messages; alice adds dave, who reads from then on;
// alice removes carol, and dave leaves.
// Screenshots of the group (desktop and phone widths) go to $SEALPOST_SCREENSHOTS.

import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { mkdirSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startBroker, launchBrowser, newUser, linkDevice, waitFor, WAIT_MS } from './harness.mjs';

const SHOTS = process.env.SEALPOST_SCREENSHOTS || join(tmpdir(), 'sealpost-screenshots');

let broker;
let browser;
const users = {};

before(async () => {
  broker = await startBroker();
  browser = await launchBrowser();
  for (const name of ['alice', 'bob', 'carol', 'dave']) {
    users[name] = await newUser(browser, broker, `${name}@localhost`);
  }
});

after(async () => {
  if (browser) await browser.close();
  if (broker) {
    await broker.stop();
    broker.cleanup();
  }
});

/** Waits until `user` lists a group named `name`; returns its id. */
async function groupListed(user, name) {
  try {
    const h = await user.page.waitForFunction(
      (n) => [...document.querySelectorAll('#conversations button')]
        .find((b) => b.querySelector('.name')?.textContent === n)?.dataset.group,
      name, { timeout: WAIT_MS },
    );
    return await h.jsonValue();
  } catch (e) {
    const errors = await user.page.evaluate(() => window.sealpostDebug.errors);
    throw new Error(`${user.handle} never listed ${name}: ${e.message}; page errors: ${JSON.stringify(errors)}; console: ${user.consoleLines.slice(-10).join(' | ')}`);
  }
}

async function openGroup(user, id) {
  await user.page.click(`#conversations button[data-group="${id}"]`);
  await user.page.waitForSelector('#group:not([hidden])', { timeout: WAIT_MS });
  // The members (and adding, removing, leaving) are behind the group's info button.
  if (await user.page.isHidden('#group-info')) await user.page.click('#group-info-toggle');
}

function groupTexts(user) {
  return user.page.evaluate(() => [...document.querySelectorAll('#group-messages li.message .text')]
    .map((d) => d.textContent));
}

async function say(user, text) {
  await user.page.fill('#group-input', text);
  await user.page.click('#group-send');
}

test('a group is created, talks, shows its members and grows', async () => {
  const { alice, bob, carol, dave } = users;
  await alice.page.click('#new-group summary');
  await alice.page.fill('#group-name', 'Weekend hike');
  await alice.page.fill('#group-new-members', 'bob@localhost, carol@localhost');
  await alice.page.click('#create-group');
  const id = await groupListed(alice, 'Weekend hike');
  assert.equal(await groupListed(bob, 'Weekend hike'), id);
  assert.equal(await groupListed(carol, 'Weekend hike'), id);

  await openGroup(alice, id);
  await say(alice, 'Saturday at 9?');
  await openGroup(bob, id);
  await waitFor('bob sees alice', async () => (await groupTexts(bob)).includes('Saturday at 9?'));
  await say(bob, 'I am in');
  await openGroup(carol, id);
  await waitFor('carol sees both', async () => {
    const t = await groupTexts(carol);
    return t.includes('Saturday at 9?') && t.includes('I am in');
  });
  // Members: three devices, each confirmed by its account's signed device list.
  await waitFor('alice sees three confirmed members', () => alice.page.evaluate(() =>
    document.querySelectorAll('#group-member-list .member-ok').length === 3));

  // Alice adds dave: he joins and reads what comes next, nothing from before.
  await alice.page.fill('#group-add-handle', 'dave@localhost');
  await alice.page.click('#group-add');
  assert.equal(await groupListed(dave, 'Weekend hike'), id);
  await waitFor('bob knows of dave', () => bob.page.evaluate(() =>
    [...document.querySelectorAll('#group-member-list li')].some((li) => li.textContent.startsWith('dave@localhost'))));
  await say(bob, 'welcome dave');
  await openGroup(dave, id);
  await waitFor('dave reads from then on', async () => (await groupTexts(dave)).includes('welcome dave'));
  assert.ok(!(await groupTexts(dave)).includes('Saturday at 9?'), 'nothing from before he joined');

  // Alice removes carol: carol's page says so, and her input is closed.
  await alice.page.click('#group-member-list button.remove[data-user="carol@localhost"]');
  await waitFor('carol is told', () => carol.page.evaluate(() =>
    document.getElementById('group-messages').textContent.includes('You were removed from this group')));
  assert.ok(await carol.page.evaluate(() => document.getElementById('group-input').disabled));
  // Dave leaves: a member (alice, the lowest leaf) commits his removal.
  await dave.page.click('#group-leave');
  await waitFor('dave is out', () => alice.page.evaluate(() =>
    ![...document.querySelectorAll('#group-member-list li')].some((li) => li.textContent.startsWith('dave@localhost'))));
  await say(alice, 'just bob and me now');
  await waitFor('bob reads it', async () => (await groupTexts(bob)).includes('just bob and me now'));

  // Bob links a second browser. Before her next text alice's page brings it into the group
  // (bob's signed device list has it now), and it reads from then on.
  await alice.page.evaluate(() => { window.sealpostDebug.listMaxAgeMs = 0; });
  const bob2 = await linkDevice(browser, broker, bob);
  await say(alice, 'two bobs now');
  assert.equal(await groupListed(bob2, 'Weekend hike'), id);
  await openGroup(bob2, id);
  await waitFor('the new device reads it', async () => (await groupTexts(bob2)).includes('two bobs now'));
  assert.ok(!(await groupTexts(bob2)).includes('just bob and me now'), 'nothing from before it was linked');
  await waitFor('alice sees both of bob\'s devices', () => alice.page.evaluate(() =>
    [...document.querySelectorAll('#group-member-list li')].filter((li) => li.textContent.startsWith('bob@localhost')).length === 2));

  mkdirSync(SHOTS, { recursive: true });
  await alice.page.setViewportSize({ width: 1280, height: 800 });
  await alice.page.screenshot({ path: join(SHOTS, 'group-1280.png'), fullPage: true });
  await alice.page.setViewportSize({ width: 390, height: 844 });
  await alice.page.screenshot({ path: join(SHOTS, 'group-390.png'), fullPage: true });
  for (const u of Object.values(users)) {
    assert.deepEqual(await u.page.evaluate(() => window.sealpostDebug.errors), [], `${u.handle}'s page shows no error`);
  }
});
