// qemu-io judges the server: patterns written and read back, zeroes, discard, FUA,
// several AIO requests in flight, the export's tail and past it.

import { afterAll, beforeAll, expect, it } from 'vitest';
import { type QemuMapEntry, qemuMapAt } from '../helpers/images.js';
import { MiB, type ServerHandle, startServer } from '../helpers/server.js';
import { describeRun, describeWithTools, type RunResult, run, runOk } from '../helpers/tools.js';

const SIZE = 64 * MiB;

describeWithTools(['qemu-io', 'qemu-img'], 'qemu-io against the server', () => {
  let server: ServerHandle;

  beforeAll(async () => {
    server = await startServer({ size: SIZE, name: 'disk' });
  });

  afterAll(async () => {
    if (server) expect(await server.stop()).toBe(0);
  });

  /** qemu-io with the given commands; its exit code says whether a command failed. */
  const qemuIo = (...cmds: string[]): Promise<RunResult> =>
    run('qemu-io', ['-f', 'raw', server.uri(), ...cmds.flatMap((c) => ['-c', c])]);

  /** The commands succeeded and every pattern check passed. */
  const expectClean = (r: RunResult) => {
    expect(r.code, describeRun(r)).toBe(0);
    expect(r.stdout + r.stderr).not.toMatch(/Pattern verification failed|failed:/);
  };

  const map = async () => {
    const r = await runOk('qemu-img', ['map', '--output=json', '-f', 'raw', server.uri()]);
    return JSON.parse(r.stdout) as QemuMapEntry[];
  };

  it('write -P 0xab, then read -P 0xab verifies', async () => {
    const r = await qemuIo('write -P 0xab 0 64k', 'read -P 0xab 0 64k');
    expectClean(r);
    expect(r.stdout).toContain('wrote 65536/65536 bytes at offset 0');
    expect(r.stdout).toContain('read 65536/65536 bytes at offset 0');
    // In a new connection too.
    expectClean(await qemuIo('read -P 0xab 0 64k', 'read -P 0xab 60k 4k'));
  });

  it('a wrong pattern is noticed (the checks are real)', async () => {
    await runOk('qemu-io', ['-f', 'raw', server.uri(), '-c', 'write -P 0x01 128k 4k']);
    const r = await qemuIo('read -P 0x02 128k 4k');
    expect(r.stdout + r.stderr).toContain('Pattern verification failed');
  });

  it('write -z reads back as zeroes', async () => {
    expectClean(await qemuIo('write -P 0xcd 1M 1M', 'read -P 0xcd 1M 1M'));
    expectClean(await qemuIo('write -z 1M 1M', 'read -P 0 1M 1M'));
    expectClean(await qemuIo('write -P 0xcd 2M 64k', 'write -z -u 2M 64k', 'read -P 0 2M 64k'));
  });

  it('discard deallocates (map shows it unallocated) and reads as zeroes', async () => {
    expectClean(await qemuIo('write -P 0x33 4M 2M'));
    expect(qemuMapAt(await map(), 5 * MiB).data).toBe(true);
    expectClean(await qemuIo('discard 4M 1M', 'read -P 0 4M 1M', 'read -P 0x33 5M 1M'));
    const m = await map();
    expect(qemuMapAt(m, 4 * MiB)).toMatchObject({ data: false, zero: true });
    expect(qemuMapAt(m, 5 * MiB - 1)).toMatchObject({ data: false, zero: true });
    expect(qemuMapAt(m, 5 * MiB).data).toBe(true);
  });

  it('FUA writes (write -f, aio_write -f) land', async () => {
    const r = await qemuIo('write -f -P 0x44 8M 256k', 'aio_write -f -P 0x45 9M 64k', 'aio_flush');
    expectClean(r);
    expectClean(await qemuIo('read -P 0x44 8M 256k', 'read -P 0x45 9M 64k'));
  });

  it('several aio_write / aio_read in flight', async () => {
    const writes: string[] = [];
    const reads: string[] = [];
    for (let i = 0; i < 16; i++) {
      const off = 16 * MiB + i * 128 * 1024;
      const pat = `0x${(0x60 + i).toString(16)}`;
      writes.push(`aio_write -P ${pat} ${off} 128k`);
      reads.push(`aio_read -P ${pat} ${off} 128k`);
    }
    const r = await qemuIo(...writes, 'aio_flush', ...reads, 'aio_flush');
    expectClean(r);
    expect(r.stdout.match(/^wrote 131072\/131072 bytes/gm)?.length).toBe(16);
    expect(r.stdout.match(/^read 131072\/131072 bytes/gm)?.length).toBe(16);
  });

  it("reads and writes at the export's tail; past it they fail", async () => {
    const tail = SIZE - 4096;
    expectClean(await qemuIo(`write -P 0x77 ${tail} 4k`, `read -P 0x77 ${tail} 4k`));
    expectClean(await qemuIo(`read -P 0x77 ${SIZE - 1} 1`));
    for (const cmd of [`read ${SIZE} 4k`, `read ${tail} 8k`, `write -P 1 ${SIZE - 512} 1k`]) {
      const r = await qemuIo(cmd);
      expect(r.code, describeRun(r)).not.toBe(0);
      expect(r.stdout + r.stderr).toMatch(/failed/);
    }
    // The server is still fine afterwards.
    expectClean(await qemuIo(`read -P 0x77 ${tail} 4k`));
  });
});
