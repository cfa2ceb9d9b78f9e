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
