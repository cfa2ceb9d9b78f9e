// Guests that a real libvirtd runs (started by the test without systemd, see
// helpers/libvirt.ts; QEMU runs as libvirt-qemu:kvm, TCG, direct kernel boot of the
// test guest):
// - what `ballast attach --guest vm1 --format libvirt` prints, pasted verbatim into the
//   domain, gives the guest its paging and dump devices (vdb, vdc) through the agent's
//   default Unix socket (root:kvm 0660, in a directory the agent made under umask 077);
//   the guest swaps onto the paging device and reads its data back;
// - what `ballast attach NAME --format virsh` prints, run by sh, hot-plugs a device
//   into the running domain and its persistent definition;
// - the guest panics (<panic model='isa'/>, <on_crash>preserve</on_crash>): dumpd,
//   told of it by libvirt's lifecycle events, dumps it through libvirt (virsh dump
//   --memory-only into its FIFO) onto its dump device; the dump is listed, fetched and
//   holds the marks from the guest's memory, and the guest is rebooted through libvirt
//   (virsh reset + resume); `dump now` dumps the running guest through libvirt too.

import { type ChildProcess, spawn } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { chmodSync, copyFileSync, mkdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import type { AgentHandle } from '../helpers/agent.js';
import { buildGuest, GuestConsole, occurrences } from '../helpers/guest.js';
import { LIBVIRT_TOOLS, Libvirtd, startAgentForLibvirt } from '../helpers/libvirt.js';
import { BALLAST_BIN, freePort, MiB, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run, runOk, toolEnv } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

/** Guest boots under TCG on a busy 2-core machine: far beyond the suite's default 60 s. */
const SLOW = scaled(400_000);

const ballast = (args: string[], timeoutMs = 120_000) =>
  run(process.execPath, [BALLAST_BIN, ...args], { timeoutMs });

function uidOf(user: string): number {
  const line = readFileSync('/etc/passwd', 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${user}:`));
  return Number(line?.split(':')[2] ?? -1);
}

function gidOf(group: string): number {
  const line = readFileSync('/etc/group', 'utf8')
    .split('\n')
    .find((l) => l.startsWith(`${group}:`));
  return Number(line?.split(':')[2] ?? -1);
}

/** The domain XML a libvirt user writes, with what `attach` printed pasted in. */
function domainXml(o: {
  name: string;
  kernel: string;
  initrd: string;
  console: string;
  disks: string;
}): string {
  return `<domain type='qemu'>
  <name>${o.name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${o.kernel}</kernel>
    <initrd>${o.initrd}</initrd>
    <cmdline>console=ttyS0 panic=0 quiet loglevel=3 mitigations=off</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_crash>preserve</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='unix'>
      <source mode='bind' path='${o.console}'/>
      <target port='0'/>
    </serial>
    <panic model='isa'/>
${o.disks}
  </devices>
</domain>
`;
}

describeWithTools(
  [...LIBVIRT_TOOLS, 'readelf', 'cpio', 'busybox', 'vmlinuz'],
  'guests that libvirt runs',
  () => {
    let dir: string;
    let lv: Libvirtd;
    let agent: AgentHandle;
    let agentFlag: string;
    let con: GuestConsole;
    let dumpd: ChildProcess | undefined;
    let dumpdLog = '';
    let port: number;
    let printed: string;
    const nonce = randomBytes(6).toString('hex');

    const waitLog = async (s: string, timeoutMs = 60_000) => {
      const deadline = Date.now() + scaled(timeoutMs);
      while (!dumpdLog.includes(s)) {
        if (Date.now() > deadline) throw new Error(`dumpd did not log "${s}":\n${dumpdLog}`);
        await new Promise((r) => setTimeout(r, 50));
      }
    };

    /** The console's whole lines (ended by a newline) that start with `prefix`. */
    const lines = (prefix: string) =>
      con.text
        .split(/\r?\n/)
        .slice(0, -1)
        .filter((l) => l.startsWith(prefix));
    const lastLine = (prefix: string) => lines(prefix).pop() ?? '';
    /** Waits for the n-th whole line that starts with `prefix`. */
    const waitLine = async (prefix: string, n = 1, timeoutMs = 60_000) => {
      await con.waitFor(prefix, n, timeoutMs);
      const deadline = Date.now() + scaled(10_000);
      while (lines(prefix).length < n && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 50));
    };

    beforeAll(async () => {
      dir = makeTempDir('ballast-lvt-');
      chmodSync(dir, 0o755);
      const guest = buildGuest(dir);
      const started = Libvirtd.start();
      agent = await startAgentForLibvirt(dir);
      agentFlag = `unix:${agent.apiSocket}`;
      for (const [name, size, role] of [
        ['vm1-swap', '256M', 'paging'],
        ['vm1-dump', '320M', 'dump'],
        ['vm1-data', '16M', 'data'],
      ] as const) {
        const r = await agent.api('POST', '/v1/devices', { name, size, role, guest: 'vm1' });
        expect(r.status, r.text).toBe(201);
      }
      lv = await started;
      const g = await guest;
      // QEMU runs as libvirt-qemu: give it its own copies of the kernel and initrd
      // (libvirt hands them to that user) and a directory for its console socket.
      const kernel = path.join(dir, 'vmlinuz');
      copyFileSync(g.kernel, kernel);
      const qemuDir = path.join(dir, 'qemu');
      mkdirSync(qemuDir);
      chmodSync(qemuDir, 0o770);
      const { chownSync } = await import('node:fs');
      chownSync(qemuDir, uidOf('libvirt-qemu'), gidOf('kvm'));

      // dumpd follows the domain through libvirt.
      port = await freePort();
      const cfg = path.join(dir, 'dumpd.yaml');
      writeFileSync(
        cfg,
        [
          `listen: 127.0.0.1:${port}`,
          `runDir: ${path.join(dir, 'dumpd-run')}`,
          'defaults: { format: elf, after: reboot, keep: 3 }',
          'guests:',
          `  - { name: vm1, libvirt: "${lv.uri}", agent: "${agentFlag}", agentDevice: vm1-dump }`,
          '',
        ].join('\n'),
      );
      dumpd = spawn(process.execPath, [BALLAST_BIN, 'dumpd', '--config', cfg], {
        env: toolEnv(),
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      dumpd.stderr?.on('data', (b: Buffer) => {
        dumpdLog += b.toString();
      });
      await waitLog('guest vm1: libvirt connected');

      const r = await agent.cli('attach', '--guest', 'vm1', '--format', 'libvirt');
      expect(r.code, describeRun(r)).toBe(0);
      printed = r.stdout;
      const xml = domainXml({
        name: 'vm1',
        kernel,
        initrd: g.initrd,
        console: path.join(qemuDir, 'vm1.console'),
        disks: printed.trimEnd(),
      });
      const file = path.join(dir, 'vm1.xml');
      writeFileSync(file, xml);
      const def = await lv.virsh(['define', file]);
      expect(def.code, describeRun(def)).toBe(0);
      const start = await lv.virsh(['start', 'vm1']);
      expect(start.code, `${describeRun(start)}\n${lv.qemuLog('vm1')}`).toBe(0);
      con = await GuestConsole.connect(path.join(qemuDir, 'vm1.console'));
    }, SLOW);

    afterAll(async () => {
      if (process.env.BALLAST_TEST_DEBUG) console.log(`libvirtd:\n${lv?.log().slice(-6000)}`);
      con?.close();
      if (dumpd && dumpd.exitCode === null) {
        const gone = new Promise((r) => dumpd?.once('exit', r));
        dumpd.kill('SIGTERM');
        await gone;
      }
      await lv?.stop();
      await agent?.stop();
    }, SLOW);

    it(
      'the printed <disk> elements, pasted verbatim, give the guest its devices; it swaps onto the paging one',
      async () => {
        // Every device of the guest, each with its own target: paging, dump, then the rest.
        expect(printed.match(/<disk /g)).toHaveLength(3);
        expect(
          [...printed.matchAll(/name='(vm1-[a-z]+)'[\s\S]*?<target dev='(vd[a-z])'/g)].map(
            (m) => `${m[1]}=${m[2]}`,
          ),
        ).toEqual(['vm1-swap=vdb', 'vm1-dump=vdc', 'vm1-data=vdd']);
        expect(printed).toContain(`socket='${path.join(agent.dir, 'run', 'ballast', 'nbd.sock')}'`);
        // The socket QEMU opened: root:kvm 0660, in a directory made 0755 under umask 077.
        const sock = statSync(path.join(agent.dir, 'run', 'ballast', 'nbd.sock'));
        expect([sock.mode & 0o777, sock.gid]).toEqual([0o660, gidOf('kvm')]);
        expect(statSync(path.join(agent.dir, 'run', 'ballast')).mode & 0o777).toBe(0o755);
        // QEMU runs as libvirt-qemu (Debian's default), not root.
        const status = readFileSync(`/proc/${lv.qemuPid('vm1')}/status`, 'utf8');
        expect(status).toMatch(new RegExp(`^Uid:\\s+${uidOf('libvirt-qemu')}\\s`, 'm'));

        await con.waitFor('BALLAST-READY', 1, 180_000);
        // The guest names its disks in PCI order; each one's serial is its device's name.
        con.send('disks');
        await waitLine('BALLAST-DISKS', 1, 30_000);
        const seen = lastLine('BALLAST-DISKS');
        for (const d of ['vm1-swap', 'vm1-dump', 'vm1-data']) expect(seen).toContain(`=${d}`);
        con.send('swap vm1-swap');
        await con.waitFor('BALLAST-SWAPON vm1-swap', 1, 60_000);
        // 96 MiB of data in a guest with 128 MiB of RAM (its kernel holds a good part): much
        // of it goes to swap.
        con.send(`swapfill ${nonce} 96`);
        await waitLine('BALLAST-FILLED', 1, 300_000);
        const filled = lastLine('BALLAST-FILLED');
        const m = /BALLAST-FILLED (\w+) swapKiB=(\d+)/.exec(filled);
        expect(m, con.text.slice(-2000)).not.toBeNull();
        expect(m?.[1]).toBe('ok');
        expect(Number(m?.[2])).toBeGreaterThan(16 * 1024);
        // The agent saw the pages land: the paging device's file holds data now.
        const d = JSON.parse((await agent.cli('device', 'show', 'vm1-swap', '--json')).stdout);
        expect(d.allocatedBytes).toBeGreaterThan(16 * MiB);
        expect(d.connections).toBe(1);
        console.log(`libvirt guest: ${filled}; vm1-swap allocated ${d.allocatedBytes} bytes`);
      },
      SLOW,
    );

    it(
      'the printed virsh attach-device command hot-plugs a device into the running domain',
      async () => {
        const r = await agent.api('POST', '/v1/devices', {
          name: 'vm1-hot',
          size: '8M',
          role: 'data',
          guest: 'vm1',
        });
        expect(r.status, r.text).toBe(201);
        const p = await agent.cli('attach', 'vm1-hot', '--format', 'virsh', '--target', 'vde');
        expect(p.code, describeRun(p)).toBe(0);
        expect(p.stdout).toMatch(/^virsh attach-device vm1 \/dev\/stdin --live --persistent/);
        const sh = await run('sh', ['-c', p.stdout], {
          env: { LIBVIRT_DEFAULT_URI: lv.uri },
          timeoutMs: 120_000,
        });
        expect(sh.code, describeRun(sh)).toBe(0);
        expect(sh.stdout).toContain('Device attached successfully');
        const live = await lv.virsh(['domblklist', 'vm1']);
        expect(live.stdout).toMatch(/vde\s+vm1-hot/);
        const config = await lv.virsh(['dumpxml', '--inactive', 'vm1']);
        expect(config.stdout).toContain("name='vm1-hot'");
        // The guest sees the new disk.
        const before = con.count('BALLAST-DISKS');
        for (let i = 0; i < 60; i++) {
          con.send('disks');
          await waitLine('BALLAST-DISKS', before + i + 1, 30_000);
          if (lastLine('BALLAST-DISKS').includes('=vm1-hot')) break;
          await new Promise((res) => setTimeout(res, 1000));
        }
        expect(lastLine('BALLAST-DISKS')).toContain('=vm1-hot');
      },
      SLOW,
    );

    it(
      'a panic is dumped by dumpd onto the dump device and the guest rebooted through libvirt',
      async () => {
        con.send(`mark ${nonce}`);
        await con.waitFor('BALLAST-MARKED', 1, 60_000);
        const boots = con.count('BALLAST-BOOT');
        con.send('panic');
        await waitLog('guest vm1: GUEST_PANICKED', 60_000);
        await waitLog('guest vm1: dump 1 complete', 300_000);
        await waitLog(`guest vm1: reboot through libvirt`, 60_000);
        await con.waitFor('BALLAST-BOOT', boots + 1, 180_000);
        const st = await lv.virsh(['domstate', 'vm1', '--reason']);
        expect(st.stdout.trim()).toMatch(/^running/);
        // libvirt saw the panic and the reset (its log of the domain's events).
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
        const core = readFileSync(out);
        expect(occurrences(core, `BALLAST-MARK-${nonce}\n`)).toBeGreaterThanOrEqual(10_000);
        const elf = await runOk('readelf', ['-h', out]);
        expect(elf.stdout).toMatch(/Type:\s+CORE/);
      },
      SLOW,
    );

    it(
      'dump now: a running libvirt guest is dumped through libvirt and keeps running',
      async () => {
        // dumpd on TCP: a dump on request needs the token it wrote to its runDir
        const token = readFileSync(path.join(dir, 'dumpd-run', 'token'), 'utf8').trim();
        const r = await fetch(`http://127.0.0.1:${port}/v1/guests/vm1/dump`, {
          method: 'POST',
          headers: { authorization: `Bearer ${token}` },
        });
        const body = (await r.json()) as { ok: boolean; after: string; entry: { id: number } };
        expect(r.status, JSON.stringify(body)).toBe(200);
        expect(body).toMatchObject({ ok: true, after: 'none', entry: { id: 2 } });
        expect((await lv.virsh(['domstate', 'vm1'])).stdout.trim()).toBe('running');
        const ls = await ballast(['dump', 'ls', 'vm1-dump', '--agent', agentFlag, '--json']);
        const dumps = (JSON.parse(ls.stdout) as { dumps: { id: number; state: string }[] }).dumps;
        expect(dumps.map((d) => [d.id, d.state])).toEqual([
          [1, 'complete'],
          [2, 'complete'],
        ]);
      },
      SLOW,
    );

    it(
      'dump now --early-reboot: libvirt holds the monitor, so it falls back, recorded in the result, the catalog and the metric',
      async () => {
        await con.waitFor('BALLAST-BOOT', 1, 180_000);
        // Room for one more dump of the guest on its device (320 MiB hold two).
        const before = await ballast(['dump', 'ls', 'vm1-dump', '--agent', agentFlag, '--json']);
        const old = (JSON.parse(before.stdout) as { dumps: { id: number }[] }).dumps;
        for (const d of old) {
          const rm = await ballast(['dump', 'rm', 'vm1-dump', String(d.id), '--agent', agentFlag]);
          expect(rm.code, describeRun(rm)).toBe(0);
        }
        const boots = con.count('BALLAST-BOOT');
        const r = await ballast([
          'dump',
          'now',
          'vm1',
          '--early-reboot',
          '--json',
          '--dumpd',
          `127.0.0.1:${port}`,
          '--dumpd-token-file',
          path.join(dir, 'dumpd-run', 'token'),
        ]);
        expect(r.code, describeRun(r)).toBe(0);
        const res = JSON.parse(r.stdout) as { ok: boolean; mode: string; fallback?: string };
        expect(res).toMatchObject({ ok: true, mode: 'dump-then-reboot' });
        expect(res.fallback).toMatch(/libvirt holds/);
        await waitLog('guest vm1: early reboot not possible (early reboot needs QEMU');
        const ls = await ballast(['dump', 'ls', 'vm1-dump', '--agent', agentFlag, '--json']);
        const dumps = (
          JSON.parse(ls.stdout) as { dumps: { id: number; state: string; reason: string }[] }
        ).dumps;
        expect(dumps).toHaveLength(1);
        expect(dumps[0]).toMatchObject({
          state: 'complete',
          reason: expect.stringMatching(/^dump-then-reboot: early reboot needs QEMU's monitor/),
        });
        const m = await fetch(`http://127.0.0.1:${port}/metrics`).then((x) => x.text());
        expect(m).toMatch(/ballast_dumpd_early_reboot_fallbacks_total\{guest="vm1"\} 1/);
        // an early reboot is a reboot: the guest boots again
        await con.waitFor('BALLAST-BOOT', boots + 1, 180_000);
      },
      SLOW,
    );
  },
);
