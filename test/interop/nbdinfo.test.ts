// nbdinfo judges what the server advertises: size, flags, block sizes, descriptions,
// the export list, and the allocation map.

import { truncateSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { type NbdinfoMapEntry, nbdinfoMapAt } from '../helpers/images.js';
import { MiB, makeTempDir, type ServerHandle, startServer } from '../helpers/server.js';
import { describeRun, describeWithTools, run, runOk } from '../helpers/tools.js';

interface ExportInfo {
  'export-name': string;
  description?: string;
  'export-size': number;
  contexts?: string[];
  is_read_only: boolean;
  can_cache: boolean;
  can_df: boolean;
  can_fast_zero: boolean;
  can_flush: boolean;
  can_fua: boolean;
  can_multi_conn: boolean;
  can_trim: boolean;
  can_zero: boolean;
  block_size_minimum?: number;
  block_size_preferred?: number;
  block_size_maximum?: number;
}

interface Info {
  protocol: string;
  structured: boolean;
  exports: ExportInfo[];
}

const info = async (uri: string, ...opts: string[]): Promise<Info> => {
  const r = await runOk('nbdinfo', ['--json', ...opts, uri]);
  return JSON.parse(r.stdout) as Info;
};

const WRITE_SIDE = ['trim', 'zero', 'fast-zero', 'fua', 'flush'] as const;
const ALWAYS = ['read', 'connect', 'cache', 'df', 'multi-conn', 'structured-reply'] as const;

describeWithTools(['nbdinfo', 'qemu-io'], 'nbdinfo against the server', () => {
  describe('a writable export', () => {
    let server: ServerHandle;

    beforeAll(async () => {
      server = await startServer({
        size: '64M',
        name: 'disk',
        description: 'Ballast interop disk',
      });
    });
    afterAll(async () => {
      if (server) expect(await server.stop()).toBe(0);
    });

    it('--json: size, flags, block sizes, description', async () => {
      const i = await info(server.uri());
      expect(i.protocol).toBe('newstyle-fixed');
      expect(i.structured).toBe(true);
      expect(i.exports).toHaveLength(1);
      expect(i.exports[0]).toMatchObject({
        'export-name': 'disk',
        description: 'Ballast interop disk',
        'export-size': 64 * MiB,
        is_read_only: false,
        can_cache: true,
        can_df: true,
        can_fast_zero: true,
        can_flush: true,
        can_fua: true,
        can_multi_conn: true,
        can_trim: true,
        can_zero: true,
        block_size_minimum: 1,
        block_size_preferred: 4096,
        block_size_maximum: 33554432,
      });
      expect(i.exports[0]!.contexts).toContain('base:allocation');
    });

    it('the empty export name reaches the only export', async () => {
      const i = await info(server.uri(''));
      expect(i.exports[0]!['export-size']).toBe(64 * MiB);
    });

    it('an unknown export name fails', async () => {
      const r = await run('nbdinfo', ['--size', server.uri('no-such-export')]);
      expect(r.code, describeRun(r)).not.toBe(0);
    });

    it('--can / --is answer per the contract', async () => {
      for (const flag of [...WRITE_SIDE, ...ALWAYS, 'write']) {
        const r = await run('nbdinfo', ['--can', flag, server.uri()]);
        expect(r.code, `--can ${flag}\n${describeRun(r)}`).toBe(0);
      }
      const ro = await run('nbdinfo', ['--is', 'read-only', server.uri()]);
      expect(ro.code, describeRun(ro)).toBe(2);
    });

    it('--size prints the size', async () => {
      const r = await runOk('nbdinfo', ['--size', server.uri()]);
      expect(r.stdout.trim()).toBe(String(64 * MiB));
    });

    it('--list shows the export and its description', async () => {
      const i = await info(server.uri(), '--list');
      const e = i.exports.find((x) => x['export-name'] === 'disk');
      expect(e, JSON.stringify(i)).toBeDefined();
      expect(e!.description).toBe('Ballast interop disk');
    });

    it('--map follows writes, trims and zeroes', async () => {
      const map = async () =>
        JSON.parse(
          (await runOk('nbdinfo', ['--map', '--json', server.uri()])).stdout,
        ) as NbdinfoMapEntry[];

      let m = await map();
      expect(m.reduce((n, e) => n + e.length, 0)).toBe(64 * MiB);
      expect(m.every((e) => e.type === 3)).toBe(true); // a new sparse file: all hole,zero

      await runOk('qemu-io', [
        '-f',
        'raw',
        server.uri(),
        '-c',
        `write -P 0x5 ${1 * MiB} ${2 * MiB}`,
        '-c',
        `write -P 0x6 ${60 * MiB} ${64 * 1024}`,
      ]);
      m = await map();
      expect(nbdinfoMapAt(m, 0)).toMatchObject({ type: 3, description: 'hole,zero' });
      expect(nbdinfoMapAt(m, 1 * MiB)).toMatchObject({ type: 0, description: 'data' });
      expect(nbdinfoMapAt(m, 3 * MiB - 1).type).toBe(0);
      expect(nbdinfoMapAt(m, 3 * MiB).type).toBe(3);
      expect(nbdinfoMapAt(m, 60 * MiB).type).toBe(0);
      expect(nbdinfoMapAt(m, 60 * MiB + 64 * 1024).type).toBe(3);

      await runOk('qemu-io', [
        '-f',
        'raw',
        server.uri(),
        '-c',
        `discard ${1 * MiB} ${1 * MiB}`,
        '-c',
        `write -z -u ${60 * MiB} ${64 * 1024}`,
      ]);
      m = await map();
      expect(nbdinfoMapAt(m, 1 * MiB).type).toBe(3);
      expect(nbdinfoMapAt(m, 2 * MiB - 1).type).toBe(3);
      expect(nbdinfoMapAt(m, 2 * MiB).type).toBe(0);
      expect(nbdinfoMapAt(m, 60 * MiB).type & 2).toBe(2); // reads as zero

      const totals = JSON.parse(
        (await runOk('nbdinfo', ['--map', '--totals', '--json', server.uri()])).stdout,
      ) as { size: number; type: number }[];
      expect(totals.find((t) => t.type === 0)?.size).toBe(1 * MiB);
    });
  });

  describe('a read-only export', () => {
    let server: ServerHandle;

    beforeAll(async () => {
      const file = path.join(makeTempDir(), 'ro.img');
      writeFileSync(file, '');
      truncateSync(file, 16 * MiB);
      server = await startServer({ file, name: 'ro', readOnly: true });
    });
    afterAll(async () => {
      if (server) expect(await server.stop()).toBe(0);
    });

    it('--json shows read-only and no write-side flags', async () => {
      const i = await info(server.uri());
      expect(i.exports[0]).toMatchObject({
        'export-size': 16 * MiB,
        is_read_only: true,
        can_trim: false,
        can_zero: false,
        can_fast_zero: false,
        can_fua: false,
        can_flush: false,
        can_cache: true,
        can_df: true,
        can_multi_conn: true,
      });
    });

    it('--can answers false for writes, true for reads', async () => {
      for (const flag of [...WRITE_SIDE, 'write']) {
        const r = await run('nbdinfo', ['--can', flag, server.uri()]);
        expect(r.code, `--can ${flag}\n${describeRun(r)}`).toBe(2);
      }
      for (const flag of ALWAYS) {
        const r = await run('nbdinfo', ['--can', flag, server.uri()]);
        expect(r.code, `--can ${flag}\n${describeRun(r)}`).toBe(0);
      }
      const ro = await run('nbdinfo', ['--is', 'read-only', server.uri()]);
      expect(ro.code, describeRun(ro)).toBe(0);
    });
  });

  describe('several exports', () => {
    let server: ServerHandle;

    beforeAll(async () => {
      const dir = makeTempDir();
      const ro = path.join(dir, 'gamma.img');
      writeFileSync(ro, '');
      truncateSync(ro, 8 * MiB);
      server = await startServer({
        exports: [
          { name: 'alpha', size: '64M', description: 'first disk' },
          { name: 'beta', size: 32 * MiB, description: 'second disk' },
          { name: 'gamma', file: ro, readOnly: true, description: 'read-only disk' },
        ],
      });
    });
    afterAll(async () => {
      if (server) expect(await server.stop()).toBe(0);
    });

    it('--list shows every export with its description, size and mode', async () => {
      const i = await info(server.uri('alpha'), '--list');
      const byName = new Map(i.exports.map((e) => [e['export-name'], e]));
      expect([...byName.keys()]).toEqual(expect.arrayContaining(['alpha', 'beta', 'gamma']));
      expect(byName.get('alpha')).toMatchObject({
        description: 'first disk',
        'export-size': 64 * MiB,
        is_read_only: false,
      });
      expect(byName.get('beta')).toMatchObject({
        description: 'second disk',
        'export-size': 32 * MiB,
        is_read_only: false,
      });
      expect(byName.get('gamma')).toMatchObject({
        description: 'read-only disk',
        'export-size': 8 * MiB,
        is_read_only: true,
      });
    });

    it('each name reaches its own export', async () => {
      expect((await info(server.uri('beta'))).exports[0]!['export-size']).toBe(32 * MiB);
      expect((await info(server.uri('gamma'))).exports[0]!.is_read_only).toBe(true);
      const r = await run('nbdinfo', ['--size', server.uri('delta')]);
      expect(r.code, describeRun(r)).not.toBe(0);
    });
  });
});
