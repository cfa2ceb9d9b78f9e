// The layout of a dump device, as pure code (no I/O):
//
//   0        64 KiB    128 KiB          1 MiB                                  end
//   | slot A | slot B  | (unused)       | dump | dump | ... free ...  | dump |
//
// The catalog lives in two slots. Every update is written, whole, into the slot that
// does not hold the newest catalog, with a higher generation and a CRC-32; a reader
// takes the valid slot with the highest generation. So a crash while writing the
// catalog leaves the previous one intact, and a crash while writing a dump leaves an
// entry in state `writing` whose region no other entry overlaps: earlier dumps are
// never touched. Dumps start on 1 MiB boundaries; a new dump takes the largest free
// gap, and its entry reserves that gap (`capacity`) before any data is written.
//
// Slot (64 KiB): header (64 bytes) then up to 255 entries of 256 bytes.
//   header: magic "BALDUMP1"(8) version u32 headerSize u32 generation u64 count u32
//           entrySize u32 nextId u32 crc32 u32 (over the slot with this field zero)
//   entry:  id u32, state u8, format u8, checksum algorithm u8, pad u8, createdAt u64
//           (ms), finishedAt u64, offset u64, capacity u64, length u64, checksum [32]
//           (the digest from its first byte), guest [64], reason [96], panic i32,
//           running i32 (ms relative to createdAt; 0x80000000 = none), 8 spare bytes
//
// Version 2 added the checksum algorithm (0 none, 1 SHA-256, 2 CRC-32: agent/checksum.ts);
// version 1 had a zero there and always a SHA-256, and is still read.
// Version 3 added the state `streaming` (an early-reboot dump: the guest runs again
// while its snapshot streams in), the format `migration` (that snapshot, stored as
// QEMU's migration stream: snapshot.ts) and the panic and running-again times.
// Earlier versions read as having no times.

import { CHECKSUM_ALGS, CHECKSUM_BYTES, crc32, parseChecksum } from '../agent/checksum.js';

export const MAGIC = Buffer.from('BALDUMP1', 'latin1');
export const VERSION = 3;
/** The oldest layout still read. */
export const MIN_VERSION = 1;
export const SLOT_SIZE = 64 * 1024;
export const SLOT_OFFSETS = [0, SLOT_SIZE] as const;
export const HEADER_SIZE = 64;
export const ENTRY_SIZE = 256;
export const MAX_ENTRIES = Math.floor((SLOT_SIZE - HEADER_SIZE) / ENTRY_SIZE);
export const ALIGN = 1024 * 1024;
/** Where the first dump may start. */
export const DATA_START = ALIGN;
export const GUEST_MAX = 64;
export const REASON_MAX = 96;

export type DumpState = 'writing' | 'complete' | 'failed' | 'streaming';
const STATES: DumpState[] = ['writing', 'complete', 'failed', 'streaming'];

/** Whether a dump is still being written (its whole reservation is held). */
export const inProgress = (e: DumpEntry) => e.state === 'writing' || e.state === 'streaming';

/** What `query-dump-guest-memory-capability` may offer. */
export const FORMATS = [
  'elf',
  'kdump-zlib',
  'kdump-lzo',
  'kdump-snappy',
  'win-dmp',
  'kdump-raw-zlib',
  'kdump-raw-lzo',
  'kdump-raw-snappy',
  // A background snapshot as QEMU's migration stream (early reboot); not a QEMU dump format.
  'migration',
] as const;
export type DumpFormat = (typeof FORMATS)[number];

export interface DumpEntry {
  id: number;
  state: DumpState;
  format: DumpFormat;
  guest: string;
  createdAt: number;
  /** 0 while writing. */
  finishedAt: number;
  offset: number;
  /** Bytes reserved for this dump from `offset`. */
  capacity: number;
  /** Bytes of dump data (final for complete and failed dumps). */
  length: number;
  /** "<alg>:<hex>" of the `length` bytes (agent/checksum.ts); '' unless complete. */
  checksum: string;
  /**
   * Why a dump failed; for a complete one, a note (why an early-reboot dump fell back to
   * dump-then-reboot); '' otherwise.
   */
  reason: string;
  /** When the guest panicked (or the dump was asked for), ms; 0 when unknown. */
  panicAt: number;
  /** When the guest ran again after it, ms; 0 when it has not (yet). */
  runningAt: number;
}

const NO_TIME = -0x80000000;
const relTime = (t: number, base: number) =>
  t > 0 ? Math.max(NO_TIME + 1, Math.min(0x7fffffff, t - base)) : NO_TIME;

export interface Catalog {
  generation: number;
  nextId: number;
  entries: DumpEntry[];
}

export class DumpError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DumpError';
    this.code = code;
  }
}

export function emptyCatalog(): Catalog {
  return { generation: 0, nextId: 1, entries: [] };
}

export const alignUp = (n: number) => Math.ceil(n / ALIGN) * ALIGN;

/** Truncates to at most `max` UTF-8 bytes without splitting a character. */
function utf8Fit(s: string, max: number): Buffer {
  let b = Buffer.from(s, 'utf8');
  if (b.length <= max) return b;
  b = b.subarray(0, max);
  while (b.length && !Buffer.from(b.toString('utf8'), 'utf8').equals(b)) b = b.subarray(0, -1);
  return b;
}

function readString(b: Buffer, start: number, max: number): string {
  const end = b.indexOf(0, start);
  return b.toString('utf8', start, end < 0 || end > start + max ? start + max : end);
}

export function validGuestName(g: string): boolean {
  return g.length > 0 && Buffer.byteLength(g, 'utf8') <= GUEST_MAX && !g.includes('\0');
}

export function encodeSlot(cat: Catalog): Buffer {
  if (cat.entries.length > MAX_ENTRIES)
    throw new DumpError('DUMP_CATALOG_FULL', `more than ${MAX_ENTRIES} dumps in one catalog`);
  const b = Buffer.alloc(SLOT_SIZE);
  MAGIC.copy(b, 0);
  b.writeUInt32LE(VERSION, 8);
  b.writeUInt32LE(HEADER_SIZE, 12);
  b.writeBigUInt64LE(BigInt(cat.generation), 16);
  b.writeUInt32LE(cat.entries.length, 24);
  b.writeUInt32LE(ENTRY_SIZE, 28);
  b.writeUInt32LE(cat.nextId, 32);
  cat.entries.forEach((e, i) => {
    const p = HEADER_SIZE + i * ENTRY_SIZE;
    b.writeUInt32LE(e.id, p);
    b.writeUInt8(STATES.indexOf(e.state), p + 4);
    b.writeUInt8(FORMATS.indexOf(e.format), p + 5);
    b.writeBigUInt64LE(BigInt(e.createdAt), p + 8);
    b.writeBigUInt64LE(BigInt(e.finishedAt), p + 16);
    b.writeBigUInt64LE(BigInt(e.offset), p + 24);
    b.writeBigUInt64LE(BigInt(e.capacity), p + 32);
    b.writeBigUInt64LE(BigInt(e.length), p + 40);
    const sum = parseChecksum(e.checksum);
    if (sum) {
      b.writeUInt8(CHECKSUM_ALGS.indexOf(sum.alg) + 1, p + 6);
      Buffer.from(sum.hex, 'hex').copy(b, p + 48);
    }
    utf8Fit(e.guest, GUEST_MAX).copy(b, p + 80);
    utf8Fit(e.reason, REASON_MAX).copy(b, p + 144);
    b.writeInt32LE(relTime(e.panicAt, e.createdAt), p + 240);
    b.writeInt32LE(relTime(e.runningAt, e.createdAt), p + 244);
  });
  b.writeUInt32LE(crc32(b), 36);
  return b;
}

/**
 * Decodes one slot. Returns null when it holds no catalog (no magic, torn or
 * corrupt: the CRC does not match); throws DUMP_BAD_VERSION for a newer layout.
 */
export function decodeSlot(b: Buffer): Catalog | null {
  if (b.length < SLOT_SIZE || !b.subarray(0, 8).equals(MAGIC)) return null;
  const crc = b.readUInt32LE(36);
  const copy = Buffer.from(b.subarray(0, SLOT_SIZE));
  copy.writeUInt32LE(0, 36);
  if (crc32(copy) !== crc) return null;
  const version = b.readUInt32LE(8);
  if (version < MIN_VERSION || version > VERSION)
    throw new DumpError(
      'DUMP_BAD_VERSION',
      `dump catalog version ${version}: this ballast reads versions ${MIN_VERSION} to ${VERSION}`,
    );
  const count = b.readUInt32LE(24);
  if (
    b.readUInt32LE(12) !== HEADER_SIZE ||
    b.readUInt32LE(28) !== ENTRY_SIZE ||
    count > MAX_ENTRIES
  )
    return null;
  const entries: DumpEntry[] = [];
  for (let i = 0; i < count; i++) {
    const p = HEADER_SIZE + i * ENTRY_SIZE;
    const state = STATES[b.readUInt8(p + 4)];
    const format = FORMATS[b.readUInt8(p + 5)];
    if (!state || !format) return null;
    const algByte = b.readUInt8(p + 6);
    // Version 1: no algorithm byte, a SHA-256 or zeroes.
    const alg =
      version === 1
        ? b.subarray(p + 48, p + 80).some((x) => x !== 0)
          ? 'sha256'
          : undefined
        : algByte === 0
          ? undefined
          : CHECKSUM_ALGS[algByte - 1];
    if (version > 1 && algByte !== 0 && !alg) return null;
    const checksum = alg ? `${alg}:${b.toString('hex', p + 48, p + 48 + CHECKSUM_BYTES[alg])}` : '';
    const createdAt = Number(b.readBigUInt64LE(p + 8));
    const time = (at: number) => {
      const d = version >= 3 ? b.readInt32LE(at) : NO_TIME;
      return d === NO_TIME ? 0 : createdAt + d;
    };
    entries.push({
      id: b.readUInt32LE(p),
      state,
      format,
      createdAt,
      finishedAt: Number(b.readBigUInt64LE(p + 16)),
      offset: Number(b.readBigUInt64LE(p + 24)),
      capacity: Number(b.readBigUInt64LE(p + 32)),
      length: Number(b.readBigUInt64LE(p + 40)),
      checksum,
      guest: readString(b, p + 80, GUEST_MAX),
      reason: readString(b, p + 144, REASON_MAX),
      panicAt: time(p + 240),
      runningAt: time(p + 244),
    });
  }
  return { generation: Number(b.readBigUInt64LE(16)), nextId: b.readUInt32LE(32), entries };
}

/**
 * The current catalog from both slots: the valid one with the highest generation. Two
 * all-zero slots are a fresh device (an empty catalog, generation 0). Anything else
 * without a valid slot is not ours: DUMP_NOT_A_DUMP_DEVICE.
 */
export function chooseCatalog(a: Buffer, b: Buffer): Catalog {
  const ca = decodeSlot(a);
  const cb = decodeSlot(b);
  if (ca && cb) return ca.generation >= cb.generation ? ca : cb;
  const one = ca ?? cb;
  if (one) return one;
  const zero = (x: Buffer) => x.every((v) => v === 0);
  if (zero(a) && zero(b)) return emptyCatalog();
  throw new DumpError(
    'DUMP_NOT_A_DUMP_DEVICE',
    'the device holds data but no valid dump catalog (not a dump device, or both catalog copies are damaged)',
  );
}

/** Which slot the next catalog (generation + 1) goes to: never the current one's. */
export function slotFor(generation: number): 0 | 1 {
  return (generation % 2) as 0 | 1;
}

/** Bytes an entry holds on the device. Writing entries hold their whole reservation. */
export function footprint(e: DumpEntry): number {
  return inProgress(e) ? e.capacity : Math.min(e.capacity, alignUp(e.length));
}

/** Free gaps (aligned) between DATA_START and the device's end, in offset order. */
export function freeGaps(cat: Catalog, deviceSize: number): { offset: number; length: number }[] {
  const end = Math.floor(deviceSize / ALIGN) * ALIGN;
  const used = cat.entries
    .map((e) => ({ offset: e.offset, end: e.offset + alignUp(footprint(e)) }))
    .sort((x, y) => x.offset - y.offset);
  const gaps: { offset: number; length: number }[] = [];
  let pos = DATA_START;
  for (const u of used) {
    if (u.offset > pos) gaps.push({ offset: pos, length: Math.min(u.offset, end) - pos });
    pos = Math.max(pos, u.end);
  }
  if (end > pos) gaps.push({ offset: pos, length: end - pos });
  return gaps.filter((g) => g.length > 0);
}

function next(cat: Catalog, entries: DumpEntry[], nextId = cat.nextId): Catalog {
  return { generation: cat.generation + 1, nextId, entries };
}

/** Region of the device a dropped entry held, to trim. */
export interface Trim {
  offset: number;
  length: number;
}

const trimOf = (e: DumpEntry): Trim => ({ offset: e.offset, length: footprint(e) });

export interface PlanOptions {
  guest: string;
  format: DumpFormat;
  now: number;
  /** Dumps to keep on the device, counting the new one (at least 1). */
  keep: number;
  /** `streaming` for an early-reboot dump (default `writing`). */
  state?: 'writing' | 'streaming';
  panicAt?: number;
}

export interface Plan {
  catalog: Catalog;
  entry: DumpEntry;
  /**
   * Regions of dropped dumps: trim them after the catalog is written, before the dump
   * (parts the new dump overwrites may wait until it is settled: device.ts).
   */
  trims: Trim[];
}

/**
 * Starts a dump: drops dumps over the retention (failed and interrupted ones first,
 * then the oldest complete ones), then reserves the largest free gap for the new one.
 */
export function planDump(cat: Catalog, deviceSize: number, o: PlanOptions): Plan {
  if (!validGuestName(o.guest))
    throw new DumpError('DUMP_BAD_GUEST', `guest name must be 1-${GUEST_MAX} bytes without NUL`);
  if (!FORMATS.includes(o.format))
    throw new DumpError('DUMP_BAD_FORMAT', `unknown dump format ${o.format}`);
  const keep = Math.max(1, Math.floor(o.keep));
  const byAge = (x: DumpEntry, y: DumpEntry) => x.createdAt - y.createdAt || x.id - y.id;
  const bad = cat.entries.filter((e) => e.state !== 'complete').sort(byAge);
  const good = cat.entries.filter((e) => e.state === 'complete').sort(byAge);
  const dropped: DumpEntry[] = [];
  while (bad.length + good.length > keep - 1) {
    const victim = bad.shift() ?? good.shift();
    if (victim) dropped.push(victim);
  }
  const kept = cat.entries.filter((e) => !dropped.includes(e));
  if (kept.length + 1 > MAX_ENTRIES)
    throw new DumpError('DUMP_CATALOG_FULL', `the catalog holds at most ${MAX_ENTRIES} dumps`);
  const gaps = freeGaps({ ...cat, entries: kept }, deviceSize);
  const best = gaps.reduce<{ offset: number; length: number } | null>(
    (m, g) => (m === null || g.length > m.length ? g : m),
    null,
  );
  if (!best)
    throw new DumpError(
      'DUMP_NO_SPACE',
      `no free space on the ${deviceSize}-byte dump device (it must exceed ${DATA_START + ALIGN} bytes)`,
    );
  const entry: DumpEntry = {
    id: cat.nextId,
    state: o.state ?? 'writing',
    format: o.format,
    guest: o.guest,
    createdAt: o.now,
    finishedAt: 0,
    offset: best.offset,
    capacity: best.length,
    length: 0,
    checksum: '',
    reason: '',
    panicAt: o.panicAt ?? 0,
    runningAt: 0,
  };
  const nextId = cat.nextId >= 0xffffffff ? 1 : cat.nextId + 1;
  return {
    catalog: next(cat, [...kept, entry], nextId),
    entry,
    trims: dropped.map(trimOf),
  };
}

function update(cat: Catalog, id: number, f: (e: DumpEntry) => DumpEntry): Catalog {
  const e = cat.entries.find((x) => x.id === id);
  if (!e) throw new DumpError('DUMP_NOT_FOUND', `no dump ${id} on the device`);
  return next(
    cat,
    cat.entries.map((x) => (x.id === id ? f(x) : x)),
  );
}

/** Marks a dump complete; its reservation shrinks to its data (the rest is free). */
export function completeDump(
  cat: Catalog,
  id: number,
  r: { length: number; checksum: string; now: number; note?: string },
): Catalog {
  return update(cat, id, (e) => {
    if (!inProgress(e)) throw new DumpError('DUMP_STATE', `dump ${id} is ${e.state}, not writing`);
    if (r.length > e.capacity)
      throw new DumpError('DUMP_NO_SPACE', `dump ${id} is larger than its reservation`);
    if (!parseChecksum(r.checksum))
      throw new DumpError(
        'DUMP_STATE',
        `dump ${id}: not a checksum: ${JSON.stringify(r.checksum)}`,
      );
    return {
      ...e,
      state: 'complete',
      length: r.length,
      checksum: r.checksum,
      finishedAt: r.now,
      capacity: alignUp(r.length),
      reason: r.note ?? e.reason,
    };
  });
}

/** Records when the guest ran again, or a note on how the dump was taken. */
export function annotateDump(
  cat: Catalog,
  id: number,
  r: { runningAt?: number; note?: string },
): Catalog {
  return update(cat, id, (e) => ({
    ...e,
    ...(r.runningAt !== undefined ? { runningAt: r.runningAt } : {}),
    ...(r.note !== undefined ? { reason: r.note } : {}),
  }));
}

/** Marks a dump failed, keeping what was written (up to `length`) for inspection. */
export function failDump(
  cat: Catalog,
  id: number,
  r: { length: number; reason: string; now: number },
): Catalog {
  return update(cat, id, (e) => ({
    ...e,
    state: 'failed',
    length: Math.min(r.length, e.capacity),
    checksum: '',
    reason: r.reason,
    finishedAt: r.now,
    capacity: Math.min(e.capacity, alignUp(r.length)),
  }));
}

/** Drops one dump; trim the returned region after the catalog is written. */
export function removeDump(cat: Catalog, id: number): { catalog: Catalog; trim: Trim } {
  const e = cat.entries.find((x) => x.id === id);
  if (!e) throw new DumpError('DUMP_NOT_FOUND', `no dump ${id} on the device`);
  return {
    catalog: next(
      cat,
      cat.entries.filter((x) => x.id !== id),
    ),
    trim: trimOf(e),
  };
}

/**
 * Dumps left `writing` or `streaming` by a dumpd that died (of one guest, or all):
 * they are failed ('interrupted') and their reservations freed (trim them). Returns
 * null when there is nothing to recover.
 */
export function recoverInterrupted(
  cat: Catalog,
  now: number,
  guest?: string,
): { catalog: Catalog; trims: Trim[] } | null {
  const stale = cat.entries.filter(
    (e) => inProgress(e) && (guest === undefined || e.guest === guest),
  );
  if (!stale.length) return null;
  const catalog = next(
    cat,
    cat.entries.map((e) =>
      stale.includes(e)
        ? {
            ...e,
            state: 'failed' as const,
            reason: 'interrupted',
            finishedAt: now,
            length: 0,
            capacity: 0,
          }
        : e,
    ),
  );
  return { catalog, trims: stale.map((e) => ({ offset: e.offset, length: e.capacity })) };
}
