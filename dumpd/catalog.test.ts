import { describe, expect, it } from 'vitest';
import { checksummer, crc32, crc32js, parseChecksum } from '../agent/checksum.js';
import {
  ALIGN,
  annotateDump,
  type Catalog,
  chooseCatalog,
  completeDump,
  DATA_START,
  decodeSlot,
  emptyCatalog,
  encodeSlot,
  failDump,
  freeGaps,
  MAX_ENTRIES,
  planDump,
  recoverInterrupted,
  removeDump,
  SLOT_SIZE,
  slotFor,
  VERSION,
} from './catalog.js';

const MiB = 1024 * 1024;
const SUM = 'crc32:0badcafe';

/** A device simulated as its two slots, written the way dumpd writes them. */
class Device {
  slots = [Buffer.alloc(SLOT_SIZE), Buffer.alloc(SLOT_SIZE)];
  read(): Catalog {
    return chooseCatalog(this.slots[0] as Buffer, this.slots[1] as Buffer);
  }
  commit(c: Catalog, tornAt?: number): void {
    const img = encodeSlot(c);
    const slot = this.slots[slotFor(c.generation)] as Buffer;
    if (tornAt === undefined) img.copy(slot);
    else img.copy(slot, 0, 0, tornAt);
  }
}

function dumpOnce(d: Device, size: number, guest: string, len: number, now: number, keep = 3) {
  const p = planDump(d.read(), size, { guest, format: 'elf', now, keep });
  d.commit(p.catalog);
  const done = completeDump(p.catalog, p.entry.id, { length: len, checksum: SUM, now: now + 1 });
  d.commit(done);
  return { plan: p, catalog: done };
}

describe('checksums', () => {
  it('CRC-32 matches the standard check value, in zlib and in JavaScript', () => {
    expect(crc32(Buffer.from('123456789'))).toBe(0xcbf43926);
    expect(crc32js(Buffer.from('123456789'))).toBe(0xcbf43926);
    const b = Buffer.from('a longer buffer, fed in two pieces');
    expect(crc32(b.subarray(9), crc32(b.subarray(0, 9)))).toBe(crc32js(b));
  });

  it('checksummers name their algorithm, and parseChecksum takes only what they make', () => {
    const c = checksummer('crc32');
    c.update(Buffer.from('1234'));
    c.update(Buffer.from('56789'));
    expect(c.digest()).toBe('crc32:cbf43926');
    const s = checksummer('sha256');
    s.update(Buffer.from('abc'));
    expect(s.digest()).toBe(
      'sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad',
    );
    expect(parseChecksum('crc32:cbf43926')).toEqual({ alg: 'crc32', hex: 'cbf43926' });
    for (const bad of ['', 'crc32:cbf4392', 'md5:cbf43926', 'sha256:cbf43926', 'CRC32:cbf43926'])
      expect(parseChecksum(bad)).toBeNull();
  });
});

describe('slots', () => {
  it('round-trip every field', () => {
    const c = emptyCatalog();
    const p = planDump(c, 64 * MiB, { guest: 'gäst-1', format: 'kdump-zlib', now: 1700, keep: 2 });
    const f = failDump(p.catalog, p.entry.id, { length: 5000, reason: 'QEMU said no', now: 1800 });
    const back = decodeSlot(encodeSlot(f));
    expect(back).toEqual(f);
    const done = completeDump(p.catalog, p.entry.id, {
      length: 3 * MiB + 1,
      checksum: SUM,
      now: 9,
    });
    expect(decodeSlot(encodeSlot(done))).toEqual(done);
  });

  it('a fresh (all-zero) device has an empty catalog; garbage is refused', () => {
    expect(chooseCatalog(Buffer.alloc(SLOT_SIZE), Buffer.alloc(SLOT_SIZE))).toEqual(emptyCatalog());
    const junk = Buffer.alloc(SLOT_SIZE, 0x41);
    expect(() => chooseCatalog(junk, Buffer.alloc(SLOT_SIZE))).toThrow(
      expect.objectContaining({ code: 'DUMP_NOT_A_DUMP_DEVICE' }),
    );
  });

  it('any flipped bit makes a slot invalid', () => {
    const img = encodeSlot(
      planDump(emptyCatalog(), 64 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 1 }).catalog,
    );
    for (const pos of [0, 9, 16, 24, 40, 64, 100, 200, 300, SLOT_SIZE - 1]) {
      const b = Buffer.from(img);
      b[pos] = (b[pos] as number) ^ 0x10;
      expect(decodeSlot(b)).toBeNull();
    }
  });

  it('completeDump takes only a checksum it knows', () => {
    const p = planDump(emptyCatalog(), 64 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 1 });
    for (const checksum of ['', 'abc', 'md5:00112233'])
      expect(() => completeDump(p.catalog, p.entry.id, { length: 1, checksum, now: 2 })).toThrow(
        expect.objectContaining({ code: 'DUMP_STATE' }),
      );
  });

  it('entries keep their checksum algorithm (CRC-32 and SHA-256 side by side)', () => {
    const sha = `sha256:${'ab'.repeat(32)}`;
    let c = emptyCatalog();
    for (const checksum of [SUM, sha]) {
      const p = planDump(c, 64 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 5 });
      c = completeDump(p.catalog, p.entry.id, { length: MiB, checksum, now: 2 });
    }
    const back = decodeSlot(encodeSlot(c));
    expect(back?.entries.map((e) => e.checksum)).toEqual([SUM, sha]);
    // An algorithm this version does not know makes the slot unreadable, not wrong.
    const b = encodeSlot(c);
    b.writeUInt8(9, 64 + 6);
    b.writeUInt32LE(0, 36);
    b.writeUInt32LE(crc32(b), 36);
    expect(decodeSlot(b)).toBeNull();
  });

  it('reads version 1 catalogs, whose entries carry a SHA-256 and no algorithm', () => {
    const sha = 'cd'.repeat(32);
    let c = emptyCatalog();
    const p = planDump(c, 64 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 5 });
    c = completeDump(p.catalog, p.entry.id, { length: MiB, checksum: `sha256:${sha}`, now: 2 });
    const q = planDump(c, 64 * MiB, { guest: 'g', format: 'elf', now: 3, keep: 5 });
    // As version 1 wrote it: version 1, algorithm byte 0 (padding), the digest or zeroes.
    const b = encodeSlot(q.catalog);
    b.writeUInt32LE(1, 8);
    b.writeUInt8(0, 64 + 6);
    b.writeUInt32LE(0, 36);
    b.writeUInt32LE(crc32(b), 36);
    const back = decodeSlot(b);
    expect(back?.entries.map((e) => [e.state, e.checksum])).toEqual([
      ['complete', `sha256:${sha}`],
      ['writing', ''],
    ]);
  });

  it('a streaming dump keeps its panic and running-again times, is recovered as interrupted', () => {
    const p = planDump(emptyCatalog(), 64 * MiB, {
      guest: 'vm1',
      format: 'migration',
      now: 1_000_000,
      keep: 3,
      state: 'streaming',
      panicAt: 999_250,
    });
    let c = annotateDump(p.catalog, p.entry.id, { runningAt: 1_000_040 });
    const back = decodeSlot(encodeSlot(c));
    expect(back?.entries[0]).toMatchObject({
      state: 'streaming',
      format: 'migration',
      panicAt: 999_250,
      runningAt: 1_000_040,
    });
    // Its whole reservation is held while it streams.
    expect(freeGaps(c, 64 * MiB)).toEqual([]);
    expect(recoverInterrupted(c, 5, 'other')).toBeNull();
    const r = recoverInterrupted(c, 5, 'vm1');
    expect(r?.catalog.entries[0]).toMatchObject({ state: 'failed', reason: 'interrupted' });
    c = completeDump(c, p.entry.id, { length: 10, checksum: SUM, now: 2_000_000, note: 'n' });
    expect(decodeSlot(encodeSlot(c))?.entries[0]).toMatchObject({
      state: 'complete',
      reason: 'n',
      panicAt: 999_250,
      runningAt: 1_000_040,
      finishedAt: 2_000_000,
    });
  });

  it('a newer layout version is DUMP_BAD_VERSION', () => {
    const b = encodeSlot(emptyCatalog());
    b.writeUInt32LE(VERSION + 1, 8);
    b.writeUInt32LE(0, 36);
    b.writeUInt32LE(crc32(b), 36);
    expect(() => decodeSlot(b)).toThrow(expect.objectContaining({ code: 'DUMP_BAD_VERSION' }));
  });

  it('long guest names and reasons are cut at a character boundary', () => {
    const c = planDump(emptyCatalog(), 64 * MiB, {
      guest: 'é'.repeat(32),
      format: 'elf',
      now: 1,
      keep: 1,
    });
    const f = failDump(c.catalog, c.entry.id, { length: 0, reason: 'ü'.repeat(80), now: 2 });
    const back = decodeSlot(encodeSlot(f));
    expect(back?.entries[0]?.reason).toBe('ü'.repeat(48));
    expect(() =>
      planDump(emptyCatalog(), 64 * MiB, { guest: 'x'.repeat(65), format: 'elf', now: 1, keep: 1 }),
    ).toThrow(expect.objectContaining({ code: 'DUMP_BAD_GUEST' }));
  });
});

describe('crash safety', () => {
  it('a catalog write torn at any point leaves the previous catalog', () => {
    const d = new Device();
    const { catalog: before } = dumpOnce(d, 256 * MiB, 'g', 10 * MiB, 100);
    const p = planDump(before, 256 * MiB, { guest: 'g', format: 'elf', now: 200, keep: 3 });
    // Torn anywhere in the bytes that differ (the rest of a slot is zeroes either way).
    for (const torn of [0, 1, 8, 40, 64, 100, 300, 400]) {
      const t = new Device();
      t.slots = d.slots.map((s) => Buffer.from(s));
      t.commit(p.catalog, torn);
      expect(t.read()).toEqual(before);
    }
    d.commit(p.catalog);
    expect(d.read()).toEqual(p.catalog);
  });

  it('updates alternate slots, so the newest valid one always survives', () => {
    const d = new Device();
    let c = d.read();
    const gens: number[] = [];
    for (let i = 0; i < 6; i++) {
      const p = planDump(c, 256 * MiB, { guest: 'g', format: 'elf', now: i, keep: 10 });
      d.commit(p.catalog);
      c = completeDump(p.catalog, p.entry.id, { length: MiB, checksum: SUM, now: i });
      d.commit(c);
      gens.push(
        decodeSlot(d.slots[0] as Buffer)?.generation ?? -1,
        decodeSlot(d.slots[1] as Buffer)?.generation ?? -1,
      );
    }
    expect(d.read().generation).toBe(12);
    expect(Math.abs((gens.at(-1) ?? 0) - (gens.at(-2) ?? 0))).toBe(1);
  });

  it('a dump interrupted mid-way never overlaps earlier dumps and is recovered as failed', () => {
    const d = new Device();
    const first = dumpOnce(d, 256 * MiB, 'g', 30 * MiB, 1).catalog;
    const p = planDump(first, 256 * MiB, { guest: 'g', format: 'elf', now: 2, keep: 3 });
    d.commit(p.catalog); // dumpd dies here, after writing some data into its reservation
    const old = first.entries[0];
    expect(old).toBeDefined();
    if (!old) return;
    const r = p.entry;
    expect(r.offset >= old.offset + old.capacity || r.offset + r.capacity <= old.offset).toBe(true);
    const listed = d.read();
    expect(listed.entries.find((e) => e.id === r.id)?.state).toBe('writing');
    const rec = recoverInterrupted(listed, 3);
    expect(rec?.trims).toEqual([{ offset: r.offset, length: r.capacity }]);
    expect(rec?.catalog.entries.find((e) => e.id === r.id)).toMatchObject({
      state: 'failed',
      reason: 'interrupted',
    });
    expect(rec?.catalog.entries.find((e) => e.id === old.id)).toEqual(old);
    expect(recoverInterrupted(first, 3)).toBeNull();
  });
});

describe('space and retention', () => {
  it('the first dump starts at 1 MiB and reserves the rest of the device', () => {
    const p = planDump(emptyCatalog(), 100 * MiB + 123, {
      guest: 'g',
      format: 'elf',
      now: 1,
      keep: 1,
    });
    expect(p.entry.offset).toBe(DATA_START);
    expect(p.entry.capacity).toBe(99 * MiB);
    expect(p.trims).toEqual([]);
  });

  it('completion shrinks the reservation to the data, aligned', () => {
    const p = planDump(emptyCatalog(), 100 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 2 });
    const c = completeDump(p.catalog, p.entry.id, { length: 5 * MiB + 1, checksum: SUM, now: 2 });
    expect(c.entries[0]?.capacity).toBe(6 * MiB);
    expect(freeGaps(c, 100 * MiB)).toEqual([{ offset: 7 * MiB, length: 93 * MiB }]);
  });

  it('keeps at most `keep` dumps: failed first, then the oldest complete; returns trims', () => {
    const d = new Device();
    dumpOnce(d, 512 * MiB, 'g', 10 * MiB, 1, 3);
    const p2 = planDump(d.read(), 512 * MiB, { guest: 'g', format: 'elf', now: 2, keep: 3 });
    d.commit(p2.catalog);
    d.commit(failDump(p2.catalog, p2.entry.id, { length: 3 * MiB, reason: 'x', now: 3 }));
    dumpOnce(d, 512 * MiB, 'g', 10 * MiB, 4, 3);
    const cat = d.read();
    expect(cat.entries.map((e) => e.state)).toEqual(['complete', 'failed', 'complete']);
    const p4 = planDump(cat, 512 * MiB, { guest: 'g', format: 'elf', now: 5, keep: 3 });
    expect(p4.trims).toEqual([{ offset: p2.entry.offset, length: 3 * MiB }]);
    expect(p4.catalog.entries.map((e) => e.id)).toEqual([1, 3, 4]);
    const p5 = planDump(cat, 512 * MiB, { guest: 'g', format: 'elf', now: 5, keep: 1 });
    expect(p5.catalog.entries.map((e) => e.id)).toEqual([4]);
    expect(p5.trims).toHaveLength(3);
    expect(p5.entry.offset).toBe(DATA_START);
    expect(p5.entry.capacity).toBe(511 * MiB);
  });

  it('takes the largest gap between kept dumps', () => {
    const c: Catalog = { generation: 5, nextId: 9, entries: [] };
    const mk = (id: number, offset: number, len: number) => ({
      id,
      state: 'complete' as const,
      format: 'elf' as const,
      guest: 'g',
      createdAt: id,
      finishedAt: id,
      offset,
      capacity: len,
      length: len,
      checksum: SUM,
      reason: '',
      panicAt: 0,
      runningAt: 0,
    });
    c.entries.push(mk(1, 1 * MiB, 2 * MiB), mk(2, 40 * MiB, 10 * MiB), mk(3, 60 * MiB, 30 * MiB));
    expect(freeGaps(c, 100 * MiB)).toEqual([
      { offset: 3 * MiB, length: 37 * MiB },
      { offset: 50 * MiB, length: 10 * MiB },
      { offset: 90 * MiB, length: 10 * MiB },
    ]);
    const p = planDump(c, 100 * MiB, { guest: 'g', format: 'elf', now: 10, keep: 10 });
    expect(p.entry).toMatchObject({ id: 9, offset: 3 * MiB, capacity: 37 * MiB });
    expect(p.catalog.nextId).toBe(10);
  });

  it('a device with no room is DUMP_NO_SPACE; a full catalog is DUMP_CATALOG_FULL', () => {
    expect(() =>
      planDump(emptyCatalog(), DATA_START, { guest: 'g', format: 'elf', now: 1, keep: 1 }),
    ).toThrow(expect.objectContaining({ code: 'DUMP_NO_SPACE' }));
    let c = emptyCatalog();
    for (let i = 0; i < MAX_ENTRIES; i++) {
      const p = planDump(c, 1024 * 1024 * MiB, { guest: 'g', format: 'elf', now: i, keep: 1000 });
      c = completeDump(p.catalog, p.entry.id, { length: ALIGN, checksum: SUM, now: i });
    }
    expect(() => encodeSlot(c)).not.toThrow();
    expect(() =>
      planDump(c, 1024 * 1024 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 1000 }),
    ).toThrow(expect.objectContaining({ code: 'DUMP_CATALOG_FULL' }));
  });

  it('remove frees the region; unknown ids are DUMP_NOT_FOUND', () => {
    const d = new Device();
    const { catalog } = dumpOnce(d, 64 * MiB, 'g', 4 * MiB, 1);
    const r = removeDump(catalog, 1);
    expect(r.trim).toEqual({ offset: DATA_START, length: 4 * MiB });
    expect(r.catalog.entries).toEqual([]);
    expect(r.catalog.generation).toBe(catalog.generation + 1);
    expect(() => removeDump(catalog, 7)).toThrow(
      expect.objectContaining({ code: 'DUMP_NOT_FOUND' }),
    );
    expect(() => completeDump(catalog, 1, { length: 1, checksum: SUM, now: 1 })).toThrow(
      expect.objectContaining({ code: 'DUMP_STATE' }),
    );
  });

  it('completing beyond the reservation is DUMP_NO_SPACE', () => {
    const p = planDump(emptyCatalog(), 10 * MiB, { guest: 'g', format: 'elf', now: 1, keep: 1 });
    expect(() =>
      completeDump(p.catalog, p.entry.id, { length: 10 * MiB, checksum: SUM, now: 2 }),
    ).toThrow(expect.objectContaining({ code: 'DUMP_NO_SPACE' }));
  });
});
