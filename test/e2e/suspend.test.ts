// Suspend to the paging device and resume on another host, end to end: a real etcd, two
// agents ("hosts" a and b) sharing a pool, a guest under QEMU TCG that swaps onto the
// first part of its paging device and checksums its data. It is suspended mid-run into
// the device's suspend area on a; a stream with one byte flipped on the device is refused
// on b (nothing taken, the new QEMU told to quit); restored, it resumes on b, which then
// holds the device, and the guest finishes its run with every checksum right.

import { closeSync, openSync, readSync, writeSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { hostKey, type PrView } from '../../migrate/handoff.js';
import { decodeHeader, HEADER_BYTES, type ImageHeader, suspendArea } from '../../migrate/image.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { GuestConsole } from '../helpers/guest.js';
import { type QemuHandle, startQemu } from '../helpers/qemu.js';
import { MiB, makeTempDir } from '../helpers/server.js';
import { buildSwapGuest, swapGuestArgs, waitLine } from '../helpers/swap-guest.js';
import { describeRun, describeWithTools } from '../helpers/tools.js';
import { scaled } from '../helpers/wait.js';

const SLOW = scaled(300_000);
const CHUNKS = 40;
const SIZE = 512 * MiB;
const RAM = 128;
const AREA = suspendArea(SIZE, RAM * MiB);

describeWithTools(
  ['etcd', 'etcdctl', 'qemu-system-x86_64', 'cpio', 'busybox', 'vmlinuz'],
  'moving guests: suspend to the paging device, resume on another host',
  () => {
    let dir: string;
    let etcd: EtcdCluster;
    let a: AgentHandle;
    let b: AgentHandle;
    let g: { kernel: string; initrd: string };
    let file: string;
    let n = 0;

    async function qemuOn(h: AgentHandle, boot: boolean): Promise<{ q: QemuHandle; cons: string }> {
      n++;
      const cons = path.join(dir, `con${n}.sock`);
      const q = await startQemu(
        swapGuestArgs({
          ...g,
          console: cons,
          nbdSocket: h.nbdSocket,
          paging: 'vm2-swap',
          swapBytes: AREA?.offset,
          memMiB: RAM,
          incoming: !boot,
        }),
        { dir, qmp: path.join(dir, `qmp${n}.sock`) },
      );
      return { q, cons };
    }

    function header(): ImageHeader | null {
      const fd = openSync(file, 'r');
      const b = Buffer.alloc(HEADER_BYTES);
      readSync(fd, b, 0, HEADER_BYTES, SIZE - HEADER_BYTES);
      closeSync(fd);
      return decodeHeader(b);
    }

    /** XORs one byte of the device file (the shared pool is the same path on every host). */
    function flip(at: number): void {
      const fd = openSync(file, 'r+');
      const b = Buffer.alloc(1);
      readSync(fd, b, 0, 1, at);
      b[0] = (b[0] ?? 0) ^ 0x10;
      writeSync(fd, b, 0, 1, at);
      closeSync(fd);
    }

    async function holder(): Promise<string | null> {
      const r = await a.api('GET', '/v1/devices/vm2-swap/pr');
      return (r.body as unknown as PrView).reservation?.holder ?? null;
    }

    beforeAll(async () => {
      expect(AREA).not.toBeNull();
      dir = makeTempDir('ballast-susp-');
      const built = buildSwapGuest(dir);
      etcd = await startEtcdCluster({ size: 1 });
      const shared = makeTempDir('ballast-susp-shared-');
      const cfg = (host: string) => ({
        pools: [{ name: 'shared', path: shared, shared: true }],
        cluster: { name: 'susp', etcd: etcd.endpoints, host, leaseTtl: 2 },
      });
      a = await startAgent(cfg('a'));
      b = await startAgent(cfg('b'));
      const r = await a.api('POST', '/v1/devices', {
        name: 'vm2-swap',
        size: '512M',
        role: 'paging',
        pool: 'shared',
        guest: 'vm2',
      });
      expect(r.status, r.text).toBe(201);
      file = (r.body as { extents: { file: string }[] }).extents[0]?.file as string;
      // host a's identity holds the device, as it would for a guest running there
      for (const body of [
        { action: 'register-ignore', as: 'a', key: 0, saKey: hostKey('a') },
        { action: 'reserve', as: 'a', key: hostKey('a'), type: 1 },
      ]) {
        const p = await a.api('POST', '/v1/devices/vm2-swap/pr', body);
        expect(p.status, p.text).toBe(200);
      }
      g = await built;
    }, SLOW);

    afterAll(async () => {
      await a?.kill9().catch(() => {});
      await b?.kill9().catch(() => {});
      await etcd?.stop();
    }, SLOW);

    it(
      'suspended mid-run on a, a flipped byte refused on b, resumed on b: every checksum right',
      async () => {
        const first = await qemuOn(a, true);
        const con = await GuestConsole.connect(first.cons);
        await con.waitFor('BALLAST-READY', 1, 180_000);
        expect(con.text).toContain(`BALLAST-BOOT vda=${(AREA?.offset ?? 0) / 512}`);
        con.send('swapon');
        await waitLine(con, 'BALLAST-SWAPON', 1, 60_000);
        con.send(`fill ${CHUNKS}`);
        await waitLine(con, 'BALLAST-FILLED', 1, 240_000);
        con.send('check 4');
        await con.waitFor('BALLAST-PASS 1', 1, 240_000);

        const sus = await a.cli('guest', 'suspend', 'vm2', '--qmp', first.q.qmp);
        expect(sus.code, describeRun(sus)).toBe(0);
        console.log(sus.stdout);
        expect(sus.stdout).toMatch(/suspended vm2 into vm2-swap at 368050176: [\d.]+ MiB/);
        expect(await first.q.exited).toBe(0);
        con.close();
        const h = header();
        expect(h).toMatchObject({ guest: 'vm2', offset: AREA?.offset, format: 1 });
        expect(h?.qemu).toMatch(/^\d+\.\d+\.\d+$/);
        expect(h?.machine).toMatch(/^pc-i440fx-/);
        expect(h?.length).toBeGreaterThan(32 * MiB);
        expect(h?.length).toBeLessThan((AREA?.end ?? 0) - (AREA?.offset ?? 0));

        // one byte flipped in the middle of the stream: refused, nothing taken
        const at = (h?.offset ?? 0) + Math.floor((h?.length ?? 0) / 2);
        flip(at);
        const bad = await qemuOn(b, false);
        const refused = await b.cli('guest', 'resume', 'vm2', '--qmp', bad.q.qmp);
        expect(refused.code, describeRun(refused)).not.toBe(0);
        expect(refused.stderr).toMatch(/SUSPEND_BAD_CHECKSUM/);
        expect(await bad.q.exited).not.toBeNull();
        expect(await holder()).toBe('a');
        expect(header()).toEqual(h);

        flip(at);
        const good = await qemuOn(b, false);
        const res = await b.cli('guest', 'resume', 'vm2', '--qmp', good.q.qmp);
        expect(res.code, describeRun(res)).toBe(0);
        console.log(res.stdout);
        expect(res.stdout).toMatch(/resumed vm2 on b from vm2-swap: .*checksum verified/);
        expect(await holder()).toBe('b');
        expect(header()).toBeNull(); // spent: never resumed twice

        const con2 = await GuestConsole.connect(good.cons);
        const line = await waitLine(con2, 'BALLAST-CHECKED', 1);
        expect(line, con2.text.slice(-1500)).toMatch(new RegExp(`ok=${4 * CHUNKS} bad=0 `));
        expect(Number(/pswpin=(\d+)/.exec(line)?.[1])).toBeGreaterThan(0);
        con2.close();

        const again = await qemuOn(b, false);
        const none = await b.cli('guest', 'resume', 'vm2', '--qmp', again.q.qmp);
        expect(none.stderr).toMatch(/SUSPEND_NO_IMAGE/);
      },
      SLOW,
    );
  },
);
