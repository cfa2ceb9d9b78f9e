// The checker's SPC-4 model against pr.md's tables, case by case.

import { describe, expect, it } from 'vitest';
import { access, EMPTY, type Model, type Request, showModel, step } from './model.js';

function run(...reqs: Request[]): { m: Model; outs: ReturnType<typeof step>['out'][] } {
  let m = EMPTY;
  const outs = [];
  for (const q of reqs) {
    const r = step(m, q);
    outs.push(r.out);
    m = r.next;
  }
  return { m, outs };
}

const reg = (as: string, sa: string, key = '0x0'): Request => ({
  action: 'register',
  as,
  key,
  saKey: sa,
});

describe('nemesis model', () => {
  it('REGISTER: new, replace, wrong key, unregister; generation counts changes only', () => {
    const { m, outs } = run(
      reg('a', '0xa'),
      reg('a', '0xb', '0x1'),
      reg('a', '0xb', '0xa'),
      reg('b', '0x0'),
    );
    expect(outs.map((o) => (o.ok ? o.generation : o.code))).toEqual([1, 'PR_CONFLICT', 2, 0 + 2]);
    expect(showModel(m)).toBe('g2 [a=b] -');
    expect(step(m, reg('a', '0x0', '0xb')).next.regs).toEqual({});
    expect(step(EMPTY, reg('a', '0x5', '0x7')).out).toMatchObject({
      ok: false,
      reason: 'not-registered',
    });
  });

  it('RESERVE and RELEASE: holder, type mismatch, other holder, invalid release', () => {
    const base = run(reg('a', '0xa'), reg('b', '0xb'), {
      action: 'reserve',
      as: 'a',
      key: '0xa',
      type: 'WE',
    }).m;
    expect(base.reservation).toEqual({ type: 1, holder: 'a' });
    expect(step(base, { action: 'reserve', as: 'a', key: '0xa', type: 1 }).out).toMatchObject({
      ok: true,
      changed: false,
    });
    expect(step(base, { action: 'reserve', as: 'a', key: '0xa', type: 3 }).out).toMatchObject({
      reason: 'type-mismatch',
    });
    expect(step(base, { action: 'reserve', as: 'b', key: '0xb', type: 1 }).out).toMatchObject({
      reason: 'reserved-by-other',
    });
    expect(step(base, { action: 'release', as: 'a', key: '0xa', type: 3 }).out).toMatchObject({
      code: 'PR_INVALID_RELEASE',
    });
    expect(step(base, { action: 'release', as: 'b', key: '0xb', type: 1 }).out).toMatchObject({
      ok: true,
      changed: false,
    });
    expect(
      step(base, { action: 'release', as: 'a', key: '0xa', type: 1 }).next.reservation,
    ).toBeNull();
    expect(step(base, { action: 'reserve', as: 'a', key: '0xa', type: 'XX' }).out).toMatchObject({
      code: 'PR_BAD_TYPE',
    });
    expect(
      step(base, { action: 'register', as: 'c', key: '0x0', saKey: '0xc', type: 'XX' }).out,
    ).toMatchObject({ code: 'PR_BAD_TYPE' });
  });

  it('access by type: holder, registrant, other', () => {
    const regs = { h: '1', r: '2' };
    const at = (type: number): Model => ({
      generation: 2,
      regs,
      reservation: { type, holder: 'h' },
    });
    const row = (t: number) =>
      ['h', 'r', 'o']
        .map((id) => {
          const x = access(at(t), id);
          return `${x.read ? 'r' : '-'}${x.write ? 'w' : '-'}`;
        })
        .join(' ');
    expect(row(1)).toBe('rw r- r-');
    expect(row(3)).toBe('rw -- --');
    expect(row(5)).toBe('rw rw r-');
    expect(row(6)).toBe('rw rw --');
    expect(row(7)).toBe('rw rw r-');
    expect(row(8)).toBe('rw rw --');
    expect(access(EMPTY, 'o')).toEqual({ read: true, write: true });
  });

  it('PREEMPT: the holder key takes the reservation; another key drops only; no match conflicts; 0 is invalid', () => {
    const base = run(reg('a', '0xa'), reg('b', '0xb'), {
      action: 'reserve',
      as: 'a',
      key: '0xa',
      type: 3,
    }).m;
    const take = step(base, {
      action: 'preempt-abort',
      as: 'b',
      key: '0xb',
      saKey: '0xa',
      type: 1,
    });
    expect(take.out).toEqual({ ok: true, changed: true, generation: 3, preempted: ['a'] });
    expect(take.next.reservation).toEqual({ type: 1, holder: 'b' });
    expect(
      step(base, { action: 'preempt', as: 'b', key: '0xb', saKey: '0x0', type: 1 }).out,
    ).toMatchObject({ code: 'PR_INVALID_REQUEST' });
    expect(
      step(base, { action: 'preempt', as: 'a', key: '0xa', saKey: '0xb', type: 1 }).next,
    ).toMatchObject({ regs: { a: 'a' }, reservation: { type: 3, holder: 'a' } });
    expect(
      step(base, { action: 'preempt', as: 'a', key: '0xa', saKey: '0xf', type: 1 }).out,
    ).toMatchObject({ reason: 'no-matching-registration' });
    // all registrants, key 0: everyone else goes and the initiator holds a new reservation
    const ar = run(reg('a', '0xa'), reg('b', '0xb'), {
      action: 'reserve',
      as: 'a',
      key: '0xa',
      type: 7,
    }).m;
    const all = step(ar, { action: 'preempt', as: 'b', key: '0xb', saKey: '0x0', type: 3 });
    expect(all.out).toMatchObject({ ok: true, preempted: ['a'] });
    expect(all.next.reservation).toEqual({ type: 3, holder: 'b' });
  });

  it('unregistering releases a held reservation; an all-registrants one stays while anyone is left', () => {
    const held = run(
      reg('a', '0xa'),
      { action: 'reserve', as: 'a', key: '0xa', type: 5 },
      reg('a', '0x0', '0xa'),
    ).m;
    expect(held.reservation).toBeNull();
    const ar = run(
      reg('a', '0xa'),
      reg('b', '0xb'),
      { action: 'reserve', as: 'a', key: '0xa', type: 8 },
      reg('a', '0x0', '0xa'),
    ).m;
    expect(ar.reservation?.type).toBe(8);
    expect(step(ar, reg('b', '0x0', '0xb')).next.reservation).toBeNull();
  });

  it('REGISTER AND MOVE and CLEAR', () => {
    const base = run(reg('a', '0xa'), { action: 'reserve', as: 'a', key: '0xa', type: 1 }).m;
    const mv = step(base, {
      action: 'register-move',
      as: 'a',
      key: '0xa',
      saKey: '0xb',
      target: 'b',
      unregister: true,
    });
    expect(showModel(mv.next)).toBe('g2 [b=b] 1@b');
    expect(
      step(base, { action: 'register-move', as: 'a', key: '0xa', saKey: '0xb', target: 'a' }).out,
    ).toMatchObject({ code: 'PR_INVALID_REQUEST' });
    expect(step(EMPTY, { action: 'clear', as: 'a', key: '0x0' }).out).toMatchObject({
      reason: 'not-registered',
    });
    expect(showModel(step(base, { action: 'clear', as: 'a', key: '0xa' }).next)).toBe('g2 [] -');
  });
});
