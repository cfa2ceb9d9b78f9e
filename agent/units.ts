import { BallastError } from './errors.js';

const UNITS: Record<string, number> = {
  '': 1,
  B: 1,
  K: 1024,
  M: 1024 ** 2,
  G: 1024 ** 3,
  T: 1024 ** 4,
  P: 1024 ** 5,
};

/**
 * Sizes as operators write them: 1048576, 512K, 64M, 1G, 1.5GiB, 2T.
 * Suffixes are binary (K = KiB), as with qemu-img and nbdkit.
 */
export function parseSize(text: string, what = 'size'): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(?:([KMGTP])(?:i?B)?|B)?\s*$/i.exec(text);
  if (!m) {
    throw new BallastError(
      'BALLAST_BAD_SIZE',
      `bad ${what} ${JSON.stringify(text)}: expected a number of bytes with an optional K, M, G, T or P suffix (e.g. 64M, 1G)`,
    );
  }
  const unit = UNITS[(m[2] ?? '').toUpperCase()]!;
  const value = Number(m[1]) * unit;
  if (!Number.isSafeInteger(value)) {
    throw new BallastError(
      'BALLAST_BAD_SIZE',
      `bad ${what} ${JSON.stringify(text)}: not a whole number of bytes below 2^53`,
    );
  }
  return value;
}

export function formatSize(n: number): string {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB', 'PiB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1 && v % 1024 === 0) {
    v /= 1024;
    i++;
  }
  if (i === 0 && n >= 1024) {
    let f = n;
    let j = 0;
    while (f >= 1024 && j < units.length - 1) {
      f /= 1024;
      j++;
    }
    return `${f.toFixed(1)} ${units[j]}`;
  }
  return `${v} ${units[i]}`;
}
