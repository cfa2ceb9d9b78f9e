import { describe, expect, it } from 'vitest';
import { FlattenedReader, flatten, isFlattened } from './flattened.js';

async function reassemble(
  stream: Buffer,
  cut: number[],
): Promise<{ out: Buffer; r: FlattenedReader }> {
  const out = Buffer.alloc(64);
  const r = new FlattenedReader((off, data) => {
    data.copy(out, off);
  });
  let prev = 0;
  for (const c of [...cut, stream.length]) {
    await r.push(stream.subarray(prev, c));
    prev = c;
  }
  return { out, r };
}

describe('flattened format', () => {
  const recs = [
    { offset: 0, data: Buffer.from('KDUMP   ') },
    { offset: 40, data: Buffer.from('tail') },
    { offset: 8, data: Buffer.from('middle') },
  ];
  const stream = Buffer.concat([flatten(recs), Buffer.alloc(100)]);

  it('is recognised by its signature', () => {
    expect(isFlattened(stream)).toBe(true);
    expect(isFlattened(Buffer.from('\x7fELF............'))).toBe(false);
  });

  it('writes every record at its offset, whatever the chunking', async () => {
    const want = Buffer.alloc(64);
    for (const r of recs) r.data.copy(want, r.offset);
    for (const cut of [[], [1], [4095, 4096, 4097], [4100, 4111, 4112, 4119], [4150]]) {
      const { out, r } = await reassemble(stream, cut);
      expect(out).toEqual(want);
      expect(r.size).toBe(44);
      expect(() => r.finish()).not.toThrow();
    }
    const every = Array.from({ length: stream.length - 1 }, (_, i) => i + 1);
    expect((await reassemble(stream, every)).out).toEqual(want);
  });

  it('a truncated stream or a foreign header is DUMP_BAD_FLATTENED', async () => {
    const { r } = await reassemble(stream.subarray(0, 4096 + 20), []);
    expect(() => r.finish()).toThrow(expect.objectContaining({ code: 'DUMP_BAD_FLATTENED' }));
    await expect(reassemble(Buffer.alloc(5000, 1), [])).rejects.toMatchObject({
      code: 'DUMP_BAD_FLATTENED',
    });
  });
});
