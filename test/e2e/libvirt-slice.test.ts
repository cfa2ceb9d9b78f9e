// `ballast attach --guest-ram --format libvirt|virsh` under a real libvirtd (helpers/
// libvirt.ts): the paging device's <disk> carries a storage slice, and QEMU's guest disk
// (query-block through `virsh qemu-monitor-command`) is exactly the part before the
// suspend area, which is what `guest suspend` checks (migrate/area.ts) before it stops
// a guest. The domains have no kernel and are started paused: nothing boots.

import { chmodSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { guestViews, overlapping } from '../../migrate/area.js';
import { suspendArea } from '../../migrate/image.js';
import type { AgentHandle } from '../helpers/agent.js';
import { LIBVIRT_TOOLS, Libvirtd, startAgentForLibvirt } from '../helpers/libvirt.js';
import { MiB, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

const SLOW = scaled(180_000);
const OFFSET = suspendArea(512 * MiB, 128 * MiB)?.offset as number;

function domainXml(name: string, disks: string): string {
  return `<domain type='qemu'>
  <name>${name}</name>
  <memory unit='MiB'>128</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  <features><acpi/><apic/></features>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
${disks}
  </devices>
</domain>
`;
}

describeWithTools(LIBVIRT_TOOLS, 'attach --guest-ram under libvirt: a storage slice', () => {
  let dir: string;
  let lv: Libvirtd;
  let agent: AgentHandle;

  /** What the domain's QEMU answers to query-block. */
  async function queryBlock(domain: string): Promise<unknown> {
    const r = await lv.virsh(['qemu-monitor-command', domain, '{"execute":"query-block"}']);
    expect(r.code, describeRun(r)).toBe(0);
    return (JSON.parse(r.stdout) as { return: unknown }).return;
  }

  async function startPaused(name: string, disks: string): Promise<void> {
    const file = path.join(dir, `${name}.xml`);
    writeFileSync(file, domainXml(name, disks));
    const def = await lv.virsh(['define', file]);
    expect(def.code, describeRun(def)).toBe(0);
    const start = await lv.virsh(['start', name, '--paused']);
    expect(start.code, `${describeRun(start)}\n${lv.qemuLog(name)}`).toBe(0);
  }

  beforeAll(async () => {
    dir = makeTempDir('ballast-lvs-');
    chmodSync(dir, 0o755);
    const started = Libvirtd.start();
    agent = await startAgentForLibvirt(dir);
    for (const [name, size, role, guest] of [
      ['vm1-swap', '512M', 'paging', 'vm1'],
      ['vm1-dump', '64M', 'dump', 'vm1'],
      ['vm2-swap', '512M', 'paging', 'vm2'],
    ] as const) {
      const r = await agent.api('POST', '/v1/devices', { name, size, role, guest });
      expect(r.status, r.text).toBe(201);
    }
    lv = await started;
  }, SLOW);

  afterAll(async () => {
    await lv?.stop();
    await agent?.stop();
  }, SLOW);

  it(
    '--format libvirt: the paging disk is the part before the suspend area, the dump disk whole',
    async () => {
      const r = await agent.cli(
        'attach',
        '--guest',
        'vm1',
        '--guest-ram',
        '128M',
        '--format',
        'libvirt',
      );
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stdout.match(/<slices>/g)).toHaveLength(1);
      expect(r.stdout).toContain(`<slice type='storage' offset='0' size='${OFFSET}'/>`);
      expect(r.stderr).toContain(`vm1-swap: suspend area at ${OFFSET} (351 MiB)`);
      await startPaused('vm1', r.stdout.trimEnd());
      const blocks = await queryBlock('vm1');
      const swap = guestViews(blocks, 'vm1-swap');
      expect(swap, JSON.stringify(blocks)).toEqual([
        expect.objectContaining({ start: 0, end: OFFSET }),
      ]);
      expect(overlapping(swap, OFFSET)).toEqual([]);
      expect(guestViews(blocks, 'vm1-dump')).toEqual([
        expect.objectContaining({ start: 0, end: 64 * MiB }),
      ]);
    },
    SLOW,
  );

  it(
    '--format virsh: the hot-plugged paging disk is the part before the suspend area',
    async () => {
      await startPaused('vm2', '');
      const p = await agent.cli(
        'attach',
        '--guest',
        'vm2',
        '--guest-ram',
        '128M',
        '--format',
        'virsh',
      );
      expect(p.code, describeRun(p)).toBe(0);
      expect(p.stdout).toContain(`<slice type='storage' offset='0' size='${OFFSET}'/>`);
      const sh = await run('sh', ['-c', p.stdout], {
        env: { LIBVIRT_DEFAULT_URI: lv.uri },
        timeoutMs: 120_000,
      });
      expect(sh.code, describeRun(sh)).toBe(0);
      const blocks = await queryBlock('vm2');
      expect(guestViews(blocks, 'vm2-swap'), JSON.stringify(blocks)).toEqual([
        expect.objectContaining({ start: 0, end: OFFSET }),
      ]);
    },
    SLOW,
  );
});
