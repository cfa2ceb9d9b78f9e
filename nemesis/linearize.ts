// A linearizability checker. An operation whose outcome is unknown gets an
// infinite return time: it may take effect at any point after its call (or
// after every other one, which stands for never). An operation known to take
// effect by some time, or never, gets that time as its return and a model step
// with two outcomes (happened, or not).
//
// The search goes through the history once, in time order, carrying the SET
// of every configuration the history so far can be in: a model state and which
// of the operations in flight (called, not returned) it has already placed.
// Each operation is placed "just in time" (Lowe, "Testing for
// linearizability", 2017): when it returns, each configuration that has not
// placed it yet places it, after any of the other operations in flight in any
// order; the configurations this gives (each distinct one once) are the next
// set. Any valid order is found this way (every operation placed before the
// returning one was called before it returned and is still in flight), and
// every configuration kept is one a valid order reaches, so the verdict is
// exact, and a dead end is found where it is, never by undoing every choice
// made since the start of a long history (Wing & Gong's depth-first search
// with Lowe's memo, which this replaced, went back 40 s of a 30-minute run and
// gave up after 22 million steps; it is kept in linearize-dfs.ts as the
// reference the property test compares against).
//
// One reduction keeps the set small, and loses no valid order: an operation
// whose step leaves the state as it is (a read; a refusal) is placed before a
// step only when it could not be placed, leaving the state as it is, after that
// step. Else the configuration without it has every future the one with it has
// (it may place it first, at the same state), so only that one is kept.
// Without this, 14 reads in flight together gave 2^14 configurations.

export interface LinOp<I, O> {
  id: number;
  /** Call and return on one monotonic clock (ms); Infinity: the outcome is unknown. */
  call: number;
  ret: number;
  input: I;
  /** undefined when the outcome is unknown: any outcome is accepted. */
  output: O | undefined;
}

export interface LinModel<S, I, O> {
  init: S;
  /**
   * Whether `input` answering `output` (undefined: unknown) is possible in `s`,
   * and the next state; `also`: other possible next states (an operation that
   * may or may not have happened), each tried in turn.
   */
  step(s: S, input: I, output: O | undefined): { ok: boolean; next: S; also?: S[] };
  key(s: S): string;
  /**
   * Optional: whether `input` can never be placed in `s` nor in any state after
   * it (a configuration that still has to place it has no future).
   */
  dead?(s: S, input: I): boolean;
  /**
   * Optional: states are compared with `covers` only within one `group`;
   * `covers(a, b)`: every future b has, a has too (b need not be kept beside a).
   */
  group?(s: S): string;
  covers?(a: S, b: S): boolean;
}

/** The most configurations the search carried at once, when, and with how many operations in flight. */
export interface Widest {
  configs: number;
  time: number;
  inFlight: number;
}

export type LinResult<S> =
  | { verdict: 'ok'; order: number[]; states: S[]; steps: number; widest: Widest }
  | {
      verdict: 'fail';
      /** The operation that returned when no configuration could place it. */
      stuck: number;
      /** The operations placed before it in one configuration, in order, and the state they left. */
      prefix: number[];
      state: S;
      steps: number;
      widest: Widest;
    }
  | { verdict: 'undecided'; steps: number; widest: Widest };

/** What a checker needs of a search (the one here, or the reference in linearize-dfs.ts). */
export type Search = <S, I, O>(
  model: LinModel<S, I, O>,
  ops: readonly LinOp<I, O>[],
  maxSteps?: number,
) =>
  | { verdict: 'ok' }
  | { verdict: 'fail'; stuck: number; prefix: number[]; state: S }
  | { verdict: 'undecided'; steps: number };

/** The operations a configuration placed, newest first (shared between configurations). */
interface Trail<S> {
  id: number;
  state: S;
  prev: Trail<S> | null;
}

interface Conf<S> {
  state: S;
  key: string;
  /** The operations in flight it has placed, as indices, ascending. */
  placed: number[];
  trail: Trail<S> | null;
}

/** Checks `ops` against `model`; gives up after `maxSteps` model steps (verdict 'undecided'). */
export function linearize<S, I, O>(
  model: LinModel<S, I, O>,
  ops: readonly LinOp<I, O>[],
  maxSteps = 5_000_000,
): LinResult<S> {
  const events: { i: number; call: boolean; time: number }[] = [];
  ops.forEach((op, i) => {
    events.push({ i, call: true, time: op.call }, { i, call: false, time: op.ret });
  });
  // Calls before returns at the same instant: such operations count as concurrent.
  events.sort((a, b) => a.time - b.time || (a.call === b.call ? 0 : a.call ? -1 : 1));

  const confKey = (key: string, placed: number[]) => `${key}|${placed.join(',')}`;
  const with_ = (placed: number[], i: number) => {
    const out = [...placed, i];
    out.sort((a, b) => a - b);
    return out;
  };
  const initKey = model.key(model.init);
  let frontier = new Map<string, Conf<S>>([
    [confKey(initKey, []), { state: model.init, key: initKey, placed: [], trail: null }],
  ]);
  const inFlight: number[] = [];
  let steps = 0;
  const widest: Widest = { configs: 1, time: Number.NEGATIVE_INFINITY, inFlight: 0 };

  /** Whether operation `i` is possible in `s` and may leave it as it is. */
  const stays = (s: S, key: string, i: number): boolean => {
    steps++;
    const op = ops[i]!;
    const r = model.step(s, op.input, op.output);
    if (!r.ok) return false;
    if (r.next === s || model.key(r.next) === key) return true;
    return (r.also ?? []).some((a) => a === s || model.key(a) === key);
  };

  for (const e of events) {
    if (e.call) {
      inFlight.push(e.i);
      continue;
    }
    const x = e.i;
    const next = new Map<string, Conf<S>>();
    const seen = new Set<string>();
    // the states placed so far in this round, by group and operations placed, for `covers`
    const seenBy = new Map<string, S[]>();
    const keep = (c: Conf<S>) => {
      const k = confKey(c.key, c.placed);
      if (!next.has(k)) next.set(k, c);
    };
    /**
     * Places operations in flight after `c` up to and including `x`. An operation
     * that may leave the state as it is goes only just before a step that changes
     * it (or `x`), and only if it could not leave the new state as it is: else the
     * configuration without it has every future this one has.
     */
    const place = (c: Conf<S>): boolean => {
      const idle = inFlight.filter(
        (z) => z !== x && !c.placed.includes(z) && stays(c.state, c.key, z),
      );
      for (const y of inFlight) {
        if (c.placed.includes(y)) continue;
        if (++steps > maxSteps) return false;
        const op = ops[y]!;
        const r = model.step(c.state, op.input, op.output);
        if (!r.ok) continue;
        for (const s of [r.next, ...(r.also ?? [])]) {
          const key = s === c.state ? c.key : model.key(s);
          if (key === c.key && y !== x) continue;
          // the operations that stayed at c's state and could not stay at s: any of them may go first
          const before = idle.filter((z) => z !== y && !stays(s, key, z));
          for (let mask = 0; mask < 1 << before.length; mask++) {
            if (++steps > maxSteps) return false;
            let trail: Trail<S> | null = c.trail;
            let placed = c.placed;
            before.forEach((z, i) => {
              if (!(mask & (1 << i))) return;
              trail = { id: ops[z]!.id, state: c.state, prev: trail };
              placed = with_(placed, z);
            });
            trail = { id: op.id, state: s, prev: trail };
            if (y === x) {
              keep({ state: s, key, placed, trail });
              continue;
            }
            placed = with_(placed, y);
            const k = confKey(key, placed);
            if (seen.has(k)) continue;
            seen.add(k);
            if (model.group && model.covers) {
              const g = `${model.group(s)}|${placed.join(',')}`;
              const list = seenBy.get(g);
              if (list?.some((a) => model.covers!(a, s))) continue;
              if (list) list.push(s);
              else seenBy.set(g, [s]);
            }
            if (!place({ state: s, key, placed, trail })) return false;
          }
        }
      }
      return true;
    };
    for (const c of frontier.values()) {
      const at = c.placed.indexOf(x);
      if (at >= 0) {
        keep({ ...c, placed: c.placed.filter((p) => p !== x) });
        continue;
      }
      if (!place(c)) return { verdict: 'undecided', steps, widest };
    }
    inFlight.splice(inFlight.indexOf(x), 1);
    if (model.dead) {
      for (const [k, c] of next) {
        if (inFlight.some((y) => !c.placed.includes(y) && model.dead!(c.state, ops[y]!.input))) {
          next.delete(k);
        }
      }
    }
    // A configuration that placed an operation which could stay at its state
    // is dropped when the one that did not place it is there too (that one may
    // place it first, at the same state: it has every future this one has).
    // (That one may be dropped in turn for a third: fewer placed each time.)
    if (next.size > 1) {
      const drop: string[] = [];
      for (const [k, c] of next) {
        for (const y of c.placed) {
          if (
            !next.has(
              confKey(
                c.key,
                c.placed.filter((p) => p !== y),
              ),
            )
          )
            continue;
          if (!stays(c.state, c.key, y)) continue;
          drop.push(k);
          break;
        }
      }
      for (const k of drop) next.delete(k);
    }
    if (model.group && model.covers && next.size > 1) {
      const groups = new Map<string, [string, Conf<S>][]>();
      for (const [k, c] of next) {
        const g = `${model.group(c.state)}|${c.placed.join(',')}`;
        const list = groups.get(g);
        if (list) list.push([k, c]);
        else groups.set(g, [[k, c]]);
      }
      for (const list of groups.values()) {
        if (list.length < 2) continue;
        const kept: Conf<S>[] = [];
        for (const [k, c] of list) {
          if (kept.some((a) => model.covers!(a.state, c.state))) {
            next.delete(k);
            continue;
          }
          kept.push(c);
        }
        // one kept before a later one that covers it
        for (const [k, c] of list) {
          if (!next.has(k)) continue;
          if (kept.some((a) => a !== c && model.covers!(a.state, c.state))) next.delete(k);
        }
      }
    }
    if (next.size === 0) {
      // the configuration that got furthest: its order and state
      let best: Conf<S> | null = null;
      let bestLen = -1;
      for (const c of frontier.values()) {
        const order = orderOf(c.trail);
        if (order.length > bestLen) {
          best = c;
          bestLen = order.length;
        }
      }
      return {
        verdict: 'fail',
        stuck: ops[x]!.id,
        prefix: orderOf(best?.trail ?? null),
        state: best ? best.state : model.init,
        steps,
        widest,
      };
    }
    if (next.size > widest.configs) {
      widest.configs = next.size;
      widest.time = e.time;
      widest.inFlight = inFlight.length + 1;
    }
    frontier = next;
  }
  const first = frontier.values().next().value as Conf<S>;
  const trail: Trail<S>[] = [];
  for (let t = first.trail; t; t = t.prev) trail.push(t);
  trail.reverse();
  return {
    verdict: 'ok',
    order: trail.map((t) => t.id),
    states: trail.map((t) => t.state),
    steps,
    widest,
  };
}

function orderOf<S>(t: Trail<S> | null): number[] {
  const out: number[] = [];
  for (; t; t = t.prev) out.push(t.id);
  return out.reverse();
}
