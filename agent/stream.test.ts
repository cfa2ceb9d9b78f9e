import { describe, expect, it } from 'vitest';
import { DIRECT_ALIGN, partsOf, streamRange } from './stream.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('partsOf: a device range onto its extent files', () => {
  it('maps a range inside one extent to one part, direct when aligned', () => {
    expect(partsOf([64 * MiB], 16 * MiB, 4 * MiB, DIRECT_ALIGN)).toEqual([
      { index: 0, fileOffset: 16 * MiB, at: 0, length: 4 * MiB, direct: true },
    ]);
    expect(partsOf([64 * MiB], 16 * MiB, 4 * MiB)).toEqual([
      { index: 0, fileOffset: 16 * MiB, at: 0, length: 4 * MiB, direct: false },
    ]);
  });

  it('splits at extent boundaries, with file offsets from each extent’s start', () => {
    const parts = partsOf([10 * MiB, 10 * MiB, 10 * MiB], 8 * MiB, 16 * MiB, DIRECT_ALIGN);
    expect(parts).toEqual([
      { index: 0, fileOffset: 8 * MiB, at: 0, length: 2 * MiB, direct: true },
      { index: 1, fileOffset: 0, at: 2 * MiB, length: 10 * MiB, direct: true },
      { index: 2, fileOffset: 0, at: 12 * MiB, length: 4 * MiB, direct: true },
    ]);
  });

  it('sends only an unaligned head and tail through the page cache', () => {
    const parts = partsOf([64 * MiB], 4 * KiB + 100, 12 * KiB + 50, DIRECT_ALIGN);
    expect(parts).toEqual([
      { index: 0, fileOffset: 4 * KiB + 100, at: 0, length: 4 * KiB - 100, direct: false },
      { index: 0, fileOffset: 8 * KiB, at: 4 * KiB - 100, length: 8 * KiB, direct: true },
      { index: 0, fileOffset: 16 * KiB, at: 12 * KiB - 100, length: 150, direct: false },
    ]);
    // every byte once, in order
    let at = 0;
    for (const p of parts) {
      expect(p.at).toBe(at);
      at += p.length;
    }
    expect(at).toBe(12 * KiB + 50);
  });

  it('a short range inside one block is buffered whole', () => {
    expect(partsOf([64 * MiB], 100, 200, DIRECT_ALIGN)).toEqual([
      { index: 0, fileOffset: 100, at: 0, length: 200, direct: false },
    ]);
    // the last piece of a stream: aligned start, unaligned end
    expect(partsOf([64 * MiB], 8 * MiB, 4 * KiB + 1, DIRECT_ALIGN)).toEqual([
      { index: 0, fileOffset: 8 * MiB, at: 0, length: 4 * KiB, direct: true },
      { index: 0, fileOffset: 8 * MiB + 4 * KiB, at: 4 * KiB, length: 1, direct: false },
    ]);
  });

  it('an extent of an unaligned length leaves the next one aligned from its start', () => {
    const parts = partsOf([8 * KiB + 10, 64 * KiB], 4 * KiB, 16 * KiB, DIRECT_ALIGN);
    expect(parts).toEqual([
      { index: 0, fileOffset: 4 * KiB, at: 0, length: 4 * KiB, direct: true },
      { index: 0, fileOffset: 8 * KiB, at: 4 * KiB, length: 10, direct: false },
      { index: 1, fileOffset: 0, at: 4 * KiB + 10, length: 8 * KiB, direct: true },
      { index: 1, fileOffset: 8 * KiB, at: 12 * KiB + 10, length: 4 * KiB - 10, direct: false },
    ]);
    expect(parts.reduce((n, p) => n + p.length, 0)).toBe(16 * KiB);
  });

  it('refuses a range past the extents', () => {
    expect(() => partsOf([4 * MiB, 4 * MiB], 6 * MiB, 4 * MiB)).toThrow(
      expect.objectContaining({ code: 'BALLAST_STREAM_RANGE' }),
    );
  });
});

describe('streamRange', () => {
  it('defaults the end to the device size', () => {
    expect(streamRange(64 * MiB, 16 * MiB, undefined)).toEqual({ offset: 16 * MiB, end: 64 * MiB });
    expect(streamRange(64 * MiB, 0, 4096)).toEqual({ offset: 0, end: 4096 });
  });

  it('refuses an empty range, one past the device, or no offset', () => {
    for (const [o, e] of [
      [64 * MiB, undefined],
      [8 * MiB, 8 * MiB],
      [8 * MiB, 64 * MiB + 1],
    ] as const) {
      expect(() => streamRange(64 * MiB, o, e)).toThrow(
        expect.objectContaining({ code: 'BALLAST_STREAM_RANGE' }),
      );
    }
    expect(() => streamRange(64 * MiB, undefined, undefined)).toThrow(
      expect.objectContaining({ code: 'BALLAST_BAD_REQUEST' }),
    );
  });
});
