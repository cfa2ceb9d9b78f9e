// The store's disk fails with real I/O errors: the data directory is an ext4
// filesystem on a loop device whose backing file lives on a small tmpfs; once
// that tmpfs is full, every write the loop device passes down fails, and ext4
// and SQLite see EIO. Mutations are refused with STORE_IO, device I/O (its
// pool is elsewhere) goes on, and after the disk is repaired (room again,
// e2fsck) the agent starts with everything that was acknowledged.

import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync } from 'node:fs';
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { dedent } from '../helpers/nbdsh.js';
import { makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run, SYSTEM_PYTHON, toolEnv } from '../helpers/tools.js';

const isRoot = process.getuid?.() === 0;
const sh = (cmd: string, args: string[]) =>
  execFileSync(cmd, args, { env: toolEnv(), encoding: 'utf8' }).trim();

async function py(code: string): Promise<unknown> {
  const r = await run(SYSTEM_PYTHON, ['-c', dedent(code)], { timeoutMs: 60_000 });
  expect(r.code, describeRun(r)).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? 'null');
}

describeWithTools(
  ['nbdsh', 'losetup', 'mkfs.ext4', 'e2fsck'],
  'the store on a failing disk',
  () => {
    let dir = '';
    let loop = '';
    let agent: AgentHandle | undefined;
    const back = () => path.join(dir, 'back');
    const data = () => path.join(dir, 'data');

    const mountData = () => {
      loop = sh('losetup', ['-f', '--show', path.join(back(), 'img')]);
      sh('mount', ['-o', 'errors=continue', loop, data()]);
    };
    const unmountData = () => {
      try {
        sh('umount', [data()]);
      } catch {
        sh('umount', ['-l', data()]);
      }
      sh('losetup', ['-d', loop]);
      loop = '';
    };

    afterAll(async () => {
      if (agent) await agent.kill9().catch(() => {});
      if (loop) {
        try {
          sh('umount', ['-l', data()]);
        } catch {}
        try {
          sh('losetup', ['-d', loop]);
        } catch {}
      }
      if (dir) {
        try {
          sh('umount', ['-l', back()]);
        } catch {}
        rmSync(dir, { recursive: true, force: true });
      }
    });

    it.runIf(isRoot)(
      'I/O errors: STORE_IO for mutations, device I/O goes on, acknowledged state survives the repair',
      async () => {
        dir = makeTempDir('ballast-eio-');
        mkdirSync(back());
        mkdirSync(data());
        sh('mount', ['-t', 'tmpfs', '-o', 'size=8m', 'tmpfs', back()]);
        const img = path.join(back(), 'img');
        sh('truncate', ['-s', '64M', img]);
        sh('mkfs.ext4', ['-q', '-F', img]);
        mountData();
        // The agent's data directory is on the failing disk; its pool is not.
        agent = await startAgent({
          dir,
          pools: [{ name: 'default', path: path.join(dir, 'pool') }],
        });
        const a = agent;
        expect((await a.cli('device', 'create', 'swap-a', '--size', '16M')).code).toBe(0);
        const reg = await a.api('POST', '/v1/devices/swap-a/pr', {
          action: 'register',
          as: 'host-a',
          key: '0',
          saKey: '0xa',
        });
        expect(reg.status, reg.text).toBe(200);
        await py(`
        import nbd, json
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(a.uri('swap-a'))})
        h.pwrite(b'\\x5a' * 1048576, 0, nbd.CMD_FLAG_FUA)
        print(json.dumps(True))
      `);

        // The disk under the store starts failing: its backing store is full.
        try {
          sh('dd', ['if=/dev/zero', `of=${path.join(back(), 'filler')}`, 'bs=64k']);
        } catch {}
        const refused: string[] = [];
        for (let i = 0; i < 40 && refused.length < 2; i++) {
          // Enough writes to the store that the loop device must pass some down.
          const c = await a.api('POST', '/v1/devices', { name: `swap-x${i}`, size: '1M' });
          if (c.status !== 201) refused.push(String(c.body.code));
        }
        expect(refused.length, 'no mutation was refused').toBeGreaterThan(0);
        expect(refused.every((c) => c === 'STORE_IO')).toBe(true);
        const pr = await a.api('POST', '/v1/devices/swap-a/pr', {
          action: 'reserve',
          as: 'host-a',
          key: '0xa',
          type: 'WE',
        });
        expect([pr.status, pr.body.code]).toEqual([500, 'STORE_IO']);
        // The data path does not depend on the store.
        const io = await py(`
        import nbd, json
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(a.uri('swap-a'))})
        h.pwrite(b'\\x6b' * 65536, 2097152, nbd.CMD_FLAG_FUA)
        print(json.dumps(h.pread(1048576, 0) == b'\\x5a' * 1048576 and h.pread(65536, 2097152) == b'\\x6b' * 65536))
      `);
        expect(io).toBe(true);

        // Repair: stop the agent, make room, check the filesystem, start again.
        await a.kill9();
        agent = undefined;
        unmountData();
        rmSync(path.join(back(), 'filler'));
        const fsck = await run('e2fsck', ['-fy', img], { timeoutMs: 60_000 });
        expect(fsck.code, describeRun(fsck)).toBeLessThan(4); // 0-3: clean or fixed
        mountData();
        await a.start();
        agent = a;
        const show = (await a.api('GET', '/v1/devices/swap-a/pr')).body as {
          registrations: { identity: string }[];
        };
        expect(show.registrations.map((r) => r.identity)).toEqual(['host-a']);
        const after = await py(`
        import nbd, json
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(a.uri('swap-a'))})
        print(json.dumps(h.pread(1048576, 0) == b'\\x5a' * 1048576 and h.pread(65536, 2097152) == b'\\x6b' * 65536))
      `);
        expect(after).toBe(true);
        // And mutations work again.
        const c2 = await a.cli('device', 'create', 'swap-b', '--size', '4M');
        expect(c2.code, describeRun(c2)).toBe(0);
        expect(a.stderr()).not.toMatch(/STORE_CORRUPT/);
        await a.stop();
        agent = undefined;
        unmountData();
      },
      180_000,
    );
  },
);
