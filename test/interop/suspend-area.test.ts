// The paging device's suspend area and what the guest sees, judged by a real QEMU (no
// guest kernel: SeaBIOS finds nothing to boot and idles, which is a running guest all
// the same). `ballast attach --guest-ram` prints arguments under which QEMU's guest
// disk is exactly the part before the suspend area, and `guest suspend` then writes
// the guest into it; a guest given the whole device is refused (SUSPEND_AREA_VISIBLE)
// before anything is written and goes on running, unless --force, which warns.

import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { leaveOutArea } from '../../migrate/area.js';
import { HEADER_BYTES, suspendArea } from '../../migrate/image.js';
import { connectQmp, runState } from '../../migrate/qemu.js';
import { movableQemuArgs } from '../../migrate/takeover.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { startQemu } from '../helpers/qemu.js';
import { MiB } from '../helpers/server.js';
import { describeRun, describeWithTools } from '../helpers/tools.js';

const SIZE = 512 * MiB;
const RAM = 128 * MiB;
const AREA = suspendArea(SIZE, RAM);
/** What the guest's last bytes before the area hold: they must survive a suspend. */
const MARK = Buffer.from('guest data just before the suspend area');

describeWithTools(
  ['qemu-system-x86_64'],
  'the suspend area, out of the guest’s sight (a real QEMU judges)',
  () => {
    let agent: AgentHandle;
    let file: string;

    function readAt(at: number, n: number): Buffer {
      const fd = openSync(file, 'r');
      const b = Buffer.alloc(n);
      readSync(fd, b, 0, n, at);
      closeSync(fd);
      return b;
    }

    function writeAt(at: number, b: Buffer): void {
      const fd = openSync(file, 'r+');
      writeSync(fd, b, 0, b.length, at);
      closeSync(fd);
    }

    /** QEMU running the printed arguments: SeaBIOS only, a running guest. */
    async function guest(printed: string) {
      return startQemu([
        '-machine',
        'pc,accel=tcg',
        '-m',
        String(RAM / MiB),
        ...printed.trim().split(/\s+/),
      ]);
    }

    async function state(qmp: string): Promise<string> {
      const q = await connectQmp(`unix:${qmp}`, 'guest');
      try {
        return await runState(q);
      } finally {
        q.close();
      }
    }

    beforeAll(async () => {
      agent = await startAgent();
      const r = await agent.api('POST', '/v1/devices', {
        name: 'swap-vm1',
        size: '512M',
        role: 'paging',
        guest: 'vm1',
      });
      expect(r.status, r.text).toBe(201);
      file = (r.body as { extents: { file: string }[] }).extents[0]?.file as string;
    });

    afterAll(async () => {
      if (agent) expect(await agent.stop()).toBe(0);
    });

    it('attach --guest-ram: QEMU sees the part before the area; suspend writes into the area only', async () => {
      const offset = AREA?.offset as number;
      expect(offset).toBe(351 * MiB);
      const r = await agent.cli('attach', 'swap-vm1', '--guest-ram', '128M');
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stdout).toContain(
        `-blockdev driver=raw,node-name=ballast-swap-vm1-raw,file=ballast-swap-vm1,size=${offset} `,
      );
      expect(r.stdout).toContain('-device virtio-blk-pci,drive=ballast-swap-vm1-raw,');
      expect(r.stderr).toBe(
        `swap-vm1: suspend area at ${offset} (351 MiB) for 128 MiB of RAM; the guest sees only the part before it (size=${offset})\n`,
      );
      const j = JSON.parse(
        (await agent.cli('attach', 'swap-vm1', '--guest-ram', '128M', '--json')).stdout,
      );
      expect(j.suspendArea).toEqual({ offset, end: SIZE - HEADER_BYTES, ramBytes: RAM });

      writeAt(offset - MARK.length, MARK);
      const q = await guest(r.stdout);
      const c = await connectQmp(`unix:${q.qmp}`, 'guest');
      const blocks = (await c.execute('query-block')) as {
        qdev?: string;
        inserted?: { 'node-name': string; image: { 'virtual-size': number } };
      }[];
      c.close();
      const disk = blocks.find((b) => b.inserted?.['node-name'] === 'ballast-swap-vm1-raw');
      expect(disk?.inserted?.image['virtual-size'], JSON.stringify(blocks)).toBe(offset);
      expect(await state(q.qmp)).toBe('running');

      const s = await agent.cli('guest', 'suspend', 'vm1', '--qmp', `unix:${q.qmp}`);
      expect(s.code, describeRun(s)).toBe(0);
      expect(s.stderr).toBe('');
      expect(s.stdout).toMatch(new RegExp(`^suspended vm1 into swap-vm1 at ${offset}: `));
      expect(await q.exited).toBe(0);
      expect(readAt(offset - MARK.length, MARK.length)).toEqual(MARK);
      expect(readAt(SIZE - HEADER_BYTES, 16).toString('latin1')).toBe('BALLAST-SUSPEND\0');
    });

    it('a guest that sees the whole device: refused before anything is written, it runs on; --force warns and suspends', async () => {
      const offset = AREA?.offset as number;
      const r = await agent.cli('attach', 'swap-vm1');
      expect(r.code, describeRun(r)).toBe(0);
      // something in the header's place: a refused suspend leaves it (it zeroes it first otherwise)
      const junk = Buffer.alloc(HEADER_BYTES, 0x5a);
      writeAt(SIZE - HEADER_BYTES, junk);
      const q = await guest(r.stdout);
      const s = await agent.cli('guest', 'suspend', 'vm1', '--qmp', `unix:${q.qmp}`);
      expect(s.code, describeRun(s)).toBe(1);
      expect(s.stderr).toContain('error SUSPEND_AREA_VISIBLE: ');
      expect(s.stderr).toContain(
        `the guest's disk ballast-swap-vm1-dev (node ballast-swap-vm1) sees swap-vm1 up to byte ${SIZE} (512 MiB), past the start of the suspend area at ${offset} (351 MiB)`,
      );
      expect(s.stderr).toContain(
        `a raw node with size=${offset} over the NBD node (ballast attach swap-vm1 --guest-ram 128M prints its QEMU arguments`,
      );
      expect(s.stderr).toContain('--force');
      expect(await state(q.qmp)).toBe('running');
      expect(readAt(SIZE - HEADER_BYTES, HEADER_BYTES)).toEqual(junk);

      const f = await agent.cli('guest', 'suspend', 'vm1', '--qmp', `unix:${q.qmp}`, '--force');
      expect(f.code, describeRun(f)).toBe(0);
      expect(f.stderr).toMatch(
        /^warning: the guest's disk ballast-swap-vm1-dev \(node ballast-swap-vm1\) sees swap-vm1 up to byte /,
      );
      expect(f.stderr).toContain('--force: suspending anyway');
      expect(f.stdout).toMatch(new RegExp(`^suspended vm1 into swap-vm1 at ${offset}: `));
      expect(await q.exited).toBe(0);
    });

    it('guest takeover --guest-ram: a guest that moves sees the part before the area too, and suspends', async () => {
      const offset = AREA?.offset as number;
      const j = JSON.parse((await agent.cli('attach', 'swap-vm1', '--json')).stdout);
      const a = leaveOutArea(
        { device: 'swap-vm1', uri: j.uri, qemu: j.qemu, libvirt: j.libvirt },
        { offset, end: SIZE - HEADER_BYTES, ramBytes: RAM },
      );
      // what takeover prints for it: reconnecting, pausing on a refused write
      const q = await guest(movableQemuArgs(a.qemu).join(' '));
      const c = await connectQmp(`unix:${q.qmp}`, 'guest');
      const blocks = (await c.execute('query-block')) as {
        inserted?: { 'node-name': string; image: { 'virtual-size': number } };
      }[];
      c.close();
      const disk = blocks.find((b) => b.inserted?.['node-name'] === 'ballast-swap-vm1-raw');
      expect(disk?.inserted?.image['virtual-size'], JSON.stringify(blocks)).toBe(offset);
      const s = await agent.cli('guest', 'suspend', 'vm1', '--qmp', `unix:${q.qmp}`);
      expect(s.code, describeRun(s)).toBe(0);
      expect(s.stderr).toBe('');
      expect(await q.exited).toBe(0);
    });
  },
);
