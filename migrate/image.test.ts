import { describe, expect, it } from 'vitest';
import {
  compareVersions,
  decodeHeader,
  encodeHeader,
  HEADER_BYTES,
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
