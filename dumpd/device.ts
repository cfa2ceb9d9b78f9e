// A dump device reached over NBD: the catalog (catalog.ts) read and written through
// the NBD client, dumps streamed in with bounded writes in flight, and read back.
//
// Order of writes for one dump (each step durable before the next):
//   1. catalog with the new `writing` entry (and dropped dumps removed)   FUA / flush
//   2. trims of the dropped dumps' regions
//   3. dump data into the reserved region                                  flush
//   4. catalog with the entry `complete` (length, SHA-256) or `failed`     FUA / flush

import { createHash } from 'node:crypto';
import { NbdClient, type NbdClientOptions } from '../nbd/client.js';
import {
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
import { Hasher } from './hasher.js';

/** Dump data is written in pieces of this size... */
const WRITE_SIZE = 4 * 1024 * 1024;
/** ...with at most this many bytes in flight (and at most this many waiting to be hashed). */
const MAX_OUTSTANDING = 32 * 1024 * 1024;

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

  /** Marks dumps left `writing` by a dead dumpd as failed and frees their space. */
  async recover(now = Date.now()): Promise<number> {
    const r = recoverInterrupted(this.catalog, now);
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

  /** Reserves space for a new dump (dropping old ones per `keep`) and returns its writer. */
  async begin(o: {
    guest: string;
    format: DumpFormat;
    keep: number;
    now?: number;
  }): Promise<DumpWriter> {
    const plan = planDump(this.catalog, this.size, { ...o, now: o.now ?? Date.now() });
    await this.commit(plan.catalog);
    await this.trim(plan.trims);
    return new DumpWriter(this, plan.entry);
  }

  /**
   * Streams a dump's bytes to `sink` in order, in pieces of up to 4 MiB, with a few
   * reads in flight. Returns the SHA-256 of what was read.
   */
  async read(
    e: DumpEntry,
    sink: (chunk: Buffer, pos: number) => Promise<void> | void,
    opts: { start?: number; end?: number } = {},
  ): Promise<string> {
    const hash = createHash('sha256');
    const start = opts.start ?? 0;
    const end = Math.min(opts.end ?? e.length, e.length);
    const step = Math.min(WRITE_SIZE, this.nbd.maxBlock);
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
    return hash.digest('hex');
  }

  async close(): Promise<void> {
    await this.nbd.close();
  }
}

/**
 * Appends one dump's data into its reservation. `append` may be called with chunks of
 * any size; it returns a promise to await for backpressure. A write past the
 * reservation fails with DUMP_NO_SPACE; any failure makes later calls throw it.
 */
export class DumpWriter {
  /** Bytes accepted so far. */
  length = 0;
  private readonly hash = new Hasher();
  private pending: Buffer[] = [];
  private pendingBytes = 0;
  private written = 0;
  private outstanding = 0;
  private readonly inflight = new Set<Promise<void>>();
  private failure: Error | null = null;
  private settled = false;

  constructor(
    private readonly dev: DumpDevice,
    readonly entry: DumpEntry,
  ) {}

  get error(): Error | null {
    return this.failure;
  }

  /**
   * Takes the next chunk. Returns undefined when more may follow at once, or a promise
   * to await first (writes in flight are over the cap). Throws when the dump cannot
   * continue (DUMP_NO_SPACE, or the first write error).
   */
  append(chunk: Buffer): Promise<void> | undefined {
    if (this.failure) throw this.failure;
    if (this.length + chunk.length > this.entry.capacity) {
      this.failure = new DumpError(
        'DUMP_NO_SPACE',
        `the dump does not fit on the device: more than ${this.entry.capacity} bytes (free space at offset ${this.entry.offset})`,
      );
      throw this.failure;
    }
    this.length += chunk.length;
    this.pending.push(chunk);
    this.pendingBytes += chunk.length;
    if (this.pendingBytes >= WRITE_SIZE) this.issue();
    if (this.outstanding <= MAX_OUTSTANDING && this.hash.backlog <= MAX_OUTSTANDING)
      return undefined;
    return this.backpressure();
  }

  private async backpressure(): Promise<void> {
    while (this.outstanding > MAX_OUTSTANDING && !this.failure) await Promise.race(this.inflight);
    await this.hash.below(MAX_OUTSTANDING);
    if (this.failure) throw this.failure;
  }

  private issue(): void {
    if (this.pendingBytes === 0) return;
    const data =
      this.pending.length === 1 ? (this.pending[0] as Buffer) : Buffer.concat(this.pending);
    this.pending = [];
    this.pendingBytes = 0;
    // Hash whole pieces in order: fewer calls than per pipe read.
    this.hash.update(data);
    const at = this.entry.offset + this.written;
    this.written += data.length;
    this.outstanding += data.length;
    const p: Promise<void> = this.dev.nbd.write(at, data).then(
      () => {
        this.outstanding -= data.length;
        this.inflight.delete(p);
      },
      (e: Error) => {
        this.outstanding -= data.length;
        this.inflight.delete(p);
        this.failure ??= e;
      },
    );
    this.inflight.add(p);
  }

  /** Writes what is buffered and waits for every write. */
  private async drain(): Promise<void> {
    this.issue();
    while (this.inflight.size) await Promise.all(this.inflight);
    if (this.failure) throw this.failure;
    if (this.dev.nbd.canFlush) await this.dev.nbd.flush();
  }

  /** Makes the data durable and marks the dump complete. */
  async finish(now = Date.now()): Promise<DumpEntry> {
    if (this.settled) throw new DumpError('DUMP_STATE', 'the dump is already settled');
    await this.drain();
    const sha256 = await this.hash.digest();
    await this.dev.commit(
      completeDump(this.dev.catalog, this.entry.id, { length: this.length, sha256, now }),
    );
    this.settled = true;
    return this.dev.find(this.entry.id);
  }

  /** Marks the dump failed (with what made it to the device); never throws for I/O. */
  async fail(reason: string, now = Date.now()): Promise<DumpEntry | null> {
    if (this.settled) return null;
    this.settled = true;
    this.hash.close();
    try {
      this.issue();
      while (this.inflight.size) await Promise.all(this.inflight);
    } catch {}
    try {
      await this.dev.commit(
        failDump(this.dev.catalog, this.entry.id, { length: this.written, reason, now }),
      );
      return this.dev.find(this.entry.id);
    } catch {
      // The device is gone: the entry stays `writing` and is recovered as interrupted.
      return null;
    }
  }
}
