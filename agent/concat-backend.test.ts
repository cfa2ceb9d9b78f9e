import * as fs from 'node:fs';
import { constants as osConstants, tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from 'vitest';
import type { Backend, BackendCaps, Extent, IoRequest } from '../nbd/backend.js';
import { FULL_CAPS } from '../test/helpers/caps.js';
import { ConcatBackend, type ConcatExtent } from './concat-backend.js';
import { SparseFileBackend } from './sparse-file.js';

const { EIO, ENOSPC, EINVAL, ENOTSUP } = osConstants.errno;
const KiB = 1024;
const MiB = 1024 * KiB;

let dir: string;
let counter = 0;
const toClose: Backend[] = [];

beforeAll(() => {
  dir = fs.mkdtempSync(join(tmpdir(), 'ballast-concat-'));
});
afterAll(() => {
  fs.rmSync(dir, { recursive: true, force: true });
});
afterEach(async () => {
  for (const b of toClose.splice(0).reverse()) await b.close();
});

function track<T extends Backend>(b: T): T {
  toClose.push(b);
  return b;
}

function tmpPath(): string {
  return join(dir, `e${counter++}.img`);
}

interface Device {
  concat: ConcatBackend;
  files: SparseFileBackend[];
  paths: string[];
}

/** A device of three sparse files: 1 MiB + 3 MiB + 2 MiB. */
async function device(sizes = [MiB, 3 * MiB, 2 * MiB]): Promise<Device> {
  const files: SparseFileBackend[] = [];
  const paths: string[] = [];
  for (const size of sizes) {
    const path = tmpPath();
    paths.push(path);
    files.push(await SparseFileBackend.open(path, { size, rotational: false }));
  }
  const concat = track(
    new ConcatBackend(files.map((backend) => ({ backend, length: backend.size }))),
  );
  return { concat, files, paths };
}

function run(
  op: (req: IoRequest) => void,
  offset: number,
  length: number,
  buf: Buffer = Buffer.alloc(0),
  bufOffset = 0,
): Promise<number> {
  return new Promise((resolve, reject) => {
    let calls = 0;
    const req: IoRequest = {
      offset,
      length,
      buf,
      bufOffset,
      done(errno) {
        calls++;
        if (calls !== 1) reject(new Error(`done called ${calls} times`));
        resolve(errno);
      },
    };
    op(req);
  });
}

async function readAt(b: Backend, offset: number, length: number): Promise<Buffer> {
  const buf = Buffer.alloc(length + 7, 0xee);
  expect(await run((r) => b.read(r), offset, length, buf, 7)).toBe(0);
  expect(buf.subarray(0, 7).every((x) => x === 0xee)).toBe(true);
  return buf.subarray(7);
}

async function writeAt(b: Backend, offset: number, data: Buffer, fua = false): Promise<void> {
  const buf = Buffer.concat([Buffer.alloc(3, 0xaa), data]);
  expect(await run((r) => b.write(r, fua), offset, data.length, buf, 3)).toBe(0);
}

function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.alloc(length);
  for (let i = 0; i < length; i++) buf[i] = (i * 31 + seed * 7 + (i >> 9)) & 0xff;
  return buf;
}

/** The device's bytes [offset, offset+length), read from the files themselves. */
function fromFiles(d: Device, offset: number, length: number): Buffer {
  const out = Buffer.alloc(length);
  let start = 0;
  for (const [i, f] of d.files.entries()) {
    const end = start + f.size;
    const lo = Math.max(offset, start);
    const hi = Math.min(offset + length, end);
    if (lo < hi) {
      const fd = fs.openSync(d.paths[i]!, 'r');
      try {
        fs.readSync(fd, out, lo - offset, hi - lo, lo - start);
      } finally {
        fs.closeSync(fd);
      }
    }
    start = end;
  }
  return out;
}

function mapOf(b: Backend, offset: number, length: number, max = 100): Extent[] {
  const out: Extent[] = [];
  expect(b.extents(offset, length, max, out)).toBe(0);
  return out;
}

/**
 * An in-memory backend. Operations take effect when called; completions run
 * at once, or wait in `queue` (to be completed in any order) when `defer`.
 * `fail` makes every ranged operation complete with that errno.
 */
class MemBackend implements Backend {
  readonly size: number;
  readonly caps: BackendCaps;
  readonly data: Buffer;
  defer = false;
  fail = 0;
  readonly queue: Array<() => void> = [];
  readonly seen: IoRequest[] = [];
  flushes = 0;
  closed = 0;
  map: Extent[] = [];

  constructor(size: number, caps: Partial<BackendCaps> = {}) {
    this.size = size;
    this.caps = { ...FULL_CAPS, ...caps };
    this.data = Buffer.alloc(size);
  }

  private complete(req: IoRequest, errno: number): void {
    if (this.defer) this.queue.push(() => req.done(errno));
    else req.done(errno);
  }

  private check(req: IoRequest): boolean {
    this.seen.push(req);
    if (req.offset < 0 || req.offset + req.length > this.size) {
      throw new Error(`request [${req.offset}, +${req.length}) past the end ${this.size}`);
    }
    if (this.fail) {
      this.complete(req, this.fail);
      return false;
    }
    return true;
  }

  read(req: IoRequest): void {
    if (!this.check(req)) return;
    this.data.copy(req.buf, req.bufOffset, req.offset, req.offset + req.length);
    this.complete(req, 0);
  }
  write(req: IoRequest): void {
    if (!this.check(req)) return;
    req.buf.copy(this.data, req.offset, req.bufOffset, req.bufOffset + req.length);
    this.complete(req, 0);
  }
  trim(req: IoRequest): void {
    this.zero(req);
  }
  zero(req: IoRequest): void {
    if (!this.check(req)) return;
    this.data.fill(0, req.offset, req.offset + req.length);
    this.complete(req, 0);
  }
  cache(req: IoRequest): void {
    if (this.check(req)) this.complete(req, 0);
  }
  flush(req: IoRequest): void {
    this.flushes++;
    this.complete(req, this.fail);
  }
  extents(offset: number, length: number, max: number, out: Extent[]): number {
    if (this.fail) return this.fail;
    // `map` describes the whole backend from 0; report the runs that overlap.
    let pos = 0;
    let n = 0;
    for (const e of this.map) {
      const end = pos + e.length;
      if (end > offset && pos < offset + length) {
        if (n >= max) break;
        out.push({ length: end - Math.max(pos, offset), hole: e.hole });
        n++;
      }
      pos = end;
    }
    return 0;
  }
  async close(): Promise<void> {
    this.closed++;
  }

  /** Completes every queued request, in a shuffled order. */
  drain(random: () => number): void {
    while (this.queue.length > 0) {
      const i = Math.floor(random() * this.queue.length);
      const [f] = this.queue.splice(i, 1);
      f!();
    }
  }
}

function rng(seed: number): () => number {
  let s = seed >>> 0;
  return () => {
    s = (s * 1664525 + 1013904223) >>> 0;
    return s / 2 ** 32;
  };
}

// ---------------------------------------------------------------------------

describe('construction', () => {
  it('adds up the extents and exposes them', async () => {
    const d = await device();
    expect(d.concat.size).toBe(6 * MiB);
    expect(d.concat.parts.map((p) => p.length)).toEqual([MiB, 3 * MiB, 2 * MiB]);
    expect(d.concat.parts[1]!.backend).toBe(d.files[1]);
  });

  it('refuses no extents, bad lengths and extents longer than their backend', () => {
    const m = new MemBackend(MiB);
    const bad: ConcatExtent[][] = [
      [],
      [{ backend: m, length: 0 }],
      [{ backend: m, length: -1 }],
      [{ backend: m, length: 1.5 }],
      [{ backend: m, length: MiB + 1 }],
    ];
    for (const extents of bad) {
      expect(() => new ConcatBackend(extents)).toThrow(
        expect.objectContaining({ code: 'BALLAST_EXTENT_INVALID' }),
      );
    }
  });

  it('ANDs the caps of its children, and is rotational if any child is', () => {
    const a = new MemBackend(MiB);
    const c = track(new ConcatBackend([{ backend: a, length: MiB }]));
    expect(c.caps).toEqual(FULL_CAPS);
    const keys = [
      'write',
      'flush',
      'fua',
      'trim',
      'zero',
      'fastZero',
      'cache',
      'extents',
      'multiConn',
    ] as const;
    for (const k of keys) {
      const b = new MemBackend(MiB, { [k]: false });
      const cc = track(
        new ConcatBackend([
          { backend: a, length: MiB },
          { backend: b, length: MiB },
        ]),
      );
      expect(cc.caps[k]).toBe(false);
      for (const other of keys) if (other !== k) expect(cc.caps[other]).toBe(true);
      expect(cc.caps.rotational).toBe(false);
    }
    const r = new MemBackend(MiB, { rotational: true });
    const cr = track(
      new ConcatBackend([
        { backend: a, length: MiB },
        { backend: r, length: MiB },
      ]),
    );
    expect(cr.caps.rotational).toBe(true);
    expect(cr.caps.write).toBe(true);
  });

  it('takes read-only caps from a read-only file', async () => {
    const path = tmpPath();
    await (await SparseFileBackend.open(path, { size: MiB })).close();
    const ro = await SparseFileBackend.open(path, { readOnly: true, rotational: false });
    const rw = await SparseFileBackend.open(tmpPath(), { size: MiB, rotational: true });
    const c = track(
      new ConcatBackend([
        { backend: rw, length: MiB },
        { backend: ro, length: MiB },
      ]),
    );
    expect(c.caps).toMatchObject({
      write: false,
      trim: false,
      zero: false,
      fastZero: false,
      flush: true,
      extents: true,
      multiConn: true,
      rotational: true,
    });
  });
});

describe('reads and writes', () => {
  it('inside each extent land in that file at the local offset', async () => {
    const d = await device();
    const cases = [
      { offset: 0, length: 4 * KiB, file: 0, local: 0 },
      { offset: 12345, length: 54321, file: 0, local: 12345 },
      { offset: MiB - 100, length: 100, file: 0, local: MiB - 100 },
      { offset: MiB, length: 64 * KiB, file: 1, local: 0 },
      { offset: 2 * MiB + 777, length: 100_000, file: 1, local: MiB + 777 },
      { offset: 4 * MiB - 1, length: 1, file: 1, local: 3 * MiB - 1 },
      { offset: 4 * MiB, length: 4 * KiB, file: 2, local: 0 },
      { offset: 6 * MiB - 5000, length: 5000, file: 2, local: 2 * MiB - 5000 },
    ];
    for (const [i, c] of cases.entries()) {
      const data = pattern(c.length, i + 1);
      await writeAt(d.concat, c.offset, data);
      expect((await readAt(d.concat, c.offset, c.length)).equals(data)).toBe(true);
      const fd = fs.openSync(d.paths[c.file]!, 'r');
      const got = Buffer.alloc(c.length);
      fs.readSync(fd, got, 0, c.length, c.local);
      fs.closeSync(fd);
      expect(got.equals(data), `case ${i}`).toBe(true);
    }
  });

  it('across every boundary, and across all of them', async () => {
    const d = await device();
    const ranges = [
      [MiB - 5000, 12_000],
      [MiB - 1, 2],
      [4 * MiB - 70_000, 70_001],
      [4 * MiB - 1, 1 + 4 * KiB],
      [MiB - 100, 3 * MiB + 200],
      [0, 6 * MiB],
    ] as const;
    for (const [i, [offset, length]] of ranges.entries()) {
      const data = pattern(length, 10 + i);
      await writeAt(d.concat, offset, data, i % 2 === 1);
      expect(fromFiles(d, offset, length).equals(data), `range ${i} in the files`).toBe(true);
      expect((await readAt(d.concat, offset, length)).equals(data), `range ${i}`).toBe(true);
    }
  });

  it('reads data written to the files directly', async () => {
    const d = await device();
    fs.writeFileSync(d.paths[0]!, pattern(MiB, 21));
    fs.writeFileSync(d.paths[1]!, pattern(3 * MiB, 22));
    fs.writeFileSync(d.paths[2]!, pattern(2 * MiB, 23));
    const all = Buffer.concat([pattern(MiB, 21), pattern(3 * MiB, 22), pattern(2 * MiB, 23)]);
    for (const [offset, length] of [
      [0, 6 * MiB],
      [MiB - 3, 6],
      [3 * MiB, 2 * MiB],
    ] as const) {
      expect(
        (await readAt(d.concat, offset, length)).equals(all.subarray(offset, offset + length)),
      ).toBe(true);
    }
  });

  it('refuses requests past the end with EINVAL', async () => {
    const d = await device();
    const buf = Buffer.alloc(8192);
    expect(await run((r) => d.concat.read(r), 6 * MiB - 4096, 8192, buf)).toBe(EINVAL);
    expect(await run((r) => d.concat.write(r, false), 6 * MiB, 1, buf)).toBe(EINVAL);
    expect(await run((r) => d.concat.trim(r, false), -1, 10)).toBe(EINVAL);
  });

  it('passes zero-length requests to one extent', async () => {
    const d = await device();
    for (const offset of [0, MiB, 4 * MiB, 6 * MiB]) {
      expect(await run((r) => d.concat.read(r), offset, 0)).toBe(0);
      expect(await run((r) => d.concat.trim(r, false), offset, 0)).toBe(0);
    }
  });

  it('works with a single extent, shorter than its file', async () => {
    const path = tmpPath();
    const f = await SparseFileBackend.open(path, { size: 2 * MiB });
    const c = track(new ConcatBackend([{ backend: f, length: MiB }]));
    expect(c.size).toBe(MiB);
    const data = pattern(MiB, 30);
    await writeAt(c, 0, data);
    expect((await readAt(c, 0, MiB)).equals(data)).toBe(true);
    expect(fs.readFileSync(path).subarray(0, MiB).equals(data)).toBe(true);
    expect(await run((r) => c.read(r), MiB, 1, Buffer.alloc(1))).toBe(EINVAL);
    expect(mapOf(c, 0, MiB)).toEqual([{ length: MiB, hole: false }]);
  });
});

describe('trim, zero and cache', () => {
  async function full(): Promise<{ d: Device; all: Buffer }> {
    const d = await device();
    const all = pattern(6 * MiB, 40);
    await writeAt(d.concat, 0, all);
    return { d, all };
  }

  it('trim across a boundary reads back as zeroes and punches holes in both files', async () => {
    const { d, all } = await full();
    const offset = MiB - 64 * KiB;
    const length = 128 * KiB;
    expect(await run((r) => d.concat.trim(r, false), offset, length)).toBe(0);
    const expected = Buffer.from(all);
    expected.fill(0, offset, offset + length);
    expect((await readAt(d.concat, 0, 6 * MiB)).equals(expected)).toBe(true);
    expect(fromFiles(d, 0, 6 * MiB).equals(expected)).toBe(true);
    expect(mapOf(d.concat, 0, 6 * MiB)).toEqual([
      { length: offset, hole: false },
      { length, hole: true },
      { length: 6 * MiB - offset - length, hole: false },
    ]);
  });

  for (const [mayTrim, fast] of [
    [true, false],
    [false, false],
    [true, true],
  ] as const) {
    it(`zero across two boundaries (mayTrim ${mayTrim}, fast ${fast})`, async () => {
      const { d, all } = await full();
      const offset = MiB - 12_345;
      const length = 3 * MiB + 30_000; // into the third extent
      const errno = await run((r) => d.concat.zero(r, mayTrim, fast, true), offset, length);
      // fast zeroing may legitimately be refused by a filesystem without fallocate modes.
      if (fast && errno === ENOTSUP) return;
      expect(errno).toBe(0);
      const expected = Buffer.from(all);
      expected.fill(0, offset, offset + length);
      expect((await readAt(d.concat, 0, 6 * MiB)).equals(expected)).toBe(true);
      expect(fromFiles(d, 0, 6 * MiB).equals(expected)).toBe(true);
    });
  }

  it('cache across a boundary succeeds', async () => {
    const d = await device();
    expect(await run((r) => d.concat.cache(r), MiB - 4096, 3 * MiB + 8192)).toBe(0);
    expect(await run((r) => d.concat.cache(r), 5 * MiB, 4096)).toBe(0);
  });
});

describe('extents', () => {
  /** data [0,64K) | hole to 1M | extent 1 all hole | data [4M,4M+64K) | hole to 6M */
  async function sparse(): Promise<Device> {
    const d = await device();
    await writeAt(d.concat, 0, pattern(64 * KiB, 50));
    await writeAt(d.concat, 4 * MiB, pattern(64 * KiB, 51));
    return d;
  }

  it('coalesces holes across extent boundaries', async () => {
    const d = await sparse();
    expect(mapOf(d.concat, 0, 6 * MiB)).toEqual([
      { length: 64 * KiB, hole: false },
      { length: 4 * MiB - 64 * KiB, hole: true },
      { length: 64 * KiB, hole: false },
      { length: 2 * MiB - 64 * KiB, hole: true },
    ]);
  });

  it('coalesces data across a boundary', async () => {
    const d = await sparse();
    await writeAt(d.concat, MiB - 4 * KiB, pattern(8 * KiB, 52));
    expect(mapOf(d.concat, 512 * KiB, MiB)).toEqual([
      { length: 512 * KiB - 4 * KiB, hole: true },
      { length: 8 * KiB, hole: false },
      { length: 512 * KiB - 4 * KiB, hole: true },
    ]);
  });

  it('maps ranges that start and end inside extents', async () => {
    const d = await sparse();
    expect(mapOf(d.concat, 32 * KiB, 4 * MiB)).toEqual([
      { length: 32 * KiB, hole: false },
      { length: 4 * MiB - 64 * KiB, hole: true },
      { length: 32 * KiB, hole: false },
    ]);
    // Inside one extent (not the first).
    expect(mapOf(d.concat, 2 * MiB, 4096)).toEqual([{ length: 4096, hole: true }]);
    expect(mapOf(d.concat, 4 * MiB + 4096, 4096)).toEqual([{ length: 4096, hole: false }]);
    // Every run stays within the export, and they cover the range.
    const m = mapOf(d.concat, 5 * MiB, 10 * MiB);
    expect(m.reduce((s, e) => s + e.length, 0)).toBe(MiB);
  });

  it('honours max and appends to out', async () => {
    const d = await sparse();
    for (const max of [1, 2, 3]) {
      const out: Extent[] = [{ length: 1, hole: false }];
      expect(d.concat.extents(0, 6 * MiB, max, out)).toBe(0);
      expect(out.length).toBe(1 + max);
      expect(out[0]).toEqual({ length: 1, hole: false });
      expect(out.slice(1)).toEqual(mapOf(d.concat, 0, 6 * MiB).slice(0, max));
    }
    // The coalesced hole across 1M counts once.
    const one: Extent[] = [];
    expect(d.concat.extents(128 * KiB, 5 * MiB, 1, one)).toBe(0);
    expect(one).toEqual([{ length: 4 * MiB - 128 * KiB, hole: true }]);
    expect(d.concat.extents(0, 6 * MiB, 0, one)).toBe(0);
    expect(one.length).toBe(1);
  });

  it('clamps a child map that runs past its extent', () => {
    const a = new MemBackend(2 * MiB);
    a.map = [{ length: 2 * MiB, hole: true }];
    const b = new MemBackend(MiB);
    b.map = [{ length: MiB, hole: false }];
    const c = track(
      new ConcatBackend([
        { backend: a, length: MiB },
        { backend: b, length: MiB },
      ]),
    );
    expect(mapOf(c, 0, 2 * MiB)).toEqual([
      { length: MiB, hole: true },
      { length: MiB, hole: false },
    ]);
    expect(mapOf(c, 4096, 4096)).toEqual([{ length: MiB - 4096, hole: true }]);
  });

  it('stops where a child stops short, and passes errors on', () => {
    const a = new MemBackend(MiB);
    a.map = [{ length: MiB / 2, hole: false }]; // says nothing about the second half
    const b = new MemBackend(MiB);
    b.map = [{ length: MiB, hole: true }];
    const c = track(
      new ConcatBackend([
        { backend: a, length: MiB },
        { backend: b, length: MiB },
      ]),
    );
    expect(mapOf(c, 0, 2 * MiB)).toEqual([{ length: MiB / 2, hole: false }]);
    a.map = [{ length: MiB, hole: false }];
    b.fail = EIO;
    const out: Extent[] = [{ length: 7, hole: true }];
    expect(c.extents(0, 2 * MiB, 10, out)).toBe(EIO);
    expect(out).toEqual([{ length: 7, hole: true }]);
  });
});

describe('flush', () => {
  it('reaches every file', async () => {
    const d = await device();
    const spies = d.files.map((f) => vi.spyOn(f, 'flush'));
    expect(await run((r) => d.concat.flush(r), 0, 0)).toBe(0);
    for (const s of spies) expect(s).toHaveBeenCalledTimes(1);
  });

  it('flushes a backend used by several extents once, and reports the first error', async () => {
    const a = new MemBackend(MiB);
    const b = new MemBackend(MiB);
    const c = track(
      new ConcatBackend([
        { backend: a, length: MiB / 2 },
        { backend: b, length: MiB },
        { backend: a, length: MiB },
      ]),
    );
    expect(await run((r) => c.flush(r), 0, 0)).toBe(0);
    expect(a.flushes).toBe(1);
    expect(b.flushes).toBe(1);
    b.fail = ENOSPC;
    expect(await run((r) => c.flush(r), 0, 0)).toBe(ENOSPC);
    expect(a.flushes).toBe(2);
  });

  it('passes the request straight through with one backend', () => {
    const a = new MemBackend(MiB);
    const c = track(new ConcatBackend([{ backend: a, length: MiB }]));
    const req: IoRequest = { offset: 0, length: 0, buf: Buffer.alloc(0), bufOffset: 0, done() {} };
    c.flush(req);
    expect(a.flushes).toBe(1);
  });
});

describe('errors', () => {
  function mixed(): { c: ConcatBackend; bad: MemBackend; good: MemBackend } {
    const good = new MemBackend(MiB);
    const bad = new MemBackend(MiB);
    bad.fail = EIO;
    const c = track(
      new ConcatBackend([
        { backend: good, length: MiB },
        { backend: bad, length: MiB },
        { backend: good, length: MiB },
      ]),
    );
    return { c, bad, good };
  }

  it('a failing child fails requests inside it and across it, once', async () => {
    for (const defer of [false, true]) {
      const { c, bad, good } = mixed();
      bad.defer = defer;
      good.defer = defer;
      const buf = Buffer.alloc(3 * MiB);
      const pending = [
        run((r) => c.read(r), MiB + 10, 100, buf),
        run((r) => c.write(r, false), MiB - 10, 20, buf),
        run((r) => c.zero(r, true, false, false), 0, 3 * MiB),
        run((r) => c.trim(r, false), 2 * MiB - 1, 2),
        run((r) => c.read(r), 0, MiB, buf), // the good extent alone
      ];
      bad.drain(rng(1));
      good.drain(rng(2));
      expect(await Promise.all(pending)).toEqual([EIO, EIO, EIO, EIO, 0]);
    }
  });

  it('the first error wins', async () => {
    const a = new MemBackend(MiB);
    const b = new MemBackend(MiB);
    a.defer = true;
    b.defer = true;
    a.fail = ENOSPC;
    b.fail = EIO;
    const c = track(
      new ConcatBackend([
        { backend: a, length: MiB },
        { backend: b, length: MiB },
      ]),
    );
    const buf = Buffer.alloc(2 * MiB);
    const first = run((r) => c.write(r, false), 0, 2 * MiB, buf);
    b.drain(Math.random);
    a.drain(Math.random);
    expect(await first).toBe(EIO);
    const second = run((r) => c.write(r, false), 0, 2 * MiB, buf);
    a.drain(Math.random);
    b.drain(Math.random);
    expect(await second).toBe(ENOSPC);
  });

  it('completes a split request whose parts all complete synchronously', async () => {
    const { c, bad } = mixed();
    bad.fail = 0;
    const buf = pattern(3 * MiB, 60);
    expect(await run((r) => c.write(r, false), 0, 3 * MiB, buf)).toBe(0);
    const back = Buffer.alloc(3 * MiB);
    expect(await run((r) => c.read(r), 0, 3 * MiB, back)).toBe(0);
    expect(back.equals(buf)).toBe(true);
  });
});

describe('concurrency', () => {
  it('many requests completing in any order each complete once, with the right data', async () => {
    const sizes = [64 * KiB, 192 * KiB, 128 * KiB, 4 * KiB, 124 * KiB];
    const mems = sizes.map((s) => new MemBackend(s));
    const c = track(new ConcatBackend(mems.map((m) => ({ backend: m, length: m.size }))));
    const random = rng(7);
    const model = Buffer.alloc(c.size);
    for (const m of mems) m.defer = true;
    // Disjoint writes, so their order does not matter.
    const pending: Promise<number>[] = [];
    const slice = c.size / 256;
    for (let i = 0; i < 256; i++) {
      const offset = i * slice + Math.floor(random() * 100);
      const length = 1 + Math.floor(random() * (slice - 100));
      const data = pattern(length, i);
      data.copy(model, offset);
      const buf = Buffer.concat([Buffer.alloc(5), data]);
      pending.push(run((r) => c.write(r, false), offset, length, buf, 5));
    }
    // Complete parts in a random order across backends.
    while (mems.some((m) => m.queue.length > 0)) {
      const m = mems[Math.floor(random() * mems.length)]!;
      const i = Math.floor(random() * m.queue.length);
      const f = m.queue.splice(i, 1)[0];
      f?.();
    }
    expect(await Promise.all(pending)).toEqual(pending.map(() => 0));
    for (const m of mems) m.defer = false;
    expect((await readAt(c, 0, c.size)).equals(model)).toBe(true);
  });

  it('concurrent writes and reads on real files across boundaries', async () => {
    const d = await device();
    const random = rng(11);
    const model = Buffer.alloc(6 * MiB);
    const writes: Promise<number>[] = [];
    const slice = (6 * MiB) / 64;
    for (let i = 0; i < 64; i++) {
      // Each write straddles the point i * slice, so many cross an extent boundary.
      const offset = Math.max(0, i * slice - Math.floor(random() * 20_000));
      const length = 1 + Math.floor(random() * (slice - 20_000));
      const data = pattern(length, 100 + i);
      data.copy(model, offset);
      writes.push(run((r) => d.concat.write(r, false), offset, length, data));
    }
    expect(await Promise.all(writes)).toEqual(writes.map(() => 0));
    const reads = [];
    for (let i = 0; i < 48; i++) {
      const offset = Math.floor(random() * (6 * MiB - 300_000));
      const length = 1 + Math.floor(random() * 300_000);
      reads.push(
        readAt(d.concat, offset, length).then((b) =>
          b.equals(model.subarray(offset, offset + length)),
        ),
      );
    }
    expect(await Promise.all(reads)).toEqual(reads.map(() => true));
    expect(fromFiles(d, 0, 6 * MiB).equals(model)).toBe(true);
  });
});

describe('allocation', () => {
  it('hands the first extent the caller’s own request object', () => {
    const a = new MemBackend(MiB);
    const b = new MemBackend(MiB);
    const c = track(
      new ConcatBackend([
        { backend: a, length: MiB },
        { backend: b, length: MiB },
      ]),
    );
    const req: IoRequest = {
      offset: 100,
      length: 10,
      buf: Buffer.alloc(10),
      bufOffset: 0,
      done() {},
    };
    c.read(req);
    expect(a.seen[0]).toBe(req);
    req.offset = MiB + 100;
    c.read(req);
    expect(b.seen[0]).not.toBe(req);
    expect(b.seen[0]!.offset).toBe(100);
  });

  it('creates no adapters on the single-extent or split paths once warm', async () => {
    const mems = [MiB, 3 * MiB, 2 * MiB].map((s) => new MemBackend(s));
    const c = track(new ConcatBackend(mems.map((m) => ({ backend: m, length: m.size }))));
    const buf = Buffer.alloc(256 * KiB);
    const reqs: IoRequest[] = [];
    let completed = 0;
    for (let i = 0; i < 32; i++) {
      reqs.push({
        offset: 0,
        length: 0,
        buf,
        bufOffset: 0,
        done: () => {
          completed++;
        },
      });
    }
    /** `depth` requests in flight at once, completed in a shuffled order. */
    const round = (depth: number, offsets: (i: number) => number, length: number, seed: number) => {
      for (const m of mems) m.defer = true;
      for (let i = 0; i < depth; i++) {
        const r = reqs[i]!;
        r.offset = offsets(i);
        r.length = length;
        if (i % 2) c.read(r);
        else c.write(r, false);
      }
      const random = rng(seed);
      for (const m of mems) m.drain(random);
    };
    const inside = (i: number) => [MiB, 4 * MiB, 0][i % 3]! + i * 1000; // extents 1, 2 and 0
    const across = (i: number) => (i % 2 ? MiB : 4 * MiB) - 1000 - i;

    // Warm up: as many in flight as later.
    round(32, inside, 4096, 1);
    round(32, across, 64 * KiB, 2);
    const warm = ConcatBackend.poolStats();
    const before = completed;
    for (let k = 0; k < 200; k++) {
      round(1 + (k % 32), inside, 4096, k);
      round(1 + (k % 32), across, 64 * KiB, k + 1000);
      // Synchronous completions too.
      for (const m of mems) m.defer = false;
      c.read(Object.assign(reqs[0]!, { offset: 2 * MiB, length: 512 }));
      c.write(Object.assign(reqs[1]!, { offset: MiB - 10, length: 20 }), true);
    }
    expect(completed - before).toBeGreaterThan(200 * 2);
    const after = ConcatBackend.poolStats();
    expect(after.parts).toBe(warm.parts);
    expect(after.joins).toBe(warm.joins);
  });
});

describe('growing and closing', () => {
  it('withExtent appends an extent; the old backend keeps working', async () => {
    const d = await device([MiB, MiB]);
    const data = pattern(2 * MiB, 70);
    await writeAt(d.concat, 0, data);
    const extra = await SparseFileBackend.open(tmpPath(), { size: 2 * MiB, rotational: true });
    const grown = track(d.concat.withExtent({ backend: extra, length: 2 * MiB }));
    expect(grown.size).toBe(4 * MiB);
    expect(grown.parts.length).toBe(3);
    expect(grown.caps.rotational).toBe(true);
    expect(d.concat.caps.rotational).toBe(false);
    expect((await readAt(grown, 0, 2 * MiB)).equals(data)).toBe(true);
    const more = pattern(MiB, 71);
    await writeAt(grown, 2 * MiB - MiB / 2, more);
    const old = await readAt(d.concat, 2 * MiB - MiB / 2, MiB / 2);
    expect(old.equals(more.subarray(0, MiB / 2))).toBe(true);
    expect((await readAt(grown, 2 * MiB - MiB / 2, MiB)).equals(more)).toBe(true);
  });

  it('closes children with the last backend that holds them', async () => {
    const a = new MemBackend(MiB);
    const b = new MemBackend(MiB);
    const c1 = new ConcatBackend([{ backend: a, length: MiB }]);
    const c2 = c1.withExtent({ backend: b, length: MiB });
    await c1.close();
    expect(a.closed).toBe(0);
    await c1.close(); // idempotent: does not drop c2's hold
    expect(a.closed).toBe(0);
    await c2.close();
    expect(a.closed).toBe(1);
    expect(b.closed).toBe(1);
    expect(() => c1.withExtent({ backend: b, length: MiB })).toThrow(
      expect.objectContaining({ code: 'BALLAST_EXTENT_INVALID' }),
    );
  });

  it('closes every file of a device, each once', async () => {
    const a = new MemBackend(MiB);
    const b = new MemBackend(MiB);
    const c = new ConcatBackend([
      { backend: a, length: MiB },
      { backend: b, length: MiB },
      { backend: a, length: MiB / 2 },
    ]);
    await c.close();
    expect(a.closed).toBe(1);
    expect(b.closed).toBe(1);
    // Real files: their locks are released, so they can be opened again.
    const d = await device();
    toClose.splice(toClose.indexOf(d.concat), 1);
    await d.concat.close();
    for (const p of d.paths) await (await SparseFileBackend.open(p, {})).close();
  });
});
