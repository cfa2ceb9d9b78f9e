// Configuration-change notifications judged by a real HTTP receiver: every
// event arrives, in order, signed, none lost, through failures, throttling, a
// receiver that is away, and a kill -9 of the agent; tier changes detected on a
// real loop device; the SSE stream and `ballast events`.

import { execFileSync, spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { idKey, Receiver } from '../helpers/receiver.js';
import { BALLAST_BIN, makeTempDir } from '../helpers/server.js';
import { describeWithTools, run } from '../helpers/tools.js';
import { until as waitUntil } from '../helpers/wait.js';

const until = (what: string, pred: () => boolean | Promise<boolean>, ms = 20_000) =>
  waitUntil(what, pred, ms);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const SECRET = 'a-secret-of-sixteen-chars';

/** The log as the agent's SSE endpoint gives it (history, no follow). */
async function logIds(a: AgentHandle, types?: string): Promise<string[]> {
  const r = await a.cli('events', '--json', ...(types ? ['--types', types] : []));
  expect(r.code, r.stderr).toBe(0);
  return r.stdout
    .split('\n')
    .filter(Boolean)
    .map((l) => (JSON.parse(l) as { id: string }).id);
}

describeWithTools([], 'notifications: recipients, delivery, the event log', () => {
  let a: AgentHandle;
  let dir: string;
  let secretFile: string;

  beforeAll(async () => {
    dir = makeTempDir('ballast-notify-');
    secretFile = path.join(dir, 'secret');
    writeFileSync(secretFile, `${SECRET}\n`);
    a = await startAgent({ events: { retryCap: 0.5, deliveryTimeout: 1, rescanInterval: 0 } });
  });
  afterAll(async () => {
    await a?.stop();
  });

  it('every event arrives in order, signed, through 500s, 429s and a receiver that is away', async () => {
    const rx = new Receiver(SECRET);
    await rx.start();
    rx.failEvery = 3;
    const add = await a.cli(
      'notify',
      'add',
      'hook',
      '--url',
      rx.url,
      '--types',
      'device.*,acl.changed',
      '--secret-file',
      secretFile,
    );
    expect(add.code, add.stderr).toBe(0);
    const t = await a.cli('notify', 'test', 'hook');
    expect(t.stdout).toMatch(/delivered|failed/);
    for (let i = 0; i < 8; i++) {
      expect((await a.cli('device', 'create', `n${i}`, '--size', '1M')).code).toBe(0);
    }
    rx.throttle = { count: 2, retryAfter: 1 };
    expect((await a.cli('device', 'resize', 'n1', '--size', '2M')).code).toBe(0);
    await a.api('PUT', '/v1/devices/n2/acl', { entries: [{ identity: 'x', access: 'rw' }] });
    await sleep(300);
    await rx.stop(); // away for a while
    for (let i = 0; i < 4; i++) expect((await a.cli('device', 'rm', `n${i}`)).code).toBe(0);
    await sleep(1500);
    await rx.start(rx.port);
    const want = await logIds(a, 'device.*,acl.changed');
    // 8 created, 1 resized, the access list set, 4 deleted, and n2's access list gone with it
    expect(want.length).toBe(8 + 1 + 1 + 4 + 1);
    await until(
      'every event delivered',
      () => rx.ids().filter((i) => !i.startsWith('test-')).length >= want.length,
    );
    const got = rx.ids().filter((i) => !i.startsWith('test-'));
    expect(got).toEqual(want);
    // in order, signed, CloudEvents
    const keys = got.map(idKey);
    expect([...keys].sort((x, y) => x - y)).toEqual(keys);
    expect(rx.got.every((g) => g.signatureOk === true)).toBe(true);
    expect(rx.got.find((g) => g.type === 'io.ballast.device.resized')).toMatchObject({
      subject: 'n1',
      data: { before: { size: 1048576 }, after: { size: 2097152 } },
    });
    // duplicates, if any, carry the same id (none expected without a crash)
    expect(rx.got.length).toBe(rx.ids().length);
    const ls = await a.cli('notify', 'ls');
    expect(ls.stdout).toMatch(
      /hook\s+http:\/\/127\.0\.0\.1:\d+\/hook\s+device\.\*,acl\.changed\s+active/,
    );
    const m = (await a.api('GET', '/metrics')).text;
    expect(m).toMatch(/ballast_notify_deliveries_total\{recipient="hook",outcome="failed"\} [1-9]/);
    expect(m).toMatch(
      /ballast_notify_deliveries_total\{recipient="hook",outcome="throttled"\} [1-9]/,
    );
    expect(m).toMatch(/ballast_events_total\{kind="device.created"\} [1-9]/);
    expect((await a.cli('notify', 'rm', 'hook')).code).toBe(0);
    await rx.stop();
  });

  it('bad recipients: a clear error or a visible state, never a blocked agent', async () => {
    const bad = await a.cli('notify', 'add', 'x', '--url', 'ftp://127.0.0.1/x', '--json');
    expect(bad.code).toBe(8);
    expect(bad.stdout).toMatch(/NOTIFY_BAD_URL/);
    const types = await a.cli(
      'notify',
      'add',
      'x',
      '--url',
      'http://127.0.0.1:1/',
      '--types',
      'device.nope',
    );
    expect(types.code).toBe(8);
    expect(types.stderr).toMatch(/NOTIFY_BAD_TYPES/);
    // unreachable, hanging, 500 forever, 410: each visible; a good one unaffected
    const hang = new Receiver();
    hang.hang = true;
    await hang.start();
    const five = new Receiver();
    five.always = 500;
    await five.start();
    const gone = new Receiver();
    gone.always = 410;
    await gone.start();
    const good = new Receiver();
    await good.start();
    for (const [n, url] of [
      ['unreach', 'http://127.0.0.1:9/'],
      ['hang', hang.url],
      ['five', five.url],
      ['gone', gone.url],
      ['good', good.url],
    ]) {
      expect(
        (await a.cli('notify', 'add', n!, '--url', url!, '--types', 'device.created')).code,
      ).toBe(0);
    }
    expect((await a.cli('device', 'create', 'bad1', '--size', '1M')).code).toBe(0);
    await until('good got it', () => good.ids().length === 1);
    let last = '';
    await until('gone disabled', async () => {
      last = (await a.cli('notify', 'ls')).stdout;
      const r = JSON.parse((await a.cli('notify', 'ls', '--json')).stdout) as {
        recipients: { name: string; disabled?: unknown; lastError: string | null }[];
      };
      const by = Object.fromEntries(r.recipients.map((x) => [x.name, x]));
      return (
        by.gone?.disabled !== undefined &&
        /ECONNREFUSED/.test(by.unreach?.lastError ?? '') &&
        /no answer/.test(by.hang?.lastError ?? '') &&
        /HTTP 500/.test(by.five?.lastError ?? '')
      );
    }).catch((e) => {
      throw new Error(`${(e as Error).message}:\n${last}`);
    });
    const ls = await a.cli('notify', 'ls');
    expect(ls.stdout).toMatch(/gone .*disabled \(HTTP 410 Gone/);
    // still serving the API and delivering to the good one
    expect((await a.cli('device', 'create', 'bad2', '--size', '1M')).code).toBe(0);
    await until('good got the second', () => good.ids().length === 2);
    expect(five.posts).toBeGreaterThan(1); // retried, backing off
    for (const n of ['unreach', 'hang', 'five', 'gone', 'good']) await a.cli('notify', 'rm', n);
    for (const r of [hang, five, gone, good]) await r.stop();
  });

  it('kill -9 during a burst of 1,000 changes: after the restart every event arrives, by id exactly once', async () => {
    const b = await startAgent({ events: { retryCap: 0.5, rescanInterval: 0 } });
    try {
      const rx = new Receiver();
      await rx.start();
      expect(
        (await b.cli('notify', 'add', 'burst', '--url', rx.url, '--types', 'acl.changed')).code,
      ).toBe(0);
      expect((await b.cli('device', 'create', 'burst', '--size', '1M')).code).toBe(0);
      let done = 0;
      const burst = (async () => {
        for (let i = 0; i < 1000; i++) {
          const r = await b
            .api('PUT', '/v1/devices/burst/acl', {
              entries: [{ identity: `id${i}`, access: 'rw' }],
            })
            .catch(() => null);
          if (!r) break;
          done++;
        }
      })();
      await until('some delivered', () => rx.ids().length > 100);
      await b.kill9();
      await burst;
      await b.start();
      for (let i = done; i < 1000; i++) {
        await b.api('PUT', '/v1/devices/burst/acl', {
          entries: [{ identity: `id${i}`, access: 'rw' }],
        });
      }
      const want = await logIds(b, 'acl.changed');
      expect(want.length).toBeGreaterThanOrEqual(1000);
      await until('all delivered', () => rx.ids().length >= want.length, 60_000);
      expect(rx.ids()).toEqual(want);
      await rx.stop();
    } finally {
      await b.stop();
    }
  });

  it('ballast events: the log and a live stream, resumable by id', async () => {
    const since = (await logIds(a)).pop() ?? '0';
    const child = spawn(
      process.execPath,
      [BALLAST_BIN, 'events', '--follow', '--json', '--types', 'device.created', '--since', since],
      { env: { ...process.env, BALLAST_AGENT: `unix:${a.apiSocket}` } },
    );
    let out = '';
    child.stdout.on('data', (b: Buffer) => {
      out += b.toString();
    });
    await sleep(500);
    expect((await a.cli('device', 'create', 'ev1', '--size', '1M')).code).toBe(0);
    await until('the stream printed it', () => out.includes('ev1'), 10_000);
    child.kill('SIGINT');
    const lines = out
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { type: string; subject: string });
    expect(lines).toEqual([
      expect.objectContaining({ type: 'io.ballast.device.created', subject: 'ev1' }),
    ]);
    const bad = await a.cli('events', '--types', 'nope.nope');
    expect(bad.code).toBe(8);
  });
});

describeWithTools(
  ['losetup', 'mkfs.ext4'],
  'notifications: tier changes on a real loop device',
  () => {
    it('flipping the loop device from ssd to hdd sends tier.changed for each device on the pool', async () => {
      const dir = makeTempDir('ballast-tier-');
      const img = path.join(dir, 'disk.img');
      const mnt = path.join(dir, 'mnt');
      mkdirSync(mnt);
      execFileSync('truncate', ['-s', '256M', img]);
      const loop = execFileSync('losetup', ['-f', '--show', img]).toString().trim();
      const rot = `/sys/block/${path.basename(loop)}/queue/rotational`;
      let a: AgentHandle | undefined;
      const rx = new Receiver();
      try {
        execFileSync('mkfs.ext4', ['-q', loop]);
        execFileSync('mount', [loop, mnt]);
        writeFileSync(rot, '0');
        a = await startAgent({
          pools: [{ name: 'loop', path: path.join(mnt, 'pool') }, { name: 'other' }],
          events: { rescanInterval: 0 },
        });
        const pools = await a.cli('pool', 'ls', '--json');
        expect(pools.stdout).toMatch(/"media": "ssd"/);
        await rx.start();
        expect(
          (await a.cli('notify', 'add', 'tier', '--url', rx.url, '--types', 'tier.changed')).code,
        ).toBe(0);
        for (const d of ['t1', 't2']) {
          expect((await a.cli('device', 'create', d, '--size', '4M', '--pool', 'loop')).code).toBe(
            0,
          );
        }
        expect(
          (await a.cli('device', 'create', 't3', '--size', '4M', '--pool', 'other')).code,
        ).toBe(0);
        writeFileSync(rot, '1');
        const r = await a.cli('pool', 'rescan');
        expect(r.stdout).toMatch(/pool loop: ssd -> hdd/);
        expect(r.stdout).toMatch(/device t1: tier ssd -> hdd/);
        await until('two tier events', () => rx.ids().length === 2);
        expect(rx.got.map((g) => [g.subject, g.data.before, g.data.after])).toEqual([
          ['t1', ['ssd'], ['hdd']],
          ['t2', ['ssd'], ['hdd']],
        ]);
      } finally {
        await rx.stop().catch(() => {});
        await a?.stop();
        await run('umount', [mnt]);
        await run('losetup', ['-d', loop]);
      }
    });
  },
);
