import * as fs from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it } from 'vitest';
import type { Extent, IoRequest } from '../nbd/backend.js';
import { loadNative } from './native.js';
import { SparseFileBackend, type SparseFileOptions } from './sparse-file.js';

const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let counter = 0;
const open: SparseFileBackend[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(join(tmpdir(), 'ballast-sparse-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});
afterEach(async () => {
  for (const b of open.splice(0)) await b.close();
});

function tmpPath(): string {
  return join(dir, `f${counter++}.img`);
}

async function openB(path: string, opts: SparseFileOptions = {}): Promise<SparseFileBackend> {
  const b = await SparseFileBackend.open(path, opts);
  open.push(b);
  return b;
}

async function closeB(b: SparseFileBackend): Promise<void> {
  open.splice(open.indexOf(b), 1);
  await b.close();
}

/** Runs one request; resolves to the errno it completed with. */
function run(
  op: (req: IoRequest) => void,
  offset: number,
  length: number,
  buf: Buffer = Buffer.alloc(0),
  bufOffset = 0,
): Promise<number> {
  return new Promise((resolve) => {
    let calls = 0;
    const req: IoRequest = {
      offset,
      length,
      buf,
      bufOffset,
      done(errno) {
        calls++;
        expect(calls).toBe(1);
        resolve(errno);
      },
    };
    op(req);
  });
}

async function readAt(b: SparseFileBackend, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length + 7, 0xee);
  expect(await run((r) => b.read(r), offset, length, buf, 7)).toBe(0);
  expect(buf.subarray(0, 7).every((x) => x === 0xee)).toBe(true);
  return buf.subarray(7);
}

async function writeAt(b: SparseFileBackend, offset: number, data: Buffer, fua = false) {
  const buf = Buffer.concat([Buffer.alloc(3, 0xaa), data]);
  expect(await run((r) => b.write(r, fua), offset, data.length, buf, 3)).toBe(0);
}

function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i++) buf[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return buf;
}

function extentsOf(b: SparseFileBackend, offset: number, length: number, max = 100): Extent[] {
  const out: Extent[] = [];
  expect(b.extents(offset, length, max, out)).toBe(0);
  return out;
}

/** Creates a file with data in [0,1M) and [3M,4M) and holes in [1M,3M) and [4M,8M). */
async function mixed(opts: SparseFileOptions = {}): Promise<SparseFileBackend> {
  const b = await openB(tmpPath(), { size: 8 * MiB, ...opts });
  await writeAt(b, 0, pattern(MiB, 1));
  await writeAt(b, 3 * MiB, pattern(MiB, 2));
  return b;
}

describe('native addon', () => {
  it('loads with its functions and constants', () => {
    const n = loadNative();
    expect(typeof n.preadNowait).toBe('function');
    expect(typeof n.fadvise).toBe('function');
    expect(n.constants.SEEK_DATA).toBe(3);
    expect(n.lseek(-1, 0, 0)).toBeLessThan(0);
  });

  it('writes large buffers in pieces, inline and on the pool, and reports errors as -errno', async () => {
    const n = loadNative();
    const EBADF = 9;
    const EINVAL = 22;
    const path = tmpPath();
    const fd = fs.openSync(path, 'w+');
    try {
      // Several 64 KiB pieces and a short tail, from an odd buffer offset to an odd position.
      const data = pattern(MiB + 5, 3);
      const buf = Buffer.concat([Buffer.alloc(11), data]);
      expect(n.pwriteInline(fd, buf, 11, data.length, 7)).toBe(data.length);
      expect(await n.pwriteAsync(fd, buf, 11, data.length, 2 * MiB + 1)).toBe(data.length);
      const file = fs.readFileSync(path);
      expect(file.subarray(7, 7 + data.length).equals(data)).toBe(true);
      expect(file.subarray(2 * MiB + 1).equals(data)).toBe(true);
      expect(await n.pwriteAsync(-1, buf, 0, 10, 0)).toBe(-EBADF);
      expect(await n.pwriteAsync(fd, buf, 11, buf.length, 0)).toBe(-EINVAL);
      expect(n.pwriteInline(fd, buf, 0, buf.length + 1, 0)).toBe(-EINVAL);
    } finally {
      fs.closeSync(fd);
    }
  });

  it('makes FIFOs and grows pipes', () => {
    const n = loadNative();
    const EEXIST = 17;
    const path = tmpPath();
    expect(n.mkfifo(path, 0o600)).toBe(0);
    const st = fs.statSync(path);
    expect(st.isFIFO()).toBe(true);
    expect(st.mode & 0o777).toBe(0o600);
    expect(n.mkfifo(path, 0o600)).toBe(-EEXIST);
    const fd = fs.openSync(path, fs.constants.O_RDONLY | fs.constants.O_NONBLOCK);
    try {
      // Never more than /proc/sys/fs/pipe-max-size without CAP_SYS_RESOURCE: -EPERM then.
      const r = n.setPipeSize(fd, 256 * KiB);
      expect(r === -1 || r >= 256 * KiB).toBe(true);
    } finally {
      fs.closeSync(fd);
    }
    const file = fs.openSync(tmpPath(), 'w');
    try {
      expect(n.setPipeSize(file, 256 * KiB)).toBeLessThan(0);
    } finally {
      fs.closeSync(file);
    }
  });
});

describe('SparseFileBackend.open', () => {
  it('creates a missing file sparsely when given a size', async () => {
    const path = tmpPath();
    const b = await openB(path, { size: 64 * MiB });
    const st = fs.statSync(path);
    expect(st.size).toBe(64 * MiB);
    expect(st.blocks).toBe(0);
    expect(b.size).toBe(64 * MiB);
    expect(b.path).toBe(path);
    expect(b.fd).toBeGreaterThanOrEqual(0);
    expect(st.mode & 0o777).toBe(0o600);
    expect(extentsOf(b, 0, 64 * MiB)).toEqual([{ length: 64 * MiB, hole: true }]);
  });

  it('refuses a missing file without a size', async () => {
    await expect(SparseFileBackend.open(tmpPath(), {})).rejects.toMatchObject({
      code: 'BALLAST_FILE_NOT_FOUND',
    });
  });

  it('refuses directories and non-regular files', async () => {
    await expect(SparseFileBackend.open(dir, { size: MiB })).rejects.toMatchObject({
      code: 'BALLAST_FILE_INVALID',
    });
    await expect(SparseFileBackend.open('/dev/null', {})).rejects.toMatchObject({
      code: 'BALLAST_FILE_INVALID',
    });
  });

  it('refuses a size smaller than the file and never truncates', async () => {
    const path = tmpPath();
    fs.writeFileSync(path, pattern(MiB, 3));
    await expect(SparseFileBackend.open(path, { size: MiB / 2 })).rejects.toMatchObject({
      code: 'BALLAST_SIZE_MISMATCH',
    });
    expect(fs.readFileSync(path).equals(pattern(MiB, 3))).toBe(true);
  });

  it('refuses an invalid size', async () => {
    for (const size of [-1, 1.5, Number.NaN]) {
      await expect(SparseFileBackend.open(tmpPath(), { size })).rejects.toMatchObject({
        code: 'BALLAST_SIZE_INVALID',
      });
    }
  });

  it('grows a smaller file sparsely and keeps its data', async () => {
    const path = tmpPath();
    fs.writeFileSync(path, pattern(64 * KiB, 4));
    const blocks = fs.statSync(path).blocks;
    const b = await openB(path, { size: 32 * MiB });
    const st = fs.statSync(path);
    expect(st.size).toBe(32 * MiB);
    expect(st.blocks).toBe(blocks);
    expect(b.size).toBe(32 * MiB);
    expect((await readAt(b, 0, 64 * KiB)).equals(pattern(64 * KiB, 4))).toBe(true);
  });

  it('opens an existing file at its own size, including an empty one', async () => {
    const path = tmpPath();
    fs.writeFileSync(path, Buffer.alloc(0));
    const b = await openB(path, {});
    expect(b.size).toBe(0);
    expect(extentsOf(b, 0, 0)).toEqual([]);
    await closeB(b);
    const b2 = await openB(path, { size: 0 });
    expect(b2.size).toBe(0);
  });

  it('locks the file against a second server until closed', async () => {
    const path = tmpPath();
    const b = await openB(path, { size: MiB });
    const err = await SparseFileBackend.open(path, {}).catch((e: unknown) => e);
    expect(err).toMatchObject({ code: 'BALLAST_FILE_LOCKED' });
    expect((err as Error).message).toContain(path);
    await expect(SparseFileBackend.open(path, { readOnly: true })).rejects.toMatchObject({
      code: 'BALLAST_FILE_LOCKED',
    });
    await closeB(b);
    await closeB(await openB(path, {}));
  });

  it('shares the lock between read-only opens but not with a writer', async () => {
    const path = tmpPath();
    fs.writeFileSync(path, pattern(8 * KiB, 5));
    const r1 = await openB(path, { readOnly: true });
    const r2 = await openB(path, { readOnly: true });
    await expect(SparseFileBackend.open(path, {})).rejects.toMatchObject({
      code: 'BALLAST_FILE_LOCKED',
    });
    await closeB(r1);
    await closeB(r2);
    await closeB(await openB(path, {}));
  });

  it('reports caps, with rotational from the options', async () => {
    const b = await openB(tmpPath(), { size: MiB, rotational: true });
    expect(b.caps).toEqual({
      write: true,
      flush: true,
      fua: true,
      trim: true,
      zero: true,
      fastZero: true,
      cache: true,
      extents: true,
      multiConn: true,
      rotational: true,
    });
    const b2 = await openB(tmpPath(), { size: MiB, rotational: false });
    expect(b2.caps.rotational).toBe(false);
    const b3 = await openB(tmpPath(), { size: MiB });
    expect(typeof b3.caps.rotational).toBe('boolean');
  });

  it('close is idempotent', async () => {
    const b = await SparseFileBackend.open(tmpPath(), { size: MiB });
    await b.close();
    await b.close();
  });
});

describe('read-only', () => {
  it('reports caps.write=false and serves reads', async () => {
    const path = tmpPath();
    fs.writeFileSync(path, pattern(64 * KiB, 6));
    const b = await openB(path, { readOnly: true });
    expect(b.caps).toMatchObject({
      write: false,
      trim: false,
      zero: false,
      fastZero: false,
      flush: true,
      cache: true,
      extents: true,
    });
    expect((await readAt(b, 1234, 5000)).equals(pattern(64 * KiB, 6).subarray(1234, 6234))).toBe(
      true,
    );
    expect(extentsOf(b, 0, 64 * KiB)).toEqual([{ length: 64 * KiB, hole: false }]);
    expect(await run((r) => b.flush(r), 0, 0)).toBe(0);
    expect(await run((r) => b.cache(r), 0, 64 * KiB)).toBe(0);
    // The server never writes to a read-only export; if it did, the fd refuses (EBADF).
    const errno = await run((r) => b.write(r, false), 0, 4, Buffer.alloc(4, 1));
    expect(errno).toBe(9);
    expect(fs.readFileSync(path).equals(pattern(64 * KiB, 6))).toBe(true);
  });

  it('does not create or grow a file', async () => {
    await expect(
      SparseFileBackend.open(tmpPath(), { size: MiB, readOnly: true }),
    ).rejects.toMatchObject({ code: 'BALLAST_FILE_NOT_FOUND' });
    const path = tmpPath();
    fs.writeFileSync(path, Buffer.alloc(4096));
    await expect(SparseFileBackend.open(path, { size: MiB, readOnly: true })).rejects.toMatchObject(
      {
        code: 'BALLAST_SIZE_MISMATCH',
      },
    );
    expect(fs.statSync(path).size).toBe(4096);
  });
});

describe.each([
  ['nowait', {}],
  ['pool', { nowait: false }],
  ['cache none', { cache: 'none' }],
] as const)('read/write (%s)', (_name, extra) => {
  it('round-trips at odd offsets and buffer offsets', async () => {
    const path = tmpPath();
    const b = await openB(path, { size: 4 * MiB, ...extra });
    const data = pattern(300_001, 7);
    await writeAt(b, 12_345, data);
    expect((await readAt(b, 12_345, data.length)).equals(data)).toBe(true);
    // Around the write: zeroes.
    const around = await readAt(b, 12_000, 345 + data.length + 1000);
    expect(around.subarray(0, 345).every((x) => x === 0)).toBe(true);
    expect(around.subarray(345, 345 + data.length).equals(data)).toBe(true);
    expect(around.subarray(345 + data.length).every((x) => x === 0)).toBe(true);
    // Unaligned overwrite in the middle, at the very end, and of length zero.
    await writeAt(b, 100_003, Buffer.from('hello'));
    data.write('hello', 100_003 - 12_345);
    expect((await readAt(b, 12_345, data.length)).equals(data)).toBe(true);
    await writeAt(b, 4 * MiB - 3, Buffer.from('end'));
    expect((await readAt(b, 4 * MiB - 5, 5)).toString('latin1')).toBe('\0\0end');
    await writeAt(b, 0, Buffer.alloc(0));
    expect((await readAt(b, 0, 0)).length).toBe(0);
    // And on disk.
    const disk = fs.readFileSync(path);
    expect(disk.length).toBe(4 * MiB);
    expect(disk.subarray(12_345, 12_345 + data.length).equals(data)).toBe(true);
  });

  it('writes with FUA', async () => {
    const path = tmpPath();
    const b = await openB(path, { size: MiB, ...extra });
    const data = pattern(70_000, 8);
    await writeAt(b, 777, data, true);
    expect((await readAt(b, 777, data.length)).equals(data)).toBe(true);
    expect(
      fs
        .readFileSync(path)
        .subarray(777, 777 + data.length)
        .equals(data),
    ).toBe(true);
  });

  it('reads zeroes past the end of a file shrunk behind its back', async () => {
    const path = tmpPath();
    const b = await openB(path, { size: MiB, ...extra });
    await writeAt(b, 0, Buffer.alloc(MiB, 0x5a));
    fs.truncateSync(path, 100_000);
    const got = await readAt(b, 90_000, 50_000);
    expect(got.subarray(0, 10_000).every((x) => x === 0x5a)).toBe(true);
    expect(got.subarray(10_000).every((x) => x === 0)).toBe(true);
    expect((await readAt(b, 500_000, 1000)).every((x) => x === 0)).toBe(true);
    expect(extentsOf(b, 0, MiB)).toEqual([
      { length: 100_000, hole: false },
      { length: MiB - 100_000, hole: true },
    ]);
  });

  it('reads cold (uncached) data', async () => {
    const path = tmpPath();
    const data = pattern(2 * MiB, 9);
    fs.writeFileSync(path, data);
    const fd = fs.openSync(path, 'r');
    fs.fdatasyncSync(fd);
    // Drop the cached pages (POSIX_FADV_DONTNEED = 4) so the nowait read sees EAGAIN.
    loadNative().fadvise(fd, 0, 0, 4);
    fs.closeSync(fd);
    const b = await openB(path, extra);
    expect((await readAt(b, 1, 2 * MiB - 2)).equals(data.subarray(1, 2 * MiB - 1))).toBe(true);
  });
});

describe('nowait and pool paths', () => {
  it('give identical data', async () => {
    const a = await openB(tmpPath(), { size: 2 * MiB });
    const p = await openB(tmpPath(), { size: 2 * MiB, nowait: false });
    const writes: [number, number][] = [
      [0, 4096],
      [5, 100_000],
      [777_777, 333_333],
      [2 * MiB - 4097, 4097],
    ];
    for (const [i, [off, len]] of writes.entries()) {
      await writeAt(a, off, pattern(len, i));
      await writeAt(p, off, pattern(len, i));
    }
    for (const [off, len] of [
      [0, 2 * MiB],
      [3, 1_000_001],
      [2 * MiB - 10, 10],
    ] as const) {
      expect((await readAt(a, off, len)).equals(await readAt(p, off, len))).toBe(true);
    }
    expect(fs.readFileSync(a.path).equals(fs.readFileSync(p.path))).toBe(true);
  });

  it('pool writes in flight together all land, one after another', async () => {
    const p = await openB(tmpPath(), { size: 8 * MiB, nowait: false });
    const parts = Array.from({ length: 12 }, (_, i) => pattern(600_000 + i, i));
    const at = (i: number) => i * 650_000 + (i % 3);
    // Issued at once: the pool runs them in order; the last two overlap, the later wins.
    const writes = parts.map((d, i) => run((r) => p.write(r, i === 5), at(i), d.length, d));
    const over = pattern(100_000, 99);
    writes.push(run((r) => p.write(r, false), at(11), over.length, over));
    expect(await Promise.all(writes)).toEqual(parts.map(() => 0).concat(0));
    for (const [i, d] of parts.entries()) {
      const want = i === 11 ? Buffer.concat([over, d.subarray(over.length)]) : d;
      expect((await readAt(p, at(i), d.length)).equals(want)).toBe(true);
    }
  });
});

describe('cache none', () => {
  it('writes aligned requests with O_DIRECT and the rest through the page cache, coherently', async () => {
    const d = await openB(tmpPath(), { size: 8 * MiB, cache: 'none' });
    const w = await openB(tmpPath(), { size: 8 * MiB });
    expect(d.cacheMode).toBe('none');
    expect(w.cacheMode).toBe('writeback');
    // Aligned (direct), unaligned (page cache) over it, direct again over that, a
    // 5 MiB one (more than one pass through the aligned buffer), with FUA too.
    const writes: [number, number, boolean][] = [
      [0, 64 * KiB, false],
      [100, 5000, false],
      [0, 8 * KiB, true],
      [MiB, 5 * MiB, false],
      [MiB + 4096, 4096, true],
      [8 * MiB - 4096, 4096, false],
    ];
    for (const [i, [off, len, fua]] of writes.entries()) {
      // Read first, so direct writes have cached pages to invalidate.
      await readAt(d, off, len);
      await writeAt(d, off, pattern(len, i), fua);
      await writeAt(w, off, pattern(len, i), fua);
      expect((await readAt(d, off, len)).equals(pattern(len, i))).toBe(true);
    }
    expect((await readAt(d, 0, 8 * MiB)).equals(await readAt(w, 0, 8 * MiB))).toBe(true);
    expect(fs.readFileSync(d.path).equals(fs.readFileSync(w.path))).toBe(true);
  });

  it('works on tmpfs: O_DIRECT there since Linux 6.6, the page cache before', async (ctx) => {
    const shm = '/dev/shm';
    if (!fs.existsSync(shm)) ctx.skip();
    const path = join(fs.mkdtempSync(join(shm, 'ballast-')), 'f.img');
    try {
      const b = await openB(path, { size: MiB, cache: 'none' });
      expect(['none', 'writeback']).toContain(b.cacheMode);
      await writeAt(b, 0, pattern(64 * KiB, 1));
      expect((await readAt(b, 0, 64 * KiB)).equals(pattern(64 * KiB, 1))).toBe(true);
      await closeB(b);
    } finally {
      fs.rmSync(dirname(path), { recursive: true, force: true });
    }
  });

  it('read-only files ignore it', async () => {
    const path = tmpPath();
    await closeB(await openB(path, { size: MiB }));
    const b = await openB(path, { readOnly: true, cache: 'none' });
    expect(b.cacheMode).toBe('writeback');
  });
});

describe('flush and cache', () => {
  it('complete successfully', async () => {
    const b = await openB(tmpPath(), { size: MiB });
    await writeAt(b, 0, pattern(4096, 1));
    expect(await run((r) => b.flush(r), 0, 0)).toBe(0);
    expect(await run((r) => b.cache(r), 0, MiB)).toBe(0);
    expect(await run((r) => b.cache(r), MiB - 1, 1)).toBe(0);
  });
});

describe('trim', () => {
  it.each([false, true])('makes a hole (fua=%s)', async (fua) => {
    const b = await openB(tmpPath(), { size: 4 * MiB });
    await writeAt(b, 0, pattern(2 * MiB, 10));
    expect(await run((r) => b.flush(r), 0, 0)).toBe(0);
    const before = fs.statSync(b.path).blocks;
    expect(before).toBeGreaterThanOrEqual((2 * MiB) / 512);
    expect(await run((r) => b.trim(r, fua), 512 * KiB, MiB)).toBe(0);
    expect(fs.statSync(b.path).blocks).toBe(before - MiB / 512);
    expect(extentsOf(b, 0, 4 * MiB)).toEqual([
      { length: 512 * KiB, hole: false },
      { length: MiB, hole: true },
      { length: 512 * KiB, hole: false },
      { length: 2 * MiB, hole: true },
    ]);
    expect((await readAt(b, 512 * KiB, MiB)).every((x) => x === 0)).toBe(true);
    const edge = await readAt(b, 512 * KiB - 10, 20);
    expect(
      edge.subarray(0, 10).equals(pattern(2 * MiB, 10).subarray(512 * KiB - 10, 512 * KiB)),
    ).toBe(true);
    expect(edge.subarray(10).every((x) => x === 0)).toBe(true);
  });

  it('is a no-op for length 0 and succeeds when unsupported', async () => {
    const b = await openB(tmpPath(), { size: MiB });
    expect(await run((r) => b.trim(r, false), 0, 0)).toBe(0);
    const nf = await openB(tmpPath(), { size: MiB, fallocate: false });
    await writeAt(nf, 0, pattern(8192, 1));
    expect(await run((r) => nf.trim(r, true), 0, 8192)).toBe(0);
    expect((await readAt(nf, 0, 8192)).equals(pattern(8192, 1))).toBe(true);
  });
});

describe('zero', () => {
  it('with mayTrim: punches a hole', async () => {
    const b = await openB(tmpPath(), { size: 2 * MiB });
    await writeAt(b, 0, pattern(2 * MiB, 11));
    expect(await run((r) => b.flush(r), 0, 0)).toBe(0);
    const before = fs.statSync(b.path).blocks;
    expect(await run((r) => b.zero(r, true, false, false), MiB, 512 * KiB)).toBe(0);
    expect(fs.statSync(b.path).blocks).toBe(before - (512 * KiB) / 512);
    expect((await readAt(b, MiB, 512 * KiB)).every((x) => x === 0)).toBe(true);
    expect(extentsOf(b, MiB, 512 * KiB)).toEqual([{ length: 512 * KiB, hole: true }]);
  });

  it.each([false, true])(
    'without mayTrim (NO_HOLE): keeps the range allocated (fast=%s)',
    async (fast) => {
      const b = await openB(tmpPath(), { size: 2 * MiB });
      await writeAt(b, 0, pattern(2 * MiB, 12));
      expect(await run((r) => b.flush(r), 0, 0)).toBe(0);
      const before = fs.statSync(b.path).blocks;
      expect(await run((r) => b.zero(r, false, fast, true), MiB - 100, 300 * KiB)).toBe(0);
      expect(fs.statSync(b.path).blocks).toBe(before);
      const got = await readAt(b, MiB - 200, 300 * KiB + 200);
      expect(got.subarray(0, 100).equals(pattern(2 * MiB, 12).subarray(MiB - 200, MiB - 100))).toBe(
        true,
      );
      expect(got.subarray(100, 100 + 300 * KiB).every((x) => x === 0)).toBe(true);
      expect(
        got
          .subarray(100 + 300 * KiB)
          .equals(pattern(2 * MiB, 12).subarray(MiB + 300 * KiB - 100, MiB + 300 * KiB)),
      ).toBe(true);
    },
  );

  it('without fallocate: fast fails with ENOTSUP, slow writes zeroes', async () => {
    const b = await openB(tmpPath(), { size: 4 * MiB, fallocate: false });
    const data = pattern(4 * MiB, 13);
    await writeAt(b, 0, data);
    expect(await run((r) => b.zero(r, true, true, false), 0, MiB)).toBe(95);
    expect((await readAt(b, 0, 4 * MiB)).equals(data)).toBe(true);
    // More than one 1 MiB piece, unaligned.
    expect(await run((r) => b.zero(r, true, false, true), 1001, 2 * MiB + 5)).toBe(0);
    data.fill(0, 1001, 1001 + 2 * MiB + 5);
    expect((await readAt(b, 0, 4 * MiB)).equals(data)).toBe(true);
    expect(await run((r) => b.zero(r, false, false, false), 0, 0)).toBe(0);
  });
});

describe('extents', () => {
  it('maps mixed data and holes', async () => {
    const b = await mixed();
    expect(extentsOf(b, 0, 8 * MiB)).toEqual([
      { length: MiB, hole: false },
      { length: 2 * MiB, hole: true },
      { length: MiB, hole: false },
      { length: 4 * MiB, hole: true },
    ]);
    // Starting mid-run, ending mid-run: clamped to the range.
    expect(extentsOf(b, 512 * KiB, 3 * MiB)).toEqual([
      { length: 512 * KiB, hole: false },
      { length: 2 * MiB, hole: true },
      { length: 512 * KiB, hole: false },
    ]);
    expect(extentsOf(b, 2 * MiB, 4096)).toEqual([{ length: 4096, hole: true }]);
  });

  it('pushes at most max extents and appends to out', async () => {
    const b = await mixed();
    expect(extentsOf(b, 0, 8 * MiB, 1)).toEqual([{ length: MiB, hole: false }]);
    expect(extentsOf(b, 0, 8 * MiB, 3)).toEqual([
      { length: MiB, hole: false },
      { length: 2 * MiB, hole: true },
      { length: MiB, hole: false },
    ]);
    expect(extentsOf(b, MiB, 7 * MiB, 1)).toEqual([{ length: 2 * MiB, hole: true }]);
    expect(extentsOf(b, 0, 8 * MiB, 0)).toEqual([]);
    const out: Extent[] = [{ length: 1, hole: false }];
    expect(b.extents(MiB, MiB, 5, out)).toBe(0);
    expect(out).toEqual([
      { length: 1, hole: false },
      { length: MiB, hole: true },
    ]);
  });

  it('never reports past the export size', async () => {
    const b = await mixed();
    expect(extentsOf(b, 7 * MiB, 4 * MiB)).toEqual([{ length: MiB, hole: true }]);
    expect(extentsOf(b, 8 * MiB, MiB)).toEqual([]);
    const full = await openB(tmpPath(), { size: 3 * MiB });
    await writeAt(full, 0, pattern(3 * MiB, 14));
    expect(extentsOf(full, 2 * MiB, 10 * MiB)).toEqual([{ length: MiB, hole: false }]);
  });

  it('is the same whatever the I/O path', async () => {
    const a = await mixed();
    const p = await mixed({ nowait: false });
    expect(extentsOf(a, 0, 8 * MiB)).toEqual(extentsOf(p, 0, 8 * MiB));
  });
});
