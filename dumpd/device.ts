// A dump device reached over NBD: the catalog (catalog.ts) read and written through
// the NBD client, dumps streamed in with bounded writes in flight, and read back.
//
// Order of writes for one dump (each step durable before the next):
//   1. catalog with the new `writing` entry (and dropped dumps removed)   FUA / flush
//   2. trims of the dropped dumps' regions outside the new reservation
//   3. dump data into the reserved region, a flush every 32 MiB         flush
//   4. catalog with the entry `complete` (length, CRC-32) or `failed`      FUA / flush
//   5. trims of the dropped regions inside the reservation past the data
//
// Dropped regions inside the reservation are not trimmed before the dump: it
// overwrites them (into allocated blocks and cached pages, which is cheaper for the
// server than after a hole punch), and step 5 trims what it did not overwrite. No
// catalog entry refers to those bytes after step 1; a dumpd that dies before step 5
// leaves the entry `writing`, and recovery trims its whole reservation.

import { type ChecksumAlg, checksummer, parseChecksum } from '../agent/checksum.js';
import { NbdClient, type NbdClientOptions } from '../nbd/client.js';
import {
  annotateDump,
  type Catalog,
  chooseCatalog,
  completeDump,
  type DumpEntry,
  DumpError,
  type DumpFormat,
  encodeSlot,
  failDump,
  planDump,
  recoverInterrupted,
  removeDump,
  SLOT_OFFSETS,
  SLOT_SIZE,
  slotFor,
  type Trim,
} from './catalog.js';

/** Dumps are read back in pieces of this size. */
const READ_SIZE = 4 * 1024 * 1024;
/**
 * Dump data is written in pieces of this size. The server keeps a request's
 * buffer for the next one only up to 2 MiB and 16 MiB per connection (nbd/server.ts,
 * RETAIN_*), and writes pieces up to 4 MiB into the page cache on its event loop:
 * 4 MiB pieces cost it a fresh buffer (page faults, garbage) and a thread-pool
 * write each, about three times the CPU of 1 MiB pieces.
 */
const PIECE_SIZE = 1024 * 1024;
/**
 * At most this many bytes are in flight (written and not acknowledged): below the
 * server's retained buffers, and the reader stops until it is.
 */
const MAX_OUTSTANDING = 12 * 1024 * 1024;
/**
 * A flush goes out after every this many bytes, not waited for by the data path: the
 * server writes the dump back while more arrives, so the last flush before the dump
 * is marked complete finds little left to write (with one flush at the end, it took
 * 170-220 ms of a 512 MiB dump here), and the agent's host never holds more than a
 * few of these in dirty pages for a dump of any size.
 */
const FLUSH_EVERY = 32 * 1024 * 1024;
/** What new dumps are checksummed with (agent/checksum.ts). */
const CHECKSUM: ChecksumAlg = 'crc32';

export class DumpDevice {
  catalog: Catalog;

  private constructor(
    readonly nbd: NbdClient,
    readonly uri: string,
    catalog: Catalog,
  ) {
    this.catalog = catalog;
  }

  static async open(uri: string, opts: NbdClientOptions = {}): Promise<DumpDevice> {
    const nbd = await NbdClient.connect(uri, opts);
    try {
      if (nbd.size < 2 * SLOT_SIZE)
        throw new DumpError('DUMP_DEVICE_TOO_SMALL', `the device has only ${nbd.size} bytes`);
      const cat = await DumpDevice.readCatalog(nbd);
      return new DumpDevice(nbd, uri, cat);
    } catch (e) {
      nbd.destroy();
      throw e;
    }
  }

  private static async readCatalog(nbd: NbdClient): Promise<Catalog> {
    const [a, b] = await Promise.all(SLOT_OFFSETS.map((o) => nbd.read(o, SLOT_SIZE)));
    return chooseCatalog(a as Buffer, b as Buffer);
  }

  get size(): number {
    return this.nbd.size;
  }

  async refresh(): Promise<Catalog> {
    this.catalog = await DumpDevice.readCatalog(this.nbd);
    return this.catalog;
  }

  /** Writes a catalog into the slot its generation belongs to, durably. */
  async commit(cat: Catalog): Promise<void> {
    if (this.nbd.readOnly)
      throw new DumpError('DUMP_READ_ONLY', `the dump device ${this.uri} is read-only`);
    const slot = SLOT_OFFSETS[slotFor(cat.generation)];
    const img = encodeSlot(cat);
    if (this.nbd.canFua) await this.nbd.write(slot, img, { fua: true });
    else {
      await this.nbd.write(slot, img);
      if (this.nbd.canFlush) await this.nbd.flush();
    }
    this.catalog = cat;
  }

  /** Gives freed regions back to the storage (sparse again); best effort. */
  async trim(trims: readonly Trim[]): Promise<void> {
    for (const t of trims) {
      if (t.length <= 0) continue;
      const len = Math.min(t.length, this.size - t.offset);
      if (len <= 0) continue;
      if (this.nbd.canTrim) await this.nbd.trim(t.offset, len);
      else if (this.nbd.canZero) await this.nbd.writeZeroes(t.offset, len);
    }
  }

  /**
   * Marks dumps left `writing` or `streaming` by a dead dumpd (of one guest, or all)
   * as failed and frees their space.
   */
  async recover(now = Date.now(), guest?: string): Promise<number> {
    const r = recoverInterrupted(this.catalog, now, guest);
    if (!r) return 0;
    await this.commit(r.catalog);
    await this.trim(r.trims);
    return r.trims.length;
  }

  async remove(id: number): Promise<DumpEntry> {
    const e = this.find(id);
    const r = removeDump(this.catalog, id);
    await this.commit(r.catalog);
    await this.trim([r.trim]);
    return e;
  }

  find(id: number): DumpEntry {
    const e = this.catalog.entries.find((x) => x.id === id);
    if (!e) throw new DumpError('DUMP_NOT_FOUND', `no dump ${id} on ${this.uri}`);
    return e;
  }

  /** Records when the guest ran again, or a note, in a dump's entry. */
  async annotate(id: number, r: { runningAt?: number; note?: string }): Promise<DumpEntry> {
    await this.commit(annotateDump(this.catalog, id, r));
    return this.find(id);
  }

  /** Reserves space for a new dump (dropping old ones per `keep`) and returns its writer. */
  async begin(o: {
    guest: string;
    format: DumpFormat;
    keep: number;
    now?: number;
    state?: 'writing' | 'streaming';
    panicAt?: number;
  }): Promise<DumpWriter> {
    const plan = planDump(this.catalog, this.size, { ...o, now: o.now ?? Date.now() });
    await this.commit(plan.catalog);
    const e = plan.entry;
    const inside = clip(plan.trims, e.offset, e.offset + e.capacity);
    await this.trim(clip(plan.trims, 0, e.offset));
    await this.trim(clip(plan.trims, e.offset + e.capacity, Number.MAX_SAFE_INTEGER));
    return new DumpWriter(this, e, inside);
  }

  /**
   * Streams a dump's bytes to `sink` in order, in pieces of up to 4 MiB, with a few
   * reads in flight. Returns the checksum of what was read ("<alg>:<hex>"), with the
   * algorithm of the entry's checksum (CRC-32 when it has none).
   */
  async read(
    e: DumpEntry,
    sink: (chunk: Buffer, pos: number) => Promise<void> | void,
    opts: { start?: number; end?: number } = {},
  ): Promise<string> {
    const hash = checksummer(parseChecksum(e.checksum)?.alg ?? CHECKSUM);
    const start = opts.start ?? 0;
    const end = Math.min(opts.end ?? e.length, e.length);
    const step = Math.min(READ_SIZE, this.nbd.maxBlock);
    const ahead: Promise<Buffer>[] = [];
    let next = start;
    const fill = () => {
      while (ahead.length < 4 && next < end) {
        const n = Math.min(step, end - next);
        ahead.push(this.nbd.read(e.offset + next, n));
        next += n;
      }
    };
    fill();
    let pos = start;
    while (ahead.length) {
      const p = ahead.shift() as Promise<Buffer>;
      const chunk = await p;
      fill();
      hash.update(chunk);
      await sink(chunk, pos);
      pos += chunk.length;
    }
    return hash.digest();
  }

  /**
   * A dump's bytes in order, in pieces of up to 4 MiB with a few reads in flight, for
   * readers that pull (the migration stream parser). `checksum()` is valid once the
   * iteration has ended: compare it with the entry's.
   */
  pieces(e: DumpEntry): { chunks: AsyncGenerator<Buffer>; checksum: () => string } {
    const hash = checksummer(parseChecksum(e.checksum)?.alg ?? CHECKSUM);
    const step = Math.min(READ_SIZE, this.nbd.maxBlock);
    const nbd = this.nbd;
    async function* gen(): AsyncGenerator<Buffer> {
      const ahead: Promise<Buffer>[] = [];
      let next = 0;
      const fill = () => {
        while (ahead.length < 4 && next < e.length) {
          const n = Math.min(step, e.length - next);
          const p = nbd.read(e.offset + next, n);
          p.catch(() => {});
          ahead.push(p);
          next += n;
        }
      };
      fill();
      while (ahead.length) {
        const chunk = await (ahead.shift() as Promise<Buffer>);
        fill();
        hash.update(chunk);
        yield chunk;
      }
    }
    return { chunks: gen(), checksum: () => hash.digest() };
  }

  async close(): Promise<void> {
    await this.nbd.close();
  }
}

/**
 * Appends one dump's data into its reservation. The data is read straight into the
 * writer's buffers (window() / filled()); each full piece is checksummed and written
 * over NBD from the same buffer, which is reused once the write is acknowledged. A
 * write past the reservation fails with DUMP_NO_SPACE; any failure makes later calls
 * throw it.
 */
export class DumpWriter {
  /** Bytes accepted so far. */
  length = 0;
  private readonly sum = checksummer(CHECKSUM);
  private readonly pieceSize: number;
  /** Pieces free for reuse. */
  private readonly free: Buffer[] = [];
  /** The piece being filled, and how much of it is. */
  private cur: Buffer | null = null;
  private fill = 0;
  private written = 0;
  /** Bytes of pieces handed out and not yet acknowledged. */
  private outstanding = 0;
  private readonly inflight = new Set<Promise<void>>();
  private waiters: (() => void)[] = [];
  private failure: Error | null = null;
  private settled = false;
  /** Bytes written since the last flush was sent, and that flush while it runs. */
  private unflushed = 0;
  private flushing: Promise<void> | null = null;

  /**
   * @param overwrite dropped regions inside the reservation, not trimmed yet: what of
   *   them the dump does not overwrite is trimmed once it is settled.
   */
  constructor(
    private readonly dev: DumpDevice,
    readonly entry: DumpEntry,
    private readonly overwrite: readonly Trim[] = [],
  ) {
    this.pieceSize = Math.max(1, Math.min(PIECE_SIZE, dev.nbd.maxBlock));
  }

  get error(): Error | null {
    return this.failure;
  }

  /**
   * Where the next bytes go: the unfilled rest of the current piece (never empty).
   * Only the first `n` bytes, reported by filled(n), are taken.
   */
  window(): Buffer {
    if (!this.cur) {
      this.cur = this.free.pop() ?? Buffer.allocUnsafeSlow(this.pieceSize);
      this.fill = 0;
    }
    return this.cur.subarray(this.fill);
  }

  /**
   * `n` bytes were placed at the start of the last window(). Returns true when more
   * may follow at once, false when the caller should await ready() first (too much in
   * flight). Throws when the dump cannot continue (DUMP_NO_SPACE, or the first write
   * error).
   */
  filled(n: number): boolean {
    if (this.failure) throw this.failure;
    const cur = this.cur;
    if (!cur || n > cur.length - this.fill)
      throw new DumpError('DUMP_STATE', `filled(${n}) past the window`);
    if (this.length + n > this.entry.capacity) {
      this.failure = new DumpError(
        'DUMP_NO_SPACE',
        `the dump does not fit on the device: more than ${this.entry.capacity} bytes (free space at offset ${this.entry.offset})`,
      );
      throw this.failure;
    }
    this.length += n;
    this.fill += n;
    if (this.fill === cur.length) this.issue();
    return this.outstanding <= MAX_OUTSTANDING;
  }

  /** Copies `data` in (a header: small); returns as filled() does. */
  append(data: Buffer): boolean {
    let more = true;
    for (let off = 0; off < data.length; ) {
      const w = this.window();
      const n = Math.min(w.length, data.length - off);
      data.copy(w, 0, off, off + n);
      more = this.filled(n);
      off += n;
    }
    return more;
  }

  /** Resolves once more may be read (rejects with the failure, if any). */
  ready(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.outstanding <= MAX_OUTSTANDING) return Promise.resolve();
    return new Promise<void>((resolve) => this.waiters.push(resolve)).then(() => {
      if (this.failure) throw this.failure;
    });
  }

  private wake(): void {
    if (this.outstanding > MAX_OUTSTANDING && !this.failure) return;
    const w = this.waiters;
    this.waiters = [];
    for (const f of w) f();
  }

  /** Checksums and writes the filled part of the current piece. */
  private issue(): void {
    const piece = this.cur;
    const n = this.fill;
    if (!piece || n === 0) return;
    this.cur = null;
    this.fill = 0;
    const data = piece.subarray(0, n);
    const at = this.entry.offset + this.written;
    this.written += n;
    this.outstanding += n;
    // In order, on this thread: about 0.25 ms per MiB, less than handing it to a worker.
    this.sum.update(data);
    const p: Promise<void> = this.dev.nbd.write(at, data).then(
      () => this.settle(p, piece, n),
      (e: Error) => {
        this.failure ??= e;
        this.settle(p, piece, n);
      },
    );
    this.inflight.add(p);
    this.unflushed += n;
    if (this.unflushed >= FLUSH_EVERY && !this.flushing && this.dev.nbd.canFlush) {
      this.unflushed = 0;
      // Covers the writes acknowledged before it; finish() sends the last one.
      const f: Promise<void> = this.dev.nbd.flush().then(
        () => this.settle(f),
        (e: Error) => {
          this.failure ??= e;
          this.settle(f);
        },
      );
      this.flushing = f;
      this.inflight.add(f);
    }
  }

  /** A write (with its piece, now free) or a flush is done. */
  private settle(p: Promise<void>, piece?: Buffer, n = 0): void {
    this.inflight.delete(p);
    if (p === this.flushing) this.flushing = null;
    if (piece) {
      this.outstanding -= n;
      this.free.push(piece);
      this.wake();
    }
  }

  /** Writes what is buffered and waits for every write. */
  private async drain(): Promise<void> {
    this.issue();
    while (this.inflight.size) await Promise.all(this.inflight);
    if (this.failure) throw this.failure;
    if (this.dev.nbd.canFlush) await this.dev.nbd.flush();
  }

  /** Makes the data durable and marks the dump complete (with a note, if any). */
  async finish(now = Date.now(), note?: string): Promise<DumpEntry> {
    if (this.settled) throw new DumpError('DUMP_STATE', 'the dump is already settled');
    await this.drain();
    await this.dev.commit(
      completeDump(this.dev.catalog, this.entry.id, {
        length: this.length,
        checksum: this.sum.digest(),
        now,
        ...(note !== undefined ? { note } : {}),
      }),
    );
    this.settled = true;
    await this.trimPast(this.length);
    return this.dev.find(this.entry.id);
  }

  /** Trims the dropped regions under the reservation past the first `n` bytes; best effort. */
  private async trimPast(n: number): Promise<void> {
    const from = this.entry.offset + n;
    await this.dev.trim(clip(this.overwrite, from, Number.MAX_SAFE_INTEGER)).catch(() => {});
  }

  /** Marks the dump failed (with what made it to the device); never throws for I/O. */
  async fail(reason: string, now = Date.now()): Promise<DumpEntry | null> {
    if (this.settled) return null;
    this.settled = true;
    this.failure ??= new DumpError('DUMP_FAILED', reason);
    this.wake();
    try {
      this.issue();
      while (this.inflight.size) await Promise.all(this.inflight);
    } catch {}
    try {
      await this.dev.commit(
        failDump(this.dev.catalog, this.entry.id, { length: this.written, reason, now }),
      );
      await this.trimPast(this.written);
      return this.dev.find(this.entry.id);
    } catch {
      // The device is gone: the entry stays `writing` and is recovered as interrupted.
      return null;
    }
  }
}

/** The parts of `trims` within [from, to). */
function clip(trims: readonly Trim[], from: number, to: number): Trim[] {
  const out: Trim[] = [];
  for (const t of trims) {
    const a = Math.max(t.offset, from);
    const b = Math.min(t.offset + t.length, to);
    if (b > a) out.push({ offset: a, length: b - a });
  }
  return out;
}
