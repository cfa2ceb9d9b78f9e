// Local image files for the interop tests: sparse files with random data in known places.

import { createHash, randomBytes } from 'node:crypto';
import { createReadStream, statSync } from 'node:fs';
import { open } from 'node:fs/promises';

export interface Region {
  offset: number;
  length: number;
}

/** A sparse file of `size` bytes with random data in `regions`; returns its whole content. */
export async function writeSparseImage(
  file: string,
  size: number,
  regions: readonly Region[],
): Promise<Buffer> {
  const content = Buffer.alloc(size);
  const fh = await open(file, 'w');
  try {
    await fh.truncate(size);
    for (const r of regions) {
      const data = randomBytes(r.length);
      data.copy(content, r.offset);
      await fh.write(data, 0, data.length, r.offset);
    }
  } finally {
    await fh.close();
  }
  return content;
}

/** A file of `size` random bytes (fully allocated). */
export async function writeRandomFile(file: string, size: number): Promise<void> {
  const fh = await open(file, 'w');
  try {
    const chunk = 4 * 1024 * 1024;
    for (let off = 0; off < size; off += chunk) {
      const n = Math.min(chunk, size - off);
      await fh.write(randomBytes(n), 0, n, off);
    }
  } finally {
    await fh.close();
  }
}

export function sha256File(file: string): Promise<string> {
  return new Promise((resolve, reject) => {
    const hash = createHash('sha256');
    createReadStream(file)
      .on('data', (b) => hash.update(b))
      .on('error', reject)
      .on('end', () => resolve(hash.digest('hex')));
  });
}

/** Bytes of storage behind a file (st_blocks * 512). */
export function allocatedBytes(file: string): number {
  return statSync(file).blocks * 512;
}

/** One entry of `qemu-img map --output=json`. */
export interface QemuMapEntry {
  start: number;
  length: number;
  data: boolean;
  zero: boolean;
}

/** The map entry covering `offset`. */
export function qemuMapAt(entries: readonly QemuMapEntry[], offset: number): QemuMapEntry {
  const e = entries.find((x) => x.start <= offset && offset < x.start + x.length);
  if (!e) throw new Error(`no map entry covers ${offset}: ${JSON.stringify(entries)}`);
  return e;
}

/** One entry of `nbdinfo --map --json`. */
export interface NbdinfoMapEntry {
  offset: number;
  length: number;
  type: number;
  description: string;
}

export function nbdinfoMapAt(entries: readonly NbdinfoMapEntry[], offset: number): NbdinfoMapEntry {
  const e = entries.find((x) => x.offset <= offset && offset < x.offset + x.length);
  if (!e) throw new Error(`no map entry covers ${offset}: ${JSON.stringify(entries)}`);
  return e;
}
