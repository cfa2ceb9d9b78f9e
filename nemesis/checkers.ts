// The checkers: pure functions of a recorded history (nemesis/history.ts),
// independent of the code under test. Each returns the anomalies it found,
// with the operations that show it.

import type { AclOp, AuditRow, DeviceOp, History, IoOp, Op, PrOp } from './history.js';
import { type LinModel, type LinOp, linearize, type Search } from './linearize.js';
import { linearizeDfs } from './linearize-dfs.js';
import {
  access,
  canonKey,
  EMPTY,
  type Model,
  type Outcome,
  type Request,
  showModel,
  step,
  typeOf,
} from './model.js';

export interface Anomaly {
  check: string;
  message: string;
  /** The operations that show it (the minimal history around it). */
  ops: Op[];
}

/**
 * How long after its client stopped waiting a command of unknown outcome may
 * still take effect: the agent's change deadline (cluster.changeTimeout) and a
 * member lease (a late request carries the sender's epoch, kept under its
 * lease), with room for a frozen etcd member or agent. Past it, the command
 * happened or never will.
 */
export const UNKNOWN_BOUND_MS = 15_000;
/** The longest a client waits for a PR command (older histories lack gaveUp). */
const CLIENT_WAIT_MS = 60_000;

/** The latest call or return in the history (a loop: a long run has too many for a spread). */
function lastTime(h: History): number {
  let t = 0;
  for (const o of h.ops) t = Math.max(t, o.ret ?? o.call);
  return t;
}

const retOf = (o: Op) =>
  o.status === 'unknown' || o.ret === null ? Number.POSITIVE_INFINITY : o.ret;

// ---- reservations and NBD I/O: linearizable against the model ----

/**
 * What the search tracks: the reservation state committed last, the changes
 * not yet settled, and how far each agent got with them. pr.md: every agent
 * applies a change (in order) before the change is acknowledged, and until it
 * is settled a connection may do only what both the old and the new state
 * allow. So a change takes effect in steps, all between its call and its
 * return: it is committed; each agent applies it (what it takes away holds
 * there at once); once every agent has, each agent lifts the old state's limits
 * in turn (what it gives holds there). Only I/O shows how far an agent got, so
 * an I/O step may move its agent on (and the others' applies, which a lift
 * needs); a change's `settle` step, before it returns, moves every agent past it.
 * A command of unknown outcome may also never happen (`gone`: its settle step
 * is then nothing).
 */
interface PrState {
  m: Model;
  /** Committed, not settled everywhere: each change's id and the state before it. */
  pending: { id: number; old: Model }[];
  /** Per agent (in `agents` order): how many pending changes it has applied, and lifted. */
  applied: number[];
  lifted: number[];
  /** Unknown commands that did not happen and whose settle step is still to come. */
  gone: number[];
  /**
   * Changes committed whose settle step is still to come (once lifted everywhere it never
   * can come). Left out of the key: the operations placed decide it, and no step reads it.
   */
  committed: number[];
}

type PrInput =
  | { req: Request; id: number }
  | { settle: number }
  | { io: { identity: string; cmd: 'read' | 'write'; agent: string } }
  | { read: string };

/** Whether an agent that applied `a` and lifted `l` of the pending changes allows the I/O. */
function allows(
  s: PrState,
  a: number,
  l: number,
  identity: string,
  cmd: 'read' | 'write',
): boolean {
  const view = a < s.pending.length ? s.pending[a]!.old : s.m;
  if (!access(view, identity)[cmd]) return false;
  for (let i = l; i < a; i++) if (!access(s.pending[i]!.old, identity)[cmd]) return false;
  return true;
}

/** Drops the changes every agent has lifted. */
function trim(s: PrState): PrState {
  const k = Math.min(...s.lifted);
  if (k <= 0) return s;
  return {
    ...s,
    pending: s.pending.slice(k),
    applied: s.applied.map((x) => x - k),
    lifted: s.lifted.map((x) => x - k),
  };
}

const pendingKey = (s: PrState) => s.pending.map((p) => `${p.id}<${showModel(p.old)}>`).join(',');

function prModelFor(
  agents: readonly string[],
): LinModel<PrState, PrInput, Outcome | 'ok' | 'EPERM'> {
  const zero = agents.map(() => 0);
  return {
    init: { m: EMPTY, pending: [], applied: zero, lifted: zero, gone: [], committed: [] },
    // a pending change's state before it is part of the state: what an agent that has
    // not lifted it allows (two orders can reach the same changes over different states)
    key: (s) =>
      `${showModel(s.m)}|${pendingKey(s)}|${s.applied.join('')}/${s.lifted.join('')}|${s.gone.join(',')}`,
    // Only I/O looks at how far an agent got, and an I/O step may move its agent
    // as far as it likes: a state whose agents are nowhere further on than
    // another's, all else equal, can do all that one can.
    group: (s) => `${showModel(s.m)}|${pendingKey(s)}|${s.gone.join(',')}|${s.committed.join(',')}`,
    covers: (a, b) =>
      a.applied.every((v, i) => v <= b.applied[i]!) && a.lifted.every((v, i) => v <= b.lifted[i]!),
    dead: (s, input) =>
      'settle' in input &&
      s.committed.includes(input.settle) &&
      !s.pending.some((p) => p.id === input.settle),
    step(s, input, output) {
      if ('read' in input) return { ok: showModel(s.m) === input.read, next: s };
      if ('io' in input) {
        const x = agents.indexOf(input.io.agent);
        const want = output === 'ok';
        const n = s.pending.length;
        const nexts: PrState[] = [];
        // the agent may have applied more (a2 >= its a) and lifted more (l2 >= its l);
        // a lift needs every agent to have applied the change first
        for (let a2 = s.applied[x]!; a2 <= n; a2++) {
          for (let l2 = s.lifted[x]!; l2 <= a2; l2++) {
            if (allows(s, a2, l2, input.io.identity, input.io.cmd) !== want) continue;
            if (a2 === s.applied[x] && l2 === s.lifted[x]) {
              nexts.unshift(s);
              continue;
            }
            const applied = s.applied.map((v, i) => Math.max(v, l2, i === x ? a2 : 0));
            const lifted = s.lifted.map((v, i) => (i === x ? l2 : v));
            nexts.push(trim({ ...s, applied, lifted }));
          }
        }
        if (nexts.length === 0) return { ok: false, next: s };
        return { ok: true, next: nexts[0]!, also: nexts.slice(1) };
      }
      if ('settle' in input) {
        const gi = s.gone.indexOf(input.settle);
        if (gi >= 0)
          return { ok: true, next: { ...s, gone: s.gone.filter((g) => g !== input.settle) } };
        const i = s.pending.findIndex((p) => p.id === input.settle);
        if (i < 0) {
          // not committed yet (its command comes first), or already settled by I/O
          return { ok: false, next: s };
        }
        return {
          ok: true,
          next: trim({
            ...s,
            committed: s.committed.filter((c) => c !== input.settle),
            applied: s.applied.map((v) => Math.max(v, i + 1)),
            lifted: s.lifted.map((v) => Math.max(v, i + 1)),
          }),
        };
      }
      const r = step(s.m, input.req);
      if (output !== undefined && (typeof output === 'string' || !sameOutcome(r.out, output))) {
        return { ok: false, next: s };
      }
      // an answered change settles before it returns; an unknown one within its bound, or never
      const tracked = output === undefined || (r.out.ok && r.out.changed);
      if (!tracked) return { ok: true, next: { ...s, m: r.next } };
      const next: PrState = {
        ...s,
        m: r.next,
        pending: [...s.pending, { id: input.id, old: s.m }],
        committed: [...s.committed, input.id],
      };
      if (output !== undefined) return { ok: true, next };
      return { ok: true, next, also: [{ ...s, gone: [...s.gone, input.id] }] };
    },
  };
}

function sameOutcome(model: Outcome, got: Outcome): boolean {
  if (model.ok !== got.ok) return false;
  if (model.ok && got.ok) {
    return (
      model.generation === got.generation &&
      model.changed === got.changed &&
      [...model.preempted].sort().join(',') === [...got.preempted].sort().join(',')
    );
  }
  if (!model.ok && !got.ok) return model.code === got.code;
  return false;
}

/** A state as the agents show it (GET /v1/devices/:name/pr), in the model's form. */
export function finalModelString(f: {
  generation: number;
  regs: Record<string, string>;
  reservation: string;
}): string {
  const regs = Object.entries(f.regs)
    .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0))
    .map(([id, k]) => `${id}=${canonKey(k) ?? k}`)
    .join(',');
  return `g${f.generation} [${regs}] ${f.reservation}`;
}

/**
 * Per device, the PR commands, the NBD READs and WRITEs answered (done or
 * refused with EPERM) and the state every agent shows at the end must fit one
 * order in which each took effect between its call and its return. An I/O sent
 * right after a PR command returned that no such order explains is a grant (or
 * revocation) not yet in force on that agent.
 */
/**
 * The depth-first search decides most histories in a few steps per operation; one it
 * cannot decide so (a dead end far back, many operations in flight) goes to the
 * frontier search, which decides it in one pass. Both are exact.
 */
const prSearch: Search = (model, ops, maxSteps) => {
  const quick = linearizeDfs(
    model,
    ops,
    Math.min(maxSteps ?? 5_000_000, Math.max(2_000_000, 100 * ops.length)),
  );
  return quick.verdict === 'undecided' ? linearize(model, ops, maxSteps) : quick;
};

export function checkReservations(
  h: History,
  maxSteps?: number,
  search: Search = prSearch,
): Anomaly[] {
  const anomalies: Anomaly[] = [];
  // a change's settle step: every agent past it
  const SETTLE = 1_000_000_000;
  const agents = [
    ...new Set(h.ops.filter((o) => o.kind === 'io' || o.kind === 'pr').map((o) => o.agent)),
  ].sort();
  const prModel = prModelFor(agents);
  const bound = h.unknownBoundMs ?? UNKNOWN_BOUND_MS;
  for (const device of h.prDevices) {
    const ops = h.ops.filter((o): o is PrOp => o.kind === 'pr' && o.device === device);
    const ios = h.ops.filter(
      (o): o is IoOp =>
        o.kind === 'io' &&
        o.device === device &&
        (o.status === 'ok' || (o.status === 'failed' && o.errno === 'EPERM')),
    );
    const lin: LinOp<PrInput, Outcome | 'ok' | 'EPERM'>[] = [];
    for (const o of ops) {
      if (o.status === 'failed' && !o.out) continue; // did not happen
      const unknown = o.status === 'unknown';
      // an unknown outcome takes effect within the bound after the client stopped waiting, or never
      const ret = unknown ? (o.gaveUp ?? o.call + CLIENT_WAIT_MS) + bound : retOf(o);
      lin.push({
        id: o.id,
        call: o.call,
        ret,
        input: { req: o.req, id: o.id },
        output: unknown ? undefined : o.out,
      });
      if (unknown || (o.out?.ok && o.out.changed)) {
        lin.push({
          id: SETTLE + o.id,
          call: o.call,
          ret,
          input: { settle: o.id },
          output: undefined,
        });
      }
    }
    for (const o of ios) {
      lin.push({
        id: o.id,
        call: o.call,
        ret: retOf(o),
        input: { io: { identity: o.identity, cmd: o.cmd, agent: o.agent } },
        output: o.status === 'ok' ? 'ok' : 'EPERM',
      });
    }
    const fin = h.final.agents[0]?.pr[device];
    const end = lastTime(h) + 1;
    if (fin) {
      lin.push({
        id: -1,
        call: end,
        ret: end + 1,
        input: { read: finalModelString(fin) },
        output: undefined,
      });
    }
    // a history the search decides takes a few steps per operation; the cap grows with it
    const r = search(prModel, lin, maxSteps ?? Math.max(5_000_000, 1000 * lin.length));
    if (r.verdict === 'undecided') {
      anomalies.push({
        check: 'reservations-linearizable',
        message: `${device}: the search gave up after ${r.steps} steps (history too concurrent to decide)`,
        ops: [],
      });
      continue;
    }
    if (r.verdict === 'ok') continue;
    const stuckId = r.stuck % SETTLE;
    const stuck: PrOp | IoOp | undefined =
      ops.find((o) => o.id === stuckId) ?? ios.find((o) => o.id === stuckId);
    const unsettled = r.state.pending.map((p, i) => {
      const on = (n: number[]) => agents.filter((_, x) => n[x]! > i).join(',') || 'none';
      return `#${p.id} applied on ${on(r.state.applied)}, lifted on ${on(r.state.lifted)}`;
    });
    const state = `${showModel(r.state.m)}${unsettled.length ? ` (not settled: ${unsettled.join('; ')})` : ''}`;
    const all: (PrOp | IoOp)[] = [...ops, ...ios];
    const check =
      stuck?.kind === 'io'
        ? stuck.probe !== undefined
          ? 'grant-in-force'
          : 'io-allowed'
        : 'reservations-linearizable';
    const what = stuck
      ? stuck.kind === 'io'
        ? `op ${stuck.id}: ${stuck.identity} ${stuck.cmd} through ${stuck.agent} ${stuck.status === 'ok' ? 'done' : 'refused (EPERM)'}${stuck.probe !== undefined ? `, sent right after op ${stuck.probe} returned` : ''}`
        : `op ${stuck.id} (${describe(stuck)})`
      : `the state the agents show at the end (${fin ? finalModelString(fin) : '?'})`;
    anomalies.push({
      check,
      message: `${device}: no order of the PR commands and I/O explains ${what}; the deepest order reached ${r.prefix.length} operations, leaving ${state}`,
      ops: around(all, stuck ?? ops[ops.length - 1], r.prefix),
    });
  }
  return anomalies;
}

/** After a PREEMPT AND ABORT returned, no connection of a preempted identity opened before it is served. */
export function checkAbort(h: History): Anomaly[] {
  const out: Anomaly[] = [];
  const seen = new Set<number>();
  for (const p of h.ops) {
    if (p.kind !== 'pr' || p.status !== 'ok' || p.req.action !== 'preempt-abort') continue;
    if (!p.out?.ok || p.out.preempted.length === 0 || p.ret === null) continue;
    const pret = p.ret;
    for (const c of h.conns) {
      if (c.device !== p.device || !p.out.preempted.includes(c.identity) || c.opened >= p.call) {
        continue;
      }
      if (seen.has(c.id)) continue;
      const served = h.ops.find(
        (o): o is IoOp =>
          o.kind === 'io' &&
          o.conn === c.id &&
          o.call > pret &&
          (o.status === 'ok' || (o.status === 'failed' && o.errno !== undefined)),
      );
      if (!served) continue;
      seen.add(c.id);
      out.push({
        check: 'abort',
        message: `${p.device}: op ${p.id} (${describe(p)}) preempted ${c.identity} with abort, yet ${c.identity}'s connection ${c.id} through ${c.agent} still answered op ${served.id} (${served.status}${served.errno ? ` ${served.errno}` : ''}) sent after it returned`,
        ops: [p, served],
      });
    }
  }
  return out;
}

/**
 * Every block read back from the shared file must hold a write that could be
 * the last to land: not one refused, and none that some acknowledged write sent
 * after it had to land after. A write of an identity that a PREEMPT AND ABORT
 * removed must have landed before that command returned (it drains them).
 */
export function checkBlocks(h: History): Anomaly[] {
  const out: Anomaly[] = [];
  for (const device of h.prDevices) {
    const got = h.final.blocks[device];
    if (!got) continue;
    const writes = h.ops.filter(
      (o): o is IoOp => o.kind === 'io' && o.device === device && o.cmd === 'write',
    );
    const aborts = h.ops.filter(
      (o): o is PrOp =>
        o.kind === 'pr' &&
        o.device === device &&
        o.status === 'ok' &&
        o.req.action === 'preempt-abort',
    );
    for (let b = 0; b < got.length; b++) {
      const onBlock = writes.filter((w) => w.block === b);
      const acked = onBlock.filter((w) => w.status === 'ok');
      const tag = got[b]!;
      if (tag === '') {
        if (acked.length > 0) {
          out.push({
            check: 'writes-kept',
            message: `${device} block ${b}: reads back as zeroes, though ${acked.length} write(s) to it were acknowledged`,
            ops: acked.slice(-3),
          });
        }
        continue;
      }
      const w = onBlock.find((x) => x.tag === tag);
      if (!w) {
        out.push({
          check: 'writes-kept',
          message: `${device} block ${b}: holds ${tag}, which no client wrote there`,
          ops: [],
        });
        continue;
      }
      if (w.status === 'failed' && w.errno === 'EPERM') {
        out.push({
          check: 'writes-kept',
          message: `${device} block ${b}: holds op ${w.id}'s data, a write refused with EPERM`,
          ops: [w],
        });
        continue;
      }
      let deadline = retOf(w);
      let why = 'it returned';
      for (const p of aborts) {
        if (
          p.out?.ok &&
          p.out.preempted.includes(w.identity) &&
          p.ret !== null &&
          p.ret > w.call &&
          p.ret < deadline
        ) {
          deadline = p.ret;
          why = `op ${p.id} preempted ${w.identity} with abort`;
        }
      }
      const later = acked.find((x) => x.call > deadline);
      if (later) {
        const abort = aborts.find((p) => why.startsWith(`op ${p.id} `));
        out.push({
          check: why === 'it returned' ? 'writes-kept' : 'no-write-after-preempt',
          message: `${device} block ${b}: holds op ${w.id}'s data (${w.identity} through ${w.agent}), which had to land before ${why}; op ${later.id} (${later.identity}) wrote it later and was acknowledged`,
          ops: [w, ...(abort ? [abort] : []), later].sort((a, c) => a.call - c.call),
        });
      }
    }
  }
  return out;
}

// ---- the audit trail ----

function auditRequest(r: AuditRow, unregister: boolean): Request {
  return {
    action: r.action as Request['action'],
    as: r.initiator,
    key: r.key,
    ...(r.saKey !== undefined ? { saKey: r.saKey } : {}),
    ...(r.type !== undefined ? { type: r.type } : {}),
    ...(r.target !== undefined ? { target: r.target } : {}),
    unregister,
  };
}

const API_REFUSALS = new Set([
  'PR_BAD_TYPE',
  'PR_BAD_KEY',
  'PR_INVALID_REQUEST',
  'BALLAST_BAD_REQUEST',
]);

function rowKey(r: {
  initiator: string;
  action: string;
  key: string;
  saKey?: string | undefined;
  outcome: string;
  code?: string | undefined;
  generation?: number;
}): string {
  const gen = r.outcome === 'refused' ? '' : String(r.generation);
  return [
    r.initiator,
    r.action,
    canonKey(r.key) ?? r.key,
    r.saKey === undefined ? '' : (canonKey(r.saKey) ?? r.saKey),
    r.outcome,
    r.code ?? '',
    gen,
  ].join('|');
}

function opKey(o: PrOp): string | null {
  if (!o.out) return null;
  return rowKey({
    initiator: o.req.as,
    action: o.req.action,
    key: o.req.key,
    saKey: o.req.saKey,
    outcome: o.out.ok ? (o.out.changed ? 'changed' : 'unchanged') : 'refused',
    code: o.out.ok ? undefined : o.out.code,
    generation: o.out.ok ? o.out.generation : undefined,
  });
}

/**
 * Entries `positions` (ascending) of one content, given to the commands `ops` that
 * share it: each command's entry must come after every command in `fixed` that
 * returned before it was sent, and before every one sent after it returned. Earliest
 * deadline first over the positions in order (the matching exists if this finds
 * it); where it finds none, call order, which the real-time check then reports.
 */
export function shareEntries(
  ops: PrOp[],
  positions: number[],
  fixed: [PrOp, number][],
): Map<PrOp, number> {
  const bounds = ops.map((o) => {
    let lo = -1;
    let hi = Number.POSITIVE_INFINITY;
    for (const [f, i] of fixed) {
      if (f.ret !== null && f.ret < o.call) lo = Math.max(lo, i);
      if (o.ret !== null && o.ret < f.call) hi = Math.min(hi, i);
    }
    return { o, lo, hi };
  });
  const out = new Map<PrOp, number>();
  const open = new Set(bounds);
  for (const i of positions) {
    let best: (typeof bounds)[number] | undefined;
    for (const b of open) {
      if (b.lo < i && i < b.hi && (best === undefined || b.hi < best.hi)) best = b;
    }
    if (best === undefined) break;
    open.delete(best);
    out.set(best.o, i);
  }
  if (out.size === ops.length) return out;
  const byCall = [...ops].sort((a, b) => a.call - b.call);
  return new Map(byCall.map((o, n) => [o, positions[n]!]));
}

/**
 * Each device's audit trail lists every acknowledged command (changes and
 * refusals), nothing that did not happen, in an order the model can replay and
 * that respects real time.
 */
export function checkAudit(h: History): Anomaly[] {
  const out: Anomaly[] = [];
  for (const device of h.prDevices) {
    const rows = [...(h.final.audit[device] ?? [])].sort((a, b) => a.seq - b.seq);
    const ops = h.ops.filter((o): o is PrOp => o.kind === 'pr' && o.device === device);
    // replay: some reading of the trail is a valid sequence for the model
    let states: Model[] = [EMPTY];
    for (const r of rows) {
      const next: Model[] = [];
      for (const s of states) {
        if (
          r.outcome === 'refused' &&
          r.code !== undefined &&
          API_REFUSALS.has(r.code) &&
          typeOf(r.type as never) !== undefined
        ) {
          // refused before the model could judge it (a malformed field): nothing changes
          if (typeOf(String(r.type)) === null || r.code !== 'PR_BAD_TYPE') {
            next.push(s);
            continue;
          }
        }
        for (const unreg of r.action === 'register-move' ? [false, true] : [false]) {
          const x = step(s, auditRequest(r, unreg));
          const outcome = !x.out.ok ? 'refused' : x.out.changed ? 'changed' : 'unchanged';
          const genOk = !x.out.ok || x.out.generation === r.generation;
          if (outcome === r.outcome && genOk && (x.out.ok || x.out.code === r.code))
            next.push(x.next);
        }
      }
      const uniq = new Map(next.map((s) => [showModel(s), s]));
      if (uniq.size === 0) {
        out.push({
          check: 'audit',
          message: `${device}: audit entry ${r.seq} (${r.initiator} ${r.action} → ${r.outcome}${r.code ? ` ${r.code}` : ''}, generation ${r.generation}) does not follow from the entries before it (states then: ${states.map(showModel).join(' | ')})`,
          ops: [],
        });
        break;
      }
      states = [...uniq.values()];
    }
    // every acknowledged command is on the trail; nothing else is
    const pos = new Map<string, number[]>();
    rows.forEach((r, i) => {
      const k = rowKey(r);
      pos.set(k, [...(pos.get(k) ?? []), i]);
    });
    const acked = new Map<string, PrOp[]>();
    const maybe = new Map<string, number>();
    for (const o of ops) {
      const k = opKey(o);
      // a refusal whose answer said it is not on the trail (etcd unreachable): not expected there
      if (o.note && /\bNOT on the audit trail\b/.test(o.note)) continue;
      if (o.note && /\bmay not be on the audit trail\b/.test(o.note)) {
        if (k) maybe.set(k, (maybe.get(k) ?? 0) + 1);
        continue;
      }
      if (o.status === 'ok' || (o.status === 'failed' && o.out)) {
        if (k) acked.set(k, [...(acked.get(k) ?? []), o]);
      } else if (o.status === 'unknown') {
        // any of its possible entries may be there
        for (const kk of pos.keys())
          if (kk.startsWith(`${o.req.as}|${o.req.action}|`))
            maybe.set(kk, (maybe.get(kk) ?? 0) + 1);
      }
    }
    for (const [k, list] of acked) {
      const n = pos.get(k)?.length ?? 0;
      if (n < list.length) {
        out.push({
          check: 'audit',
          message: `${device}: ${list.length} acknowledged command(s) ${k.replaceAll('|', ' ')} but ${n} on the audit trail`,
          ops: list.slice(0, 5),
        });
      }
    }
    for (const [k, p] of pos) {
      const allowed = (acked.get(k)?.length ?? 0) + (maybe.get(k) ?? 0);
      if (p.length > allowed) {
        out.push({
          check: 'audit',
          message: `${device}: ${p.length} audit entr${p.length === 1 ? 'y' : 'ies'} ${k.replaceAll('|', ' ')} (seq ${p.map((i) => rows[i]!.seq).join(',')}) but only ${allowed} such command(s) made or possibly made`,
          // the commands of that content: those answered "not made" are the likely source
          ops: ops
            .filter(
              (o) =>
                rowKey({
                  initiator: o.req.as,
                  action: o.req.action,
                  key: o.req.key,
                  saKey: o.req.saKey,
                  outcome: k.split('|')[4]!,
                  code: k.split('|')[5] || undefined,
                  generation: Number(k.split('|')[6]),
                }) === k,
            )
            .slice(0, 6),
        });
      }
    }
    // real-time order: a command that returned before another was sent comes first.
    // Content whose count on the trail differs from what was acknowledged is reported
    // above and left out. Commands of the same content share its entries: each is
    // given one that real time allows next to the commands told apart by content
    // (sendEntries), so that a long command overlapping a short one of the same
    // content is not judged on the short one's entry.
    const at = new Map<PrOp, number>();
    const keyOf = new Map<PrOp, string>();
    const shared: [PrOp[], number[]][] = [];
    for (const [k, list] of acked) {
      for (const o of list) keyOf.set(o, k);
      const p = pos.get(k) ?? [];
      if (p.length !== list.length || maybe.has(k)) continue;
      if (list.length === 1) at.set(list[0]!, p[0]!);
      else shared.push([list, p]);
    }
    const fixed = [...at];
    for (const [list, p] of shared) {
      for (const [o, i] of shareEntries(list, p, fixed)) at.set(o, i);
    }
    const list = [...at.keys()].sort((a, b) => a.call - b.call);
    let reported = 0;
    for (const a of list) {
      if (a.ret === null || reported > 3) continue;
      for (const b of list) {
        if (a.ret >= b.call || reported > 3) continue;
        const pa = at.get(a)!;
        const pb = at.get(b)!;
        if (pa > pb) {
          reported++;
          out.push({
            check: 'audit',
            message: `${device}: op ${a.id} returned before op ${b.id} was sent, but the trail lists it after (seq ${rows[pa]!.seq} > ${rows[pb]!.seq}; entries told apart by call order among ${acked.get(keyOf.get(a)!)!.length} and ${acked.get(keyOf.get(b)!)!.length} of the same content)`,
            // and the other commands of the same content, which the entries were shared among
            ops: [
              a,
              b,
              ...[a, b].flatMap((x) =>
                acked
                  .get(keyOf.get(x)!)!
                  .filter((o) => o !== a && o !== b)
                  .slice(0, 3),
              ),
            ],
          });
        }
      }
    }
  }
  return out;
}

// ---- the catalog and the access lists: registers ----

/**
 * A device: absent, or its size and, while a create whose outcome is unknown
 * holds the name, that create (its agent died mid-way: the name stays taken
 * until the create is completed or rolled back, so it may appear and go).
 */
type DevState = { size: number; by: number } | null;
type DevIn = { op: DeviceOp } | { hold: number } | { rollback: number } | { read: number | null };

/** A held name: the record of a create answered NOT made, until its agent removes it. */
const HELD = -1;

const devModel: LinModel<DevState, DevIn, string> = {
  init: null,
  key: (s) => JSON.stringify(s),
  step(s, input, output) {
    if ('read' in input) return { ok: input.read === (s?.size ?? null), next: s };
    // its agent removes the record only while it is that create's own: once the create
    // finished (a resize or delete through another agent touched it) there is nothing to undo
    if ('rollback' in input) return { ok: true, next: s?.by === input.rollback ? null : s };
    if ('hold' in input) {
      // its record may have held the name for a while, or never been seen
      if (s !== null) return { ok: true, next: s };
      return { ok: true, next: { size: HELD, by: input.hold }, also: [s] };
    }
    const o = input.op;
    const known = output !== undefined;
    if (s?.size === HELD) {
      // not a device: taken for a create, gone for a resize; a delete may remove the record
      if (o.action === 'create')
        return { ok: !known || output === 'BALLAST_DEVICE_EXISTS', next: s };
      if (o.action === 'resize')
        return { ok: !known || output === 'BALLAST_DEVICE_NOT_FOUND', next: s };
      if (output === 'ok') return { ok: true, next: null };
      return {
        ok: !known || output === 'BALLAST_DEVICE_NOT_FOUND',
        next: s,
        also: known ? [] : [null],
      };
    }
    switch (o.action) {
      case 'create':
        if (s === null)
          return { ok: !known || output === 'ok', next: { size: o.size!, by: known ? -1 : o.id } };
        return { ok: !known || output === 'BALLAST_DEVICE_EXISTS', next: s };
      case 'resize':
        if (s === null) return { ok: !known || output === 'BALLAST_DEVICE_NOT_FOUND', next: s };
        if (o.size! < s.size) return { ok: !known || output === 'BALLAST_SHRINK_REFUSED', next: s };
        return { ok: !known || output === 'ok', next: { size: o.size!, by: -1 } };
      case 'delete':
        if (s === null) return { ok: !known || output === 'BALLAST_DEVICE_NOT_FOUND', next: s };
        return { ok: !known || output === 'ok', next: null };
    }
  },
};

/** Codes a device command answers that the model decides (the others say nothing happened). */
export const DEVICE_VERDICTS = new Set([
  'BALLAST_DEVICE_EXISTS',
  'BALLAST_DEVICE_NOT_FOUND',
  'BALLAST_SHRINK_REFUSED',
]);

/** A create answered NOT made whose record may hold the name until its agent removes it. */
const HOLDS_NAME = /its record goes once the store takes it|may be listed as creating/;

// The catalog and the access lists keep the depth-first search: a name's history is a few
// hundred operations, decided in about one step each, and its operations in doubt stay in
// flight to the end, which the frontier search would carry in every combination.
const dfs = linearizeDfs as Search;

export function checkCatalog(h: History, search: Search = dfs): Anomaly[] {
  const out: Anomaly[] = [];
  const fin = h.final.agents[0];
  const names = new Set(h.ops.filter((o): o is DeviceOp => o.kind === 'device').map((o) => o.name));
  for (const name of names) {
    const ops = h.ops.filter((o): o is DeviceOp => o.kind === 'device' && o.name === name);
    const lin: LinOp<DevIn, string>[] = [];
    // a create that may have left its record behind: that record may go at any time after
    const rollback = (o: DeviceOp) =>
      lin.push({
        id: 1_000_000_000 + o.id,
        call: o.call,
        ret: Number.POSITIVE_INFINITY,
        input: { rollback: o.id },
        output: undefined,
      });
    for (const o of ops) {
      if (o.action === 'create' && o.status === 'failed' && o.note && HOLDS_NAME.test(o.note)) {
        // NOT made, but its record holds the name until its agent has removed it
        lin.push({
          id: o.id,
          call: o.call,
          ret: Number.POSITIVE_INFINITY,
          input: { hold: o.id },
          output: undefined,
        });
        rollback(o);
        continue;
      }
      if (o.status === 'failed' && !(o.code && DEVICE_VERDICTS.has(o.code))) continue;
      lin.push({
        id: o.id,
        call: o.call,
        ret: retOf(o),
        input: { op: o },
        output: o.status === 'unknown' ? undefined : o.status === 'ok' ? 'ok' : o.code,
      });
      if (o.status === 'unknown' && o.action === 'create') {
        rollback(o);
      }
    }
    const listed = fin?.devices.find((d) => d.name === name);
    if (fin) {
      const end = lastTime(h) + 1;
      lin.push({
        id: -1,
        call: end,
        ret: end + 1,
        input: { read: listed ? listed.size : null },
        output: undefined,
      });
    }
    const r = search(devModel, lin);
    if (r.verdict === 'fail') {
      const at = ops.findIndex((o) => o.id === r.stuck);
      const stuck = ops[at];
      out.push({
        check: 'catalog',
        message: `device ${name}: no order of the creates, resizes and deletes explains ${stuck ? `op ${stuck.id} (${describe(stuck)})` : `what the agents list at the end (${listed ? `${listed.size} bytes, ${listed.state}` : 'absent'})`}`,
        // the operations on the name before the one no order explains (and two after)
        ops: stuck ? ops.slice(Math.max(0, at - 8), at + 3) : ops.slice(-8),
      });
    }
  }
  for (const a of h.final.agents) {
    for (const d of a.devices) {
      if (d.state !== 'ready') {
        out.push({
          check: 'catalog',
          message: `agent ${a.agent} lists ${d.name} as ${d.state} after the faults stopped`,
          ops: h.ops.filter((o) => o.kind === 'device' && o.name === d.name).slice(-5),
        });
      }
    }
  }
  return out;
}

type AclIn = { set: string | null } | { read: string | null };

const aclModel: LinModel<string | null, AclIn, 'ok'> = {
  init: null,
  key: (s) => String(s),
  step(s, input) {
    if ('read' in input) return { ok: input.read === s, next: s };
    return { ok: true, next: input.set };
  },
};

export function checkAcl(h: History, search: Search = dfs): Anomaly[] {
  const out: Anomaly[] = [];
  const fin = h.final.agents[0];
  const devices = new Set(h.ops.filter((o): o is AclOp => o.kind === 'acl').map((o) => o.device));
  for (const device of devices) {
    const ops = h.ops.filter((o): o is AclOp => o.kind === 'acl' && o.device === device);
    const lin: LinOp<AclIn, 'ok'>[] = ops
      .filter((o) => o.status !== 'failed')
      .map((o) => ({
        id: o.id,
        call: o.call,
        ret: retOf(o),
        input: { set: o.entries },
        output: o.status === 'ok' ? 'ok' : undefined,
      }));
    if (fin && device in fin.acl) {
      const end = lastTime(h) + 1;
      lin.push({
        id: -1,
        call: end,
        ret: end + 1,
        input: { read: fin.acl[device] ?? null },
        output: undefined,
      });
    }
    const r = search(aclModel, lin);
    if (r.verdict === 'fail') {
      out.push({
        check: 'acl',
        message: `${device}: the access list at the end (${fin?.acl[device] ?? 'open'}) is not the last one set by an acknowledged change (or one that may have been made)`,
        ops: ops.slice(-6),
      });
    }
  }
  return out;
}

// ---- events ----

function parseId(id: string): [number, number] {
  const m = /^(\d+)(?:\.(\d+))?$/.exec(id);
  return m ? [Number(m[1]), Number(m[2] ?? 0)] : [Number.NaN, 0];
}
const idLess = (a: string, b: string) => {
  const [ra, na] = parseId(a);
  const [rb, nb] = parseId(b);
  return ra < rb || (ra === rb && na < nb);
};

/**
 * Every event is delivered at least once to every recipient and every follow
 * stream, in id order, with the same attributes everywhere. A consumer that
 * fell behind a compaction gets a resync in place of what was compacted.
 */
export function checkEvents(h: History): Anomaly[] {
  const out: Anomaly[] = [];
  const truth = new Map<string, { attrs: string; where: string }>();
  const attrs = (e: {
    type: string;
    subject?: string | undefined;
    time?: string | undefined;
    data?: unknown;
  }) => JSON.stringify([e.type, e.subject ?? null, e.time ?? null, e.data ?? null]);
  const all: [string, typeof h.final.eventLog][] = [
    ['the final event log', h.final.eventLog],
    ...Object.entries(h.final.consumers),
  ];
  for (const [who, list] of all) {
    for (const e of list) {
      if (e.type.endsWith('resync')) continue;
      const a = attrs(e);
      const t = truth.get(e.id);
      if (!t) truth.set(e.id, { attrs: a, where: who });
      else if (t.attrs !== a) {
        out.push({
          check: 'events',
          message: `event ${e.id} differs: ${t.where} got ${t.attrs}, ${who} got ${a}`,
          ops: [],
        });
        t.attrs = a; // report each difference once per consumer
      }
    }
  }
  const compacted = Math.max(0, ...h.final.compactions);
  const base = h.final.baseline;
  const ids = [...truth.keys()]
    .filter((id) => base === undefined || idLess(base, id))
    .sort((a, b) => (idLess(a, b) ? -1 : idLess(b, a) ? 1 : 0));
  for (const [who, list] of Object.entries(h.final.consumers)) {
    // In id order: each event's first delivery after the previous one's, and after any
    // resync that came before it (a resync at r stands for the state after r: an event
    // up to r delivered for the first time after it is applied on top of a newer state).
    // A repeat is allowed (at least once), and so is a resync repeated.
    let last: string | null = null;
    const firsts = new Set<string>();
    const late: string[] = [];
    // for each resync, the last first delivery before it: what it may stand in for
    const stoodIn: { resync: string; after: string | null }[] = [];
    let newest: string | null = null; // the newest event first delivered so far
    for (const e of list) {
      if (e.type.endsWith('resync')) {
        stoodIn.push({ resync: e.id, after: newest });
        if (last === null || idLess(last, e.id)) last = e.id;
        continue;
      }
      if (firsts.has(e.id)) continue;
      if (last !== null && !idLess(last, e.id)) {
        late.push(`event ${e.id} first delivered after ${last}`);
      } else last = e.id;
      if (newest === null || idLess(newest, e.id)) newest = e.id;
      firsts.add(e.id);
    }
    if (late.length > 0) {
      out.push({
        check: 'events',
        message: `${who}: ${late[0]}${late.length > 1 ? ` (and ${late.length - 1} more event(s) out of order)` : ''}`,
        ops: [],
      });
    }
    // At least once, unless a resync stood in for it: one at or after its revision,
    // delivered while everything first delivered so far came before it.
    const missing = ids.filter(
      (id) =>
        !firsts.has(id) &&
        !stoodIn.some(
          (s) =>
            parseId(id)[0] <= parseId(s.resync)[0] &&
            parseId(id)[0] <= compacted &&
            (s.after === null || idLess(s.after, id)),
        ),
    );
    if (missing.length > 0) {
      out.push({
        check: 'events',
        message: `${who}: ${missing.length} event(s) never delivered: ${missing.slice(0, 8).join(', ')}${missing.length > 8 ? ' …' : ''} (last delivered ${last ?? 'none'})`,
        ops: [],
      });
    }
  }
  return out;
}

// ---- convergence ----

export function checkConvergence(h: History): Anomaly[] {
  if (h.final.converged) return [];
  const show = h.final.agents.map(
    (a) => `${a.agent}: ${JSON.stringify({ devices: a.devices, pr: a.pr, acl: a.acl })}`,
  );
  return [
    {
      check: 'convergence',
      message: `the agents did not agree after the faults stopped:\n    ${show.join('\n    ')}`,
      ops: [],
    },
  ];
}

// ---- all of them ----

/**
 * A change answered BALLAST_CLUSTER_NOT_APPLIED is made (not yet in force
 * everywhere): its outcome is unknown to the client, whatever else the message
 * says (histories recorded before the campaign classified it so).
 */
export function normalize(h: History): History {
  for (const o of h.ops) {
    if (
      o.kind === 'pr' &&
      o.status === 'failed' &&
      o.note?.startsWith('BALLAST_CLUSTER_NOT_APPLIED')
    ) {
      o.status = 'unknown';
      o.gaveUp ??= o.ret ?? o.call;
      o.ret = null;
    }
  }
  return h;
}

export function checkAll(h: History): Anomaly[] {
  normalize(h);
  return [
    ...checkReservations(h),
    ...checkAbort(h),
    ...checkBlocks(h),
    ...checkAudit(h),
    ...checkCatalog(h),
    ...checkAcl(h),
    ...checkEvents(h),
    ...checkConvergence(h),
  ];
}

// ---- reports ----

function overlaps(a: Op, b: Op): boolean {
  return a.call <= retOf(b) && b.call <= retOf(a);
}

/** The operations around `op`: those in flight with it, and a few before. */
function around<T extends Op>(ops: T[], op: T | undefined, prefix: number[]): T[] {
  if (!op) return ops.slice(-8);
  const near = ops.filter(
    (o) =>
      o === op ||
      (overlaps(o, op) &&
        (o.kind === 'pr' ||
          o.kind !== op.kind ||
          ('identity' in o && 'identity' in op && o.identity === op.identity))),
  );
  // the last PR commands the search had placed, and the one a probe followed
  const probe = op.kind === 'io' ? op.probe : undefined;
  const before = [
    ...prefix
      .map((id) => ops.find((o) => o.id === id))
      .filter((o): o is T => o !== undefined && o.kind === 'pr')
      .slice(-3),
    ...ops.filter((o) => o.id === probe),
  ].filter((o) => !near.includes(o));
  return [...new Set([...before, ...near])].sort((a, b) => a.call - b.call).slice(-16);
}

export function describe(o: Op): string {
  const t = (x: number | null) => (x === null ? '?' : (x / 1000).toFixed(3));
  const head = `#${o.id} ${o.process}@${o.agent} [${t(o.call)}–${o.status === 'unknown' ? '?' : t(o.ret)}] ${o.status}`;
  switch (o.kind) {
    case 'pr': {
      const q = o.req;
      const args = [
        `as=${q.as}`,
        `key=${q.key}`,
        ...(q.saKey !== undefined ? [`sa=${q.saKey}`] : []),
        ...(q.type !== undefined ? [`type=${q.type}`] : []),
        ...(q.target !== undefined ? [`target=${q.target}`] : []),
        ...(q.unregister ? ['unregister'] : []),
      ].join(' ');
      const res = o.out
        ? o.out.ok
          ? `→ ${o.out.changed ? 'changed' : 'unchanged'} g${o.out.generation}${o.out.preempted.length ? ` preempted ${o.out.preempted.join(',')}` : ''}`
          : `→ ${o.out.code}`
        : o.note
          ? `→ ${o.note}`
          : '';
      return `${head} pr ${o.device} ${q.action} ${args} ${res}`;
    }
    case 'io':
      return `${head} ${o.cmd} ${o.device}[${o.block}] as ${o.identity} conn ${o.conn}${o.tag ? ` tag ${o.tag}` : ''}${o.errno ? ` ${o.errno}` : ''}${o.note && !o.errno ? ` (${o.note})` : ''}${o.probe !== undefined ? ` probe of #${o.probe}` : ''}`;
    case 'device':
      return `${head} device ${o.action} ${o.name}${o.size ? ` ${o.size}` : ''}${o.code ? ` → ${o.code}` : ''}`;
    case 'acl':
      return `${head} acl ${o.device} ${o.entries ?? 'open'}`;
  }
}

/** A report to print: the seed, each anomaly with its history (a few per check), and the fault schedule. */
export function report(h: History, anomalies: Anomaly[], perCheck = 3): string {
  const byCheck = new Map<string, Anomaly[]>();
  for (const a of anomalies) byCheck.set(a.check, [...(byCheck.get(a.check) ?? []), a]);
  const counts = [...byCheck].map(([k, v]) => `${k} ${v.length}`).join(', ');
  const lines = [
    `nemesis: seed ${h.seed}: ${anomalies.length} anomal${anomalies.length === 1 ? 'y' : 'ies'} (${counts})`,
  ];
  for (const [check, list] of byCheck) {
    for (const a of list.slice(0, perCheck)) {
      lines.push(`  [${check}] ${a.message}`);
      for (const o of a.ops) lines.push(`      ${describe(o)}`);
    }
    if (list.length > perCheck) lines.push(`  [${check}] … and ${list.length - perCheck} more`);
  }
  lines.push('  faults:');
  for (const f of h.faults) {
    lines.push(
      `      ${(f.start / 1000).toFixed(3)}–${f.end === undefined ? '?' : (f.end / 1000).toFixed(3)} ${f.kind} ${f.target}${f.detail ? ` (${f.detail})` : ''}`,
    );
  }
  lines.push(`  replay: npm run nemesis -- --seed ${h.seed}`);
  return lines.join('\n');
}
