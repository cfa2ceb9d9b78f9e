import { describe, expect, it } from 'vitest';
import { BufferPool, classSize, MAX_CLASS } from './buffers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

describe('classSize', () => {
  it('rounds up to a power of two from 4 KiB to 2 MiB, exact above', () => {
    expect(classSize(0)).toBe(4 * KiB);
    expect(classSize(1)).toBe(4 * KiB);
    expect(classSize(4 * KiB)).toBe(4 * KiB);
    expect(classSize(4 * KiB + 1)).toBe(8 * KiB);
    expect(classSize(MiB)).toBe(MiB);
    expect(classSize(MiB + 512)).toBe(2 * MiB);
    expect(classSize(MAX_CLASS)).toBe(MAX_CLASS);
    expect(classSize(MAX_CLASS + 1)).toBe(MAX_CLASS + 1);
    expect(classSize(32 * MiB)).toBe(32 * MiB);
  });
});

describe('BufferPool', () => {
  it('hands a returned buffer to the next request of its class', () => {
    const p = new BufferPool(8 * MiB);
    const a = p.take(MiB);
    expect(a.length).toBe(MiB);
    expect(p.used).toBe(MiB);
    p.give(a);
    expect(p.used).toBe(0);
    expect(p.kept).toBe(MiB);
    const b = p.take(700 * KiB);
    expect(b).toBe(a);
    expect(p.kept).toBe(0);
  });

  it('counts what it hands out against the budget', () => {
    const p = new BufferPool(4 * MiB);
    const bs = [p.take(MiB), p.take(MiB), p.take(MiB)];
    expect(p.fits(MiB)).toBe(true);
    bs.push(p.take(MiB));
    expect(p.fits(MiB)).toBe(false);
    expect(p.fits(1)).toBe(false);
    p.give(bs.pop()!);
    expect(p.fits(MiB)).toBe(true);
    expect(p.fits(2 * MiB)).toBe(false);
  });

  it('keeps what is handed out and what is kept within twice the budget together', () => {
    const p = new BufferPool(2 * MiB);
    const big = [p.take(MiB), p.take(MiB), p.take(MiB), p.take(MiB)];
    for (const b of big) p.give(b);
    expect(p.kept).toBe(4 * MiB);
    // Another size: kept buffers of 1 MiB make room.
    const small = [] as Buffer[];
    for (let i = 0; i < 512; i++) small.push(p.take(4 * KiB));
    expect(p.used).toBe(2 * MiB);
    expect(p.used + p.kept).toBeLessThanOrEqual(4 * MiB);
    expect(p.kept).toBeLessThan(4 * MiB);
    for (const b of small) p.give(b);
    expect(p.used).toBe(0);
    expect(p.kept).toBeLessThanOrEqual(4 * MiB);
  });

  it('a buffer given back past twice the budget is dropped', () => {
    const p = new BufferPool(MiB);
    const bs = [p.take(MiB), p.take(MiB), p.take(MiB)];
    for (const b of bs) p.give(b);
    expect(p.kept).toBe(2 * MiB);
  });

  it('never keeps buffers above 2 MiB, but counts them while in use', () => {
    const p = new BufferPool(64 * MiB);
    const b = p.take(8 * MiB);
    expect(b.length).toBe(8 * MiB);
    expect(p.used).toBe(8 * MiB);
    p.give(b);
    expect(p.used).toBe(0);
    expect(p.kept).toBe(0);
  });

  it('a request past the budget is still served (a connection with nothing in flight must progress)', () => {
    const p = new BufferPool(MiB);
    const a = p.take(MiB);
    const b = p.take(MiB);
    expect(p.used).toBe(2 * MiB);
    p.give(a);
    p.give(b);
    expect(p.used).toBe(0);
    expect(p.kept).toBe(2 * MiB);
  });

  it('wakes every waiter once when a buffer comes back; a waiter may wait again', () => {
    const p = new BufferPool(MiB);
    const a = p.take(MiB);
    const calls: string[] = [];
    const w2 = () => {
      calls.push('w2');
      if (calls.length < 3) p.wait(w2);
    };
    p.wait(() => calls.push('w1'));
    p.wait(w2);
    p.give(a);
    expect(calls).toEqual(['w1', 'w2']);
    p.give(p.take(4 * KiB));
    expect(calls).toEqual(['w1', 'w2', 'w2']);
    p.give(p.take(4 * KiB));
    expect(calls).toEqual(['w1', 'w2', 'w2']);
  });

  it('a buffer given back during a wake-up does not wake the same round again', () => {
    const p = new BufferPool(MiB);
    const a = p.take(MiB);
    const b = p.take(4 * KiB);
    let n = 0;
    const w = () => {
      n++;
      p.wait(w);
      p.give(b);
    };
    p.wait(w);
    p.give(a);
    expect(n).toBe(1);
  });
});
