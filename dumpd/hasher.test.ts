import { createHash, randomBytes } from 'node:crypto';
import { expect, it } from 'vitest';
import { Hasher } from './hasher.js';

it('hashes pieces in order on a worker, with a backlog that drains', async () => {
  const pieces = Array.from({ length: 20 }, () => randomBytes(1 << 20));
  const h = new Hasher();
  for (const p of pieces) h.update(p);
  expect(h.backlog).toBe(20 << 20);
  await h.below(4 << 20);
  expect(h.backlog).toBeLessThanOrEqual(4 << 20);
  const want = createHash('sha256');
  for (const p of pieces) want.update(p);
  expect(await h.digest()).toBe(want.digest('hex'));
  expect(h.backlog).toBe(0);
});

it('hashes pieces of shared buffers in place, each promise resolving once hashed', async () => {
  const slabs = [0, 1, 2].map(() => Buffer.from(new SharedArrayBuffer(1 << 20)));
  const want = createHash('sha256');
  const h = new Hasher();
  for (let i = 0; i < 9; i++) {
    const slab = slabs[i % 3] as Buffer;
    // A slab is refilled only once the worker is done with its previous piece.
    const piece = slab.subarray(i, (1 << 20) - i);
    randomBytes(piece.length).copy(piece);
    want.update(piece);
    await h.update(piece);
  }
  h.update(randomBytes(1000).fill(7));
  want.update(Buffer.alloc(1000, 7));
  expect(await h.digest()).toBe(want.digest('hex'));
});

it('close() releases every piece handed over', async () => {
  const h = new Hasher();
  const p = h.update(Buffer.from(new SharedArrayBuffer(4096)));
  h.close();
  await p;
  await expect(h.digest()).rejects.toThrow();
});
