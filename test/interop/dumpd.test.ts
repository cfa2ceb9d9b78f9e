// dumpd against real QEMUs without a guest OS (-S: memory to dump, nothing to boot):
// guests found in a watched directory, reconnection after QEMU restarts, on-demand
// dumps with each after-dump policy, retention with trims, and /metrics.

import { existsSync, readdirSync, readFileSync, rmSync, statSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { parseConfig } from '../../dumpd/config.js';
import { Dumpd } from '../../dumpd/daemon.js';
import { DumpDevice } from '../../dumpd/device.js';
import { startWatchingDumpd, until } from '../helpers/dumpd.js';
import { startQemu, stopQemu } from '../helpers/qemu.js';
import {
  BALLAST_BIN,
  MiB,
  makeTempDir,
  type ServerHandle,
  startServer,
} from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';

describeWithTools(['qemu-system-x86_64'], 'dumpd against QEMU', () => {
  let server: ServerHandle;
  let dir: string;
  let d: Dumpd;
  let addr: string;
  const log: string[] = [];

  beforeAll(async () => {
    dir = makeTempDir('ballast-dd-');
    ({ server, d, addr } = await startWatchingDumpd({
      dir,
      exports: [
        { name: 'a-dump', size: '96M' },
        { name: 'b-dump', size: '96M' },
        { name: 'c-dump', size: '8M' },
      ],
      after: 'none',
      log,
    }));
  });

  afterAll(async () => {
    await d?.stop();
    await server?.stop();
  });

  it('picks up guests from the watched directory without a restart', async () => {
    expect(d.guestNames()).toEqual([]);
    await startQemu(['-machine', 'pc,accel=tcg', '-m', '24', '-S'], {
      dir,
      qmp: path.join(dir, 'a.qmp'),
    });
    await until(
      () => log.includes('guest a: QMP connected (' + path.join(dir, 'a.qmp') + ')'),
      'guest a',
    );
    expect(d.guestNames()).toEqual(['a']);
  });

  it('dumps on demand, applies after, keeps `keep` dumps and trims the rest', async () => {
    const r1 = await d.dump('a', { after: 'none' });
    expect(r1.ok, JSON.stringify(r1)).toBe(true);
    expect(r1.entry).toMatchObject({ id: 1, state: 'complete', guest: 'a', format: 'elf' });
    const r2 = await d.dump('a', { after: 'reboot' });
    expect(r2.ok).toBe(true);
    const r3 = await d.dump('a', { after: 'pause' });
    expect(r3.ok).toBe(true);
    const dev = await DumpDevice.open(server.uri('a-dump'));
    try {
      expect(dev.catalog.entries.map((e) => e.id)).toEqual([2, 3]);
      // Dump 1 was dropped; its region is free and reads as zeroes again.
      const ext = await dev.nbd.blockStatus(r1.entry?.offset ?? 0, 4 * MiB);
      expect((ext[0]?.flags ?? 0) & 1).toBe(1);
    } finally {
      await dev.close();
    }
    await expect(d.dump('nobody')).rejects.toMatchObject({ code: 'DUMP_UNKNOWN_GUEST' });
  });

  it('reconnects to a guest whose QEMU restarted, and forgets removed sockets', async () => {
    const qmp = path.join(dir, 'b.qmp');
    const first = await startQemu(['-machine', 'pc,accel=tcg', '-m', '16', '-S'], { dir, qmp });
    await until(() => log.some((l) => l.startsWith('guest b: QMP connected')), 'b connected');
    let connects = 0;
    d.on('connected', (name: string) => {
      if (name === 'b') connects++;
    });
    await stopQemu(first.child);
    rmSync(qmp, { force: true });
    const second = await startQemu(['-machine', 'pc,accel=tcg', '-m', '16', '-S'], { dir, qmp });
    await until(() => connects >= 1, 'b connected again');
    const r = await d.dump('b', { after: 'none' });
    expect(r.ok, JSON.stringify(r)).toBe(true);
    await stopQemu(second.child);
    rmSync(qmp, { force: true });
    await until(() => !d.guestNames().includes('b'), 'b forgotten');
  });

  it('a failed dump is marked failed and the guest is still handled per policy', async () => {
    const qmp = path.join(dir, 'c.qmp');
    const q = await startQemu(['-machine', 'pc,accel=tcg', '-m', '16', '-S'], { dir, qmp });
    await until(() => log.some((l) => l.startsWith('guest c: QMP connected')), 'c connected');
    const r = await d.dump('c', { after: 'poweroff' });
    expect(r.ok).toBe(false);
    expect(r.error?.code).toBe('DUMP_NO_SPACE');
    expect(r.entry).toMatchObject({ state: 'failed', guest: 'c' });
    expect(r.afterError).toBeUndefined();
    // poweroff = quit: QEMU exits.
    expect(await q.exited).toBe(0);
    rmSync(qmp, { force: true });
    await until(() => !d.guestNames().includes('c'), 'c forgotten');
  });

  it('dump get verifies the checksum: a corrupted dump is refused and not left behind', async () => {
    const uri = server.uri('a-dump');
    const out = path.join(dir, 'a.core');
    const ok = await run(process.execPath, [BALLAST_BIN, 'dump', 'get', uri, '3', '-o', out]);
    expect(ok.code, describeRun(ok)).toBe(0);
    expect(existsSync(out)).toBe(true);
    const dev = await DumpDevice.open(uri);
    const e = dev.find(3);
    const at = e.offset + Math.floor(e.length / 2);
    const byte = await dev.nbd.read(at, 1);
    await dev.nbd.write(at, Buffer.from([(byte[0] ?? 0) ^ 0xff]));
    await dev.close();
    const bad = await run(process.execPath, [BALLAST_BIN, 'dump', 'get', uri, '3', '-o', out]);
    expect(bad.code).toBe(1);
    expect(bad.stderr).toContain('ballast: error DUMP_CHECKSUM_MISMATCH');
    expect(existsSync(out)).toBe(false);
    const missing = await run(process.execPath, [BALLAST_BIN, 'dump', 'get', uri, '99', '-o', out]);
    expect(missing.stderr).toContain('DUMP_NOT_FOUND');
    const notDump = await run(process.execPath, [
      BALLAST_BIN,
      'dump',
      'ls',
      'nbd+unix:///nope?socket=' + server.socket,
    ]);
    expect(notDump.stderr).toContain('ballast: error NBD_REP_ERR_UNKNOWN');
  });

  it('serves /metrics and the guest list', async () => {
    const m = await fetch(`http://${addr}/metrics`).then((r) => r.text());
    expect(m).toMatch(/ballast_dumpd_dumps_completed_total\{guest="a"\} 3/);
    expect(m).toMatch(/ballast_dumpd_dump_bytes_total\{guest="a"\} \d+/);
    expect(m).toMatch(/ballast_dumpd_dump_duration_seconds_count\{guest="a"\} 3/);
    expect(m).toMatch(
      /ballast_dumpd_last_dump_timestamp_seconds\{guest="a",result="complete"\} \d+/,
    );
    const g = (await fetch(`http://${addr}/v1/guests`).then((r) => r.json())) as {
      guests: { name: string; connected: boolean }[];
    };
    expect(g.guests.map((x) => x.name)).toEqual(['a']);
    expect(g.guests[0]?.connected).toBe(true);
    // Nothing of any dump, good or failed, is left on the host's disk: FIFOs only, removed.
    // The API token is all there is (root only).
    expect(readdirSync(path.join(dir, 'run'))).toEqual(['token']);
    const token = path.join(dir, 'run', 'token');
    expect(statSync(token).mode & 0o777).toBe(0o600);
    const authorization = `Bearer ${readFileSync(token, 'utf8').trim()}`;
    // A dump reads a guest's memory and may reboot it: not without the token.
    for (const headers of [{}, { authorization: 'Bearer nope' }] as Record<string, string>[]) {
      const r = await fetch(`http://${addr}/v1/guests/a/dump?after=poweroff`, {
        method: 'POST',
        headers,
      });
      expect(r.status).toBe(401);
      expect(((await r.json()) as { code: string }).code).toBe('DUMP_UNAUTHORIZED');
    }
    const bad = await fetch(`http://${addr}/v1/guests/zzz/dump`, {
      method: 'POST',
      headers: { authorization },
    });
    expect(bad.status).toBe(404);
    expect(((await bad.json()) as { code: string }).code).toBe('DUMP_UNKNOWN_GUEST');
    const malformed = await fetch(`http://${addr}/v1/guests/%ZZ/dump`, {
      method: 'POST',
      headers: { authorization },
    });
    expect(malformed.status).toBe(400);
  });
});

describeWithTools(['qemu-system-x86_64'], 'dumpd with a QEMU that stops mid-dump', () => {
  it('gives up after dumpTimeoutSeconds: DUMP_TIMEOUT, entry failed, dumpd not wedged', async () => {
    const dir = makeTempDir('ballast-dt-');
    const server = await startServer({ size: '512M', name: 'h-dump' });
    const qmp = path.join(dir, 'h.qmp');
    const q = await startQemu(['-machine', 'pc,accel=tcg', '-m', '384', '-S'], { dir, qmp });
    const cfg = parseConfig(`
listen: 127.0.0.1:0
runDir: ${path.join(dir, 'run')}
dumpTimeoutSeconds: 2
guests:
  - { name: h, qmp: ${qmp}, device: "${server.uri()}", after: none }
`);
    const d = new Dumpd(cfg, { resolveDevice: async (ref) => ('uri' in ref ? ref.uri : '') });
    await d.start();
    try {
      await until(() => d.connectedGuests().includes('h'), 'h connected');
      const job = d.dump('h');
      // Freeze QEMU once bytes flow: it keeps the FIFO open and writes nothing more.
      for (;;) {
        const m = await d.registry.getSingleMetricAsString('ballast_dumpd_dump_bytes_total');
        if (/guest="h"\} [1-9]/.test(m)) break;
        await new Promise((r) => setTimeout(r, 5));
      }
      q.child.kill('SIGSTOP');
      const r = await job;
      q.child.kill('SIGCONT');
      expect(r.ok).toBe(false);
      expect(r.error?.code).toBe('DUMP_TIMEOUT');
      expect(r.entry?.state).toBe('failed');
      const dev = await DumpDevice.open(server.uri());
      expect(dev.catalog.entries.map((e) => e.state)).toEqual(['failed']);
      await dev.close();
    } finally {
      q.child.kill('SIGCONT');
      await stopQemu(q.child);
      await d.stop();
      await server.stop();
    }
  });
});
