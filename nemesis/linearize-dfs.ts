// The search as it was before the frontier search in linearize.ts: Wing & Gong
// depth first over the whole history, with Lowe's memo. Kept as the reference
// the property test in linearize.test.ts compares the frontier search against
// on small histories (it decides them exactly; it only gives up on long ones).

import type { LinModel, LinOp } from './linearize.js';

export type DfsResult<S> =
  | { verdict: 'ok'; order: number[]; states: S[] }
  | { verdict: 'fail'; stuck: number; prefix: number[]; state: S }
  | { verdict: 'undecided'; steps: number };

interface Node<I, O> {
  op: LinOp<I, O> | null;
  isCall: boolean;
  time: number;
  match: Node<I, O> | null;
  prev: Node<I, O> | null;
  next: Node<I, O> | null;
}

/** Checks `ops` against `model`; gives up after `maxSteps` (verdict 'undecided'). */
export function linearizeDfs<S, I, O>(
  model: LinModel<S, I, O>,
  ops: readonly LinOp<I, O>[],
  maxSteps = 5_000_000,
): DfsResult<S> {
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
  // random 32-bit words per operation, XORed): small keys for long histories.
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
  const stack: { node: Node<I, O>; state: S; alts: S[]; alt: number }[] = [];
  let state = model.init;
  let hi = 0;
  let lo = 0;
  let entry = head.next;
  let steps = 0;
  let deepest: { stuck: number; prefix: number[]; state: S; depth: number } | null = null;
  /** Linearizes `node` next with the first of `alts` from `from` not seen before. */
  const take = (node: Node<I, O>, before: S, alts: S[], from: number): boolean => {
    const [zh, zl] = zob.get(node.op!.id)!;
    for (let alt = from; alt < alts.length; alt++) {
      const next = alts[alt]!;
      const k = `${(hi ^ zh) >>> 0}.${(lo ^ zl) >>> 0}|${model.key(next)}`;
      if (memo.has(k)) continue;
      memo.add(k);
      stack.push({ node, state: before, alts, alt });
      state = next;
      hi = (hi ^ zh) >>> 0;
      lo = (lo ^ zl) >>> 0;
      lift(node);
      entry = head.next;
      return true;
    }
    return false;
  };
  while (head.next !== null) {
    if (++steps > maxSteps) return { verdict: 'undecided', steps };
    if (entry === null) break;
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
      const top = stack.pop();
      if (!top) {
        return {
          verdict: 'fail',
          stuck: deepest.stuck,
          prefix: deepest.prefix,
          state: deepest.state,
        };
      }
      state = top.state;
      const [zh, zl] = zob.get(top.node.op!.id)!;
      hi = (hi ^ zh) >>> 0;
      lo = (lo ^ zl) >>> 0;
      unlift(top.node);
      // the same operation with its next possible outcome, else the next operation
      if (!take(top.node, top.state, top.alts, top.alt + 1)) entry = top.node.next;
    }
  }
  const order = stack.map((s) => s.node.op!.id);
  const states = [...stack.map((s) => s.state).slice(1), state];
  return { verdict: 'ok', order, states };
}
