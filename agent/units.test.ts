import { describe, expect, it } from 'vitest';
import { codeOf } from '../test/helpers/errors.js';
import { BallastError } from './errors.js';
import { formatSize, parseSize } from './units.js';

const K = 1024;
const M = K * K;
const G = K * M;
const T = K * G;
const P = K * T;

describe('parseSize', () => {
  it.each([
    ['0', 0],
    ['1', 1],
    ['1048576', 1048576],
    ['512K', 512 * K],
    ['64M', 64 * M],
    ['1G', G],
    ['2T', 2 * T],
    ['1P', P],
    ['7P', 7 * P],
    ['1.5GiB', 1.5 * G],
    ['1.5G', 1.5 * G],
    ['0.5K', 512],
    ['10B', 10],
    ['10b', 10],
    ['64m', 64 * M],
    ['1k', K],
    ['1KiB', K],
    ['1KB', K],
    ['1kb', K],
    ['1kib', K],
    ['4 G', 4 * G],
    ['  64M  ', 64 * M],
    ['64 MiB', 64 * M],
    ['007', 7],
    ['9007199254740991', Number.MAX_SAFE_INTEGER],
  ])('%s → %i bytes (binary units)', (text, want) => {
    expect(parseSize(text)).toBe(want);
  });

  it.each([
    [''],
    ['   '],
    ['abc'],
    ['G'],
    ['-1'],
    ['+1'],
    ['1e3'],
    ['0x10'],
    ['1,5G'],
    ['1.5.1'],
    ['.5G'],
    ['1.'],
    ['12Q'],
    ['1KK'],
    ['1 K B'],
    ['1E'],
    ['1Gb/s'],
    ['64M extra'],
  ])('%j → BALLAST_BAD_SIZE', (text) => {
    expect(codeOf(() => parseSize(text))).toBe('BALLAST_BAD_SIZE');
  });

  it.each([
    ['a fraction of a byte', '1.5'],
    ['a fraction of a byte with a unit', '1.0001K'],
    ['2^53 bytes', '8P'],
    ['far too big', '99999999P'],
    ['2^53 as digits', '9007199254740992'],
  ])('%s → BALLAST_BAD_SIZE', (_what, text) => {
    expect(codeOf(() => parseSize(text))).toBe('BALLAST_BAD_SIZE');
  });

  it('the message names what was being parsed and quotes the input', () => {
    try {
      parseSize('lots', 'size of "disk"');
      expect.unreachable();
    } catch (e) {
      expect(e).toBeInstanceOf(BallastError);
      expect((e as Error).message).toContain('bad size of "disk"');
      expect((e as Error).message).toContain('"lots"');
      expect((e as Error).name).toBe('BallastError');
    }
  });

  // "iB" is only meaningful after a K/M/G/T/P prefix.
  it('"1iB" is not a size', () => {
    expect(codeOf(() => parseSize('1iB'))).toBe('BALLAST_BAD_SIZE');
  });
});

describe('formatSize', () => {
  it.each([
    [0, '0 B'],
    [1, '1 B'],
    [1023, '1023 B'],
    [K, '1 KiB'],
    [1536, '1.5 KiB'],
    [1025, '1.0 KiB'],
    [1025 * K, '1025 KiB'],
    [64 * M, '64 MiB'],
    [G, '1 GiB'],
    [1.5 * G, '1536 MiB'],
    [10 * G + 1, '10.0 GiB'],
    [2 * T, '2 TiB'],
    [P, '1 PiB'],
    [2048 * P, '2048 PiB'],
  ])('%i → %s', (n, want) => {
    expect(formatSize(n)).toBe(want);
  });

  it('exact values round-trip through parseSize', () => {
    for (const n of [0, 1, 1023, K, 1025 * K, 64 * M, 1.5 * G, 3 * T, 5 * P]) {
      expect(parseSize(formatSize(n))).toBe(n);
    }
  });
});
