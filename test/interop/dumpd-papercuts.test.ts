// What a new user of dumpd ran into, against real QEMUs without a guest OS:
// a guest with no pvpanic device is named at once (its panics would never be
// seen); `dump now` leaves a running guest running unless told otherwise;
// `dump ls` says how long each dump took and how fast it went.

import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { Dumpd } from '../../dumpd/daemon.js';
import { startWatchingDumpd, until } from '../helpers/dumpd.js';
import { startQemu } from '../helpers/qemu.js';
import { BALLAST_BIN, makeTempDir, type ServerHandle } from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';

describeWithTools(['qemu-system-x86_64'], 'dumpd papercuts', () => {
  let server: ServerHandle;
  let dir: string;
  let d: Dumpd;
  let addr: string;
  const log: string[] = [];

  beforeAll(async () => {
    dir = makeTempDir('ballast-dp-');
    ({ server, d, addr } = await startWatchingDumpd({
      dir,
      exports: [
        { name: 'plain-dump', size: '64M' },
        { name: 'panicky-dump', size: '64M' },
      ],
      after: 'reboot',
      log,
    }));
  });

  afterAll(async () => {
    await d?.stop();
    await server?.stop();
  });

  it('warns about a guest without a pvpanic device, not about one with it', async () => {
    await startQemu(['-machine', 'pc,accel=tcg', '-m', '16', '-S'], {
      dir,
      qmp: path.join(dir, 'plain.qmp'),
    });
    await startQemu(
      [
        '-machine',
        'pc,accel=tcg',
        '-m',
        '16',
        '-S',
        '-device',
        'pvpanic',
        '-action',
        'panic=pause',
      ],
      { dir, qmp: path.join(dir, 'panicky.qmp') },
    );
    await until(() => log.some((l) => l.startsWith('guest plain: warning: no pvpanic')), 'warning');
    await until(() => d.connectedGuests().length === 2, 'both connected');
    // Give the second one's check the same time to answer.
    await new Promise((r) => setTimeout(r, 500));
    expect(log.some((l) => l.startsWith('guest panicky: warning: no pvpanic'))).toBe(false);
    expect(log.find((l) => l.startsWith('guest plain: warning'))).toContain(
      '-device pvpanic -action panic=pause',
    );
  });

  it('`dump now` leaves a running guest running although the policy says reboot', async () => {
    const token = ['--dumpd-token-file', path.join(dir, 'run', 'token')];
    const now = await run(process.execPath, [
      BALLAST_BIN,
      'dump',
      'now',
      'plain',
      '--dumpd',
      addr,
      ...token,
    ]);
    expect(now.code, describeRun(now)).toBe(0);
    expect(now.stdout).toMatch(/^dump 1 of plain: .*; after: none$/m);
    const forced = await run(process.execPath, [
      BALLAST_BIN,
      'dump',
      'now',
      'plain',
      '--dumpd',
      addr,
      ...token,
      '--after',
      'pause',
      '--json',
    ]);
    expect(forced.code, describeRun(forced)).toBe(0);
    expect(JSON.parse(forced.stdout)).toMatchObject({ ok: true, after: 'pause' });
  });

  it('`dump ls` shows how long each dump took and its rate', async () => {
    const ls = await run(process.execPath, [BALLAST_BIN, 'dump', 'ls', server.uri('plain-dump')]);
    expect(ls.code, describeRun(ls)).toBe(0);
    const [head, ...rows] = ls.stdout.trim().split('\n');
    expect(head).toMatch(/\bTOOK\b.*\bRATE\b/);
    expect(rows).toHaveLength(2);
    for (const r of rows)
      expect(r).toMatch(/complete .* (\d+ ms|[\d.]+ s) +[\d.]+ (B|KiB|MiB|GiB)\/s/);
    const js = await run(process.execPath, [
      BALLAST_BIN,
      'dump',
      'ls',
      server.uri('plain-dump'),
      '--json',
    ]);
    const dumps = JSON.parse(js.stdout).dumps as {
      durationMs: number;
      bytesPerSecond: number;
      length: number;
    }[];
    for (const x of dumps) {
      expect(x.durationMs).toBeGreaterThanOrEqual(0);
      expect(x.bytesPerSecond).toBeGreaterThan(0);
    }
  });
});
