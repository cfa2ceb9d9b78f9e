// A suspended guest on its paging device: QEMU's migration stream written into the
// device's suspend area, and a 4 KiB header in the device's last 4 KiB that says where
// the stream is, how long, its checksum, and which QEMU and machine type wrote it.
//
// Layout of the device (the guest sees only the part before the area: give QEMU a raw
// node with size=OFFSET over the NBD node):
//
//   0 .. offset                 the guest's swap
//   offset .. size − 4 KiB      the suspend area (the stream, from its start)
//   size − 4 KiB .. size        the header
//
// Header: 16 bytes magic, u32 BE length of the JSON that follows, the JSON, zeros, and
// the SHA-256 of everything before it in the last 32 bytes. An all-zero header means "no
// suspended guest": suspend zeroes it before it writes a stream, resume after it resumed.

import { createHash } from 'node:crypto';

export const HEADER_BYTES = 4096;
const MAGIC = Buffer.from('BALLAST-SUSPEND\0', 'latin1');
export const MiB = 1024 * 1024;

export interface ImageHeader {
  format: 1;
  guest: string;
  /** Where the stream starts on the device, and its length in bytes. */
  offset: number;
  length: number;
  /** "crc32:<hex>" or "sha256:<hex>" of the stream. */
  checksum: string;
  /** The QEMU that wrote it ("7.2.22") and its machine's QOM type. */
  qemu: string;
  machine: string;
  ramBytes: number;
  createdAt: string;
}

export function encodeHeader(h: ImageHeader): Buffer {
  const json = Buffer.from(JSON.stringify(h), 'utf8');
  if (json.length > HEADER_BYTES - 32 - 20) throw new HeaderError('suspend header too long');
  const b = Buffer.alloc(HEADER_BYTES);
  MAGIC.copy(b, 0);
  b.writeUInt32BE(json.length, 16);
  json.copy(b, 20);
  createHash('sha256')
    .update(b.subarray(0, HEADER_BYTES - 32))
    .digest()
    .copy(b, HEADER_BYTES - 32);
  return b;
}

/** A suspend header that is there (its magic) but cannot be used. */
export class HeaderError extends Error {}

const INT_FIELDS = ['offset', 'length', 'ramBytes'] as const;
const STRING_FIELDS = ['guest', 'checksum', 'qemu', 'machine', 'createdAt'] as const;

/**
 * The header, null when there is none (zeros or another magic); throws HeaderError when
 * it is damaged or its fields are not what suspend writes (the device's bytes are input
 * like any other: a header with a right checksum may still have been written by hand).
 */
export function decodeHeader(b: Buffer): ImageHeader | null {
  if (b.length !== HEADER_BYTES) throw new HeaderError(`a header is ${HEADER_BYTES} bytes`);
  if (!b.subarray(0, 16).equals(MAGIC)) return null;
  const sum = createHash('sha256')
    .update(b.subarray(0, HEADER_BYTES - 32))
    .digest();
  if (!sum.equals(b.subarray(HEADER_BYTES - 32))) {
    throw new HeaderError('the header checksum is wrong');
  }
  const len = b.readUInt32BE(16);
  if (len > HEADER_BYTES - 32 - 20) throw new HeaderError('the header length is wrong');
  let h: unknown;
  try {
    h = JSON.parse(b.toString('utf8', 20, 20 + len));
  } catch {
    throw new HeaderError('the header is not JSON');
  }
  if (typeof h !== 'object' || h === null || Array.isArray(h)) {
    throw new HeaderError('the header is not an object');
  }
  const o = h as Record<string, unknown>;
  if (o.format !== 1) throw new HeaderError(`unknown header format ${String(o.format)}`);
  for (const k of INT_FIELDS) {
    const v = o[k];
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
      throw new HeaderError(`the header's ${k} is not a byte count`);
    }
  }
  for (const k of STRING_FIELDS) {
    if (typeof o[k] !== 'string' || (o[k] as string).length === 0) {
      throw new HeaderError(`the header's ${k} is not a string`);
    }
  }
  return o as unknown as ImageHeader;
}

function versionTuple(v: string): number[] {
  return v.split('.').map((x) => Number.parseInt(x, 10) || 0);
}

/** -1, 0, 1 as a < b, a = b, a > b (major.minor.micro). */
export function compareVersions(a: string, b: string): number {
  const x = versionTuple(a);
  const y = versionTuple(b);
  for (let i = 0; i < 3; i++) {
    const d = (x[i] ?? 0) - (y[i] ?? 0);
    if (d !== 0) return d < 0 ? -1 : 1;
  }
  return 0;
}

/**
 * Why QEMU `to` cannot load a stream written by `from`, or null. QEMU loads streams of
 * its own and older versions for the same machine type (a versioned type such as
 * pc-i440fx-7.2 pins the device layout); never the other way.
 */
export function incompatibility(
  from: { qemu: string; machine: string },
  to: { qemu: string; machine: string },
): string | null {
  if (from.machine !== to.machine) {
    return `the stream is of machine type ${from.machine}, this QEMU runs ${to.machine}`;
  }
  if (compareVersions(to.qemu, from.qemu) < 0) {
    return `the stream was written by QEMU ${from.qemu}, newer than this QEMU ${to.qemu}`;
  }
  return null;
}

/**
 * The default suspend area of a device for a guest of `ramBytes`: room for all of its
 * RAM plus an eighth and 16 MiB (device state, page headers), ending at the header;
 * its start rounded down to a MiB. Null when the device is too small.
 */
export function suspendArea(
  deviceBytes: number,
  ramBytes: number,
): { offset: number; end: number } | null {
  const end = deviceBytes - HEADER_BYTES;
  const need = ramBytes + Math.ceil(ramBytes / 8) + 16 * MiB;
  const offset = Math.floor((end - need) / MiB) * MiB;
  return offset > 0 ? { offset, end } : null;
}
