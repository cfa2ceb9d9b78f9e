// The disk fills up under the agent, on real filesystems (tmpfs with a size):
// - a pool's filesystem fills during a guest's writes: the writes that do not
//   fit fail with ENOSPC, everything acknowledged reads back, reads and other
//   devices go on being served, and writes succeed again once there is room;
// - the store's filesystem is full: mutations are refused with STORE_IO, I/O
//   on the devices goes on, and mutations work again once there is room.
// libnbd (nbdsh) is the guest's client and judges the data.

import { execFileSync } from 'node:child_process';
import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { dedent } from '../helpers/nbdsh.js';
import { makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run, SYSTEM_PYTHON } from '../helpers/tools.js';

const MiB = 1024 * 1024;
const isRoot = process.getuid?.() === 0;

function mountTmpfs(dir: string, sizeMiB: number): void {
  mkdirSync(dir, { recursive: true });
  execFileSync('mount', ['-t', 'tmpfs', '-o', `size=${sizeMiB}m,mode=0700`, 'tmpfs', dir]);
}

function resizeTmpfs(dir: string, sizeMiB: number): void {
  execFileSync('mount', ['-o', `remount,size=${sizeMiB}m`, dir]);
}

/** Python with libnbd; prints one JSON line. */
async function py(code: string): Promise<unknown> {
  const r = await run(SYSTEM_PYTHON, ['-c', dedent(code)], { timeoutMs: 120_000 });
  expect(r.code, describeRun(r)).toBe(0);
  return JSON.parse(r.stdout.trim().split('\n').pop() ?? 'null');
}

describeWithTools(['nbdsh'], 'a disk that fills up', () => {
  let dir: string;
  let agent: AgentHandle;
  const mounts: string[] = [];

  beforeAll(async () => {
    if (!isRoot) return;
    dir = makeTempDir('ballast-full-');
    const small = path.join(dir, 'small');
    mountTmpfs(small, 24);
    mounts.push(small);
    const data = path.join(dir, 'data');
    mountTmpfs(data, 8);
    mounts.push(data);
    agent = await startAgent({
      dir,
      pools: [
        // 24 MiB of filesystem, 8× overcommitted: devices may promise more than it holds.
        { name: 'small', path: path.join(small, 'pool'), overcommit: 8 },
        { name: 'big', path: path.join(dir, 'big') },
      ],
    });
    for (const [name, pool, size] of [
      ['swap-a', 'small', '64M'],
      ['swap-b', 'big', '16M'],
    ] as const) {
      const r = await agent.cli('device', 'create', name, '--size', size, '--pool', pool);
      expect(r.code, describeRun(r)).toBe(0);
    }
  }, 60_000);

  afterAll(async () => {
    if (agent) await agent.stop();
    for (const m of mounts.reverse()) {
      try {
        execFileSync('umount', ['-l', m]);
      } catch {}
    }
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  it.runIf(isRoot)(
    'a pool filling during writes: ENOSPC for what does not fit, nothing acknowledged lost, reads and other devices served, writes again once there is room',
    async () => {
      const a = agent.uri('swap-a');
      const b = agent.uri('swap-b');
      // Write 1 MiB chunks with FUA until the filesystem is full; note which were acknowledged.
      const first = (await py(`
        import nbd, json, errno
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(a)})
        acked, failed = [], []
        for i in range(48):
            try:
                h.pwrite(bytes([i + 1]) * ${MiB}, i * ${MiB}, nbd.CMD_FLAG_FUA)
                acked.append(i)
            except nbd.Error as e:
                failed.append([i, e.errnum])
        # Reads go on: every acknowledged chunk holds what was written.
        bad = [i for i in acked if h.pread(${MiB}, i * ${MiB}) != bytes([i + 1]) * ${MiB}]
        h.shutdown()
        print(json.dumps({"acked": acked, "failed": failed, "bad": bad, "ENOSPC": errno.ENOSPC}))
      `)) as { acked: number[]; failed: [number, number][]; bad: number[]; ENOSPC: number };
      expect(first.acked.length).toBeGreaterThan(8);
      expect(first.failed.length).toBeGreaterThan(0);
      expect(first.failed.every(([, e]) => e === first.ENOSPC)).toBe(true);
      expect(first.bad).toEqual([]);

      // The other device, in another pool, is served as before; so is the API.
      const other = (await py(`
        import nbd, json
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(b)})
        h.pwrite(b'\\x77' * ${4 * MiB}, 0, nbd.CMD_FLAG_FUA)
        print(json.dumps(h.pread(${4 * MiB}, 0) == b'\\x77' * ${4 * MiB}))
      `)) as boolean;
      expect(other).toBe(true);
      const ls = await agent.cli('device', 'ls', '--json');
      expect(ls.code, describeRun(ls)).toBe(0);

      // Room again: the writes that failed succeed, and nothing acknowledged changed.
      resizeTmpfs(mounts[0]!, 128);
      const failed = first.failed.map(([i]) => i);
      const after = (await py(`
        import nbd, json
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(a)})
        for i in ${JSON.stringify(failed)}:
            h.pwrite(bytes([i + 1]) * ${MiB}, i * ${MiB}, nbd.CMD_FLAG_FUA)
        h.flush()
        bad = [i for i in range(48) if h.pread(${MiB}, i * ${MiB}) != bytes([i + 1]) * ${MiB}]
        h.shutdown()
        print(json.dumps(bad))
      `)) as number[];
      expect(after).toEqual([]);
    },
    180_000,
  );

  it.runIf(isRoot)(
    "the store's disk full: mutations refused with STORE_IO, device I/O goes on, mutations again once there is room",
    async () => {
      const data = mounts[1]!;
      // Fill the data directory's filesystem to the last block.
      const filler = path.join(data, 'filler');
      try {
        execFileSync('dd', ['if=/dev/zero', `of=${filler}`, 'bs=64k'], { stdio: 'ignore' });
      } catch {} // dd ends with ENOSPC, as wanted
      const c = await agent.cli('device', 'create', 'swap-c', '--size', '4M', '--pool', 'big');
      expect(c.code, describeRun(c)).not.toBe(0);
      expect(c.stderr).toContain('STORE_IO');
      const pr = await agent.api('POST', '/v1/devices/swap-b/pr', {
        action: 'register',
        as: 'host-a',
        key: '0',
        saKey: '0xa',
      });
      expect([pr.status, pr.body.code]).toEqual([500, 'STORE_IO']);
      // Reads of the list, and the data path, go on.
      const ls = await agent.cli('device', 'ls', '--json');
      expect(ls.code, describeRun(ls)).toBe(0);
      expect(ls.stdout).not.toContain('swap-c');
      const io = (await py(`
        import nbd, json
        h = nbd.NBD(); h.connect_uri(${JSON.stringify(agent.uri('swap-b'))})
        h.pwrite(b'\\x42' * 65536, ${8 * MiB}, nbd.CMD_FLAG_FUA)
        print(json.dumps(h.pread(65536, ${8 * MiB}) == b'\\x42' * 65536 and h.pread(65536, 0) == b'\\x77' * 65536))
      `)) as boolean;
      expect(io).toBe(true);

      // Room again.
      rmSync(filler);
      const c2 = await agent.cli('device', 'create', 'swap-c', '--size', '4M', '--pool', 'big');
      expect(c2.code, describeRun(c2)).toBe(0);
      const pr2 = await agent.api('POST', '/v1/devices/swap-b/pr', {
        action: 'register',
        as: 'host-a',
        key: '0',
        saKey: '0xa',
      });
      expect(pr2.status, pr2.text).toBe(200);
      // And it all holds across a restart: the store was not damaged.
      await agent.stop();
      await agent.start();
      const ls2 = await agent.cli('device', 'ls', '--json');
      expect(ls2.stdout).toContain('swap-c');
      expect(agent.stderr()).not.toMatch(/problem:/);
      writeFileSync(path.join(dir, 'done'), '');
    },
    180_000,
  );
});
