// A linearizability checker in the manner of Wing & Gong, with Lowe's memo of
// (linearized set, state) pairs, as Porcupine (github.com/anishathalye/porcupine)
// and Knossos do it. An operation whose outcome is unknown gets an infinite
// return time: it may take effect at any point after its call, or never. An
// operation known to take effect by some time, or never, gets that time as its
// return and a model step with two outcomes (happened, or not).
//
// The history is first cut where no operation is in flight (every operation
// returned before the cut or is called after it): every operation before a
// cut takes effect before every one after it, so the history is linearizable
// iff some state the first part can end in lets the rest be linearized from
// it. Each part is searched on its own from a start state, giving its end
// states one by one (each distinct one once); the parts are chained depth
// first, and a (part, start state) pair that led nowhere is not tried again.
// So a dead end is found within its part and the states the cut can hold,
// never by undoing every choice made since the start of a long history (a
// 30-minute run's 90,000 operations per device: the search went back 40 s of
// history and gave up after 18 million steps).

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
}

export type LinResult<S> =
  | { verdict: 'ok'; order: number[]; states: S[]; steps: number; parts: number }
  | {
      verdict: 'fail';
      /** The operation no order could account for, at the deepest point the search reached. */
      stuck: number;
      /** The operations linearized before it there, in order, and the state they left. */
      prefix: number[];
      state: S;
      steps: number;
      parts: number;
    }
  | { verdict: 'undecided'; steps: number; parts: number };

interface Node<I, O> {
  op: LinOp<I, O> | null;
  isCall: boolean;
  time: number;
  match: Node<I, O> | null;
  prev: Node<I, O> | null;
  next: Node<I, O> | null;
  /** The state (object) in which this call was last found not to be one to force. */
  tried?: unknown;
}

/** Splits `ops` where none is in flight: each part's operations all return before the next part's are called. */
export function cut<I, O>(ops: readonly LinOp<I, O>[]): LinOp<I, O>[][] {
  const sorted = [...ops].sort((a, b) => a.call - b.call);
  const parts: LinOp<I, O>[][] = [];
  let end = Number.NEGATIVE_INFINITY;
  for (const op of sorted) {
    // a call at the very instant of a return counts as concurrent with it
    if (op.call > end || parts.length === 0) parts.push([]);
    parts[parts.length - 1]!.push(op);
    end = Math.max(end, op.ret);
  }
  return parts;
}

interface Budget {
  steps: number;
  max: number;
}

interface Dead<S> {
  stuck: number;
  prefix: number[];
  state: S;
  depth: number;
}

interface End<S> {
  order: number[];
  states: S[];
  state: S;
}

/**
 * One part's search from `init`: yields each distinct state the part can end
 * in (with the order that reached it); returns where it got stuck deepest, or
 * 'undecided' once the budget is spent.
 */
function* part<S, I, O>(
  model: LinModel<S, I, O>,
  ops: readonly LinOp<I, O>[],
  init: S,
  budget: Budget,
): Generator<End<S>, Dead<S> | 'undecided' | null, void> {
  const events: Node<I, O>[] = [];
  for (const op of ops) {
    const ret: Node<I, O> = {
      op,
      isCall: false,
      time: op.ret,
      match: null,
      prev: null,
      next: null,
    };
    const call: Node<I, O> = {
      op,
      isCall: true,
      time: op.call,
      match: ret,
      prev: null,
      next: null,
    };
    events.push(call, ret);
  }
  // Calls before returns at the same instant: such operations count as concurrent.
  events.sort((a, b) => a.time - b.time || (a.isCall === b.isCall ? 0 : a.isCall ? -1 : 1));
  const head: Node<I, O> = {
    op: null,
    isCall: false,
    time: -1,
    match: null,
    prev: null,
    next: null,
  };
  let last = head;
  for (const e of events) {
    last.next = e;
    e.prev = last;
    last = e;
  }
  // The memo keys the set of linearized operations by a Zobrist hash (two
  // random 32-bit words per operation, XORed): small keys for long parts.
  const zob = new Map<number, [number, number]>();
  let seed = 0x9e3779b9;
  const rnd = () => {
    seed ^= seed << 13;
    seed ^= seed >>> 17;
    seed ^= seed << 5;
    return seed >>> 0;
  };
  for (const op of ops) zob.set(op.id, [rnd(), rnd()]);

  const lift = (n: Node<I, O>) => {
    n.prev!.next = n.next;
    if (n.next) n.next.prev = n.prev;
    const m = n.match!;
    m.prev!.next = m.next;
    if (m.next) m.next.prev = m.prev;
  };
  const unlift = (n: Node<I, O>) => {
    const m = n.match!;
    m.prev!.next = m;
    if (m.next) m.next.prev = m;
    n.prev!.next = n;
    if (n.next) n.next.prev = n;
  };

  const memo = new Set<string>();
  const ends = new Set<string>();
  const stack: { node: Node<I, O>; state: S; alts: S[]; alt: number; forced: boolean }[] = [];
  let state = init;
  let hi = 0;
  let lo = 0;
  let entry = head.next;
  /** Whether the operations that may go next are still to be looked over for one that changes nothing. */
  let fresh = true;
  let deepest: Dead<S> | null = null;
  /** Linearizes `node` next with the first of `alts` from `from` not seen before. */
  const take = (node: Node<I, O>, before: S, alts: S[], from: number): boolean => {
    const [zh, zl] = zob.get(node.op!.id)!;
    for (let alt = from; alt < alts.length; alt++) {
      const next = alts[alt]!;
      const k = `${(hi ^ zh) >>> 0}.${(lo ^ zl) >>> 0}|${model.key(next)}`;
      if (memo.has(k)) continue;
      memo.add(k);
      stack.push({ node, state: before, alts, alt, forced: false });
      state = next;
      hi = (hi ^ zh) >>> 0;
      lo = (lo ^ zl) >>> 0;
      lift(node);
      entry = head.next;
      fresh = true;
      return true;
    }
    return false;
  };
  // the key of the state forced operations keep, once
  let keyed: { s: S; k: string } | null = null;
  const keyOf = (x: S) => {
    if (keyed?.s !== x) keyed = { s: x, k: model.key(x) };
    return keyed.k;
  };
  /**
   * An operation that may go next and, possible here, leaves the state as it
   * is (a read, a refusal, I/O while nothing is settling) goes next, and no
   * other order is tried here: if any order of the rest works, one with it
   * first does (it changes nothing the others see, and nothing must come
   * before it). This is what keeps the search from trying every interleaving
   * of concurrent reads. 'dead': it was tried here before.
   */
  const force = (): boolean | 'dead' => {
    for (let n = head.next; n?.isCall; n = n.next) {
      // a forced operation leaves the same state: what was not forceable still is not
      if (n.tried === state) continue;
      const op = n.op!;
      const r = model.step(state, op.input, op.output);
      if (
        !r.ok ||
        (r.also && r.also.length > 0) ||
        (r.next !== state && model.key(r.next) !== keyOf(state))
      ) {
        n.tried = state;
        continue;
      }
      const k0 = keyOf(state);
      const [zh, zl] = zob.get(op.id)!;
      const k = `${(hi ^ zh) >>> 0}.${(lo ^ zl) >>> 0}|${k0}`;
      if (memo.has(k)) return 'dead';
      memo.add(k);
      stack.push({ node: n, state, alts: [r.next], alt: 0, forced: true });
      state = r.next;
      hi = (hi ^ zh) >>> 0;
      lo = (lo ^ zl) >>> 0;
      lift(n);
      entry = head.next;
      return true;
    }
    return false;
  };
  /** Undoes the last operation linearized and moves on to its next choice; false when none is left. */
  const back = (): boolean => {
    for (;;) {
      const top = stack.pop();
      if (!top) return false;
      state = top.state;
      const [zh, zl] = zob.get(top.node.op!.id)!;
      hi = (hi ^ zh) >>> 0;
      lo = (lo ^ zl) >>> 0;
      unlift(top.node);
      // a forced operation was the only choice: its dead end is the one before it
      if (top.forced) continue;
      // the same operation with its next possible outcome, else the next operation
      fresh = false;
      if (!take(top.node, top.state, top.alts, top.alt + 1)) entry = top.node.next;
      return true;
    }
  };
  for (;;) {
    if (++budget.steps > budget.max) return 'undecided';
    if (head.next === null) {
      // every operation placed: an end state (each distinct one once), then look for another
      const k = model.key(state);
      if (!ends.has(k)) {
        ends.add(k);
        const order = stack.map((s) => s.node.op!.id);
        const states = [...stack.map((s) => s.state).slice(1), state];
        yield { order, states, state };
      }
      if (!back()) return deepest;
      continue;
    }
    if (fresh) {
      const f = force();
      if (f === 'dead') {
        if (!back()) return deepest;
        continue;
      }
      if (f) continue;
      fresh = false;
    }
    if (entry === null) {
      // no operation left that may go next: undo the last one
      if (!back()) return deepest;
      continue;
    }
    if (entry.isCall) {
      const op = entry.op!;
      const r = model.step(state, op.input, op.output);
      const alts = r.ok ? [r.next, ...(r.also ?? [])] : [];
      if (!take(entry, state, alts, 0)) entry = entry.next;
    } else {
      if (!deepest || stack.length > deepest.depth) {
        deepest = {
          stuck: entry.op!.id,
          prefix: stack.map((s) => s.node.op!.id),
          state,
          depth: stack.length,
        };
      }
      if (!back()) return deepest;
    }
  }
}

/** Checks `ops` against `model`; gives up after `maxSteps` (verdict 'undecided'). */
export function linearize<S, I, O>(
  model: LinModel<S, I, O>,
  ops: readonly LinOp<I, O>[],
  maxSteps = 5_000_000,
): LinResult<S> {
  const parts = cut(ops);
  const budget: Budget = { steps: 0, max: maxSteps };
  const n = parts.length;
  // The parts chained so far, each with its search and the end it gave. A part
  // searched with no choice anywhere (every operation forced) has one end, and
  // going back into it to ask for another costs nothing.
  const chain: {
    search: Generator<End<S>, Dead<S> | 'undecided' | null, void>;
    key: string;
    end?: End<S>;
  }[] = [];
  const dead = new Set<string>();
  let worst: { part: number; dead: Dead<S>; before: number[] } | null = null;
  let start = model.init;
  while (chain.length < n) {
    const i = chain.length;
    const key = `${i}|${model.key(start)}`;
    if (!dead.has(key)) chain.push({ search: part(model, parts[i]!, start, budget), key });
    // the last part's next end; a part with none left is a dead end from its start
    for (;;) {
      const top = chain[chain.length - 1];
      if (!top) {
        if (!worst) throw new Error('linearize: a history with no end and no dead end');
        return {
          verdict: 'fail',
          stuck: worst.dead.stuck,
          prefix: [...worst.before, ...worst.dead.prefix],
          state: worst.dead.state,
          steps: budget.steps,
          parts: n,
        };
      }
      const r = top.search.next();
      if (!r.done) {
        top.end = r.value;
        start = r.value.state;
        break;
      }
      if (r.value === 'undecided') return { verdict: 'undecided', steps: budget.steps, parts: n };
      dead.add(top.key);
      chain.pop();
      const at = chain.length;
      if (
        r.value &&
        (!worst || at > worst.part || (at === worst.part && r.value.depth > worst.dead.depth))
      ) {
        worst = { part: at, dead: r.value, before: chain.flatMap((c) => c.end!.order) };
      }
    }
  }
  return {
    verdict: 'ok',
    order: chain.flatMap((c) => c.end!.order),
    states: chain.flatMap((c) => c.end!.states),
    steps: budget.steps,
    parts: n,
  };
}
