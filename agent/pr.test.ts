// Every reservation type × every PERSISTENT RESERVE OUT action × the role of
// the initiator (holder, registrant, other), against the tables in pr.md.

import { describe, expect, it } from 'vitest';
import {
  applyPr,
  EMPTY_PR,
  formatKey,
  fullStatus,
  MAX_KEY,
  type PrRequest,
  type PrResult,
  type PrState,
  type PrSuccess,
  type PrType,
  parseKey,
  parseType,
  prAccess,
  prFromJson,
  prToJson,
  readKeys,
  readReservation,
  roleOf,
} from './pr.js';

const TYPES: PrType[] = [1, 3, 5, 6, 7, 8];
const ALL_REG = new Set<PrType>([7, 8]);
const H = 'host-h';
const R = 'host-r';
const O = 'host-o';
const KEY: Record<string, bigint> = { [H]: 0xan, [R]: 0xbn, [O]: 0n };
const ROLES = [
  ['holder', H],
  ['registrant', R],
  ['other', O],
] as const;

/** H registered (0xa) and holding a reservation of `type`, R registered (0xb), O not registered. */
function world(type: PrType): PrState {
  let s = EMPTY_PR;
  s = must(applyPr(s, { action: 'register', initiator: H, key: 0n, saKey: 0xan }));
  s = must(applyPr(s, { action: 'register', initiator: R, key: 0n, saKey: 0xbn }));
  s = must(applyPr(s, { action: 'reserve', initiator: H, key: 0xan, type }));
  expect(s.generation).toBe(2);
  return s;
}

function must(r: PrResult): PrState {
  if (!r.ok) throw new Error(`${r.code} ${r.reason}: ${r.message}`);
  return r.state;
}

function success(r: PrResult): PrSuccess {
  expect(r.ok, r.ok ? '' : `${r.code} ${r.reason}`).toBe(true);
  return r as PrSuccess;
}

function refused(r: PrResult, code: string, reason?: string): void {
  expect(r.ok).toBe(false);
  if (r.ok) return;
  expect(r.code).toBe(code);
  if (reason) expect(r.reason).toBe(reason);
}

const other = (t: PrType): PrType => (t === 1 ? 3 : 1);

/** The table from pr.md: [holder, registrant, other] × [read, write]. */
const ACCESS: Record<PrType, [string, string, string]> = {
  1: ['rw', 'r', 'r'],
  3: ['rw', '', ''],
  5: ['rw', 'rw', 'r'],
  6: ['rw', 'rw', ''],
  7: ['rw', 'rw', 'r'],
  8: ['rw', 'rw', ''],
};

describe.each(TYPES)('reservation type %i', (type) => {
  const allReg = ALL_REG.has(type);

  it('access: holder, registrant, other (table in pr.md)', () => {
    const s = world(type);
    ROLES.forEach(([, who], i) => {
      const a = prAccess(s, who);
      const want = ACCESS[type][i]!;
      expect({ who, read: a.read, write: a.write }).toEqual({
        who,
        read: want.includes('r'),
        write: want.includes('w'),
      });
    });
    expect(roleOf(s, R)).toBe(allReg ? 'holder' : 'registrant');
  });

  describe.each(ROLES)('as the %s', (role, who) => {
    const req = (r: Omit<PrRequest, 'initiator' | 'key'> & { key?: bigint }): PrRequest => ({
      initiator: who,
      key: KEY[who]!,
      ...r,
    });

    it('REGISTER a new key', () => {
      const s = world(type);
      const r = success(applyPr(s, req({ action: 'register', saKey: 0xcn })));
      expect(r.state.generation).toBe(3);
      expect(r.state.registrations.get(who)).toBe(0xcn);
      // Re-keying keeps the reservation where it was.
      expect(r.state.reservation).toEqual(s.reservation);
    });

    it('REGISTER with a wrong key: PR_CONFLICT', () => {
      const r = applyPr(world(type), req({ action: 'register', key: 0xffn, saKey: 0xcn }));
      refused(r, 'PR_CONFLICT', role === 'other' ? 'not-registered' : 'key-mismatch');
    });

    it('REGISTER with service action key 0 (unregister)', () => {
      const s = world(type);
      const r = success(applyPr(s, req({ action: 'register', saKey: 0n })));
      expect(r.state.registrations.has(who)).toBe(false);
      if (role === 'other') {
        expect(r.changed).toBe(false);
        expect(r.state.generation).toBe(2);
        return;
      }
      expect(r.state.generation).toBe(3);
      if (role === 'holder' && !allReg) expect(r.state.reservation).toBeNull();
      else expect(r.state.reservation?.type).toBe(type);
      // The one left holds an all-registrants reservation alone.
      if (allReg) expect(roleOf(r.state, role === 'holder' ? R : H)).toBe('holder');
    });

    it('REGISTER AND IGNORE EXISTING KEY', () => {
      const s = world(type);
      const r = success(applyPr(s, req({ action: 'register-ignore', key: 0x1234n, saKey: 0xdn })));
      expect(r.state.registrations.get(who)).toBe(0xdn);
      expect(r.state.generation).toBe(3);
      expect(r.state.reservation).toEqual(s.reservation);
    });

    it('RESERVE the same type', () => {
      const r = applyPr(world(type), req({ action: 'reserve', type }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      if (role === 'registrant' && !allReg) return refused(r, 'PR_CONFLICT', 'reserved-by-other');
      const ok = success(r);
      expect(ok.changed).toBe(false);
      expect(ok.state.generation).toBe(2);
    });

    it('RESERVE another type', () => {
      const r = applyPr(world(type), req({ action: 'reserve', type: other(type) }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      if (role === 'registrant' && !allReg) return refused(r, 'PR_CONFLICT', 'reserved-by-other');
      refused(r, 'PR_CONFLICT', 'type-mismatch');
    });

    it('RELEASE the type held', () => {
      const s = world(type);
      const r = applyPr(s, req({ action: 'release', type }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      const ok = success(r);
      // A registrant that does not hold the reservation releases nothing.
      if (role === 'registrant' && !allReg) {
        expect(ok.changed).toBe(false);
        expect(ok.state.reservation).toEqual(s.reservation);
      } else {
        expect(ok.state.reservation).toBeNull();
      }
      // RELEASE never touches registrations or the generation.
      expect(ok.state.generation).toBe(2);
      expect(ok.state.registrations.size).toBe(2);
    });

    it('RELEASE with the wrong type', () => {
      const r = applyPr(world(type), req({ action: 'release', type: other(type) }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      if (role === 'registrant' && !allReg) {
        expect(success(r).changed).toBe(false);
        return;
      }
      refused(r, 'PR_INVALID_RELEASE');
    });

    it('CLEAR', () => {
      const r = applyPr(world(type), req({ action: 'clear' }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      const ok = success(r);
      expect(ok.state.registrations.size).toBe(0);
      expect(ok.state.reservation).toBeNull();
      expect(ok.state.generation).toBe(3);
    });

    it.each(['preempt', 'preempt-abort'] as const)('%s the other registered key', (action) => {
      const victim = who === H ? R : H;
      const r = applyPr(world(type), req({ action, saKey: KEY[victim], type }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      const ok = success(r);
      expect(ok.preempted).toEqual([victim]);
      expect(ok.state.registrations.has(victim)).toBe(false);
      expect(ok.state.registrations.get(who)).toBe(KEY[who]);
      expect(ok.state.generation).toBe(3);
      expect(ok.state.reservation?.type).toBe(type);
      // Whoever is left holds it: the preemptor took it from the holder, or kept it.
      expect(roleOf(ok.state, who)).toBe('holder');
      expect(prAccess(ok.state, victim).write).toBe(false);
    });

    it.each(['preempt', 'preempt-abort'] as const)(
      '%s with the holder key to change the type',
      (action) => {
        const r = applyPr(world(type), req({ action, saKey: KEY[H], type: other(type) }));
        if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
        if (allReg) {
          // Under all-registrants the key only removes other registrations; the reservation stays.
          if (who === H) return refused(r, 'PR_CONFLICT', 'no-matching-registration');
          const ok = success(r);
          expect(ok.preempted).toEqual([H]);
          expect(ok.state.reservation?.type).toBe(type);
          return;
        }
        const ok = success(r);
        expect(ok.state.reservation).toEqual({ type: other(type), holder: who });
        expect(ok.preempted).toEqual(who === H ? [] : [H]);
      },
    );

    it.each(['preempt', 'preempt-abort'] as const)('%s with service action key 0', (action) => {
      const r = applyPr(world(type), req({ action, saKey: 0n, type: other(type) }));
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      if (!allReg) return refused(r, 'PR_INVALID_REQUEST');
      const ok = success(r);
      expect(ok.preempted).toEqual([who === H ? R : H]);
      expect(ok.state.reservation).toEqual({ type: other(type), holder: who });
      expect([...ok.state.registrations.keys()]).toEqual([who]);
    });

    it('PREEMPT a key nobody has: PR_CONFLICT', () => {
      const r = applyPr(world(type), req({ action: 'preempt', saKey: 0x77n, type }));
      refused(r, 'PR_CONFLICT', role === 'other' ? 'not-registered' : 'no-matching-registration');
    });

    it('REGISTER AND MOVE to a new identity', () => {
      const r = applyPr(
        world(type),
        req({ action: 'register-move', saKey: 0xen, target: 'host-n', unregister: true }),
      );
      if (role === 'other') return refused(r, 'PR_CONFLICT', 'not-registered');
      if (allReg) return refused(r, 'PR_INVALID_REQUEST');
      if (role === 'registrant') return refused(r, 'PR_CONFLICT', 'not-holder');
      const ok = success(r);
      expect(ok.state.reservation).toEqual({ type, holder: 'host-n' });
      expect(ok.state.registrations.get('host-n')).toBe(0xen);
      expect(ok.state.registrations.has(H)).toBe(false);
      expect(prAccess(ok.state, H).write).toBe(false);
    });
  });
});

describe('without a reservation', () => {
  const two = (): PrState => {
    let s = must(applyPr(EMPTY_PR, { action: 'register', initiator: H, key: 0n, saKey: 0xan }));
    s = must(applyPr(s, { action: 'register', initiator: R, key: 0n, saKey: 0xbn }));
    return s;
  };

  it('everyone may read and write; registering alone restricts nothing', () => {
    for (const who of [H, R, O]) expect(prAccess(two(), who)).toEqual({ read: true, write: true });
  });

  it('RESERVE creates it without a generation change; RELEASE of nothing is a no-op', () => {
    const s = two();
    const rel = success(applyPr(s, { action: 'release', initiator: H, key: 0xan, type: 1 }));
    expect(rel.changed).toBe(false);
    const r = success(applyPr(s, { action: 'reserve', initiator: R, key: 0xbn, type: 3 }));
    expect(r.state.reservation).toEqual({ type: 3, holder: R });
    expect(r.state.generation).toBe(s.generation);
  });

  it('PREEMPT removes registrations only; key 0 is an invalid field', () => {
    const s = two();
    const r = success(
      applyPr(s, { action: 'preempt', initiator: H, key: 0xan, saKey: 0xbn, type: 1 }),
    );
    expect(r.preempted).toEqual([R]);
    expect(r.state.reservation).toBeNull();
    refused(
      applyPr(s, { action: 'preempt', initiator: H, key: 0xan, saKey: 0n, type: 1 }),
      'PR_INVALID_REQUEST',
    );
  });

  it('REGISTER AND MOVE needs a reservation', () => {
    refused(
      applyPr(two(), { action: 'register-move', initiator: H, key: 0xan, saKey: 1n, target: 'x' }),
      'PR_CONFLICT',
      'no-reservation',
    );
  });

  it('the same key registered by two identities: PREEMPT removes both others', () => {
    let s = two();
    s = must(applyPr(s, { action: 'register', initiator: O, key: 0n, saKey: 0xbn }));
    s = must(applyPr(s, { action: 'reserve', initiator: R, key: 0xbn, type: 1 }));
    const r = success(
      applyPr(s, { action: 'preempt', initiator: H, key: 0xan, saKey: 0xbn, type: 1 }),
    );
    expect(r.preempted.sort()).toEqual([O, R].sort());
    expect(r.state.reservation).toEqual({ type: 1, holder: H });
  });
});

describe('bad input', () => {
  it.each([0, 2, 4, 9, -1, 1.5, Number.NaN])('type %s: PR_BAD_TYPE', (t) => {
    const s = world(1);
    refused(
      applyPr(s, { action: 'reserve', initiator: H, key: 0xan, type: t as PrType }),
      'PR_BAD_TYPE',
    );
    refused(
      applyPr(s, { action: 'release', initiator: H, key: 0xan, type: t as PrType }),
      'PR_BAD_TYPE',
    );
    refused(
      applyPr(s, { action: 'preempt', initiator: R, key: 0xbn, saKey: 0xan, type: t as PrType }),
      'PR_BAD_TYPE',
    );
  });

  it.each([-1n, MAX_KEY + 1n])('key %s: PR_BAD_KEY', (k) => {
    refused(
      applyPr(EMPTY_PR, { action: 'register', initiator: H, key: k, saKey: 1n }),
      'PR_BAD_KEY',
    );
    refused(
      applyPr(EMPTY_PR, { action: 'register', initiator: H, key: 0n, saKey: k }),
      'PR_BAD_KEY',
    );
  });

  it('an unknown action: PR_INVALID_REQUEST', () => {
    const req = { action: 'steal', initiator: H, key: 0n } as unknown as PrRequest;
    refused(applyPr(EMPTY_PR, req), 'PR_INVALID_REQUEST');
  });

  it('parseKey and parseType', () => {
    expect(parseKey('0x1F')).toBe(31n);
    expect(parseKey('31')).toBe(31n);
    expect(parseKey('0xffffffffffffffff')).toBe(MAX_KEY);
    for (const bad of [
      '',
      '1f',
      '0x',
      '-1',
      '0x1ffffffffffffffff',
      '18446744073709551616',
      '1e3',
    ]) {
      expect(parseKey(bad)).toBeNull();
    }
    expect(parseType('we')).toBe(1);
    expect(parseType('8')).toBe(8);
    expect(parseType('EAAR')).toBe(8);
    expect(parseType('2')).toBeNull();
    expect(parseType('exclusive')).toBeNull();
  });
});

describe('PERSISTENT RESERVE IN and state round trips', () => {
  it('read keys, read reservation, full status', () => {
    const s = world(1);
    expect(readKeys(s)).toEqual({ generation: 2, keys: [0xan, 0xbn] });
    expect(readReservation(s)).toEqual({ generation: 2, key: 0xan, type: 1 });
    expect(fullStatus(s).registrations).toEqual([
      { identity: H, key: 0xan, holder: true, type: 1 },
      { identity: R, key: 0xbn, holder: false, type: null },
    ]);
    const all = world(7);
    expect(readReservation(all)).toEqual({ generation: 2, key: 0n, type: 7 });
    expect(fullStatus(all).registrations.every((r) => r.holder && r.type === 7)).toBe(true);
    expect(readReservation(EMPTY_PR)).toEqual({ generation: 0, key: null, type: null });
  });

  it('JSON round trip keeps keys, holder and generation', () => {
    const s = world(6);
    const back = prFromJson(JSON.parse(JSON.stringify(prToJson(s))));
    expect(back).toEqual(s);
    expect(formatKey(0xabcn)).toBe('0xabc');
  });

  it('the generation wraps at 2^32', () => {
    const s: PrState = { ...EMPTY_PR, generation: 2 ** 32 - 1 };
    expect(
      must(applyPr(s, { action: 'register', initiator: H, key: 0n, saKey: 1n })).generation,
    ).toBe(0);
  });
});
