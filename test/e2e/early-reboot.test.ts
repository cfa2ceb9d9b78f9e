// End to end, early reboot (dumpd/early.ts), with a real guest under QEMU TCG and its
// dump device a device of a running agent. The guest marks its memory (a RAM file, and
// a fixed guest-physical region through /dev/mem) and panics; dumpd reboots it at once
// while the background snapshot streams (paced, so that the stream outlasts a boot
// here), and the rebooted guest writes other marks into the same memory. The core that
// `ballast dump get` makes from the stream must hold the first marks only; readelf
// judges the core. Also: a second panic during the stream waits and is dumped after;
// dumpd killed mid-stream leaves the guest running and the dump failed; a guest whose
// memory QEMU cannot write-protect falls back to dump-then-reboot and says why.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { inflateSync } from 'node:zlib';
import { afterAll, beforeAll, expect, it, onTestFinished } from 'vitest';
import { QmpClient } from '../../dumpd/qmp.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import {
  buildGuest,
  GuestConsole,
  guestArgs,
  occurrences,
  PHYS_MARK_GPA,
  PHYS_MARK_SIZE,
} from '../helpers/guest.js';
import { startQemu } from '../helpers/qemu.js';
import { BALLAST_BIN, freePort, MiB, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run, runOk, toolEnv } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

const SLOW = scaled(600_000);
/**
 * Paces the stream so that it outlasts a boot of the guest under TCG here. The boot is
 * paced too (each page it first writes waits for that page's turn in the stream), so
 * the guest also fills FILL_MIB of memory that no boot touches (reserved from the
 * kernel), which makes the stream longer and not the boot.
 */
const STREAM_MIBPS = 4;
const FILL_MIB = 224;
/** Room for the kernel besides the 4 MiB markphys region and the fill. */
const GUEST_MIB = 384;

const ballast = (args: string[], timeoutMs = 180_000) =>
  run(process.execPath, [BALLAST_BIN, ...args], { timeoutMs });

interface Listed {
  id: number;
  state: string;
  guest: string;
  format: string;
  length: number;
  checksum: string;
  reason: string;
  panicAt: string | null;
  runningAt: string | null;
  finishedAt: string | null;
  panicToRunningMs: number | null;
}

/** The file offset of a guest-physical address in an ELF core (its PT_LOADs). */
function elfOffsetOf(core: Buffer, gpa: number): number {
  const phoff = Number(core.readBigUInt64LE(32));
  const phnum = core.readUInt16LE(56);
  for (let i = 0; i < phnum; i++) {
    const p = phoff + i * 56;
    if (core.readUInt32LE(p) !== 1) continue;
    const off = Number(core.readBigUInt64LE(p + 8));
    const paddr = Number(core.readBigUInt64LE(p + 24));
    const size = Number(core.readBigUInt64LE(p + 32));
    if (gpa >= paddr && gpa < paddr + size) return off + (gpa - paddr);
  }
  throw new Error(`no PT_LOAD holds 0x${gpa.toString(16)}`);
}

/** One page of a kdump-compressed file, by page frame number (read as crash would). */
function kdumpPage(f: Buffer, pfn: number): Buffer {
  const bs = f.readUInt32LE(428);
  const subBlocks = f.readUInt32LE(432);
  const bitmapBlocks = f.readUInt32LE(436);
  const bitmapAt = (1 + subBlocks) * bs;
  const half = (bitmapBlocks / 2) * bs;
  const bit = (i: number) => ((f[bitmapAt + half + (i >> 3)] as number) >> (i & 7)) & 1;
  if (!bit(pfn)) throw new Error(`pfn ${pfn} is not in the dump`);
  let index = 0;
  for (let i = 0; i < pfn; i++) index += bit(i);
  const d = (1 + subBlocks + bitmapBlocks) * bs + index * 24;
  const off = Number(f.readBigUInt64LE(d));
  const size = f.readUInt32LE(d + 8);
  const flags = f.readUInt32LE(d + 12);
  const data = f.subarray(off, off + size);
  return flags & 1 ? inflateSync(data) : Buffer.from(data);
}

describeWithTools(
  ['qemu-system-x86_64', 'readelf', 'cpio', 'busybox', 'vmlinuz'],
  'dumpd early reboot',
  () => {
    let dir: string;
    let agent: AgentHandle;
    let agentFlag: string;
    let cfg: string;
    let dumpd: ChildProcess;
    let log = '';
    let port: number;
    let con: GuestConsole;
    let vmQmp: string;
    /** A second monitor of the guest for the test: QEMU serves one client per monitor. */
    let testQmp: string;
    const n1 = randomBytes(5).toString('hex');
    const n2 = randomBytes(5).toString('hex');
    const n3 = randomBytes(5).toString('hex');

    const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
    const waitLog = async (s: string | RegExp, timeoutMs = 120_000) => {
      const deadline = Date.now() + scaled(timeoutMs);
      const seen = () => (typeof s === 'string' ? log.includes(s) : s.test(log));
      while (!seen()) {
        if (Date.now() > deadline) throw new Error(`dumpd did not log "${s}":\n${log}`);
        await sleep(50);
      }
    };
    /** While it exists, vm1's early-reboot dump stays streaming (the early-reboot-hold failpoint). */
    const hold = () => path.join(dir, 'run', 'vm1.hold');
    /** Holds vm1's next early-reboot dump until the test lets it go, or ends either way. */
    const holdDump = () => {
      writeFileSync(hold(), '');
      onTestFinished(() => rmSync(hold(), { force: true }));
    };
    const startDumpd = async () => {
      log = '';
      dumpd = spawn(process.execPath, [BALLAST_BIN, 'dumpd', '--config', cfg], {
        // Early-reboot dumps stay `streaming` while RUNDIR/GUEST.hold exists: what must be
        // slower than the guest's boot is made so, not hoped to be.
        env: { ...toolEnv(), BALLAST_FAILPOINTS: 'early-reboot-hold' },
        stdio: ['ignore', 'ignore', 'pipe'],
      });
      dumpd.stderr?.on('data', (b: Buffer) => {
        log += b.toString();
      });
      await waitLog('guest vm1: QMP connected', 60_000);
      await waitLog('guest fb: QMP connected', 60_000);
    };
    const stopDumpd = async (signal: NodeJS.Signals) => {
      if (dumpd.exitCode !== null || dumpd.signalCode !== null) return;
      const gone = new Promise((r) => dumpd.once('exit', r));
      dumpd.kill(signal);
      await gone;
    };
    const ls = async (dev: string): Promise<Listed[]> => {
      const r = await ballast(['dump', 'ls', dev, '--agent', agentFlag, '--json']);
      expect(r.code, describeRun(r)).toBe(0);
      return (JSON.parse(r.stdout) as { dumps: Listed[] }).dumps;
    };
    const status = async () => {
      const q = await QmpClient.connect(testQmp);
      try {
        return (await q.execute<{ status: string }>('query-status')).status;
      } finally {
        q.close();
      }
    };
    /** Waits until the guest's console is ready for a command after its n-th boot. */
    const ready = async (boot: number) => {
      await con.waitFor('BALLAST-BOOT', boot, 240_000);
      const deadline = Date.now() + scaled(120_000);
      while (con.text.lastIndexOf('BALLAST-READY') < con.text.lastIndexOf('BALLAST-BOOT')) {
        if (Date.now() > deadline)
          throw new Error(`boot ${boot} not ready:\n${con.text.slice(-2000)}`);
        await sleep(50);
      }
    };
    const mark = async (nonce: string) => {
      const m = con.count('BALLAST-MARKED');
      const p = con.count('BALLAST-PHYS-DONE');
      con.send(`mark ${nonce}`);
      await con.waitFor('BALLAST-MARKED', m + 1, 60_000);
      con.send(`markphys ${nonce}`);
      await con.waitFor('BALLAST-PHYS-DONE', p + 1, 60_000);
    };
    const getCore = async (id: number, format = 'elf') => {
      const out = path.join(dir, `vm1-${id}.${format}`);
      const r = await ballast([
        'dump',
        'get',
        'er-dump',
        String(id),
        '-o',
        out,
        '--agent',
        agentFlag,
        ...(format === 'elf' ? [] : ['--format', format]),
      ]);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stderr).toMatch(/crc32:[0-9a-f]{8} verified/);
      return out;
    };

    beforeAll(async () => {
      dir = makeTempDir('ballast-er-');
      const guest = buildGuest(dir);
      agent = await startAgent();
      agentFlag = `unix:${agent.apiSocket}`;
      for (const [name, size] of [
        ['er-dump', '2G'],
        ['fb-dump', '256M'],
      ]) {
        const r = await agent.api('POST', '/v1/devices', { name, size, role: 'dump' });
        expect(r.status, r.text).toBe(201);
      }
      const g = await guest;
      const consoleSock = path.join(dir, 'vm1.console');
      vmQmp = path.join(dir, 'vm1.qmp');
      testQmp = path.join(dir, 'vm1-test.qmp');
      await startQemu(
        [
          ...guestArgs(g, consoleSock, GUEST_MIB, { fillMiB: FILL_MIB }),
          '-qmp',
          `unix:${testQmp},server=on,wait=off`,
        ],
        { dir, qmp: vmQmp },
      );
      con = await GuestConsole.connect(consoleSock);
      // RAM in a shared mapping of a file on a disk file system: userfaultfd cannot
      // write-protect it, so QEMU refuses background-snapshot for this guest.
      await startQemu(
        [
          '-machine',
          'pc,accel=tcg,memory-backend=ram0',
          '-object',
          `memory-backend-file,id=ram0,size=64M,mem-path=${path.join(dir, 'fb.ram')},share=on`,
          '-m',
          '64M',
          '-S',
        ],
        { dir, qmp: path.join(dir, 'fb.qmp') },
      );
      port = await freePort();
      cfg = path.join(dir, 'dumpd.yaml');
      writeFileSync(
        cfg,
        [
          `listen: 127.0.0.1:${port}`,
          `runDir: ${path.join(dir, 'run')}`,
          // No loop limit: the guest panics four times within minutes here, on purpose.
          `defaults: { format: elf, after: reboot, keep: 5, mode: early-reboot, streamMiBps: ${STREAM_MIBPS}, loopLimit: { dumps: 0 } }`,
          'guests:',
          `  - { name: vm1, qmp: ${vmQmp}, agent: "${agentFlag}", agentDevice: er-dump }`,
          `  - { name: fb, qmp: ${path.join(dir, 'fb.qmp')}, agent: "${agentFlag}", agentDevice: fb-dump }`,
          '',
        ].join('\n'),
      );
      await startDumpd();
    }, SLOW);

    afterAll(async () => {
      con?.close();
      if (dumpd) await stopDumpd('SIGTERM');
      await agent?.stop();
    }, SLOW);

    it(
      'the guest boots again before its dump completes; the core holds the marks from before the panic only',
      async () => {
        await ready(1);
        con.send(`fill ${FILL_MIB}`);
        await con.waitFor('BALLAST-FILLED', 1, 240_000);
        await mark(n1);
        holdDump();
        con.send('panic');
        await waitLog('guest vm1: GUEST_PANICKED');
        await waitLog(/guest vm1: running again \d+ ms after the panic/);
        // The second boot shows while the dump still streams...
        await ready(2);
        expect(log).not.toContain('guest vm1: dump 1 complete');
        expect((await ls('er-dump')).map((d) => [d.id, d.state, d.format])).toEqual([
          [1, 'streaming', 'migration'],
        ]);
        // ...and the rebooted guest writes other marks into the same memory meanwhile.
        await mark(n2);
        expect(log).not.toContain('guest vm1: dump 1 complete');
        rmSync(hold(), { force: true });
        await waitLog('guest vm1: dump 1 complete', 300_000);

        const [d] = await ls('er-dump');
        expect(d).toMatchObject({ id: 1, state: 'complete', format: 'migration', guest: 'vm1' });
        expect(d?.checksum).toMatch(/^crc32:/);
        const panicAt = Date.parse(d?.panicAt ?? '');
        const runningAt = Date.parse(d?.runningAt ?? '');
        const finishedAt = Date.parse(d?.finishedAt ?? '');
        expect(panicAt).toBeGreaterThan(0);
        expect(runningAt).toBeGreaterThanOrEqual(panicAt);
        expect(finishedAt).toBeGreaterThan(runningAt);
        expect(d?.panicToRunningMs).toBe(runningAt - panicAt);

        const out = await getCore(1);
        const elf = await runOk('readelf', ['-h', '-l', '-n', out]);
        expect(elf.stdout).toMatch(/Type:\s+CORE/);
        expect(elf.stdout).toMatch(/Machine:\s+Advanced Micro Devices X86-64/);
        expect(elf.stdout).toMatch(/LOAD/);
        expect(elf.stdout).toMatch(/CORE\s+0x00000150\s+NT_PRSTATUS/);
        const core = readFileSync(out);
        expect(occurrences(core, `BALLAST-MARK-${n1}\n`)).toBeGreaterThanOrEqual(10_000);
        expect(occurrences(core, n2)).toBe(0);
        const at = elfOffsetOf(core, PHYS_MARK_GPA);
        const region = core.subarray(at, at + PHYS_MARK_SIZE);
        expect(occurrences(region, `BALLAST-PHYS-${n1}\n`)).toBeGreaterThanOrEqual(
          Math.floor(PHYS_MARK_SIZE / 30),
        );

        const kd = readFileSync(await getCore(1, 'kdump-zlib'));
        expect(kd.subarray(0, 8).toString('latin1')).toBe('KDUMP   ');
        expect(kdumpPage(kd, PHYS_MARK_GPA / 4096).toString('latin1')).toContain(
          `BALLAST-PHYS-${n1}\n`,
        );

        const metrics = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
        expect(metrics).toMatch(/ballast_dumpd_panic_to_running_seconds\{guest="vm1"\} \d/);
        expect(metrics).toMatch(
          /ballast_dumpd_panic_to_dump_complete_seconds\{guest="vm1",mode="early-reboot"\} \d/,
        );
        expect(metrics).toMatch(
          /ballast_dumpd_dump_throughput_bytes_per_second\{guest="vm1",mode="early-reboot"\} \d/,
        );
        expect(metrics).toMatch(/ballast_dumpd_dumps_completed_total\{guest="vm1"\} 1/);
      },
      SLOW,
    );

    it(
      'a second panic during the stream waits for it, then is dumped the same way',
      async () => {
        holdDump();
        con.send('panic');
        await waitLog(/guest vm1: running again \d+ ms after the panic[\s\S]*running again/);
        await ready(3);
        await mark(n3);
        expect(log).not.toContain('guest vm1: dump 2 complete');
        con.send('panic');
        await waitLog('guest vm1: a dump is running; this panic waits for it');
        // Stopped by QEMU at its panic while the first stream goes on.
        expect(await status()).toBe('guest-panicked');
        rmSync(hold(), { force: true });
        await waitLog('guest vm1: dump 2 complete', 300_000);
        await waitLog('guest vm1: dumping the panic that waited');
        await ready(4);
        await waitLog('guest vm1: dump 3 complete', 300_000);
        const dumps = await ls('er-dump');
        expect(dumps.map((x) => [x.id, x.state])).toEqual([
          [1, 'complete'],
          [2, 'complete'],
          [3, 'complete'],
        ]);
        const second = readFileSync(await getCore(2));
        expect(occurrences(second, `BALLAST-MARK-${n2}\n`)).toBeGreaterThanOrEqual(10_000);
        expect(occurrences(second, n3)).toBe(0);
        const third = readFileSync(await getCore(3));
        const at = elfOffsetOf(third, PHYS_MARK_GPA);
        expect(third.subarray(at, at + 64).toString('latin1')).toContain(`BALLAST-PHYS-${n3}`);
      },
      SLOW,
    );

    it(
      'dumpd killed mid-stream: the dump is listed failed, the guest runs on, earlier dumps are intact',
      async () => {
        con.send('panic');
        // Killed once the guest runs again and the stream flows.
        await waitLog(/(running again \d+ ms after the panic[\s\S]*){4}/, 120_000);
        for (;;) {
          const m = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
          const s = /ballast_dumpd_dumps_streaming (\d+)/.exec(m);
          if (s && Number(s[1]) === 1 && (await ls('er-dump')).some((x) => x.id === 4)) break;
          await sleep(50);
        }
        await stopDumpd('SIGKILL');
        // The guest runs on: its fifth boot answers commands.
        await ready(5);
        const marked = con.count('BALLAST-MARKED');
        con.send(`mark ${n1}`);
        await con.waitFor('BALLAST-MARKED', marked + 1, 60_000);
        expect(await status()).toBe('running');
        expect((await ls('er-dump')).find((x) => x.id === 4)?.state).toBe('streaming');

        await startDumpd();
        await waitLog('guest vm1: 1 interrupted dump(s) marked failed', 60_000);
        const dumps = await ls('er-dump');
        expect(dumps.map((x) => [x.id, x.state])).toEqual([
          [1, 'complete'],
          [2, 'complete'],
          [3, 'complete'],
          [4, 'failed'],
        ]);
        expect(dumps[3]?.reason).toBe('interrupted');
        // what it wrote is not known (its space was freed): listed as such, not 0 B at 0 B/s
        const table = await ballast(['dump', 'ls', 'er-dump', '--agent', agentFlag]);
        const row = table.stdout.split('\n').find((l) => /^4\s/.test(l)) ?? '';
        expect(row).toMatch(/failed \(interrupted\)\s+(\d+ ms|-)\s+-\s+\S+\s+-\s+-\s+-\s*$/);
        const bad = await ballast([
          'dump',
          'get',
          'er-dump',
          '4',
          '-o',
          path.join(dir, 'x'),
          '--agent',
          agentFlag,
        ]);
        expect(bad.stderr).toContain('DUMP_NOT_COMPLETE');
        // The agent's event log: the three dumps completed, the interrupted one failed.
        for (let i = 0; ; i++) {
          const ev = await ballast(['events', '--json', '--types', 'dump.*', '--agent', agentFlag]);
          expect(ev.code, ev.stderr).toBe(0);
          const evs = ev.stdout
            .split('\n')
            .filter(Boolean)
            .map(
              (l) =>
                JSON.parse(l) as { type: string; subject?: string; data: Record<string, unknown> },
            )
            .filter((e) => e.subject === 'er-dump');
          const failed = evs.find((e) => e.type === 'io.ballast.dump.failed');
          if (failed || i > 50) {
            expect(
              evs.filter((e) => e.type === 'io.ballast.dump.completed').map((e) => e.data.id),
            ).toEqual([1, 2, 3]);
            expect(failed?.data).toMatchObject({
              guest: 'vm1',
              error: { code: 'DUMP_INTERRUPTED' },
            });
            break;
          }
          await sleep(100);
        }
        const core = readFileSync(await getCore(1));
        expect(occurrences(core, `BALLAST-MARK-${n1}\n`)).toBeGreaterThanOrEqual(10_000);
        // A later live migration of the guest is not turned into a snapshot.
        const q = await QmpClient.connect(testQmp);
        try {
          const caps = await q.execute<{ capability: string; state: boolean }[]>(
            'query-migrate-capabilities',
          );
          expect(caps.find((c) => c.capability === 'background-snapshot')?.state).toBe(false);
        } finally {
          q.close();
        }
      },
      SLOW,
    );

    it(
      'QEMU refusing background-snapshot falls back to dump-then-reboot and says why',
      async () => {
        const r = await ballast([
          'dump',
          'now',
          'fb',
          '--early-reboot',
          '--json',
          '--dumpd',
          `127.0.0.1:${port}`,
          // dumpd's bearer token for its TCP listener, in its runDir.
          '--dumpd-token-file',
          path.join(dir, 'run', 'token'),
        ]);
        expect(r.code, describeRun(r)).toBe(0);
        const res = JSON.parse(r.stdout) as {
          ok: boolean;
          mode: string;
          fallback: string;
          runningAt: number;
        };
        expect(res).toMatchObject({ ok: true, mode: 'dump-then-reboot' });
        expect(res.fallback).toMatch(/QEMU refused background-snapshot: .*not compatible/);
        expect(res.runningAt).toBeGreaterThan(0);
        await waitLog(/guest fb: early reboot not possible \(QEMU refused background-snapshot/);
        // no stream was ever started, and the log does not say one was
        expect(log).not.toMatch(/guest fb: early reboot[^\n]*snapshot streaming/);
        const dumps = await ls('fb-dump');
        expect(dumps).toHaveLength(1);
        expect(dumps[0]).toMatchObject({ state: 'complete', format: 'elf' });
        expect(dumps[0]?.reason).toMatch(/^dump-then-reboot: QEMU refused background-snapshot/);
        expect(dumps[0]?.length).toBeGreaterThan(64 * MiB);
        const out = path.join(dir, 'fb.core');
        const g = await ballast(['dump', 'get', 'fb-dump', '1', '-o', out, '--agent', agentFlag]);
        expect(g.code, describeRun(g)).toBe(0);
        expect((await runOk('readelf', ['-h', out])).stdout).toMatch(/Type:\s+CORE/);
        const m = await fetch(`http://127.0.0.1:${port}/metrics`).then((x) => x.text());
        expect(m).toMatch(/ballast_dumpd_early_reboot_fallbacks_total\{guest="fb"\} 1/);
      },
      SLOW,
    );
  },
);
