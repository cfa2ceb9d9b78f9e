// The search against the one it replaced (linearize-dfs.ts, Wing & Gong depth
// first), on thousands of random small histories over the checkers' own models:
// commands answered, refused, in doubt (unknown, with their settle step or a
// name held), reads and I/O, in overlapping windows. Both are exact: their
// verdicts must agree wherever the reference decides.

import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { checkAcl, checkCatalog, checkReservations } from './checkers.js';
import type { AclOp, DeviceOp, History, IoOp, Op, PrOp } from './history.js';
import { linearize, type Search } from './linearize.js';
import { linearizeDfs } from './linearize-dfs.js';
import { access, EMPTY, type Model, type Request, showModel, step } from './model.js';
import { history as base } from './test-history.js';

const RUNS = 3000;

/** Whether the reference decided, and if so whether it found an anomaly. */
function verdicts(run: (s: Search) => { message: string }[]): { ref: string; now: string } {
  const ref = run(linearizeDfs as Search);
  const now = run(linearize);
  const v = (a: { message: string }[]) =>
    a.some((x) => x.message.includes('gave up')) ? 'undecided' : a.length ? 'fail' : 'ok';
  return { ref: v(ref), now: v(now) };
}

const agree = ({ ref, now }: { ref: string; now: string }) => {
  if (ref !== 'undecided') expect(now).toBe(ref);
  else expect(now).not.toBe('undecided');
};

const window = fc.record({
  call: fc.integer({ min: 0, max: 30 }),
  len: fc.integer({ min: 0, max: 8 }),
});

const REQS: Request[] = [
  { action: 'register', as: 'a', key: '0x0', saKey: '0xa' },
  { action: 'register', as: 'b', key: '0x0', saKey: '0xb' },
  { action: 'register-ignore', as: 'c', key: '0x0', saKey: '0xc' },
  { action: 'register', as: 'a', key: '0xa', saKey: '0x0' },
  { action: 'reserve', as: 'a', key: '0xa', type: 1 },
  { action: 'reserve', as: 'b', key: '0xb', type: 3 },
  { action: 'reserve', as: 'c', key: '0xc', type: 7 },
  { action: 'release', as: 'a', key: '0xa', type: 1 },
  { action: 'release', as: 'b', key: '0xb', type: 3 },
  { action: 'preempt', as: 'b', key: '0xb', saKey: '0xa', type: 3 },
  { action: 'preempt-abort', as: 'c', key: '0xc', saKey: '0xb', type: 1 },
  { action: 'clear', as: 'c', key: '0xc' },
];

describe('the frontier search agrees with the depth-first search it replaced', () => {
  it('reservations: PR commands (answered, refused, in doubt), I/O allowed or refused, the end state', () => {
    const op = fc.record({
      w: window,
      pr: fc.boolean(),
      req: fc.integer({ min: 0, max: REQS.length - 1 }),
      who: fc.constantFrom('a', 'b', 'c'),
      agent: fc.constantFrom('a', 'b', 'c'),
      write: fc.boolean(),
      // 0: as the sequential run answers, 1: in doubt, 2: answer bent
      fate: fc.constantFrom(0, 0, 0, 1, 2),
    });
    fc.assert(
      fc.property(
        fc.array(op, { minLength: 1, maxLength: 12 }),
        fc.boolean(),
        (spec, withFinal) => {
          let m: Model = EMPTY;
          const ops: Op[] = [];
          const sorted = [...spec].sort((a, b) => a.w.call - b.w.call);
          sorted.forEach((s, id) => {
            const call = s.w.call;
            const ret = call + s.w.len;
            if (s.pr) {
              const req = REQS[s.req]!;
              const r = step(m, req);
              m = r.next;
              const o: PrOp = {
                id,
                kind: 'pr',
                process: 'p',
                agent: s.agent,
                device: 'd',
                call,
                ret,
                status: r.out.ok ? 'ok' : 'failed',
                req,
                out: r.out,
              };
              if (s.fate === 1) {
                o.status = 'unknown';
                o.ret = null;
                o.gaveUp = call + 1;
                delete o.out;
              } else if (s.fate === 2 && r.out.ok) {
                o.out = { ...r.out, generation: r.out.generation + 1 };
              }
              ops.push(o);
            } else {
              let allowed = access(m, s.who)[s.write ? 'write' : 'read'];
              if (s.fate === 2) allowed = !allowed;
              const o: IoOp = {
                id,
                kind: 'io',
                process: 'io',
                agent: s.agent,
                device: 'd',
                identity: s.who,
                conn: 0,
                cmd: s.write ? 'write' : 'read',
                block: 0,
                call,
                ret,
                status: allowed ? 'ok' : 'failed',
                ...(allowed ? {} : { errno: 'EPERM' }),
              };
              ops.push(o);
            }
          });
          const [gen, regs, res] = showModel(m).split(' ');
          const regMap = Object.fromEntries(
            regs!
              .slice(1, -1)
              .split(',')
              .filter(Boolean)
              .map((kv) => {
                const [k, v] = kv.split('=');
                return [k!, `0x${v}`];
              }),
          );
          const final = withFinal
            ? {
                agents: [
                  {
                    agent: 'a',
                    devices: [],
                    pr: {
                      d: { generation: Number(gen!.slice(1)), regs: regMap, reservation: res! },
                    },
                    acl: {},
                  },
                ],
              }
            : {};
          agree(verdicts((s) => checkReservations(history(ops, final), 200_000, s)));
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('the catalog: creates, resizes and deletes answered, refused, in doubt, NOT made holding the name', () => {
    const op = fc.record({
      w: window,
      action: fc.constantFrom('create', 'resize', 'delete'),
      size: fc.integer({ min: 1, max: 3 }),
      // 0: as the sequential run answers, 1: in doubt, 2: NOT made holding the name,
      // 3: failed saying nothing happened, 4: answer bent
      fate: fc.constantFrom(0, 0, 0, 1, 2, 3, 4),
    });
    fc.assert(
      fc.property(
        fc.array(op, { minLength: 1, maxLength: 8 }),
        fc.constantFrom('none', 'true', 'absent', 'other'),
        (spec, fin) => {
          let size: number | null = null;
          const ops: Op[] = [];
          const sorted = [...spec].sort((a, b) => a.w.call - b.w.call);
          sorted.forEach((s, id) => {
            let code: string | undefined;
            if (s.action === 'create') {
              if (size === null) size = s.size;
              else code = 'BALLAST_DEVICE_EXISTS';
            } else if (size === null) code = 'BALLAST_DEVICE_NOT_FOUND';
            else if (s.action === 'resize') {
              if (s.size < size) code = 'BALLAST_SHRINK_REFUSED';
              else size = s.size;
            } else size = null;
            if (s.fate === 4) code = code ? undefined : 'BALLAST_DEVICE_EXISTS';
            const o: DeviceOp = {
              id,
              kind: 'device',
              process: 'p',
              agent: 'a',
              action: s.action,
              name: 'n',
              size: s.size,
              call: s.w.call,
              ret: s.w.call + s.w.len,
              status: code ? 'failed' : 'ok',
              ...(code ? { code } : {}),
            };
            if (s.fate === 1) {
              o.status = 'unknown';
              o.ret = null;
              delete o.code;
            } else if (s.fate === 2 && s.action === 'create') {
              o.status = 'failed';
              o.code = 'BALLAST_CONFLICT';
              o.note = 'NOT made: its record goes once the store takes it';
            } else if (s.fate === 3) {
              o.status = 'failed';
              o.code = 'BALLAST_STORE_TIMEOUT';
            }
            ops.push(o);
          });
          const listed =
            fin === 'true' ? size : fin === 'other' ? (size ?? 0) + 1 : fin === 'absent' ? null : 0;
          const final =
            fin === 'none'
              ? {}
              : {
                  agents: [
                    {
                      agent: 'a',
                      devices: listed === null ? [] : [{ name: 'n', size: listed, state: 'ready' }],
                      pr: {},
                      acl: {},
                    },
                  ],
                };
          const run = (s: Search) =>
            checkCatalog(history(ops, final), s).filter((a) => a.message.startsWith('device'));
          agree(verdicts(run));
        },
      ),
      { numRuns: RUNS },
    );
  });

  it('access lists: sets answered, in doubt or failed, and the list at the end', () => {
    const op = fc.record({
      w: window,
      entries: fc.constantFrom('x', 'y', null),
      fate: fc.constantFrom('ok', 'ok', 'unknown', 'failed'),
    });
    fc.assert(
      fc.property(
        fc.array(op, { minLength: 1, maxLength: 9 }),
        fc.constantFrom('x', 'y', null, 'none'),
        (spec, fin) => {
          const ops: AclOp[] = spec.map((s, id) => ({
            id,
            kind: 'acl',
            process: 'p',
            agent: 'a',
            device: 'd',
            entries: s.entries,
            call: s.w.call,
            ret: s.fate === 'unknown' ? null : s.w.call + s.w.len,
            status: s.fate as AclOp['status'],
          }));
          const final =
            fin === 'none'
              ? {}
              : { agents: [{ agent: 'a', devices: [], pr: {}, acl: { d: fin } }] };
          agree(verdicts((s) => checkAcl(history(ops, final), s)));
        },
      ),
      { numRuns: RUNS },
    );
  });
});

describe('the frontier search', () => {
  // a register: w sets it, r reads it
  const model = {
    init: 0,
    key: String,
    step: (s: number, i: { w?: number; r?: number }, o: number | undefined) =>
      i.w !== undefined ? { ok: true, next: i.w } : { ok: o === undefined || o === s, next: s },
  };
  type Op = Parameters<typeof linearize<number, { w?: number; r?: number }, number>>[1][number];

  it('finds a dead end far into a long history at once, however many reads were in flight together', () => {
    // 40 rounds of 14 concurrent reads, each round after a write, then a read no state
    // explains. The depth-first search tries the rounds' reads in every order and gives
    // up after 2 million steps.
    const ops: Op[] = [];
    let id = 0;
    for (let round = 0; round < 40; round++) {
      const t = round * 100;
      ops.push({ id: id++, call: t, ret: t + 1, input: { w: round }, output: 0 });
      for (let k = 0; k < 14; k++) {
        ops.push({
          id: id++,
          call: t + 2 + k * 0.1,
          ret: t + 50,
          input: { r: round },
          output: round,
        });
      }
    }
    const bad: Op = { id, call: 5000, ret: 5001, input: { r: 99 }, output: 99 };
    expect(linearizeDfs(model, [...ops, bad], 2_000_000).verdict).toBe('undecided');
    const res = linearize(model, [...ops, bad], 2_000_000);
    expect(res).toMatchObject({ verdict: 'fail', stuck: id });
    expect(res.steps).toBeLessThan(40 * ops.length);
    const good = linearize(model, ops, 2_000_000);
    expect(good.verdict).toBe('ok');
    expect(good.steps).toBeLessThan(40 * ops.length);
  });
});

/** The shared history, with in-doubt operations bounded to 4 ms. */
function history(ops: Op[], final: Partial<History['final']>): History {
  return base(ops, final, [], { unknownBoundMs: 4 });
}
