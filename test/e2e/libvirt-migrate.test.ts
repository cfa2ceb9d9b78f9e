// A guest that libvirt runs moves to another host with `ballast migrate --libvirt`: two
// real libvirtds ("hosts" a and b, each with its own host UUID) and two agents on one
// etcd sharing a pool. The guest, defined on a with what `attach --guest --format
// libvirt` prints, swaps onto its paging device; virsh migrate --live --suspend moves
// it with its disks pointed at b's agent, b takes the reservation over while the guest
// is paused on b, then b resumes it: it swaps again there, a's identity can no longer
// write, b's agent serves the device.

import { chmodSync, copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { buildGuest, GuestConsole } from '../helpers/guest.js';
import { LIBVIRT_TOOLS, Libvirtd } from '../helpers/libvirt.js';
import { freePort, MiB, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

const SLOW = scaled(400_000);

describeWithTools(
  [...LIBVIRT_TOOLS, 'etcd', 'etcdctl', 'cpio', 'busybox', 'vmlinuz'],
  'a libvirt guest moves with ballast migrate --libvirt',
  () => {
    let dir: string;
    let etcd: EtcdCluster;
    let a: AgentHandle;
    let b: AgentHandle;
    let lva: Libvirtd;
    let lvb: Libvirtd;
    let con: GuestConsole;
    // The console's path in the domain XML is inside each libvirtd's private
    // /var/lib/libvirt: the same name on both hosts, two sockets.
    const CONSOLE = '/var/lib/libvirt/qemu/vm1.console';
    const consoleOf = (lv: Libvirtd) => path.join(lv.dir, 'lib', 'qemu', 'vm1.console');

    const lines = (c: GuestConsole, prefix: string) =>
      c.text
        .split(/\r?\n/)
        .slice(0, -1)
        .filter((l) => l.startsWith(prefix));
    const waitLine = async (c: GuestConsole, prefix: string, n = 1, timeoutMs = 120_000) => {
      await c.waitFor(prefix, n, timeoutMs);
      const deadline = Date.now() + scaled(10_000);
      while (lines(c, prefix).length < n && Date.now() < deadline)
        await new Promise((r) => setTimeout(r, 50));
    };

    beforeAll(async () => {
      dir = makeTempDir('ballast-lvm-');
      chmodSync(dir, 0o755);
      const guest = buildGuest(dir);
      const libvirtds = Promise.all([
        Libvirtd.start({ hostUuid: '2f1c5d9e-0a6b-4c1e-9d3a-00000000000a' }),
        Libvirtd.start({ hostUuid: '2f1c5d9e-0a6b-4c1e-9d3a-00000000000b' }),
      ]);
      etcd = await startEtcdCluster({ size: 1 });
      const shared = path.join(dir, 'shared');
      mkdirSync(shared);
      const agentOn = async (host: string) => {
        const d = path.join(dir, `agent-${host}`);
        mkdirSync(d);
        chmodSync(d, 0o755);
        return startAgent({
          dir: d,
          nbd: { listen: [] },
          pools: [{ name: 'shared', path: shared, shared: true }],
          cluster: { name: 'lvm', etcd: etcd.endpoints, host, leaseTtl: 2 },
        });
      };
      a = await agentOn('a');
      b = await agentOn('b');
      const r = await a.api('POST', '/v1/devices', {
        name: 'vm1-swap',
        size: '256M',
        role: 'paging',
        guest: 'vm1',
      });
      expect(r.status, r.text).toBe(201);
      [lva, lvb] = await libvirtds;
      const g = await guest;
      const kernel = path.join(dir, 'vmlinuz');
      copyFileSync(g.kernel, kernel);
      const disks = await a.cli('attach', '--guest', 'vm1', '--format', 'libvirt');
      expect(disks.code, describeRun(disks)).toBe(0);
      const file = path.join(dir, 'vm1.xml');
      writeFileSync(
        file,
        `<domain type='qemu'>
  <name>vm1</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>${kernel}</kernel>
    <initrd>${g.initrd}</initrd>
    <cmdline>console=ttyS0 panic=0 quiet loglevel=3 mitigations=off</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <serial type='unix'><source mode='bind' path='${CONSOLE}'/><target port='0'/></serial>
${disks.stdout.trimEnd()}
  </devices>
</domain>
`,
      );
      const c = await lva.virsh(['create', file]);
      expect(c.code, `${describeRun(c)}\n${lva.qemuLog('vm1')}`).toBe(0);
      con = await GuestConsole.connect(consoleOf(lva));
    }, SLOW);

    afterAll(async () => {
      con?.close();
      await lva?.stop();
      await lvb?.stop();
      await a?.stop();
      await b?.stop();
      await etcd?.stop();
    }, SLOW);

    it(
      'virsh migrate, then the hand-off while the guest is paused on b, then resume',
      async () => {
        await con.waitFor('BALLAST-READY', 1, 180_000);
        con.send('swap vm1-swap');
        await waitLine(con, 'BALLAST-SWAPON vm1-swap');
        const port = await freePort();
        const m = await a.cli(
          'migrate',
          'vm1',
          '--libvirt',
          lva.uri,
          '--to-libvirt',
          lvb.uri,
          '--to-host',
          'b',
          '--migrate-uri',
          `tcp://127.0.0.1:${port}`,
        );
        expect(
          m.code,
          `${describeRun(m)}\n${lva.log().slice(-3000)}\n${lvb.log().slice(-3000)}`,
        ).toBe(0);
        expect(m.stdout).toMatch(/migrated vm1 from a to b through libvirt \(vm1-swap\)/);
        console.log(m.stdout);
        expect((await lvb.virsh(['domstate', 'vm1'])).stdout.trim()).toBe('running');
        expect((await lva.virsh(['list', '--name'])).stdout.trim()).toBe('');
        // b holds the device now; the domain on b reaches it through b's agent.
        const pr = (await b.api('GET', '/v1/devices/vm1-swap/pr')).body as {
          reservation: { holder: string } | null;
        };
        expect(pr.reservation?.holder).toBe('b');
        const xml = (await lvb.virsh(['dumpxml', 'vm1'])).stdout;
        expect(xml).toContain(`socket='${path.join(b.dir, 'nbd.sock')}'`);
        // The guest goes on swapping on b.
        con.close();
        con = await GuestConsole.connect(consoleOf(lvb));
        con.send('swapfill 1a2b 96');
        await waitLine(con, 'BALLAST-FILLED', 1, 300_000);
        const f = /BALLAST-FILLED (\w+) swapKiB=(\d+)/.exec(
          lines(con, 'BALLAST-FILLED').pop() ?? '',
        );
        expect(f?.[1]).toBe('ok');
        expect(Number(f?.[2])).toBeGreaterThan(16 * 1024);
        const d = JSON.parse((await b.cli('device', 'show', 'vm1-swap', '--json')).stdout);
        expect(d.allocatedBytes).toBeGreaterThan(16 * MiB);
      },
      SLOW,
    );
  },
);
