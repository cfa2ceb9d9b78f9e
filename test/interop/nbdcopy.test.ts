// nbdcopy judges the server: bulk copies in and out, sparseness, several connections.

import { statSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import path from 'node:path';
import { afterEach, beforeAll, expect, it } from 'vitest';
import {
  allocatedBytes,
  sha256File,
  writeRandomFile,
  writeSparseImage,
} from '../helpers/images.js';
import { MiB, makeTempDir, type ServerHandle, startServer } from '../helpers/server.js';
import { describeWithTools, runOk } from '../helpers/tools.js';

describeWithTools(['nbdcopy'], 'nbdcopy against the server', () => {
  let dir: string;
  let server: ServerHandle | undefined;

  beforeAll(() => {
    dir = makeTempDir();
  });

  afterEach(async () => {
    if (server) expect(await server.stop()).toBe(0);
    server = undefined;
  });

  it('copies 48 MiB of random data in and back out unchanged', async () => {
    const src = path.join(dir, 'random.bin');
    const back = path.join(dir, 'random.back');
    await writeRandomFile(src, 48 * MiB);
    server = await startServer({ size: 48 * MiB, name: 'disk' });

    await runOk('nbdcopy', [src, server.uri()], { timeoutMs: 60_000 });
    await runOk('nbdcopy', [server.uri(), back], { timeoutMs: 60_000 });
    expect(statSync(back).size).toBe(48 * MiB);
    expect(await sha256File(back)).toBe(await sha256File(src));
    // What the server stored is the source too.
    expect(await sha256File(server.file)).toBe(await sha256File(src));
  });

  it('keeps a sparse source sparse on the server and back out', async () => {
    const src = path.join(dir, 'sparse.img');
    const back = path.join(dir, 'sparse.back');
    const content = await writeSparseImage(src, 64 * MiB, [
      { offset: 0, length: 1 * MiB },
      { offset: 40 * MiB, length: 1 * MiB },
    ]);
    server = await startServer({ size: '64M', name: 'disk' });

    await runOk('nbdcopy', [src, server.uri()], { timeoutMs: 60_000 });
    expect(statSync(server.file).size).toBe(64 * MiB);
    // 2 MiB of data; allow slack for filesystem metadata and block rounding.
    expect(allocatedBytes(server.file)).toBeLessThanOrEqual(4 * MiB);
    expect(allocatedBytes(server.file)).toBeGreaterThanOrEqual(2 * MiB);

    // Out again: nbdcopy follows the server's block status and writes a sparse file.
    await runOk('nbdcopy', [server.uri(), back], { timeoutMs: 60_000 });
    expect((await readFile(back)).equals(content)).toBe(true);
    expect(allocatedBytes(back)).toBeLessThanOrEqual(4 * MiB);
  });

  it('--allocated makes the server file fully allocated (zeroes with NO_HOLE)', async () => {
    const src = path.join(dir, 'sparse2.img');
    await writeSparseImage(src, 32 * MiB, [{ offset: 4 * MiB, length: 1 * MiB }]);
    server = await startServer({ size: 32 * MiB, name: 'disk' });

    await runOk('nbdcopy', ['--allocated', src, server.uri()], { timeoutMs: 60_000 });
    expect(allocatedBytes(server.file)).toBeGreaterThanOrEqual(32 * MiB);
    expect(await sha256File(server.file)).toBe(await sha256File(src));
  });

  it('copies over 4 connections (multi-conn)', async () => {
    const src = path.join(dir, 'multi.bin');
    const back = path.join(dir, 'multi.back');
    await writeRandomFile(src, 32 * MiB);
    server = await startServer({ size: 32 * MiB, name: 'disk' });

    const r = await runOk(
      'nbdcopy',
      ['--connections=4', '--threads=4', '--requests=16', '--flush', '-v', src, server.uri()],
      { timeoutMs: 60_000 },
    );
    // nbdcopy silently falls back to one connection unless the server allows multi-conn.
    expect(r.stderr).toMatch(/^nbdcopy: connections=4 /m);
    await runOk('nbdcopy', ['--connections=4', '--threads=4', server.uri(), back], {
      timeoutMs: 60_000,
    });
    expect(await sha256File(back)).toBe(await sha256File(src));
  });
});
