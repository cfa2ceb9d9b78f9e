// Crash safety: the agent killed with SIGKILL between every two steps of a
// create or delete (failpoints), at an arbitrary moment during a stream of
// creates, and in the middle of writes. After a restart every device is
// either complete or absent, acknowledged writes are there, and files the
// database does not know are reported, never deleted.

import { spawn } from 'node:child_process';
import { existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { MiB } from '../helpers/server.js';
import { describeRun, describeWithTools, run, toolEnv } from '../helpers/tools.js';

interface Dev {
  name: string;
  size: number;
  state: string;
  extents: { pool: string; file: string; size: number }[];
}

async function devices(a: AgentHandle): Promise<Dev[]> {
  return (await a.api('GET', '/v1/devices')).body.devices as Dev[];
}

async function status(a: AgentHandle): Promise<{
  problems: { kind: string; path?: string; message: string }[];
  recovered: string[];
}> {
  return (await a.api('GET', '/v1/status')).body as never;
}

/** Offsets of the 1 MiB writes qemu-io reported done. */
function ackedWrites(out: string): number[] {
  return [...out.matchAll(/^wrote 1048576\/1048576 bytes at offset (\d+)/gm)].map((m) =>
    Number(m[1]),
  );
}

/**
 * Runs qemu-io with `cmds` on `uri` and calls `act` once, as soon as its output so far
 * satisfies `when`. Resolves when qemu-io exits, with what `act` returned (undefined if
 * it was never called) and qemu-io's output, read when asked.
 */
async function qemuIoActing<T>(
  uri: string,
  cmds: string[],
  when: (out: string) => boolean,
  act: () => Promise<T>,
): Promise<{ acting: Promise<T> | undefined; output: () => string }> {
  const q = spawn('qemu-io', ['-f', 'raw', uri, ...cmds], {
    env: toolEnv(),
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let out = '';
  const done = new Promise<void>((r) => q.once('exit', () => r()));
  let acting: Promise<T> | undefined;
  q.stdout.on('data', (b: Buffer) => {
    out += b.toString();
    if (!acting && when(out)) acting = act();
  });
  await done;
  return { acting, output: () => out };
}

function poolFiles(a: AgentHandle, pool = 'default'): string[] {
  const dir = path.join(a.dir, 'pools', pool);
  return existsSync(dir)
    ? readdirSync(dir)
        .filter((f) => f.endsWith('.img'))
        .map((f) => path.join(dir, f))
    : [];
}

/** Every device complete (ready, files there at their size), and every image file accounted for. */
async function expectConsistent(a: AgentHandle): Promise<Dev[]> {
  const devs = await devices(a);
  const files = new Set<string>();
  for (const d of devs) {
    expect(d.state, JSON.stringify(d)).toBe('ready');
    expect(d.extents.reduce((s, e) => s + e.size, 0)).toBe(d.size);
    for (const e of d.extents) {
      expect(statSync(e.file).size).toBeGreaterThanOrEqual(e.size);
      files.add(e.file);
    }
  }
  const st = await status(a);
  const orphans = new Set(st.problems.filter((p) => p.kind === 'orphan-file').map((p) => p.path));
  for (const f of poolFiles(a)) {
    expect(files.has(f) || orphans.has(f), `${f} is neither a device's nor reported`).toBe(true);
  }
  return devs;
}

describeWithTools(['qemu-io'], 'ballast agent: crash safety', () => {
  it('SIGKILL between the steps of a create leaves the device complete or absent', async () => {
    const a = await startAgent();
    try {
      const cases: [string, boolean][] = [
        ['create-after-intent', false],
        ['create-after-file', false],
        ['create-after-commit', true],
      ];
      for (const [fp, survives] of cases) {
        await a.stop();
        await a.start({ BALLAST_FAILPOINTS: fp });
        const name = `d-${fp}`;
        const r = await a.cli('device', 'create', name, '--size', '4M');
        // The agent died under the request: the CLI cannot know the outcome.
        expect(r.code, describeRun(r)).toBe(3);
        expect(await a.exited).toBe(137);
        await a.start();
        const devs = await expectConsistent(a);
        const st = await status(a);
        if (survives) {
          expect(devs.find((d) => d.name === name)).toMatchObject({ size: 4 * MiB });
          expect(st.recovered).toEqual([]);
        } else {
          expect(devs.find((d) => d.name === name)).toBeUndefined();
          expect(st.recovered).toEqual([`device ${name}: interrupted create rolled back`]);
          // The name is free again and the new device works.
          const again = await a.cli('device', 'create', name, '--size', '4M');
          expect(again.code, describeRun(again)).toBe(0);
        }
        const io = await run('qemu-io', ['-f', 'raw', a.uri(name), '-c', 'write -P 7 0 1M']);
        expect(io.code, describeRun(io)).toBe(0);
        expect(st.problems).toEqual([]);
      }
      // Delete: killed after the intent, finished at the next start.
      await a.stop();
      await a.start({ BALLAST_FAILPOINTS: 'delete-after-intent' });
      const victim = (await devices(a)).find((d) => d.name === 'd-create-after-commit')!;
      const rm = await a.cli('device', 'rm', victim.name);
      expect(rm.code, describeRun(rm)).toBe(3);
      expect(await a.exited).toBe(137);
      await a.start();
      expect((await devices(a)).map((d) => d.name)).not.toContain(victim.name);
      expect(existsSync(victim.extents[0]!.file)).toBe(false);
      expect((await status(a)).recovered).toEqual([
        `device ${victim.name}: interrupted delete finished`,
      ]);
      await expectConsistent(a);
    } finally {
      await a.stop();
    }
  });

  it('SIGKILL at an arbitrary moment in a stream of creates: acknowledged ones survive', async () => {
    const a = await startAgent();
    try {
      const acked: string[] = [];
      let killed = false;
      // Three clients creating devices as fast as they can; the agent is
      // killed once six creates have been acknowledged.
      const stream = async (k: number) => {
        for (let i = 0; i < 20 && !killed; i++) {
          const name = `s${k}-${i}`;
          const r = await a.cli('device', 'create', name, '--size', '2M');
          if (r.code === 0) {
            acked.push(name);
            if (acked.length >= 6 && !killed) {
              killed = true;
              await a.kill9();
            }
          } else {
            expect(r.code, describeRun(r)).toBe(3);
            break;
          }
        }
      };
      await Promise.all([stream(0), stream(1), stream(2)]);
      expect(killed).toBe(true);
      await a.start();
      const devs = await expectConsistent(a);
      const names = devs.map((d) => d.name);
      for (const n of acked) expect(names).toContain(n);
      expect((await status(a)).problems).toEqual([]);
    } finally {
      await a.stop();
    }
  });

  it('SIGKILL during writes: acknowledged writes are there after the restart', async () => {
    const a = await startAgent();
    try {
      const c = await a.cli('device', 'create', 'w', '--size', '32M', '--role', 'paging');
      expect(c.code, describeRun(c)).toBe(0);
      const first = await run('qemu-io', ['-f', 'raw', a.uri('w'), '-c', 'write -P 0xaa 0 8M']);
      expect(first.code, describeRun(first)).toBe(0);

      // 24 writes of 1 MiB; the agent is killed when the fourth is acknowledged.
      const cmds: string[] = [];
      for (let i = 8; i < 32; i++) cmds.push('-c', `write -P 0xbb ${i}M 1M`);
      const { acting: killing, output } = await qemuIoActing(
        a.uri('w'),
        cmds,
        (out) => (out.match(/^wrote /gm) ?? []).length >= 4,
        () => a.kill9(),
      );
      await killing;
      if (!killing) await a.kill9(); // qemu-io finished first: still a crash after writes
      const acked = ackedWrites(output());
      expect(acked.length).toBeGreaterThanOrEqual(4);

      await a.start();
      const devs = await expectConsistent(a);
      expect(devs.map((d) => d.name)).toEqual(['w']);
      // Read the device back through the agent.
      const checks = ['-c', 'read -P 0xaa 0 8M'];
      for (const off of acked) checks.push('-c', `read -P 0xbb ${off} 1M`);
      const r = await run('qemu-io', ['-f', 'raw', a.uri('w'), ...checks]);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|failed:/);
      // Unacknowledged writes may be there or not, page by page; nothing else.
      const file = devs[0]!.extents[0]!.file;
      const data = readFileSync(file);
      for (let p = 8 * MiB; p < 32 * MiB; p += 4096) {
        const page = data.subarray(p, p + 4096);
        const v = page[0]!;
        expect(v === 0 || v === 0xbb, `page at ${p}`).toBe(true);
        expect(
          page.every((x) => x === v),
          `page at ${p} is torn inside`,
        ).toBe(true);
      }
    } finally {
      await a.stop();
    }
  });

  it('SIGTERM during writes: the requests in flight finish, then exit 0', async () => {
    const a = await startAgent();
    try {
      const c = await a.cli('device', 'create', 'drain', '--size', '32M');
      expect(c.code, describeRun(c)).toBe(0);
      const cmds: string[] = [];
      for (let i = 0; i < 32; i++) cmds.push('-c', `aio_write -P 0xcc ${i}M 1M`);
      cmds.push('-c', 'aio_flush');
      const { acting: stopping, output } = await qemuIoActing(
        a.uri('drain'),
        cmds,
        (out) => /^wrote /m.test(out),
        () => a.stop(),
      );
      expect(await (stopping ?? a.stop())).toBe(0);
      expect(a.stderr()).toContain('SIGTERM: finishing requests in flight');
      const acked = ackedWrites(output());
      expect(acked.length).toBeGreaterThanOrEqual(1);
      await a.start();
      const checks: string[] = [];
      for (const off of acked) checks.push('-c', `read -P 0xcc ${off} 1M`);
      const r = await run('qemu-io', ['-f', 'raw', a.uri('drain'), ...checks]);
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|failed:/);
    } finally {
      await a.stop();
    }
  });

  it('a file the database does not know is reported by status, never deleted', async () => {
    const a = await startAgent();
    try {
      await a.stop();
      const stray = path.join(a.dir, 'pools', 'default', 'stray.img');
      writeFileSync(stray, 'x');
      // And a device whose file went missing.
      await a.start();
      const c = await a.cli('device', 'create', 'lost', '--size', '1M');
      expect(c.code, describeRun(c)).toBe(0);
      const lostFile = (await devices(a))[0]!.extents[0]!.file;
      await a.stop();
      (await import('node:fs')).rmSync(lostFile);
      await a.start();
      const s = await a.cli('status');
      expect(s.code, describeRun(s)).toBe(0);
      expect(s.stdout).toContain(`orphan-file: ${stray} belongs to no device`);
      expect(s.stdout).toMatch(/missing-file: .*lost/);
      expect(existsSync(stray)).toBe(true);
      const lost = (await devices(a)).find((d) => d.name === 'lost')!;
      expect(lost.state).toBe('missing');
      const att = await a.cli('attach', 'lost');
      expect(att.code, describeRun(att)).toBe(5);
      expect(att.stderr).toContain('BALLAST_DEVICE_UNAVAILABLE');
      // It can be removed (the record goes; there were no files).
      const rm = await a.cli('device', 'rm', 'lost');
      expect(rm.code, describeRun(rm)).toBe(0);
    } finally {
      await a.stop();
    }
  });
});
