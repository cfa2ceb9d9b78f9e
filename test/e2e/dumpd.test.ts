// End to end, with a real guest: Debian's kernel and a busybox initramfs under QEMU TCG
// with pvpanic, its dump device a device of a running agent (attached to the guest, and
// named to dumpd as agent + device).
// The guest marks its memory, panics; dumpd captures the dump onto the device and
// reboots the guest (the second boot shows on the console); `ballast dump get` returns
// an ELF core that readelf accepts and that holds the mark. Also: a dump that does not
// fit fails cleanly and leaves the earlier dump intact; kdump-zlib is stored flattened
// and reassembled by `dump get --reassemble`.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { QmpClient } from '../../dumpd/qmp.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { buildGuest, GuestConsole, guestArgs, occurrences } from '../helpers/guest.js';
import { startQemu } from '../helpers/qemu.js';
import { BALLAST_BIN, freePort, MiB, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run, runOk, toolEnv } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

/** Guest boots under TCG on a busy 2-core machine: far beyond the suite's default 60 s. */
const SLOW = scaled(300_000);

const ballast = (args: string[], timeoutMs = 120_000) =>
  run(process.execPath, [BALLAST_BIN, ...args], { timeoutMs });

describeWithTools(
  ['qemu-system-x86_64', 'readelf', 'cpio', 'busybox', 'vmlinuz'],
  'dumpd end to end',
  () => {
    let dir: string;
    let agent: AgentHandle;
    let agentFlag: string;
    let dumpd: ChildProcess;
    let dumpdLog = '';
    let startDumpd: () => Promise<void>;
    let port: number;
    let con: GuestConsole;
    const nonce = randomBytes(6).toString('hex');
    let uri: (device: string) => string;
    const server = { uri: (d: string) => uri(d) };
    /** The flag that hands `dump now` the token of the dumpd whose runDir is dir/RUN. */
    const token = (run: string) => ['--dumpd-token-file', path.join(dir, run, 'token')];
    /** `dump now GUEST EXTRA...` to the dumpd on `p` whose runDir is dir/RUN. */
    const dumpNow = (guest: string, extra: string[] = [], p = port, run = 'run') =>
      ballast(['dump', 'now', guest, ...extra, '--dumpd', `127.0.0.1:${p}`, ...token(run)]);

    const until = async (f: () => boolean | Promise<boolean>, what: string, timeoutMs = 60_000) => {
      const deadline = Date.now() + scaled(timeoutMs);
      while (!(await f())) {
        if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
        await new Promise((r) => setTimeout(r, 100));
      }
    };

    const waitLog = async (s: string, timeoutMs = 60_000) => {
      const deadline = Date.now() + scaled(timeoutMs);
      while (!dumpdLog.includes(s)) {
        if (Date.now() > deadline) throw new Error(`dumpd did not log "${s}":\n${dumpdLog}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };

    beforeAll(async () => {
      dir = makeTempDir('ballast-e2e-');
      const guest = buildGuest(dir);
      agent = await startAgent();
      agentFlag = `unix:${agent.apiSocket}`;
      for (const [name, size] of [
        ['vm1-dump', '768M'],
        ['small-dump', '64M'],
        ['kd-dump', '64M'],
        ['huge-dump', '16M'],
        ['shared-dump', '448M'],
      ]) {
        const r = await agent.api('POST', '/v1/devices', { name, size, role: 'dump' });
        expect(r.status, r.text).toBe(201);
      }
      uri = (name: string) => agent.uri(name);
      const g = await guest;
      const nbdSock = agent.nbdSocket;
      const consoleSock = path.join(dir, 'vm1.console');
      await startQemu(
        [
          ...guestArgs(g, consoleSock, 256),
          '-blockdev',
          `driver=nbd,node-name=dump0,server.type=unix,server.path=${nbdSock},export=vm1-dump`,
          '-device',
          'virtio-blk-pci,drive=dump0',
        ],
        { dir, qmp: path.join(dir, 'vm1.qmp') },
      );
      con = await GuestConsole.connect(consoleSock);
      // Two guests with no OS: enough memory to dump, nothing to boot.
      await startQemu(['-machine', 'pc,accel=tcg', '-m', '48', '-S'], {
        dir,
        qmp: path.join(dir, 'small.qmp'),
      });
      await startQemu(['-machine', 'pc,accel=tcg', '-m', '32', '-S'], {
        dir,
        qmp: path.join(dir, 'kd.qmp'),
      });
      await startQemu(['-machine', 'pc,accel=tcg', '-m', '64', '-S'], {
        dir,
        qmp: path.join(dir, 'huge.qmp'),
      });
      port = await freePort();
      const cfg = path.join(dir, 'dumpd.yaml');
      writeFileSync(
        cfg,
        [
          `listen: 127.0.0.1:${port}`,
          `runDir: ${path.join(dir, 'run')}`,
          'defaults: { format: elf, after: reboot, keep: 3 }',
          'guests:',
          `  - { name: vm1, qmp: ${path.join(dir, 'vm1.qmp')}, agent: "${agentFlag}", agentDevice: vm1-dump }`,
          `  - { name: small, qmp: ${path.join(dir, 'small.qmp')}, device: "${server.uri('small-dump')}", after: none }`,
          `  - { name: kd, qmp: ${path.join(dir, 'kd.qmp')}, device: "${server.uri('kd-dump')}", format: kdump-zlib, after: none }`,
          `  - { name: huge, qmp: ${path.join(dir, 'huge.qmp')}, device: "${server.uri('huge-dump')}", after: pause }`,
          '',
        ].join('\n'),
      );
      startDumpd = async () => {
        dumpdLog = '';
        dumpd = spawn(process.execPath, [BALLAST_BIN, 'dumpd', '--config', cfg], {
          env: toolEnv(),
          stdio: ['ignore', 'pipe', 'pipe'],
        });
        dumpd.stderr?.on('data', (b: Buffer) => {
          dumpdLog += b.toString();
        });
      };
      await startDumpd();
      await waitLog('guest vm1: QMP connected');
      await waitLog('guest small: QMP connected');
      await waitLog('guest huge: QMP connected');
      await waitLog('guest kd: QMP connected');
    }, SLOW);

    afterAll(async () => {
      con?.close();
      if (dumpd && dumpd.exitCode === null) {
        const gone = new Promise((r) => dumpd.once('exit', r));
        dumpd.kill('SIGTERM');
        await gone;
      }
      await agent?.stop();
    }, SLOW);

    it(
      'a panic is dumped onto the device, the guest reboots, and the dump reads back',
      async () => {
        await con.waitFor('BALLAST-READY', 1, 120_000);
        expect(con.text).toContain('pvpanic=2');
        con.send(`mark ${nonce}`);
        await con.waitFor('BALLAST-MARKED', 1, 30_000);
        con.send('panic');
        await waitLog('guest vm1: GUEST_PANICKED', 60_000);
        await waitLog('guest vm1: dump 1 complete', 120_000);
        await con.waitFor('BALLAST-BOOT', 2, 120_000);

        const ls = await ballast(['dump', 'ls', 'vm1-dump', '--agent', agentFlag, '--json']);
        expect(ls.code, describeRun(ls)).toBe(0);
        const listed = JSON.parse(ls.stdout) as {
          dumps: { id: number; state: string; guest: string; format: string; length: number }[];
        };
        expect(listed.dumps).toHaveLength(1);
        expect(listed.dumps[0]).toMatchObject({
          id: 1,
          state: 'complete',
          guest: 'vm1',
          format: 'elf',
        });
        expect(listed.dumps[0]?.length).toBeGreaterThan(200 * MiB);
        const table = await ballast(['dump', 'ls', server.uri('vm1-dump')]);
        expect(table.stdout).toMatch(/^1\s+vm1\s+elf\s+complete/m);

        const out = path.join(dir, 'vm1.core');
        const get = await ballast([
          'dump',
          'get',
          'vm1-dump',
          '1',
          '-o',
          out,
          '--agent',
          agentFlag,
        ]);
        expect(get.code, describeRun(get)).toBe(0);
        expect(get.stderr).toMatch(/crc32:[0-9a-f]{8} verified/);
        expect(statSync(out).size).toBe(listed.dumps[0]?.length);
        const core = readFileSync(out);
        expect(occurrences(core, `BALLAST-MARK-${nonce}\n`)).toBeGreaterThanOrEqual(10_000);
        const elf = await runOk('readelf', ['-h', out]);
        expect(elf.stdout).toMatch(/Type:\s+CORE/);
        expect(elf.stdout).toMatch(/Machine:\s+Advanced Micro Devices X86-64/);

        const metrics = await fetch(`http://127.0.0.1:${port}/metrics`).then((r) => r.text());
        expect(metrics).toMatch(/ballast_dumpd_dumps_completed_total\{guest="vm1"\} 1/);
        expect(metrics).toMatch(/ballast_dumpd_panics_total\{guest="vm1"\} 1/);
        expect(metrics).toMatch(/ballast_dumpd_dump_progress_ratio\{guest="vm1"\} 1/);
        expect(metrics).toMatch(/ballast_dumpd_panic_to_running_seconds\{guest="vm1"\} \d/);
        const guests = (await fetch(`http://127.0.0.1:${port}/v1/guests`).then((r) =>
          r.json(),
        )) as {
          guests: { name: string; connected: boolean; panics: number }[];
        };
        expect(guests.guests.find((g) => g.name === 'vm1')).toMatchObject({
          connected: true,
          panics: 1,
        });
      },
      SLOW,
    );

    it(
      'a panic while dumpd is down is dumped when dumpd comes back',
      async () => {
        const gone = new Promise((r) => dumpd.once('exit', r));
        dumpd.kill('SIGTERM');
        await gone;
        // The rebooted guest is ready for commands again.
        await until(
          () => con.text.lastIndexOf('BALLAST-READY') > con.text.lastIndexOf('BALLAST-BOOT'),
          'the second boot to be ready',
        );
        con.send('panic');
        const q = await QmpClient.connect(path.join(dir, 'vm1.qmp'));
        try {
          let status = '';
          await until(async () => {
            status = (await q.execute<{ status: string }>('query-status')).status;
            return status === 'guest-panicked';
          }, 'guest-panicked');
        } finally {
          q.close();
        }
        await startDumpd();
        await waitLog('guest vm1: found in guest-panicked state');
        // when it crashed is not known: recorded as found, not as a panic at that moment
        await waitLog('guest vm1: found crashed at ');
        await waitLog('guest vm1: dump 2 complete', 120_000);
        await con.waitFor('BALLAST-BOOT', 3, 120_000);
        const ls = await ballast(['dump', 'ls', 'vm1-dump', '--agent', agentFlag, '--json']);
        const dumps = (
          JSON.parse(ls.stdout) as {
            dumps: { id: number; state: string; panicAt: string | null }[];
          }
        ).dumps;
        expect(dumps.map((d) => [d.id, d.state])).toEqual([
          [1, 'complete'],
          [2, 'complete'],
        ]);
        expect(dumps[1]?.panicAt).toBeNull();
        for (const g of ['small', 'kd', 'huge']) await waitLog(`guest ${g}: QMP connected`);
      },
      SLOW,
    );

    it(
      'a dump that does not fit fails cleanly and leaves the earlier dump intact',
      async () => {
        const first = await dumpNow('small');
        expect(first.code, describeRun(first)).toBe(0);
        const second = await dumpNow('small');
        expect(second.code).toBe(1);
        expect(second.stderr).toContain('DUMP_NO_SPACE');
        const ls = await ballast(['dump', 'ls', server.uri('small-dump'), '--json']);
        const dumps = (JSON.parse(ls.stdout) as { dumps: { id: number; state: string }[] }).dumps;
        expect(dumps.map((d) => [d.id, d.state])).toEqual([
          [1, 'complete'],
          [2, 'failed'],
        ]);
        const failed = await ballast([
          'dump',
          'get',
          server.uri('small-dump'),
          '2',
          '-o',
          path.join(dir, 'x'),
        ]);
        expect(failed.stderr).toContain('DUMP_NOT_COMPLETE');
        const good = await ballast([
          'dump',
          'get',
          server.uri('small-dump'),
          '1',
          '-o',
          path.join(dir, 'small.core'),
        ]);
        expect(good.code, describeRun(good)).toBe(0);
        await runOk('readelf', ['-h', path.join(dir, 'small.core')]);
        // The guest is still usable: dumpd is not stuck and QEMU's dump job is over.
        const rm = await ballast(['dump', 'rm', server.uri('small-dump'), '2']);
        expect(rm.code, describeRun(rm)).toBe(0);

        // A 64 MiB guest onto a 16 MiB device: failed, listed as failed, policy applied.
        const huge = await dumpNow('huge', ['--after', 'pause', '--json']);
        expect(huge.code).toBe(1);
        const r = JSON.parse(huge.stdout) as {
          ok: boolean;
          error: { code: string };
          afterError?: unknown;
          entry: { state: string };
        };
        expect(r).toMatchObject({
          ok: false,
          error: { code: 'DUMP_NO_SPACE' },
          entry: { state: 'failed' },
        });
        expect(r.afterError).toBeUndefined();
        const hl = await ballast(['dump', 'ls', server.uri('huge-dump'), '--json']);
        expect(
          (JSON.parse(hl.stdout) as { dumps: { state: string }[] }).dumps.map((d) => d.state),
        ).toEqual(['failed']);
      },
      SLOW,
    );

    it(
      'kdump-zlib is stored flattened and reassembled into a kdump file',
      async () => {
        const now = await dumpNow('kd');
        expect(now.code, describeRun(now)).toBe(0);
        const flat = path.join(dir, 'kd.flat');
        const raw = path.join(dir, 'kd.kdump');
        expect((await ballast(['dump', 'get', server.uri('kd-dump'), '1', '-o', flat])).code).toBe(
          0,
        );
        expect(readFileSync(flat).subarray(0, 12).toString('latin1')).toBe('makedumpfile');
        const bar = await ballast([
          'dump',
          'get',
          server.uri('kd-dump'),
          '1',
          '-o',
          flat,
          '--progress',
        ]);
        expect(bar.stderr).toMatch(/\[#+\] 100% /);
        const r = await ballast([
          'dump',
          'get',
          server.uri('kd-dump'),
          '1',
          '-o',
          raw,
          '--reassemble',
        ]);
        expect(r.code, describeRun(r)).toBe(0);
        expect(readFileSync(raw).subarray(0, 8).toString('latin1')).toBe('KDUMP   ');
      },
      SLOW,
    );

    it(
      'dumpd killed mid-dump leaves earlier dumps readable; the interrupted one is never good',
      async () => {
        for (const [name, mem] of [
          ['tiny', '16'],
          ['big', '384'],
        ] as const)
          await startQemu(['-machine', 'pc,accel=tcg', '-m', mem, '-S'], {
            dir,
            qmp: path.join(dir, `${name}.qmp`),
          });
        const port2 = await freePort();
        const cfg = path.join(dir, 'dumpd2.yaml');
        const dev = server.uri('shared-dump');
        writeFileSync(
          cfg,
          [
            `listen: 127.0.0.1:${port2}`,
            `runDir: ${path.join(dir, 'run2')}`,
            'defaults: { format: elf, after: none, keep: 5 }',
            'guests:',
            `  - { name: tiny, qmp: ${path.join(dir, 'tiny.qmp')}, device: "${dev}" }`,
            `  - { name: big, qmp: ${path.join(dir, 'big.qmp')}, device: "${dev}" }`,
            '',
          ].join('\n'),
        );
        let log2 = '';
        const d2 = spawn(process.execPath, [BALLAST_BIN, 'dumpd', '--config', cfg], {
          env: toolEnv(),
          stdio: ['ignore', 'ignore', 'pipe'],
        });
        d2.stderr?.on('data', (b: Buffer) => {
          log2 += b.toString();
        });
        const gone = new Promise((r) => d2.once('exit', r));
        const deadline = Date.now() + scaled(30_000);
        while (
          !(log2.includes('guest tiny: QMP connected') && log2.includes('guest big: QMP connected'))
        ) {
          if (Date.now() > deadline) throw new Error(`second dumpd did not connect:\n${log2}`);
          await new Promise((r) => setTimeout(r, 50));
        }
        const tiny = await dumpNow('tiny', [], port2, 'run2');
        expect(tiny.code, describeRun(tiny)).toBe(0);
        // Start the big dump and kill dumpd as soon as its bytes are flowing.
        void dumpNow('big', [], port2, 'run2');
        for (;;) {
          const m = await fetch(`http://127.0.0.1:${port2}/metrics`)
            .then((r) => r.text())
            .catch(() => '');
          const b = /ballast_dumpd_dump_bytes_total\{guest="big"\} (\d+)/.exec(m);
          if (b && Number(b[1]) > 0) break;
          await new Promise((r) => setTimeout(r, 10));
        }
        d2.kill('SIGKILL');
        await gone;
        const ls = await ballast(['dump', 'ls', dev, '--json']);
        expect(ls.code, describeRun(ls)).toBe(0);
        const dumps = (
          JSON.parse(ls.stdout) as { dumps: { id: number; guest: string; state: string }[] }
        ).dumps;
        expect(dumps.map((d) => [d.guest, d.state])).toEqual([
          ['tiny', 'complete'],
          ['big', 'writing'],
        ]);
        const get = await ballast(['dump', 'get', dev, '1', '-o', path.join(dir, 'tiny.core')]);
        expect(get.code, describeRun(get)).toBe(0);
        expect(get.stderr).toContain('verified');
        const bad = await ballast(['dump', 'get', dev, '2', '-o', path.join(dir, 'big.core')]);
        expect(bad.stderr).toContain('DUMP_NOT_COMPLETE');
      },
      SLOW,
    );

    it(
      'QMP errors and unknown guests carry stable codes',
      async () => {
        const r = await dumpNow('nope');
        expect(r.code).toBe(1);
        expect(r.stderr).toContain('DUMP_UNKNOWN_GUEST');
        const q = await QmpClient.connect(path.join(dir, 'kd.qmp'), { timeoutMs: 300 }).catch(
          (e: unknown) => e,
        );
        expect((q as { code?: string }).code).toBe('QMP_TIMEOUT');
      },
      SLOW,
    );
  },
);
