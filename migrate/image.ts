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
const MiB = 1024 * 1024;

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
  if (json.length > HEADER_BYTES - 32 - 20) throw new Error('suspend header too long');
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

/** The header, null when there is none (zeros or another magic); throws when it is damaged. */
export function decodeHeader(b: Buffer): ImageHeader | null {
  if (b.length !== HEADER_BYTES) throw new Error(`a header is ${HEADER_BYTES} bytes`);
  if (!b.subarray(0, 16).equals(MAGIC)) return null;
  const sum = createHash('sha256')
    .update(b.subarray(0, HEADER_BYTES - 32))
    .digest();
  if (!sum.equals(b.subarray(HEADER_BYTES - 32))) throw new Error('the header checksum is wrong');
  const len = b.readUInt32BE(16);
  if (len > HEADER_BYTES - 32 - 20) throw new Error('the header length is wrong');
  const h = JSON.parse(b.toString('utf8', 20, 20 + len)) as ImageHeader;
  if (h.format !== 1) throw new Error(`unknown header format ${String(h.format)}`);
  return h;
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
