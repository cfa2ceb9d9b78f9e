// The checksum a dump is stored with, written as "<algorithm>:<hex>" in the catalog
// entry and in `dump ls` / `dump get`. The agent's migration streams (stream.ts) and
// suspend images (migrate/suspend.ts) are hashed the same way.
//
// New dumps get CRC-32 (zlib's, the polynomial of gzip, zip and Ethernet), computed on
// dumpd's main thread as the pieces go out: it is there to catch bytes that changed or
// went missing between dumpd and a later `dump get` (a torn write, a bad disk, a
// truncated copy), not to authenticate. It runs at 3.5-5 GB/s here with the CPU's
// carry-less multiply; SHA-256, which catalogs of version 1 hold, ran at 1.8 GB/s even
// with the SHA extensions and cost a 512 MiB dump 0.3 s of CPU that the guest's reboot
// waited for (BENCHMARKING.md). Dumps with a SHA-256 are still verified with it.

import { createHash } from 'node:crypto';
import * as zlib from 'node:zlib';

export const CHECKSUM_ALGS = ['sha256', 'crc32'] as const;
export type ChecksumAlg = (typeof CHECKSUM_ALGS)[number];

/** Digest bytes of each algorithm. */
export const CHECKSUM_BYTES: Record<ChecksumAlg, number> = { sha256: 32, crc32: 4 };

export interface Checksummer {
  readonly alg: ChecksumAlg;
  update(b: Uint8Array): void;
  /** "<alg>:<hex>" of everything updated. */
  digest(): string;
}

const CRC_TABLE = (() => {
  const t = new Uint32Array(256);
  for (let n = 0; n < 256; n++) {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    t[n] = c >>> 0;
  }
  return t;
})();

/** CRC-32 in JavaScript (small buffers: the catalog slots). */
export function crc32js(b: Uint8Array, crc = 0): number {
  let c = ~crc >>> 0;
  for (let i = 0; i < b.length; i++)
    c = (CRC_TABLE[(c ^ (b[i] as number)) & 0xff] as number) ^ (c >>> 8);
  return ~c >>> 0;
}

/** zlib's CRC-32 (Node >= 20.15), else the JavaScript one: same values. */
export const crc32: (b: Uint8Array, crc?: number) => number =
  (zlib as { crc32?: (b: Uint8Array, crc?: number) => number }).crc32 ?? crc32js;

export function checksummer(alg: ChecksumAlg): Checksummer {
  if (alg === 'sha256') {
    const h = createHash('sha256');
    return {
      alg,
      update: (b) => {
        h.update(b);
      },
      digest: () => `sha256:${h.digest('hex')}`,
    };
  }
  let c = 0;
  return {
    alg,
    update: (b) => {
      c = crc32(b, c);
    },
    digest: () => `crc32:${c.toString(16).padStart(8, '0')}`,
  };
}

/** Splits "<alg>:<hex>"; null for '' or anything else. */
export function parseChecksum(s: string): { alg: ChecksumAlg; hex: string } | null {
  const m = /^([a-z0-9]+):([0-9a-f]+)$/.exec(s);
  if (!m) return null;
  const alg = m[1] as ChecksumAlg;
  if (!CHECKSUM_ALGS.includes(alg) || m[2]?.length !== 2 * CHECKSUM_BYTES[alg]) return null;
  return { alg, hex: m[2] };
}
