// The memory-sharing policy (policy.md) as one pure function: a tick of samples in,
// balloon targets out. No clock, no I/O: the controller brings the samples and sends
// the targets; the tests replay traces through it.

import { formatSize } from '../../agent/units.js';
import type { GuestShare, Tuning } from './config.js';

const PAGE = 4096;

/** One guest's sample for one interval, as the controller read it. */
export interface GuestSample {
  name: string;
  /** False when the guest could not be reached (monitor down, QEMU gone). */
  reached: boolean;
  /** The balloon's `actual` (bytes); null when QEMU has no balloon device. */
  actual: number | null;
  /** The guest's RAM size (bytes), when known. */
  ramSize?: number;
  /** virtio-balloon statistics (`guest-stats`): cumulative counters, sizes in bytes. */
  stats?: GuestStats;
  /** The guest's Ballast paging device: its state and cumulative NBD bytes. */
  paging?: { state: PagingState; readBytes?: number; writtenBytes?: number };
  /** The resident size of the guest-RAM mapping (reported, not decided on). */
  resident?: number;
}

export interface GuestStats {
  /** `last-update`, seconds: the guest's own clock of the statistics. */
  updatedAt: number;
  swapIn?: number;
  swapOut?: number;
  majorFaults?: number;
  available?: number;
  total?: number;
}

export type PagingState = 'ok' | 'full' | 'unreachable';

export interface HostSample {
  memAvailable: number;
  /** `full avg10` of /proc/pressure/memory, percent. */
  psiFullAvg10: number;
}

export interface Tick {
  /** Milliseconds on a monotonic clock. */
  at: number;
  host: HostSample;
  guests: GuestSample[];
}

export interface PolicyConfig {
  poolBytes: number;
  tuning: Tuning;
  guests: readonly GuestShare[];
}

export type Mode = 'observing' | 'managed' | 'ignoring' | 'no-balloon' | 'absent';
export type Klass = 'steady' | 'pressured' | 'idle';

interface Counters {
  at: number;
  statsAt: number | null;
  swapIn: number | null;
  majorFaults: number | null;
  pagingRead: number | null;
}

/** What the policy remembers of a guest between ticks. */
export interface GuestMemo {
  mode: Mode;
  klass: Klass;
  /** The target set last; the balloon's actual when first seen. Null until seen. */
  prev: number | null;
  lastActual: number | null;
  ramSize: number | null;
  last: Counters | null;
  /** The guest's own rates, kept while its statistics have not updated. */
  guestSwapIn: number;
  guestMajorFaults: number;
  statsStaleTicks: number;
  highStreak: number;
  lowStreak: number;
  grewAt: number | null;
  /** An unmet target: since which tick, and the actual then. */
  pending: { target: number; fromActual: number; since: number } | null;
  ignoringSince: number | null;
}

export interface PolicyState {
  tick: number;
  guests: Record<string, GuestMemo>;
}

export const EMPTY_STATE: PolicyState = { tick: 0, guests: {} };

export interface GuestDecision {
  name: string;
  mode: Mode;
  klass: Klass;
  /** This interval's sample was above the pressure threshold. */
  pressing: boolean;
  protect: boolean;
  /** The balloon target to set now, or null: send nothing. */
  target: number | null;
  /** The target in force after this tick (set now or before); null if none is known. */
  holds: number | null;
  actual: number | null;
  /** What the guest holds of the pool after this tick. */
  charge: number;
  entitlement: number;
  weight: number;
  max: number | null;
  swapInBps: number;
  majorFaultsPs: number;
  used: number | null;
  resident: number | null;
  paging: PagingState | null;
  reason: string;
}

export interface RebalanceEvent {
  kind: 'memory.rebalanced';
  data: {
    pool: number;
    budget: number;
    charged: number;
    moves: { guest: string; from: number; to: number; reason: string }[];
  };
}

export interface Decision {
  state: PolicyState;
  guests: GuestDecision[];
  pool: number;
  /** What the managed guests may hold: the pool less the others' charges and the host's shortfall. */
  budget: number;
  /** Σ charges of all guests after this tick. */
  charged: number;
  /** The floors did not fit the budget (hold floors were dropped, or even entitlements did not fit). */
  holdDropped: boolean;
  exceeded: boolean;
  event: RebalanceEvent | null;
}

function freshMemo(): GuestMemo {
  return {
    mode: 'observing',
    klass: 'steady',
    prev: null,
    lastActual: null,
    ramSize: null,
    last: null,
    guestSwapIn: 0,
    guestMajorFaults: 0,
    statsStaleTicks: 0,
    highStreak: 0,
    lowStreak: 0,
    grewAt: null,
    pending: null,
    ignoringSince: null,
  };
}

/** A counter's rate per second; a counter that went down (reboot) gives 0. */
function rate(now: number | undefined | null, before: number | null, seconds: number): number {
  if (now === undefined || now === null || before === null || !(seconds > 0)) return 0;
  const d = now - before;
  return d > 0 ? d / seconds : 0;
}

/**
 * Shares `room` among guests in proportion to weight, each up to its `need`
 * (water-filling): returns what each gets.
 */
export function waterFill(
  need: readonly number[],
  weight: readonly number[],
  room: number,
): number[] {
  const out = need.map(() => 0);
  let left = Math.max(0, room);
  const total = need.reduce((a, n) => a + Math.max(0, n), 0);
  if (total <= left) return need.map((n) => Math.max(0, n));
  const order = need
    .map((_, i) => i)
    .filter((i) => (need[i] as number) > 0)
    .sort(
      (a, b) =>
        (need[a] as number) / (weight[a] as number) - (need[b] as number) / (weight[b] as number),
    );
  let w = order.reduce((a, i) => a + (weight[i] as number), 0);
  let k = 0;
  for (; k < order.length; k++) {
    const i = order[k] as number;
    const share = (left * (weight[i] as number)) / w;
    if ((need[i] as number) > share) break;
    out[i] = need[i] as number;
    left -= need[i] as number;
    w -= weight[i] as number;
  }
  for (; k < order.length; k++) {
    const i = order[k] as number;
    out[i] = (left * (weight[i] as number)) / w;
  }
  return out;
}

function mib(n: number): string {
  return formatSize(Math.round(n / PAGE) * PAGE);
}

/** Moves `from` toward `to` by whole pages only (never past `to`). */
function pageStep(from: number, to: number): number {
  const d = Math.floor(Math.abs(to - from) / PAGE) * PAGE;
  return to >= from ? from + d : from - d;
}

interface Work {
  spec: GuestShare;
  memo: GuestMemo;
  sample: GuestSample | undefined;
  actual: number | null;
  protect: boolean;
  swapInBps: number;
  majorFaultsPs: number;
  used: number | null;
  target: number | null;
  charge: number;
  reason: string;
  max: number | null;
}

/** One interval of the policy. */
export function decide(cfg: PolicyConfig, state: PolicyState, tick: Tick): Decision {
  const t = state.tick + 1;
  const tu: Tuning = cfg.tuning;
  const byName = new Map(tick.guests.map((g) => [g.name, g]));
  const work: Work[] = [];

  for (const spec of cfg.guests) {
    const old = state.guests[spec.name];
    const memo: GuestMemo = old ? { ...old } : freshMemo();
    const x = byName.get(spec.name);
    const w: Work = {
      spec,
      memo,
      sample: x,
      actual: null,
      protect: x?.paging !== undefined && x.paging.state !== 'ok',
      swapInBps: 0,
      majorFaultsPs: 0,
      used: null,
      target: null,
      charge: 0,
      reason: '',
      max: null,
    };
    work.push(w);
    if (x?.ramSize !== undefined) memo.ramSize = x.ramSize;
    // A balloon cannot give a guest more than its RAM, whatever the config says.
    w.max =
      spec.max !== undefined && memo.ramSize !== null
        ? Math.min(spec.max, memo.ramSize)
        : (spec.max ?? memo.ramSize);

    if (!x?.reached) {
      // A guest whose monitor is down keeps what it had: it cannot lose memory to others.
      memo.mode = 'absent';
      memo.last = null;
      memo.pending = null;
      w.actual = memo.lastActual;
      w.charge = Math.max(memo.prev ?? 0, memo.lastActual ?? w.max ?? spec.entitlement);
      w.reason = 'not reached: counted at its last size';
      continue;
    }
    if (x.actual === null) {
      memo.mode = 'no-balloon';
      memo.last = null;
      memo.pending = null;
      memo.prev = null;
      w.charge = w.max ?? memo.lastActual ?? spec.entitlement;
      w.reason = 'no balloon device: counted at its size';
      continue;
    }
    const actual = x.actual;
    w.actual = actual;
    memo.lastActual = actual;
    if (w.max === null) w.max = Math.max(actual, spec.entitlement);

    // Rates from the previous sample.
    const before = memo.last;
    const st = x.stats;
    if (before) {
      const seconds = (tick.at - before.at) / 1000;
      if (st && before.statsAt !== null && st.updatedAt > before.statsAt) {
        const ss = st.updatedAt - before.statsAt;
        memo.guestSwapIn = rate(st.swapIn, before.swapIn, ss);
        memo.guestMajorFaults = rate(st.majorFaults, before.majorFaults, ss);
        memo.statsStaleTicks = 0;
      } else if (++memo.statsStaleTicks >= tu.followIntervals) {
        // Statistics that stopped say nothing: only the paging device speaks for the guest.
        memo.guestSwapIn = 0;
        memo.guestMajorFaults = 0;
      }
      const deviceIn = rate(x.paging?.readBytes, before.pagingRead, seconds);
      w.swapInBps = Math.max(memo.guestSwapIn, deviceIn);
      w.majorFaultsPs = memo.guestMajorFaults;
    }
    const advanced = !before || !st || before.statsAt === null || st.updatedAt > before.statsAt;
    memo.last = {
      at: tick.at,
      statsAt: advanced ? (st?.updatedAt ?? null) : before.statsAt,
      swapIn: advanced ? (st?.swapIn ?? null) : before.swapIn,
      majorFaults: advanced ? (st?.majorFaults ?? null) : before.majorFaults,
      pagingRead: x.paging?.readBytes ?? null,
    };
    if (st?.total !== undefined && st.available !== undefined)
      w.used = Math.max(0, st.total - st.available);

    // Mode.
    if (memo.mode === 'absent' || memo.mode === 'no-balloon') {
      memo.mode = 'observing';
      memo.prev = actual;
      memo.highStreak = 0;
      memo.lowStreak = 0;
      memo.klass = 'steady';
      memo.grewAt = null;
    }
    if (memo.mode === 'ignoring' && t - (memo.ignoringSince ?? t) >= tu.retryIntervals) {
      memo.mode = 'observing';
      memo.prev = actual;
      memo.ignoringSince = null;
    }
    if (memo.mode === 'observing') {
      if (memo.prev === null) memo.prev = actual;
      if (before) memo.mode = 'managed';
      else {
        w.charge = Math.max(memo.prev, actual);
        w.reason = 'observing: kept at its size';
        continue;
      }
    }
    if (memo.mode === 'managed' && memo.pending) {
      const p = memo.pending;
      if (Math.abs(actual - p.target) <= tu.minChange) memo.pending = null;
      else if (t - p.since >= tu.followIntervals) {
        const moved = p.target > p.fromActual ? actual - p.fromActual : p.fromActual - actual;
        // A guest that follows, however slowly, is watched again over the next window.
        if (moved >= tu.minChange) memo.pending = { ...p, fromActual: actual, since: t };
        else {
          memo.mode = 'ignoring';
          memo.ignoringSince = t;
          memo.pending = null;
          // Withdraw the request once, so that a late guest does not shrink below what is counted.
          if (memo.prev !== actual) w.target = actual;
          memo.prev = actual;
          w.charge = actual;
          w.reason = `ignoring its target: asked for ${mib(p.target)} ${tu.followIntervals} intervals ago, still ${mib(actual)}; left at its size`;
          continue;
        }
      }
    }
    if (memo.mode === 'ignoring') {
      w.charge = actual;
      w.reason = 'ignoring its target: left at its size';
      continue;
    }

    // Pressure class, with hysteresis.
    const high = w.swapInBps >= tu.swapInHigh || w.majorFaultsPs >= tu.majorFaultsHigh;
    const low = w.swapInBps <= tu.swapInLow && w.majorFaultsPs <= tu.majorFaultsLow;
    memo.highStreak = high ? memo.highStreak + 1 : 0;
    memo.lowStreak = low ? memo.lowStreak + 1 : 0;
    if (memo.highStreak >= tu.riseIntervals) memo.klass = 'pressured';
    else if (memo.klass === 'pressured' && memo.lowStreak < tu.fallIntervals)
      memo.klass = 'pressured';
    else if (memo.lowStreak >= tu.fallIntervals) memo.klass = 'idle';
    else memo.klass = 'steady';
  }

  // The budget of the managed guests.
  const managed = work.filter((w) => w.memo.mode === 'managed');
  const others = work.filter((w) => w.memo.mode !== 'managed');
  const shortfall = Math.max(0, tu.hostMinAvailable - tick.host.memAvailable);
  const budget = cfg.poolBytes - others.reduce((a, w) => a + w.charge, 0) - shortfall;

  // Floors: entitlement, actual when protected, prev while holding after growth.
  const n = managed.length;
  const prev = managed.map((w) => w.memo.prev as number);
  const actual = managed.map((w) => w.actual as number);
  const weight = managed.map((w) => w.spec.weight);
  const cap: number[] = [];
  const floorBase: number[] = [];
  const floorHold: number[] = [];
  for (let i = 0; i < n; i++) {
    const w = managed[i] as Work;
    let c = w.max as number;
    let f = Math.min(w.spec.entitlement, c);
    if (w.protect) f = Math.max(f, actual[i] as number);
    c = Math.max(c, f);
    cap.push(c);
    floorBase.push(f);
    // Among guests paging right now weight decides, so the hold is for the others.
    const holding =
      !(w.memo.klass === 'pressured' && w.memo.highStreak > 0) &&
      w.memo.grewAt !== null &&
      t - w.memo.grewAt <= tu.holdIntervals;
    floorHold.push(holding ? Math.max(f, Math.min(prev[i] as number, c)) : f);
  }
  const sum = (a: readonly number[]) => a.reduce((x, y) => x + y, 0);
  const holdDropped = sum(floorHold) > budget;
  const floor = holdDropped ? floorBase : floorHold;
  const floorsExceed = sum(floor) > budget;

  // Tiers A..D (cumulative levels), filled in order by weight.
  const lvA: number[] = [];
  const lvB: number[] = [];
  const lvC: number[] = [];
  const lvD: number[] = [];
  for (let i = 0; i < n; i++) {
    const w = managed[i] as Work;
    const f = floor[i] as number;
    const c = cap[i] as number;
    const p = prev[i] as number;
    const k = w.memo.klass;
    // Pressured guests start from their floor in tier B, so that among several the
    // contended memory goes by weight whatever each held before.
    const a = k === 'steady' ? Math.max(f, Math.min(p, c)) : f;
    const b =
      k === 'pressured'
        ? Math.max(a, Math.min(c, Math.max(p, actual[i] as number) + tu.maxStep))
        : a;
    const cc =
      k === 'idle' ? Math.max(b, Math.min(p, c, w.used === null ? p : w.used + tu.headroom)) : b;
    const d = k === 'idle' ? Math.max(cc, Math.min(p, c)) : cc;
    lvA.push(a);
    lvB.push(b);
    lvC.push(cc);
    lvD.push(d);
  }
  const alloc = [...floor];
  let room = budget - sum(floor);
  for (const lv of [lvA, lvB, lvC, lvD]) {
    if (room <= 0) break;
    const need = lv.map((v, i) => Math.max(0, v - (alloc[i] as number)));
    const got = waterFill(need, weight, room);
    for (let i = 0; i < n; i++) {
      alloc[i] = (alloc[i] as number) + (got[i] as number);
      room -= got[i] as number;
    }
  }

  // Whole pages, rounded down (a balloon moves in pages; rounded up, an even split of a
  // pool could add up to a few pages over it, and the pool would read as exceeded for
  // good). Never below the floor, so never above what the fill gave: the sum stays in.
  for (let i = 0; i < n; i++)
    alloc[i] = Math.max(floor[i] as number, Math.floor((alloc[i] as number) / PAGE) * PAGE);

  // Rate limit and deadband.
  const tgt: number[] = [];
  for (let i = 0; i < n; i++) {
    const p = prev[i] as number;
    const a = alloc[i] as number;
    let v = p + Math.max(-tu.maxStep, Math.min(tu.maxStep, a - p));
    v = pageStep(p, v);
    if (Math.abs(v - p) < tu.minChange && !(v === floor[i] && v > p)) v = p;
    tgt.push(v);
  }

  // Growth is paid from what the pool has free once growth is left out.
  const psiHigh = tick.host.psiFullAvg10 >= tu.hostPsiFullHigh;
  const base = tgt.map((_, i) => Math.max(prev[i] as number, actual[i] as number));
  const baseCharge = tgt.map((v, i) =>
    v > (base[i] as number) ? (base[i] as number) : Math.max(v, actual[i] as number),
  );
  const cost = tgt.map((v, i) => Math.max(0, v - (base[i] as number)));
  const free = psiHigh ? 0 : budget - sum(baseCharge);
  const trimmed = new Set<number>();
  if (sum(cost) > Math.max(0, free)) {
    const grant = waterFill(cost, weight, free);
    for (let i = 0; i < n; i++) {
      if ((cost[i] as number) === 0) continue;
      const b = base[i] as number;
      const p = prev[i] as number;
      let v = pageStep(b, b + (grant[i] as number));
      if (v - b < tu.minChange) v = Math.abs(b - p) < tu.minChange ? p : b;
      tgt[i] = v;
      trimmed.add(i);
    }
  }

  // Settle each managed guest.
  for (let i = 0; i < n; i++) {
    const w = managed[i] as Work;
    const p = prev[i] as number;
    let v = tgt[i] as number;
    if (w.protect) v = Math.max(v, actual[i] as number);
    const m = w.memo;
    if (v !== p) {
      w.target = v;
      // Raising a target to the actual size (stopping a shrink) gives no memory.
      if (v > p && v > (actual[i] as number)) m.grewAt = t;
      const up = v > (actual[i] as number);
      const pend = m.pending;
      if (!pend || pend.target > pend.fromActual !== up)
        m.pending = { target: v, fromActual: actual[i] as number, since: t };
      else m.pending = { ...pend, target: v };
      m.prev = v;
    }
    w.charge = Math.max(m.prev as number, actual[i] as number);
    const why: string[] = [];
    if (m.klass === 'pressured')
      why.push(
        `pressure: swap-in ${mib(w.swapInBps)}/s, ${Math.round(w.majorFaultsPs)} major faults/s`,
      );
    else if (m.klass === 'idle') why.push('idle');
    else why.push('steady');
    if (w.protect) why.push(`protect: paging device ${w.sample?.paging?.state}, not taking memory`);
    if (trimmed.has(i)) why.push('waiting for memory the shrinking guests have not given yet');
    if (psiHigh && (cost[i] as number) > 0) why.push('host memory pressure: not growing');
    if ((m.prev as number) <= w.spec.entitlement) why.push('at its entitlement');
    if ((m.prev as number) >= (cap[i] as number)) why.push('at its max');
    if (Math.abs((alloc[i] as number) - (m.prev as number)) > tu.maxStep / 2 && w.target !== null)
      why.push('rate limited');
    if (floorsExceed) why.push('pool exceeded by the floors');
    w.reason = why.join('; ');
  }

  const guests: GuestDecision[] = work.map((w) => ({
    name: w.spec.name,
    mode: w.memo.mode,
    klass: w.memo.klass,
    pressing: w.memo.mode === 'managed' && w.memo.highStreak > 0,
    protect: w.protect,
    target: w.target,
    holds: w.memo.prev,
    actual: w.actual,
    charge: w.charge,
    entitlement: w.spec.entitlement,
    weight: w.spec.weight,
    max: w.max,
    swapInBps: w.swapInBps,
    majorFaultsPs: w.majorFaultsPs,
    used: w.used,
    resident: w.sample?.resident ?? null,
    paging: w.sample?.paging?.state ?? null,
    reason: w.reason,
  }));
  const charged = sum(work.map((w) => w.charge));
  const moves = work
    .filter((w) => w.target !== null)
    .map((w) => ({
      guest: w.spec.name,
      from: state.guests[w.spec.name]?.prev ?? (w.actual as number),
      to: w.target as number,
      reason: w.reason,
    }));
  const next: PolicyState = {
    tick: t,
    guests: Object.fromEntries(work.map((w) => [w.spec.name, w.memo])),
  };
  return {
    state: next,
    guests,
    pool: cfg.poolBytes,
    budget,
    charged,
    holdDropped,
    exceeded: charged > cfg.poolBytes - shortfall,
    event:
      moves.length > 0
        ? { kind: 'memory.rebalanced', data: { pool: cfg.poolBytes, budget, charged, moves } }
        : null,
  };
}
