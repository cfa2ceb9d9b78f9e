// The memory policy (policy.md) on synthetic traces: a small world of guests whose
// balloons follow their targets (or not), whose pressure follows a script, replayed
// through decide(); and the invariants on random traces with fast-check.

import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { DEFAULT_TUNING, type GuestShare, type Tuning } from './config.js';
import {
  type Decision,
  decide,
  EMPTY_STATE,
  type GuestSample,
  type PagingState,
  type PolicyConfig,
  type PolicyState,
  waterFill,
} from './policy.js';

const MiB = 1024 * 1024;

/** What a scripted guest does in one interval. */
interface Act {
  /** Swap-ins the guest reports, bytes/s (default 0). */
  swapIn?: number;
  /** Reads Ballast sees on its paging device, bytes/s (default: the same as swapIn). */
  deviceIn?: number;
  majorFaults?: number;
  used?: number;
  paging?: PagingState;
  reached?: boolean;
  balloon?: boolean;
  /** Share of the way to its target the balloon moves this interval (default 1). */
  follow?: number;
  /** The guest's statistics do not update. */
  statsFrozen?: boolean;
}

interface SimGuest {
  actual: number;
  target: number | null;
  swapIn: number;
  deviceRead: number;
  majorFaults: number;
  statsAt: number;
}

interface World {
  cfg: PolicyConfig;
  state: PolicyState;
  guests: Map<string, SimGuest>;
  at: number;
  host: { memAvailable: number; psiFullAvg10: number };
  history: { decision: Decision; before: PolicyState; actuals: Map<string, number | null> }[];
}

function world(
  guests: (GuestShare & { start: number })[],
  poolBytes: number,
  tuning: Partial<Tuning> = {},
): World {
  return {
    cfg: { poolBytes, tuning: { ...DEFAULT_TUNING, ...tuning }, guests },
    state: EMPTY_STATE,
    guests: new Map(
      guests.map((g) => [
        g.name,
        { actual: g.start, target: null, swapIn: 0, deviceRead: 0, majorFaults: 0, statsAt: 0 },
      ]),
    ),
    at: 0,
    host: { memAvailable: 8 * 1024 * MiB, psiFullAvg10: 0 },
    history: [],
  };
}

/** One interval: the guests act, the policy decides, the targets are sent. */
function step(w: World, acts: Record<string, Act> = {}): Decision {
  const seconds = w.cfg.tuning.intervalMs / 1000;
  w.at += w.cfg.tuning.intervalMs;
  const samples: GuestSample[] = [];
  const actuals = new Map<string, number | null>();
  for (const spec of w.cfg.guests) {
    const g = w.guests.get(spec.name)!;
    const a = acts[spec.name] ?? {};
    if (g.target !== null && a.balloon !== false) {
      const f = a.follow ?? 1;
      g.actual = Math.round(g.actual + (g.target - g.actual) * f);
    }
    g.swapIn += (a.swapIn ?? 0) * seconds;
    g.deviceRead += (a.deviceIn ?? a.swapIn ?? 0) * seconds;
    g.majorFaults += (a.majorFaults ?? 0) * seconds;
    if (!a.statsFrozen) g.statsAt += seconds;
    const reached = a.reached ?? true;
    actuals.set(spec.name, reached && a.balloon !== false ? g.actual : null);
    samples.push({
      name: spec.name,
      reached,
      actual: a.balloon === false ? null : g.actual,
      ramSize: spec.max ?? 256 * MiB,
      stats: {
        updatedAt: g.statsAt,
        swapIn: g.swapIn,
        majorFaults: g.majorFaults,
        total: g.actual,
        available: Math.max(0, g.actual - (a.used ?? 48 * MiB)),
      },
      paging: { state: a.paging ?? 'ok', readBytes: g.deviceRead },
    });
  }
  const before = w.state;
  const d = decide(w.cfg, w.state, { at: w.at, host: w.host, guests: samples });
  w.state = d.state;
  for (const gd of d.guests) if (gd.target !== null) w.guests.get(gd.name)!.target = gd.target;
  w.history.push({ decision: d, before, actuals });
  return d;
}

function run(w: World, n: number, acts: (i: number) => Record<string, Act> = () => ({})): Decision {
  let d: Decision | undefined;
  for (let i = 0; i < n; i++) d = step(w, acts(i));
  return d!;
}

const g = (d: Decision, name: string) => d.guests.find((x) => x.name === name)!;

/** Three guests promised 256 MiB each over a 448 MiB pool, at the static split. */
function three(tuning: Partial<Tuning> = {}, ent = 96 * MiB): World {
  const split = Math.floor(448 / 3) * MiB;
  return world(
    ['a', 'b', 'c'].map((name) => ({
      name,
      entitlement: ent,
      weight: 128,
      max: 256 * MiB,
      start: split,
    })),
    448 * MiB,
    tuning,
  );
}

const HOT: Act = { swapIn: 8 * MiB, majorFaults: 400, used: 200 * MiB };
const IDLE: Act = { used: 48 * MiB };

describe('waterFill', () => {
  it('gives everyone what they need when there is room', () => {
    expect(waterFill([10, 20], [1, 1], 100)).toEqual([10, 20]);
  });
  it('shares by weight, and a small need leaves its rest to the others', () => {
    expect(waterFill([100, 100], [2, 1], 90)).toEqual([60, 30]);
    expect(waterFill([10, 100, 100], [1, 1, 1], 70)).toEqual([10, 30, 30]);
  });
  it('gives nothing from no room', () => {
    expect(waterFill([10, 10], [1, 1], -5)).toEqual([0, 0]);
  });
});

describe('start and restart', () => {
  it('sends nothing on the first sample and keeps every guest at its size while calm', () => {
    const w = three();
    const d1 = step(w);
    expect(d1.guests.map((x) => [x.mode, x.target])).toEqual([
      ['observing', null],
      ['observing', null],
      ['observing', null],
    ]);
    expect(d1.event).toBeNull();
    const d = run(w, 10, () => ({ a: IDLE, b: IDLE, c: IDLE }));
    expect(d.guests.every((x) => x.mode === 'managed')).toBe(true);
    expect(w.history.every((h) => h.decision.event === null)).toBe(true);
  });

  it('a restarted controller (empty state) takes each guest at its current size', () => {
    const w = three();
    run(w, 12, (i) => ({ a: i > 1 ? HOT : IDLE, b: IDLE, c: IDLE }));
    const sizes = [...w.guests.values()].map((x) => x.actual);
    w.state = EMPTY_STATE;
    const d = step(w, { a: HOT, b: IDLE, c: IDLE });
    expect(d.guests.every((x) => x.target === null)).toBe(true);
    expect(d.guests.map((x) => x.holds)).toEqual(sizes);
  });
});

describe('memory follows pressure', () => {
  it('the hot guest gets memory within a few intervals, the idle ones give it down to their entitlement', () => {
    const w = three();
    let first = -1;
    for (let i = 0; i < 20; i++) {
      const d = step(w, { a: HOT, b: IDLE, c: IDLE });
      if (first < 0 && (g(d, 'a').target ?? 0) > 149 * MiB) first = i;
    }
    // two samples to observe, riseIntervals to call it pressure, then growth
    expect(first).toBeGreaterThan(0);
    expect(first).toBeLessThanOrEqual(4);
    const end = w.history.at(-1)!.decision;
    expect(g(end, 'a').holds).toBe(256 * MiB);
    expect(g(end, 'b').holds).toBeGreaterThanOrEqual(96 * MiB);
    expect(g(end, 'c').holds).toBeGreaterThanOrEqual(96 * MiB);
    expect(end.charged).toBeLessThanOrEqual(448 * MiB);
    expect(g(end, 'a').reason).toMatch(/^pressure: swap-in 8 MiB\/s/);
    expect(g(end, 'b').reason).toMatch(/^idle/);
  });

  it('rotates: when the hot working set moves to another guest, memory follows it', () => {
    const w = three();
    run(w, 20, () => ({ a: HOT, b: IDLE, c: IDLE }));
    expect(w.guests.get('a')!.actual).toBe(256 * MiB);
    run(w, 25, () => ({ a: IDLE, b: HOT, c: IDLE }));
    expect(w.guests.get('b')!.actual).toBe(256 * MiB);
    expect(w.guests.get('a')!.actual).toBe(96 * MiB);
    run(w, 25, () => ({ a: IDLE, b: IDLE, c: HOT }));
    expect(w.guests.get('c')!.actual).toBe(256 * MiB);
    const events = w.history.map((h) => h.decision.event).filter((e) => e !== null);
    expect(events.length).toBeGreaterThan(0);
    expect(events[0]!.kind).toBe('memory.rebalanced');
    expect(events[0]!.data.moves[0]).toMatchObject({ guest: expect.any(String) });
  });

  it('an even split of a pool that is not a whole number of pages per guest stays within the pool', () => {
    // 448 MiB / 3 is 149.33 MiB: targets rounded up to whole pages added up to 8 KiB over
    // the pool, and the pool read as exceeded for good (nothing could grow)
    const w = world(
      ['a', 'b', 'c'].map((name) => ({
        name,
        entitlement: 96 * MiB,
        weight: 128,
        max: 256 * MiB,
        start: 256 * MiB,
      })),
      448 * MiB,
    );
    const d = run(w, 12, () => ({
      a: { used: 140 * MiB },
      b: { used: 140 * MiB },
      c: { used: 140 * MiB },
    }));
    const holds = d.guests.map((x) => x.holds as number);
    for (const h of holds) expect(h % 4096).toBe(0);
    expect(holds.reduce((a, b) => a + b, 0)).toBeLessThanOrEqual(448 * MiB);
    expect(Math.max(...holds) - Math.min(...holds)).toBeLessThanOrEqual(4096);
    expect(d.exceeded).toBe(false);
  });

  it('takes free memory of idle guests before the memory they use', () => {
    const w = world(
      [
        { name: 'hot', entitlement: 64 * MiB, weight: 128, max: 192 * MiB, start: 128 * MiB },
        { name: 'full', entitlement: 64 * MiB, weight: 128, max: 256 * MiB, start: 160 * MiB },
        { name: 'empty', entitlement: 64 * MiB, weight: 128, max: 256 * MiB, start: 160 * MiB },
      ],
      448 * MiB,
    );
    // the hot guest needs 64 MiB more (up to its max): all of it comes out of the guest
    // that uses little
    run(w, 12, () => ({
      hot: HOT,
      full: { used: 150 * MiB },
      empty: { used: 40 * MiB },
    }));
    const d = w.history.at(-1)!.decision;
    expect(g(d, 'hot').holds).toBe(192 * MiB);
    expect(g(d, 'full').holds).toBe(160 * MiB);
    expect(g(d, 'empty').holds).toBe(96 * MiB);
  });

  it('shares contended memory among pressured guests by weight', () => {
    const w = world(
      [
        { name: 'heavy', entitlement: 64 * MiB, weight: 200, max: 512 * MiB, start: 100 * MiB },
        { name: 'light', entitlement: 64 * MiB, weight: 100, max: 512 * MiB, start: 100 * MiB },
        { name: 'calm', entitlement: 64 * MiB, weight: 128, max: 512 * MiB, start: 64 * MiB },
      ],
      384 * MiB,
    );
    run(w, 40, () => ({ heavy: HOT, light: HOT, calm: IDLE }));
    // 320 MiB for the two: 64 + 2x and 64 + x, x = 64 MiB
    const d = w.history.at(-1)!.decision;
    expect(g(d, 'heavy').holds! / MiB).toBeCloseTo(192, 0);
    expect(g(d, 'light').holds! / MiB).toBeCloseTo(128, 0);
  });
});

describe('safety', () => {
  it('a guest that ignores its target is left at its size after followIntervals, and retried later', () => {
    const w = three({ followIntervals: 4, retryIntervals: 10 });
    const acts = () => ({ a: HOT, b: { ...IDLE, follow: 0 }, c: IDLE });
    run(w, 30, acts);
    const modes = w.history.map((h) => g(h.decision, 'b').mode);
    const first = modes.indexOf('ignoring');
    expect(first).toBeGreaterThan(0);
    const at = w.history[first]!.decision;
    expect(g(at, 'b').target).toBe(w.guests.get('b')!.actual);
    expect(g(at, 'b').reason).toMatch(/ignoring its target/);
    // no target while ignoring; counted at its actual size
    for (const h of w.history.slice(first + 1, first + 10)) {
      expect(g(h.decision, 'b').mode).toBe('ignoring');
      expect(g(h.decision, 'b').target).toBeNull();
      expect(g(h.decision, 'b').charge).toBe(w.guests.get('b')!.actual);
    }
    expect(modes.slice(first + 10)).toContain('managed');
    // the others never went over the pool on its account
    for (const h of w.history) expect(h.decision.charged).toBeLessThanOrEqual(448 * MiB);
  });

  it('a guest without a balloon device is never targeted and counts at its max', () => {
    const w = three();
    run(w, 15, () => ({ a: HOT, b: { balloon: false }, c: IDLE }));
    for (const [i, h] of w.history.entries()) {
      expect(g(h.decision, 'b').mode).toBe('no-balloon');
      expect(g(h.decision, 'b').target).toBeNull();
      expect(g(h.decision, 'b').charge).toBe(256 * MiB);
      // 149 + 256 + 149 at the start: over the pool until the others are brought down
      if (i >= 3) expect(h.decision.charged).toBeLessThanOrEqual(448 * MiB);
    }
    // a gets what is left after b's 256 MiB and c's entitlement
    expect(w.guests.get('a')!.actual).toBe(96 * MiB);
  });

  for (const state of ['full', 'unreachable'] as const) {
    it(`a guest whose paging device is ${state} gives no memory, and says so`, () => {
      const w = three();
      run(w, 20, () => ({ a: HOT, b: { ...IDLE, paging: state }, c: IDLE }));
      const d = w.history.at(-1)!.decision;
      expect(w.guests.get('b')!.actual).toBe(149 * MiB);
      expect(g(d, 'b').protect).toBe(true);
      expect(g(d, 'b').reason).toContain(`protect: paging device ${state}, not taking memory`);
      expect(w.guests.get('c')!.actual).toBe(96 * MiB);
      expect(w.guests.get('a')!.actual).toBe((448 - 149 - 96) * MiB);
    });
  }

  it('a shrink under way stops when the paging device fills', () => {
    const w = three();
    run(w, 6, () => ({ a: HOT, b: IDLE, c: IDLE }));
    // b shrinks slowly; its device fills half-way
    run(w, 2, () => ({ a: HOT, b: { ...IDLE, follow: 0.3 }, c: IDLE }));
    const b = w.guests.get('b')!;
    expect(b.target!).toBeLessThan(b.actual);
    const d = step(w, { a: HOT, b: { ...IDLE, follow: 0, paging: 'full' }, c: IDLE });
    expect(g(d, 'b').target).toBe(b.actual);
  });

  it('a guest not reached keeps its memory counted; nobody grows into it', () => {
    const w = three();
    run(w, 3, () => ({ a: IDLE, b: IDLE, c: IDLE }));
    run(w, 15, () => ({ a: HOT, b: { reached: false }, c: IDLE }));
    const d = w.history.at(-1)!.decision;
    expect(g(d, 'b').mode).toBe('absent');
    expect(g(d, 'b').charge).toBe(149 * MiB);
    expect(d.charged).toBeLessThanOrEqual(448 * MiB);
    // back: observed first, nothing sent on that sample
    const back = step(w, { a: HOT, b: IDLE, c: IDLE });
    expect(g(back, 'b').mode).toBe('observing');
    expect(g(back, 'b').target).toBeNull();
  });

  it('sees the swap-ins of a guest whose statistics say nothing, on its paging device', () => {
    const w = three();
    run(w, 10, () => ({ a: { swapIn: 0, deviceIn: 8 * MiB }, b: IDLE, c: IDLE }));
    const d = w.history.at(-1)!.decision;
    expect(g(d, 'a').klass).toBe('pressured');
    expect(g(d, 'a').swapInBps).toBe(8 * MiB);
    expect(w.guests.get('a')!.actual).toBeGreaterThan(149 * MiB);
  });

  it('statistics that stopped updating stop counting after followIntervals', () => {
    const w = three({ followIntervals: 3 });
    run(w, 4, () => ({ a: HOT, b: IDLE, c: IDLE }));
    const d = run(w, 4, () => ({ a: { statsFrozen: true, deviceIn: 0 }, b: IDLE, c: IDLE }));
    expect(g(d, 'a').swapInBps).toBe(0);
  });

  it('a counter that goes back (the guest rebooted) reads as no pressure', () => {
    const w = three();
    run(w, 4, () => ({ a: IDLE, b: IDLE, c: IDLE }));
    w.guests.get('a')!.swapIn = 0;
    w.guests.get('a')!.deviceRead = 0;
    const d = step(w, { a: IDLE, b: IDLE, c: IDLE });
    expect(g(d, 'a').swapInBps).toBe(0);
  });

  it('the host running low shrinks the budget; host memory pressure stops growth', () => {
    const w = three();
    run(w, 3, () => ({ a: IDLE, b: IDLE, c: IDLE }));
    w.host.psiFullAvg10 = 25;
    run(w, 8, () => ({ a: HOT, b: IDLE, c: IDLE }));
    expect(w.guests.get('a')!.actual).toBe(149 * MiB);
    expect(g(w.history.at(-1)!.decision, 'a').reason).toContain('host memory pressure');
    w.host.psiFullAvg10 = 0;
    w.host.memAvailable = 64 * MiB; // 64 MiB short of hostMinAvailable
    const d = run(w, 10, () => ({ a: IDLE, b: IDLE, c: IDLE }));
    expect(d.budget).toBe((448 - 64) * MiB);
    expect(d.charged).toBeLessThanOrEqual((448 - 64) * MiB);
  });
});

describe('hysteresis and rate limit', () => {
  it('pressure that comes and goes every other interval moves nothing', () => {
    const w = three();
    run(w, 30, (i) => ({ a: i % 2 ? HOT : IDLE, b: IDLE, c: IDLE }));
    expect(w.history.every((h) => h.decision.event === null)).toBe(true);
  });

  it('no target moves more than maxStep in one interval', () => {
    const w = three({ maxStep: 16 * MiB });
    run(w, 30, () => ({ a: HOT, b: IDLE, c: IDLE }));
    for (const h of w.history)
      for (const x of h.decision.guests)
        if (x.target !== null)
          expect(Math.abs(x.target - h.before.guests[x.name]!.prev!)).toBeLessThanOrEqual(16 * MiB);
    expect(w.guests.get('a')!.actual).toBe(256 * MiB);
  });

  it('a guest that just grew is not shrunk within holdIntervals', () => {
    const w = three({ holdIntervals: 6 });
    run(w, 8, () => ({ a: HOT, b: IDLE, c: IDLE }));
    const grewAt = w.history.findLastIndex((h) => (g(h.decision, 'a').target ?? 0) > 0);
    // a turns idle at once, b hot: a keeps what it got for the hold
    run(w, 6, () => ({ a: IDLE, b: HOT, c: IDLE }));
    for (const h of w.history.slice(grewAt + 1, grewAt + 7))
      expect(g(h.decision, 'a').holds!).toBeGreaterThanOrEqual(
        g(w.history[grewAt]!.decision, 'a').holds!,
      );
  });
});

// Random worlds and traces: the invariants of policy.md on every tick.
describe('invariants (fast-check)', () => {
  const act = fc.record({
    swapIn: fc.constantFrom(0, 32 * 1024, 512 * 1024, 4 * MiB),
    deviceIn: fc.option(fc.constantFrom(0, 4 * MiB), { nil: undefined }),
    majorFaults: fc.constantFrom(0, 20, 500),
    used: fc.integer({ min: 16, max: 300 }).map((x) => x * MiB),
    paging: fc.constantFrom<PagingState>('ok', 'ok', 'ok', 'full', 'unreachable'),
    reached: fc.boolean().map((b) => b || Math.random() < 0.9),
    balloon: fc.constantFrom(true, true, true, true, false),
    follow: fc.constantFrom(0, 0.3, 1, 1),
  });
  const guestSpec = fc.record({
    entitlement: fc.integer({ min: 16, max: 128 }),
    extra: fc.integer({ min: 0, max: 256 }),
    weight: fc.integer({ min: 1, max: 255 }),
    startFrac: fc.double({ min: 0, max: 1.2, noNaN: true }),
  });
  const scenario = fc
    .record({
      specs: fc.array(guestSpec, { minLength: 1, maxLength: 4 }),
      slack: fc.integer({ min: 0, max: 512 }),
      tuning: fc.record({
        maxStep: fc.constantFrom(8, 32, 64).map((x) => x * MiB),
        minChange: fc.constantFrom(1, 4).map((x) => x * MiB),
        holdIntervals: fc.integer({ min: 1, max: 6 }),
        followIntervals: fc.integer({ min: 2, max: 6 }),
        retryIntervals: fc.integer({ min: 2, max: 12 }),
        riseIntervals: fc.integer({ min: 1, max: 3 }),
        fallIntervals: fc.integer({ min: 1, max: 4 }),
      }),
      memAvailable: fc.constantFrom(8192, 8192, 100).map((x) => x * MiB),
      psi: fc.constantFrom(0, 0, 50),
    })
    .chain((s) =>
      fc.record({
        s: fc.constant(s),
        trace: fc.array(fc.tuple(...s.specs.map(() => act)), { minLength: 5, maxLength: 60 }),
      }),
    );

  it('hold on every tick of random traces', () => {
    fc.assert(
      fc.property(scenario, ({ s, trace }) => {
        const specs = s.specs.map((x, i) => ({
          name: `g${i}`,
          entitlement: x.entitlement * MiB,
          weight: x.weight,
          max: (x.entitlement + x.extra) * MiB,
          start: Math.max(MiB, Math.round((x.entitlement + x.extra) * x.startFrac) * MiB),
        }));
        const pool = specs.reduce((a, x) => a + x.entitlement, 0) + s.slack * MiB;
        const w = world(specs, pool, s.tuning);
        w.host.memAvailable = s.memAvailable;
        w.host.psiFullAvg10 = s.psi;
        const tu = w.cfg.tuning;
        const grewAt = new Map<string, number>();
        const ignoringTicks = new Map<string, number>();
        trace.forEach((acts, tick) => {
          const d = step(w, Object.fromEntries(acts.map((a, i) => [`g${i}`, a])));
          const h = w.history.at(-1)!;
          let rose = false;
          let managedCharge = 0;
          for (const x of d.guests) {
            const before = h.before.guests[x.name];
            const prev = before?.prev ?? null;
            const spec = specs.find((y) => y.name === x.name)!;
            const actual = h.actuals.get(x.name) ?? null;
            // 5. hands off
            if (x.mode === 'observing' || x.mode === 'no-balloon' || x.mode === 'absent')
              expect(x.target).toBeNull();
            if (x.mode === 'ignoring') {
              const n = (ignoringTicks.get(x.name) ?? 0) + 1;
              ignoringTicks.set(x.name, n);
              if (n > 1) expect(x.target).toBeNull();
              else if (x.target !== null) expect(x.target).toBe(actual);
            } else ignoringTicks.delete(x.name);
            // 7. start: the first sight of a guest sends nothing
            if (!before) expect(x.target).toBeNull();
            if (x.mode !== 'managed') continue;
            managedCharge += x.charge;
            if (x.target === null || prev === null) continue;
            const act = actual as number;
            // 2. entitlement and max
            if (x.target < prev) expect(x.target).toBeGreaterThanOrEqual(spec.entitlement);
            if (x.target > prev) expect(x.target <= spec.max || x.target <= act).toBe(true);
            // 3. rate (raising a protected guest's target to its actual stops a shrink: no memory moves)
            if (!(x.protect && x.target === act))
              expect(Math.abs(x.target - prev)).toBeLessThanOrEqual(tu.maxStep);
            // 4. protect
            if (x.protect) expect(x.target).toBeGreaterThanOrEqual(act);
            if (x.target > Math.max(prev, act)) rose = true;
            // 6. hysteresis
            const ga = grewAt.get(x.name);
            if (
              ga !== undefined &&
              tick - ga <= tu.holdIntervals &&
              !d.holdDropped &&
              !(x.klass === 'pressured' && x.pressing) &&
              x.target < prev
            )
              throw new Error(`${x.name} shrunk at ${tick}, grew at ${ga}`);
            if (x.target > prev && x.target > act) grewAt.set(x.name, tick);
          }
          // 1. pool: within the budget, or nothing grew
          if (rose) expect(managedCharge).toBeLessThanOrEqual(d.budget);
          // a guest that was absent, lost its balloon or was observed starts over
          for (const x of d.guests) if (x.mode !== 'managed') grewAt.delete(x.name);
        });
      }),
      { numRuns: 300 },
    );
  });
});
