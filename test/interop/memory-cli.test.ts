// `ballast dumpd` with a memory: section, and `ballast memory status|set`, against real
// QEMUs without a guest OS: one whose balloon has no driver (it ignores its targets),
// one with no balloon device. The daemon is killed with SIGKILL and started again.

import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { MemoryStatus } from '../../guestd/memory/controller.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { startQemu } from '../helpers/qemu.js';
import { BALLAST_BIN, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run, toolEnv } from '../helpers/tools.js';

const MiB = 1024 * 1024;

describeWithTools(['qemu-system-x86_64'], 'ballast memory against a running guest daemon', () => {
  let dir: string;
  let sock: string;
  let cfg: string;
  let daemon: ChildProcess | null = null;
  let stderr = '';

  function startDaemon(): ChildProcess {
    stderr = '';
    const c = spawn(BALLAST_BIN, ['dumpd', '-c', cfg], {
      env: toolEnv(),
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    c.stderr?.on('data', (b: Buffer) => {
      stderr += b.toString();
    });
    return c;
  }

  async function status(): Promise<MemoryStatus | null> {
    const r = await run(BALLAST_BIN, ['memory', 'status', '--json', '--dumpd', sock]);
    return r.code === 0 ? (JSON.parse(r.stdout) as MemoryStatus) : null;
  }

  /** Polls the status until `f` holds (the daemon decides on its own clock). */
  async function statusUntil(f: (s: MemoryStatus) => boolean, what: string): Promise<MemoryStatus> {
    const deadline = Date.now() + 50_000;
    for (;;) {
      const s = await status();
      if (s && f(s)) return s;
      if (Date.now() > deadline)
        throw new Error(`${what}: not seen; last status ${JSON.stringify(s)}\n${stderr}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  }

  beforeAll(async () => {
    dir = makeTempDir('ballast-mem-');
    sock = path.join(dir, 'dumpd.sock');
    const args = (balloon: boolean) => [
      '-machine',
      'pc,accel=tcg,memory-backend=ram',
      '-m',
      '128',
      '-object',
      'memory-backend-memfd,id=ram,size=128M',
      ...(balloon ? ['-device', 'virtio-balloon-pci,id=balloon0'] : []),
      '-S',
    ];
    await startQemu(args(true), { dir, qmp: path.join(dir, 'a.qmp') });
    await startQemu(args(false), { dir, qmp: path.join(dir, 'c.qmp') });
    cfg = path.join(dir, 'guestd.yaml');
    writeFileSync(
      cfg,
      `listen: ${sock}
runDir: ${path.join(dir, 'run')}
memory:
  pool: 192M
  hostMinAvailable: 0
  interval: 1
  followIntervals: 2
  guests:
    - { name: a, qmp: ${path.join(dir, 'a.qmp')}, entitlement: 64M, max: 128M, weight: 200 }
    - { name: c, qmp: ${path.join(dir, 'c.qmp')}, entitlement: 64M }
`,
    );
    daemon = startDaemon();
  });

  afterAll(async () => {
    if (daemon && daemon.exitCode === null) {
      const gone = new Promise((r) => daemon!.once('exit', r));
      daemon.kill('SIGKILL');
      await gone;
    }
  });

  it('shows the pool and each guest, as JSON and as a table', async () => {
    // c holds its 128 MiB (no balloon); a is asked down to 64 MiB, ignores it, is left alone
    const s = await statusUntil(
      (x) => x.guests.find((g) => g.name === 'a')?.mode === 'ignoring',
      'a ignoring its target',
    );
    expect(s.pool).toBe(192 * MiB);
    expect(s.guests.map((g) => [g.name, g.mode, g.actual, g.entitlement, g.weight])).toEqual([
      ['a', 'ignoring', 128 * MiB, 64 * MiB, 200],
      ['c', 'no-balloon', null, 64 * MiB, 128],
    ]);
    expect(s.exceeded).toBe(true);
    const t = await run(BALLAST_BIN, ['memory', 'status', '--dumpd', sock]);
    expect(t.code, describeRun(t)).toBe(0);
    const lines = t.stdout.trimEnd().split('\n');
    expect(lines[0]).toMatch(
      /^pool 192M {2}budget -64M {2}held 256M {2}EXCEEDED {2}interval 1s {2}at /,
    );
    expect(lines[1]).toMatch(
      /^GUEST +STATE +TARGET +ACTUAL +RESIDENT +ENTITLED +MAX +WEIGHT +SWAP-IN +PAGING +WHY$/,
    );
    expect(lines[2]).toMatch(
      /^a +ignoring +128M +128M +\d+M +64M +128M +200 +0 +- +ignoring its target/,
    );
    expect(lines[3]).toMatch(/^c +no-balloon +- +- +\d+M +64M +128M +128 +0 +- +no balloon device/);
    expect(stderr).toContain('memory: rebalanced: a 128M→64M');
  });

  it('sets a share, and refuses one that does not fit the pool with the numbers', async () => {
    const ok = await run(BALLAST_BIN, [
      'memory',
      'set',
      'a',
      '--entitlement',
      '100M',
      '--weight',
      '50',
      '--dumpd',
      sock,
    ]);
    expect(ok.code, describeRun(ok)).toBe(0);
    expect(ok.stdout).toBe('a: entitlement 100M, weight 50, max 128M\n');
    const bad = await run(BALLAST_BIN, [
      'memory',
      'set',
      'c',
      '--entitlement',
      '128M',
      '--dumpd',
      sock,
    ]);
    expect(bad.code, describeRun(bad)).toBe(1);
    expect(bad.stderr).toBe(
      'ballast: error MEMORY_POOL_TOO_SMALL: the entitlements add up to 228 MiB (a 100 MiB + c 128 MiB), more than the pool of 192 MiB by 36 MiB: lower an entitlement or grow the pool\n',
    );
    const unknown = await run(BALLAST_BIN, [
      'memory',
      'set',
      'x',
      '--weight',
      '1',
      '--dumpd',
      sock,
    ]);
    expect(unknown.stderr).toMatch(/^ballast: error MEMORY_UNKNOWN_GUEST: no guest named "x"/);
    const s = await status();
    expect(s?.guests.map((g) => [g.entitlement, g.weight])).toEqual([
      [100 * MiB, 50],
      [64 * MiB, 128],
    ]);
  });

  it('comes back after SIGKILL and takes the guests at their sizes again', async () => {
    const gone = new Promise((r) => daemon!.once('exit', r));
    daemon!.kill('SIGKILL');
    await gone;
    daemon = startDaemon();
    const s = await statusUntil(
      (x) => x.guests.length === 2 && x.guests[0]!.actual !== null,
      'the restarted daemon reaching a',
    );
    expect(stderr).not.toMatch(/DUMP_LISTEN_FAILED/);
    // the configured shares again, and a kept at the size it had
    expect(s.guests.map((g) => [g.name, g.entitlement, g.actual])).toEqual([
      ['a', 64 * MiB, 128 * MiB],
      ['c', 64 * MiB, null],
    ]);
    expect(['observing', 'managed', 'ignoring']).toContain(s.guests[0]!.mode);
  });

  it('refuses at start a pool too small for the entitlements', async () => {
    const bad = path.join(dir, 'bad.yaml');
    writeFileSync(
      bad,
      `listen: ${path.join(dir, 'bad.sock')}
memory:
  pool: 100M
  guests:
    - { name: a, qmp: /nonexistent.qmp, entitlement: 64M }
    - { name: b, qmp: /nonexistent2.qmp, entitlement: 64M }
`,
    );
    const r = await run(BALLAST_BIN, ['dumpd', '-c', bad]);
    expect(r.code, describeRun(r)).toBe(1);
    expect(r.stderr).toContain(
      'ballast: error MEMORY_POOL_TOO_SMALL: the entitlements add up to 128 MiB (a 64 MiB + b 64 MiB), more than the pool of 100 MiB by 28 MiB',
    );
  });
});

describeWithTools(['qemu-system-x86_64'], 'memory part with paging devices on an agent', () => {
  let agent: AgentHandle;
  let dir: string;
  let daemon: ChildProcess | null = null;
  let stderr = '';

  beforeAll(async () => {
    agent = await startAgent();
    dir = makeTempDir('ballast-memp-');
    for (const d of ['a-swap', 'b-swap']) {
      const r = await agent.cli('device', 'create', d, '--size', '64M', '--role', 'paging');
      expect(r.code, describeRun(r)).toBe(0);
    }
    // a's paging device is attached; b's is not
    const args = (swap: string | null) => [
      '-machine',
      'pc,accel=tcg,memory-backend=ram',
      '-m',
      '128',
      '-object',
      'memory-backend-memfd,id=ram,size=128M',
      '-device',
      'virtio-balloon-pci,id=balloon0',
      ...(swap
        ? [
            '-blockdev',
            `driver=nbd,node-name=swap,server.type=unix,server.path=${agent.nbdSocket},export=${swap}`,
            '-device',
            'virtio-blk-pci,drive=swap',
          ]
        : []),
      '-S',
    ];
    await startQemu(args('a-swap'), { dir, qmp: path.join(dir, 'a.qmp') });
    await startQemu(args(null), { dir, qmp: path.join(dir, 'b.qmp') });
    const cfg = path.join(dir, 'guestd.yaml');
    const agentAddr = `unix:${agent.apiSocket}`;
    writeFileSync(
      cfg,
      `listen: ${path.join(dir, 'dumpd.sock')}
runDir: ${path.join(dir, 'run')}
memory:
  pool: 192M
  hostMinAvailable: 0
  interval: 1
  guests:
    - { name: a, qmp: ${path.join(dir, 'a.qmp')}, entitlement: 64M, max: 128M, pagingDevice: a-swap, agent: "${agentAddr}" }
    - { name: b, qmp: ${path.join(dir, 'b.qmp')}, entitlement: 64M, max: 128M, pagingDevice: b-swap, agent: "${agentAddr}" }
`,
    );
    daemon = spawn(BALLAST_BIN, ['dumpd', '-c', cfg], {
      env: toolEnv(),
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    daemon.stderr?.on('data', (b: Buffer) => {
      stderr += b.toString();
    });
  });

  afterAll(async () => {
    if (daemon && daemon.exitCode === null) {
      const gone = new Promise((r) => daemon!.once('exit', r));
      daemon.kill('SIGKILL');
      await gone;
    }
    await agent?.stop();
  });

  it('takes no memory from a guest whose paging device is not attached, says so, and posts the move as an event', async () => {
    const deadline = Date.now() + 60_000;
    let events: { type: string; data: { moves: { guest: string; from: number; to: number }[] } }[] =
      [];
    while (events.length === 0) {
      if (Date.now() > deadline) throw new Error(`no memory.rebalanced event\n${stderr}`);
      const r = await agent.cli('events', '--json', '--types', 'memory.*');
      expect(r.code, describeRun(r)).toBe(0);
      events = r.stdout
        .split('\n')
        .filter(Boolean)
        .map((l) => JSON.parse(l));
      if (events.length === 0) await new Promise((res) => setTimeout(res, 300));
    }
    expect(events[0]!.type).toBe('io.ballast.memory.rebalanced');
    // b holds its 128 MiB (protected): a alone gives, down to 192 - 128 = 64 MiB
    expect(events[0]!.data.moves).toEqual([
      expect.objectContaining({ guest: 'a', from: 128 * MiB, to: 64 * MiB }),
    ]);
    const r = await run(BALLAST_BIN, [
      'memory',
      'status',
      '--json',
      '--dumpd',
      path.join(dir, 'dumpd.sock'),
    ]);
    const s = JSON.parse(r.stdout) as MemoryStatus;
    const b = s.guests.find((g) => g.name === 'b')!;
    expect([b.paging, b.protect, b.pagingWhy]).toEqual(['unreachable', true, 'no client attached']);
    expect(b.reason).toContain('protect: paging device unreachable, not taking memory');
    expect(b.target).toBe(128 * MiB);
    expect(s.guests.find((g) => g.name === 'a')!.paging).toBe('ok');
    expect(stderr).toContain(
      'memory: guest b: paging device b-swap unreachable (no client attached): not taking memory from it',
    );
  });
});
