import { createHash } from 'node:crypto';
import { describe, expect, it } from 'vitest';
import {
  compareVersions,
  decodeHeader,
  encodeHeader,
  HEADER_BYTES,
  HeaderError,
  type ImageHeader,
  incompatibility,
  suspendArea,
} from './image.js';

const MiB = 1024 * 1024;
const header: ImageHeader = {
  format: 1,
  guest: 'vm1',
  offset: 351 * MiB,
  length: 123_456_789,
  checksum: `sha256:${'ab'.repeat(32)}`,
  qemu: '7.2.22',
  machine: 'pc-i440fx-7.2-machine',
  ramBytes: 128 * MiB,
  createdAt: '2026-11-29T19:00:00.000Z',
};

describe('suspend header', () => {
  it('round-trips', () => {
    const b = encodeHeader(header);
    expect(b.length).toBe(HEADER_BYTES);
    expect(decodeHeader(b)).toEqual(header);
  });

  it('zeros and foreign data mean no image', () => {
    expect(decodeHeader(Buffer.alloc(HEADER_BYTES))).toBeNull();
    expect(decodeHeader(Buffer.alloc(HEADER_BYTES, 0x41))).toBeNull();
  });

  it('any byte flipped in the header is caught', () => {
    const good = encodeHeader(header);
    for (const at of [16, 20, 40, 100, 2000, HEADER_BYTES - 1]) {
      const b = Buffer.from(good);
      b[at] = (b[at] ?? 0) ^ 0x01;
      expect(() => decodeHeader(b), `byte ${at}`).toThrow(/checksum/);
    }
  });

  it('a header with a right checksum but fields suspend never writes is refused', () => {
    /** A header over any JSON text, checksummed as suspend does. */
    const raw = (json: string) => {
      const b = encodeHeader(header);
      b.fill(0, 16, HEADER_BYTES);
      const j = Buffer.from(json);
      b.writeUInt32BE(j.length, 16);
      j.copy(b, 20);
      createHash('sha256')
        .update(b.subarray(0, HEADER_BYTES - 32))
        .digest()
        .copy(b, HEADER_BYTES - 32);
      return b;
    };
    const bad = (o: unknown) => raw(JSON.stringify(o));
    expect(decodeHeader(raw(JSON.stringify(header)))).toEqual(header);
    for (const [b, why] of [
      [raw('{"format":1,'), /not JSON/],
      [raw('[1]'), /not an object/],
      [raw('null'), /not an object/],
      [bad({ ...header, format: 2 }), /format 2/],
      [bad({ ...header, offset: -1 }), /offset/],
      [bad({ ...header, length: '5' }), /length/],
      [bad({ ...header, ramBytes: 1.5 }), /ramBytes/],
      [bad({ ...header, qemu: 7 }), /qemu/],
      [bad({ ...header, guest: '' }), /guest/],
      [bad({ ...header, checksum: undefined }), /checksum/],
    ] as const) {
      expect(() => decodeHeader(b)).toThrow(HeaderError);
      expect(() => decodeHeader(b)).toThrow(why);
    }
  });

  it('refuses a JSON too long for 4 KiB', () => {
    expect(() => encodeHeader({ ...header, guest: 'x'.repeat(5000) })).toThrow(/too long/);
  });
});

describe('compatibility', () => {
  const m = 'pc-i440fx-7.2-machine';
  it('orders versions numerically', () => {
    expect(compareVersions('7.2.22', '7.2.9')).toBe(1);
    expect(compareVersions('7.2.0', '7.10.0')).toBe(-1);
    expect(compareVersions('8.0.0', '8.0.0')).toBe(0);
  });
  it('same or newer QEMU, same machine type: loads', () => {
    expect(incompatibility({ qemu: '7.2.22', machine: m }, { qemu: '7.2.22', machine: m })).toBe(
      null,
    );
    expect(incompatibility({ qemu: '7.2.0', machine: m }, { qemu: '8.1.0', machine: m })).toBe(
      null,
    );
  });
  it('older QEMU or another machine type: refused, saying why', () => {
    expect(incompatibility({ qemu: '8.0.0', machine: m }, { qemu: '7.2.22', machine: m })).toMatch(
      /newer than this QEMU 7.2.22/,
    );
    expect(
      incompatibility({ qemu: '7.2.22', machine: m }, { qemu: '7.2.22', machine: 'pc-q35-7.2' }),
    ).toMatch(/machine type/);
  });
});

describe('suspend area', () => {
  it('holds the RAM, an eighth and 16 MiB, MiB-aligned, before the header', () => {
    const a = suspendArea(512 * MiB, 128 * MiB);
    expect(a).toEqual({ offset: 351 * MiB, end: 512 * MiB - HEADER_BYTES });
    expect((a?.end ?? 0) - (a?.offset ?? 0)).toBeGreaterThanOrEqual(
      128 * MiB + 16 * MiB + 16 * MiB,
    );
  });
  it('is null on a device too small', () => {
    expect(suspendArea(128 * MiB, 128 * MiB)).toBeNull();
  });
});
