// Persistent reservations (SPC-4 PERSISTENT RESERVE IN/OUT) for one device, as
// pure functions: a state and a request in, a new state (or a refusal with a
// stable code) out. No I/O, no clocks. agent/pr.md has the state machine and
// the access table this implements; the unit tests walk every type ×
// operation × role.
//
// An "initiator" is a client identity (TLS certificate CN, PSK username, a
// mapped name, or 'anonymous'): SCSI's I_T nexus becomes the identity, so all
// connections of one identity share its registration.

/** Reservation types, numbered as in SPC-4. */
export const PR_TYPE = {
  WRITE_EXCLUSIVE: 1,
  EXCLUSIVE_ACCESS: 3,
  WRITE_EXCLUSIVE_REGISTRANTS_ONLY: 5,
  EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: 6,
  WRITE_EXCLUSIVE_ALL_REGISTRANTS: 7,
  EXCLUSIVE_ACCESS_ALL_REGISTRANTS: 8,
} as const;
export type PrType = (typeof PR_TYPE)[keyof typeof PR_TYPE];

/** Short names, as sg_persist and the CLI use them. */
export const PR_TYPE_NAMES: Record<PrType, string> = {
  1: 'WE',
  3: 'EA',
  5: 'WERO',
  6: 'EARO',
  7: 'WEAR',
  8: 'EAAR',
};

export const PR_TYPES: readonly PrType[] = [1, 3, 5, 6, 7, 8];

export function isAllRegistrants(t: PrType): boolean {
  return t === 7 || t === 8;
}

function registrantsOnly(t: PrType): boolean {
  return t === 5 || t === 6 || t === 7 || t === 8;
}

function exclusiveAccess(t: PrType): boolean {
  return t === 3 || t === 6 || t === 8;
}

export interface Reservation {
  readonly type: PrType;
  /** The reserving identity; for the all-registrants types every registrant holds it. */
  readonly holder: string;
}

export interface PrState {
  /** PRgeneration: bumped by every change to the registrations (not by RESERVE/RELEASE). */
  readonly generation: number;
  /** identity → reservation key (never 0). */
  readonly registrations: ReadonlyMap<string, bigint>;
  readonly reservation: Reservation | null;
}

export const EMPTY_PR: PrState = { generation: 0, registrations: new Map(), reservation: null };

export const MAX_KEY = (1n << 64n) - 1n;

export type PrAction =
  | 'register'
  | 'register-ignore'
  | 'reserve'
  | 'release'
  | 'clear'
  | 'preempt'
  | 'preempt-abort'
  | 'register-move';

export const PR_ACTIONS: readonly PrAction[] = [
  'register',
  'register-ignore',
  'reserve',
  'release',
  'clear',
  'preempt',
  'preempt-abort',
  'register-move',
];

/** One PERSISTENT RESERVE OUT. Fields an action does not use are ignored. */
export interface PrRequest {
  action: PrAction;
  /** The identity the request is made for. */
  initiator: string;
  /** RESERVATION KEY: the initiator's current key (0 when it has none). */
  key: bigint;
  /** SERVICE ACTION RESERVATION KEY: the new key, or the key to preempt. */
  saKey?: bigint;
  type?: PrType;
  /** REGISTER AND MOVE: the identity the reservation moves to. */
  target?: string;
  /** REGISTER AND MOVE: drop the initiator's registration after the move. */
  unregister?: boolean;
}

/**
 * Why a request was refused. PR_CONFLICT is SCSI's RESERVATION CONFLICT; the
 * others are its ILLEGAL REQUEST cases. `reason` is stable too.
 */
export type PrErrorCode =
  | 'PR_CONFLICT'
  | 'PR_BAD_TYPE'
  | 'PR_BAD_KEY'
  | 'PR_INVALID_RELEASE'
  | 'PR_INVALID_REQUEST';

export type PrConflictReason =
  | 'not-registered'
  | 'key-mismatch'
  | 'reserved-by-other'
  | 'type-mismatch'
  | 'no-matching-registration'
  | 'no-reservation'
  | 'not-holder';

export interface PrRefusal {
  ok: false;
  code: PrErrorCode;
  reason: PrConflictReason | 'bad-type' | 'bad-key' | 'invalid-field';
  message: string;
}

export interface PrSuccess {
  ok: true;
  state: PrState;
  /** Anything changed (registrations or reservation). */
  changed: boolean;
  /** Identities whose registration a PREEMPT (AND ABORT) removed. */
  preempted: string[];
}

export type PrResult = PrSuccess | PrRefusal;

function conflict(reason: PrConflictReason, message: string): PrRefusal {
  return { ok: false, code: 'PR_CONFLICT', reason, message };
}

function illegal(
  code: Exclude<PrErrorCode, 'PR_CONFLICT'>,
  reason: PrRefusal['reason'],
  message: string,
): PrRefusal {
  return { ok: false, code, reason, message };
}

const GEN_MOD = 2 ** 32;

function next(
  s: PrState,
  registrations: Map<string, bigint>,
  reservation: Reservation | null,
  bump: boolean,
): PrState {
  return {
    generation: bump ? (s.generation + 1) % GEN_MOD : s.generation,
    registrations,
    reservation,
  };
}

function ok(state: PrState, changed: boolean, preempted: string[] = []): PrSuccess {
  return { ok: true, state, changed, preempted };
}

export function isPrType(t: unknown): t is PrType {
  return typeof t === 'number' && (PR_TYPES as readonly number[]).includes(t);
}

export function validKey(k: unknown): k is bigint {
  return typeof k === 'bigint' && k >= 0n && k <= MAX_KEY;
}

/** Whether `who` holds the reservation (every registrant does for the all-registrants types). */
export function isHolder(s: PrState, who: string): boolean {
  const r = s.reservation;
  if (!r) return false;
  if (isAllRegistrants(r.type)) return s.registrations.has(who);
  return r.holder === who;
}

/** Removes `who`'s registration, releasing the reservation where SPC-4 says so. */
function unregister(s: PrState, regs: Map<string, bigint>, who: string): Reservation | null {
  regs.delete(who);
  const r = s.reservation;
  if (!r) return null;
  if (isAllRegistrants(r.type)) {
    // Held while any registrant is left.
    if (regs.size === 0) return null;
    return r.holder === who ? { type: r.type, holder: regs.keys().next().value as string } : r;
  }
  return r.holder === who ? null : r;
}

/** Applies one PERSISTENT RESERVE OUT. Never throws on bad input: it refuses. */
export function applyPr(s: PrState, req: PrRequest): PrResult {
  const me = req.initiator;
  if (!validKey(req.key)) return illegal('PR_BAD_KEY', 'bad-key', 'the key is not a 64-bit value');
  if (req.saKey !== undefined && !validKey(req.saKey)) {
    return illegal('PR_BAD_KEY', 'bad-key', 'the service action key is not a 64-bit value');
  }
  const mine = s.registrations.get(me);
  const sa = req.saKey ?? 0n;

  switch (req.action) {
    case 'register':
    case 'register-ignore': {
      if (mine === undefined) {
        if (req.action === 'register' && req.key !== 0n) {
          return conflict('not-registered', `${me} is not registered, so its key must be 0`);
        }
        if (sa === 0n) return ok(s, false);
        const regs = new Map(s.registrations);
        regs.set(me, sa);
        return ok(next(s, regs, s.reservation, true), true);
      }
      if (req.action === 'register' && req.key !== mine) {
        return conflict('key-mismatch', `${me} is registered with another key`);
      }
      const regs = new Map(s.registrations);
      if (sa === 0n) {
        const r = unregister(s, regs, me);
        return ok(next(s, regs, r, true), true);
      }
      regs.set(me, sa);
      return ok(next(s, regs, s.reservation, true), true);
    }

    case 'reserve': {
      if (!isPrType(req.type)) return badType(req.type);
      const check = registered(mine, req.key, me);
      if (check) return check;
      const r = s.reservation;
      if (r) {
        if (isHolder(s, me)) {
          if (r.type === req.type) return ok(s, false);
          return conflict('type-mismatch', `${me} holds a ${PR_TYPE_NAMES[r.type]} reservation`);
        }
        return conflict('reserved-by-other', `reserved (${PR_TYPE_NAMES[r.type]}) by ${r.holder}`);
      }
      return ok(next(s, new Map(s.registrations), { type: req.type, holder: me }, false), true);
    }

    case 'release': {
      if (!isPrType(req.type)) return badType(req.type);
      const check = registered(mine, req.key, me);
      if (check) return check;
      const r = s.reservation;
      // Releasing what one does not hold is a no-op, as SPC-4 says.
      if (!r || !isHolder(s, me)) return ok(s, false);
      if (r.type !== req.type) {
        return illegal(
          'PR_INVALID_RELEASE',
          'type-mismatch',
          `the reservation is ${PR_TYPE_NAMES[r.type]}, not ${PR_TYPE_NAMES[req.type]}`,
        );
      }
      return ok(next(s, new Map(s.registrations), null, false), true);
    }

    case 'clear': {
      const check = registered(mine, req.key, me);
      if (check) return check;
      return ok(next(s, new Map(), null, true), true);
    }

    case 'preempt':
    case 'preempt-abort':
      return preempt(s, req, mine, sa);

    case 'register-move':
      return registerMove(s, req, mine, sa);

    default:
      return illegal('PR_INVALID_REQUEST', 'invalid-field', `unknown action ${String(req.action)}`);
  }
}

function badType(t: unknown): PrRefusal {
  return illegal(
    'PR_BAD_TYPE',
    'bad-type',
    `unknown reservation type ${String(t)} (expected 1, 3, 5, 6, 7 or 8)`,
  );
}

function registered(mine: bigint | undefined, key: bigint, me: string): PrRefusal | null {
  if (mine === undefined) return conflict('not-registered', `${me} is not registered`);
  if (mine !== key) return conflict('key-mismatch', `${me} is registered with another key`);
  return null;
}

function preempt(s: PrState, req: PrRequest, mine: bigint | undefined, sa: bigint): PrResult {
  const me = req.initiator;
  const check = registered(mine, req.key, me);
  if (check) return check;
  const r = s.reservation;
  const regs = new Map(s.registrations);
  const preempted: string[] = [];
  /** Drops every other registration with key `k`. */
  const drop = (k: bigint): void => {
    for (const [who, key] of s.registrations) {
      if (who !== me && key === k) {
        regs.delete(who);
        preempted.push(who);
      }
    }
  };

  if (r === null || (isAllRegistrants(r.type) && sa !== 0n)) {
    // No reservation to take (or one that every registrant holds): only registrations go.
    if (sa === 0n) {
      return illegal('PR_INVALID_REQUEST', 'invalid-field', 'the service action key must not be 0');
    }
    drop(sa);
    if (preempted.length === 0) {
      return conflict('no-matching-registration', 'no other registration has that key');
    }
    let res = r;
    if (r && !regs.has(r.holder)) res = { type: r.type, holder: me };
    return ok(next(s, regs, res, true), true, preempted);
  }

  if (!isPrType(req.type)) return badType(req.type);

  if (isAllRegistrants(r.type)) {
    // sa === 0: everyone else goes, and the initiator's reservation replaces theirs.
    for (const who of s.registrations.keys()) {
      if (who !== me) {
        regs.delete(who);
        preempted.push(who);
      }
    }
    return ok(next(s, regs, { type: req.type, holder: me }, true), true, preempted);
  }

  const holderKey = s.registrations.get(r.holder);
  if (sa === holderKey) {
    // Take the reservation: the holder's key goes (everywhere but here), the type may change.
    drop(sa);
    return ok(next(s, regs, { type: req.type, holder: me }, true), true, preempted);
  }
  if (sa === 0n) {
    return illegal(
      'PR_INVALID_REQUEST',
      'invalid-field',
      'the service action key must not be 0 unless the reservation is all-registrants',
    );
  }
  drop(sa);
  if (preempted.length === 0) {
    return conflict('no-matching-registration', 'no other registration has that key');
  }
  return ok(next(s, regs, r, true), true, preempted);
}

function registerMove(s: PrState, req: PrRequest, mine: bigint | undefined, sa: bigint): PrResult {
  const me = req.initiator;
  const check = registered(mine, req.key, me);
  if (check) return check;
  const r = s.reservation;
  if (!r) return conflict('no-reservation', 'there is no reservation to move');
  if (isAllRegistrants(r.type)) {
    return illegal(
      'PR_INVALID_REQUEST',
      'invalid-field',
      'an all-registrants reservation cannot be moved',
    );
  }
  if (r.holder !== me) return conflict('not-holder', `${me} does not hold the reservation`);
  const target = req.target;
  if (!target || target === me) {
    return illegal(
      'PR_INVALID_REQUEST',
      'invalid-field',
      'REGISTER AND MOVE needs another identity',
    );
  }
  if (sa === 0n) {
    return illegal('PR_INVALID_REQUEST', 'invalid-field', 'the service action key must not be 0');
  }
  const regs = new Map(s.registrations);
  regs.set(target, sa);
  if (req.unregister) regs.delete(me);
  return ok(next(s, regs, { type: r.type, holder: target }, true), true);
}

// ---- PERSISTENT RESERVE IN ---------------------------------------------------

export interface PrKeys {
  generation: number;
  keys: bigint[];
}

export function readKeys(s: PrState): PrKeys {
  return { generation: s.generation, keys: [...s.registrations.values()] };
}

export interface PrReservationView {
  generation: number;
  /** The holder's key (0 for the all-registrants types), or null without a reservation. */
  key: bigint | null;
  type: PrType | null;
}

export function readReservation(s: PrState): PrReservationView {
  const r = s.reservation;
  if (!r) return { generation: s.generation, key: null, type: null };
  const key = isAllRegistrants(r.type) ? 0n : (s.registrations.get(r.holder) ?? 0n);
  return { generation: s.generation, key, type: r.type };
}

export interface PrStatusEntry {
  identity: string;
  key: bigint;
  holder: boolean;
  type: PrType | null;
}

export function fullStatus(s: PrState): { generation: number; registrations: PrStatusEntry[] } {
  const registrations: PrStatusEntry[] = [];
  for (const [identity, key] of s.registrations) {
    const holder = isHolder(s, identity);
    registrations.push({
      identity,
      key,
      holder,
      type: holder ? (s.reservation?.type ?? null) : null,
    });
  }
  return { generation: s.generation, registrations };
}

// ---- access --------------------------------------------------------------------

export type PrRole = 'holder' | 'registrant' | 'other';

export interface PrAccess {
  read: boolean;
  write: boolean;
}

export function roleOf(s: PrState, who: string): PrRole {
  if (isHolder(s, who)) return 'holder';
  return s.registrations.has(who) ? 'registrant' : 'other';
}

/** What `who` may do under the current reservation (see the table in pr.md). */
export function prAccess(s: PrState, who: string): PrAccess {
  const r = s.reservation;
  if (!r) return { read: true, write: true };
  const role = roleOf(s, who);
  if (role === 'holder') return { read: true, write: true };
  if (role === 'registrant' && registrantsOnly(r.type)) return { read: true, write: true };
  return { read: !exclusiveAccess(r.type), write: false };
}

// ---- text forms ------------------------------------------------------------------

/** A key as the CLI and API write it: 0x followed by hex digits. */
export function formatKey(k: bigint): string {
  return `0x${k.toString(16)}`;
}

/** Parses `0x1f`, `1f` is refused (ambiguous), `31` is decimal. Null when malformed. */
export function parseKey(text: string): bigint | null {
  const t = text.trim();
  let v: bigint;
  if (/^0x[0-9a-f]{1,16}$/i.test(t)) v = BigInt(t);
  else if (/^[0-9]{1,20}$/.test(t)) v = BigInt(t);
  else return null;
  return v <= MAX_KEY ? v : null;
}

/** Parses a type: its number or its short name (WE, EA, WERO, EARO, WEAR, EAAR). Null when unknown. */
export function parseType(text: string): PrType | null {
  const t = text.trim().toUpperCase();
  for (const type of PR_TYPES) {
    if (t === String(type) || t === PR_TYPE_NAMES[type]) return type;
  }
  return null;
}

/** JSON-safe form, for the store and the API. */
export interface PrStateJson {
  generation: number;
  registrations: { identity: string; key: string }[];
  reservation: { type: PrType; holder: string } | null;
}

export function prToJson(s: PrState): PrStateJson {
  return {
    generation: s.generation,
    registrations: [...s.registrations].map(([identity, key]) => ({
      identity,
      key: formatKey(key),
    })),
    reservation: s.reservation ? { type: s.reservation.type, holder: s.reservation.holder } : null,
  };
}

export function prFromJson(j: PrStateJson): PrState {
  const regs = new Map<string, bigint>();
  for (const r of j.registrations) {
    const k = parseKey(r.key);
    if (k === null || k === 0n) throw new Error(`bad key ${r.key} for ${r.identity}`);
    regs.set(r.identity, k);
  }
  const res = j.reservation;
  if (res && !isPrType(res.type)) throw new Error(`bad reservation type ${res.type}`);
  return {
    generation: j.generation >>> 0,
    registrations: regs,
    reservation: res ? { type: res.type, holder: res.holder } : null,
  };
}
