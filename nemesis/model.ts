// The checker's own model of SPC-4 persistent reservations, written from
// agent/pr.md and SPC-4 (never imported from agent/pr.ts: the checker must be
// able to disagree with the code it judges). Pure: a state, a request, the
// outcome and the next state.

export type Action =
  | 'register'
  | 'register-ignore'
  | 'reserve'
  | 'release'
  | 'clear'
  | 'preempt'
  | 'preempt-abort'
  | 'register-move';

/** 1 WE, 3 EA, 5 WERO, 6 EARO, 7 WEAR, 8 EAAR. */
export const TYPES = [1, 3, 5, 6, 7, 8] as const;
const NAMES: Record<string, number> = { WE: 1, EA: 3, WERO: 5, EARO: 6, WEAR: 7, EAAR: 8 };

export interface Model {
  generation: number;
  /** identity → key (bigint as lower-case hex without 0x, never '0'). */
  regs: Record<string, string>;
  reservation: { type: number; holder: string } | null;
}

export const EMPTY: Model = { generation: 0, regs: {}, reservation: null };

export interface Request {
  action: Action;
  as: string;
  /** Keys as the API takes them: '0x…' hex. */
  key: string;
  saKey?: string | undefined;
  /** As sent: a number, a name, or something invalid on purpose. */
  type?: string | number | undefined;
  target?: string | undefined;
  unregister?: boolean | undefined;
}

export type Outcome =
  | { ok: true; changed: boolean; generation: number; preempted: string[] }
  | { ok: false; code: string; reason?: string };

const allRegistrants = (t: number) => t === 7 || t === 8;

/** A key as canonical hex ('0' for zero), or null when it is not a 64-bit value. */
export function canonKey(k: string | undefined): string | null {
  if (k === undefined) return '0';
  const s = k.trim().toLowerCase();
  let v: bigint;
  try {
    if (/^0x[0-9a-f]{1,16}$/.test(s)) v = BigInt(s);
    else if (/^[0-9]{1,20}$/.test(s)) v = BigInt(s);
    else return null;
  } catch {
    return null;
  }
  if (v >= 1n << 64n) return null;
  return v.toString(16);
}

/** A type as sent, as its number, or null when unknown. */
export function typeOf(t: string | number | undefined): number | null | undefined {
  if (t === undefined) return undefined;
  const s = String(t).trim().toUpperCase();
  const n = NAMES[s] ?? (/^\d+$/.test(s) ? Number(s) : Number.NaN);
  return (TYPES as readonly number[]).includes(n) ? n : null;
}

/** Who may read and write while `m` is in force. */
export function access(m: Model, identity: string): { read: boolean; write: boolean } {
  const r = m.reservation;
  if (!r) return { read: true, write: true };
  const registered = m.regs[identity] !== undefined;
  const holder = allRegistrants(r.type) ? registered : r.holder === identity;
  if (holder) return { read: true, write: true };
  switch (r.type) {
    case 1:
      return { read: true, write: false };
    case 3:
      return { read: false, write: false };
    case 5:
    case 7:
      return { read: true, write: registered };
    default:
      return { read: registered, write: registered };
  }
}

const refuse = (code: string, reason?: string): Outcome =>
  reason === undefined ? { ok: false, code } : { ok: false, code, reason };

function unregister(m: Model, id: string): Model {
  const regs = { ...m.regs };
  delete regs[id];
  let reservation = m.reservation;
  if (reservation) {
    if (allRegistrants(reservation.type)) {
      if (Object.keys(regs).length === 0) reservation = null;
    } else if (reservation.holder === id) {
      reservation = null;
    }
  }
  return { generation: m.generation + 1, regs, reservation };
}

/** Drops every registration with key `k` but the initiator's: the next registrations and who went. */
function drop(m: Model, k: string, self: string): { regs: Record<string, string>; gone: string[] } {
  const regs: Record<string, string> = {};
  const gone: string[] = [];
  for (const [id, key] of Object.entries(m.regs)) {
    if (key === k && id !== self) gone.push(id);
    else regs[id] = key;
  }
  return { regs, gone: gone.sort() };
}

/** One PERSISTENT RESERVE OUT request against `m`: the outcome and the next state. */
export function step(m: Model, q: Request): { out: Outcome; next: Model } {
  const same = (out: Outcome) => ({ out, next: m });
  const unchanged = () =>
    same({ ok: true, changed: false, generation: m.generation, preempted: [] });
  const t = typeOf(q.type);
  if (t === null) return same(refuse('PR_BAD_TYPE'));
  const key = canonKey(q.key);
  const sa = q.saKey === undefined ? undefined : canonKey(q.saKey);
  if (key === null || sa === null) return same(refuse('PR_BAD_KEY'));
  const mine = m.regs[q.as];
  const changed = (next: Model, preempted: string[] = []) => ({
    out: { ok: true as const, changed: true, generation: next.generation, preempted },
    next,
  });

  if (q.action === 'register' || q.action === 'register-ignore') {
    const saK = sa ?? '0';
    if (mine === undefined) {
      if (q.action === 'register' && key !== '0')
        return same(refuse('PR_CONFLICT', 'not-registered'));
      if (saK === '0') return unchanged();
      return changed({
        generation: m.generation + 1,
        regs: { ...m.regs, [q.as]: saK },
        reservation: m.reservation,
      });
    }
    if (q.action === 'register' && key !== mine) return same(refuse('PR_CONFLICT', 'key-mismatch'));
    if (saK !== '0') {
      return changed({
        generation: m.generation + 1,
        regs: { ...m.regs, [q.as]: saK },
        reservation: m.reservation,
      });
    }
    return changed(unregister(m, q.as));
  }

  if (mine === undefined) return same(refuse('PR_CONFLICT', 'not-registered'));
  if (key !== mine) return same(refuse('PR_CONFLICT', 'key-mismatch'));
  const r = m.reservation;
  const holds = r !== null && (allRegistrants(r.type) || r.holder === q.as);

  switch (q.action) {
    case 'reserve': {
      if (t === undefined) return same(refuse('PR_BAD_TYPE'));
      if (!r) return changed({ ...m, reservation: { type: t, holder: q.as } });
      if (holds) return r.type === t ? unchanged() : same(refuse('PR_CONFLICT', 'type-mismatch'));
      return same(refuse('PR_CONFLICT', 'reserved-by-other'));
    }
    case 'release': {
      if (t === undefined) return same(refuse('PR_BAD_TYPE'));
      if (!r || !holds) return unchanged();
      if (r.type !== t) return same(refuse('PR_INVALID_RELEASE'));
      return changed({ ...m, reservation: null });
    }
    case 'clear':
      return changed({ generation: m.generation + 1, regs: {}, reservation: null });
    case 'preempt':
    case 'preempt-abort': {
      const saK = sa ?? '0';
      if ((!r || allRegistrants(r.type)) && saK === '0') {
        if (!r) return same(refuse('PR_INVALID_REQUEST'));
        // all-registrants, sa 0: everyone else goes, the initiator holds a new reservation
        if (t === undefined) return same(refuse('PR_BAD_TYPE'));
        const gone = Object.keys(m.regs)
          .filter((id) => id !== q.as)
          .sort();
        return changed(
          {
            generation: m.generation + 1,
            regs: { [q.as]: mine },
            reservation: { type: t, holder: q.as },
          },
          gone,
        );
      }
      if (r && !allRegistrants(r.type)) {
        if (saK === '0') return same(refuse('PR_INVALID_REQUEST'));
        const holderKey = m.regs[r.holder];
        if (saK === holderKey) {
          if (t === undefined) return same(refuse('PR_BAD_TYPE'));
          const d = drop(m, saK, q.as);
          return changed(
            { generation: m.generation + 1, regs: d.regs, reservation: { type: t, holder: q.as } },
            d.gone,
          );
        }
      }
      // no reservation, all-registrants with a key, or another key than the holder's:
      // drop it, the reservation stays
      const d = drop(m, saK, q.as);
      if (d.gone.length === 0) return same(refuse('PR_CONFLICT', 'no-matching-registration'));
      let reservation = r;
      if (reservation && allRegistrants(reservation.type) && Object.keys(d.regs).length === 0) {
        reservation = null;
      }
      return changed({ generation: m.generation + 1, regs: d.regs, reservation }, d.gone);
    }
    case 'register-move': {
      if (!r) return same(refuse('PR_CONFLICT', 'no-reservation'));
      if (allRegistrants(r.type)) return same(refuse('PR_INVALID_REQUEST'));
      if (r.holder !== q.as) return same(refuse('PR_CONFLICT', 'not-holder'));
      if (!q.target || q.target === q.as || (sa ?? '0') === '0') {
        return same(refuse('PR_INVALID_REQUEST'));
      }
      const regs = { ...m.regs, [q.target]: sa as string };
      if (q.unregister) delete regs[q.as];
      return changed({
        generation: m.generation + 1,
        regs,
        reservation: { type: r.type, holder: q.target },
      });
    }
  }
}

/** A state as one string, for the search's memo and for reports. */
export function showModel(m: Model): string {
  const regs = Object.entries(m.regs)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([id, k]) => `${id}=${k}`)
    .join(',');
  const r = m.reservation;
  return `g${m.generation} [${regs}] ${r ? `${r.type}@${allRegistrants(r.type) ? '*' : r.holder}` : '-'}`;
}
