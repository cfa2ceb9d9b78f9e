// The Store contract: one suite that every implementation passes unchanged
// (SqliteStore in cluster/store-contract.sqlite.test.ts, EtcdStore on a real
// 3-member etcd in cluster/store-contract.etcd.test.ts). It states what callers
// may rely on, in terms both can honour:
//
// - Revisions are relative: a fresh SQLite store starts at 1, a fresh prefix on
//   a shared etcd at whatever the cluster reached. What holds for both: one new
//   revision per transaction that changes something, none otherwise.
// - The compaction point of a fresh store is at most its revision (etcd: other
//   prefixes may have compacted the shared history).
// - Lease expiry is observed within the TTL plus `leaseSlackMs`.
// - A watch survives its connection being cut (`disconnect`); a store without
//   connections (SQLite) skips that one case and says why.

import { afterEach, describe, expect, it } from 'vitest';
import {
  cmp,
  isStoreError,
  op,
  type Store,
  type WatchEvent,
  type Watcher,
} from '../../agent/store/store.js';

export interface StoreHarness {
  /** A fresh, empty store (etcd: a new random prefix on the shared cluster). */
  open(): Promise<Store>;
  /**
   * Cuts the store's connections (etcd: reset them in the fault proxy), so that
   * its watches must be re-created. Undefined when the store has none.
   */
  disconnect?: (s: Store) => Promise<void>;
  /** Why `disconnect` is missing, for the skipped case's title. */
  noDisconnectReason?: string;
  /** How long after its TTL a lease's keys may still be there (default 3000 ms). */
  leaseSlackMs?: number;
}

/** The code of the StoreError `p` rejects with (fails if it resolves). */
export async function rejectionCode(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    if (isStoreError(e)) return e.code;
    throw e;
  }
  throw new Error('expected a rejection');
}

async function rejection(p: Promise<unknown>): Promise<unknown> {
  try {
    await p;
  } catch (e) {
    return e;
  }
  throw new Error('expected a rejection');
}

/** Polls `cond` until it holds; fails after `ms` with `what`. */
export async function waitFor(cond: () => boolean | Promise<boolean>, ms: number, what: string) {
  const end = performance.now() + ms;
  while (!(await cond())) {
    if (performance.now() > end) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

const brief = (e: WatchEvent) => [e.type, e.kv.key, e.kv.value, e.revision];

/** Declares the contract suite for one Store implementation. */
export function storeContract(name: string, h: StoreHarness): void {
  describe(`Store contract: ${name}`, () => {
    const stores: Store[] = [];
    const watchers: Watcher[] = [];

    afterEach(async () => {
      for (const w of watchers.splice(0)) await w.cancel();
      for (const s of stores.splice(0)) await s.close();
    });

    async function fresh(): Promise<Store> {
      const s = await h.open();
      stores.push(s);
      return s;
    }

    async function collect(
      s: Store,
      prefix: string,
      fromRevision?: number,
    ): Promise<{ events: WatchEvent[]; errors: unknown[]; w: Watcher }> {
      const events: WatchEvent[] = [];
      const errors: unknown[] = [];
      const w = await s.watch(prefix, {
        ...(fromRevision === undefined ? {} : { fromRevision }),
        onEvent: (e) => events.push(e),
        onError: (e) => errors.push(e),
      });
      watchers.push(w);
      return { events, errors, w };
    }

    it('starts empty, at a revision >= 1, with its compaction point at or below it', async () => {
      const s = await fresh();
      const rev = await s.revision();
      expect(rev).toBeGreaterThanOrEqual(1);
      expect(await s.compactRevision()).toBeLessThanOrEqual(rev);
      const r = await s.range('');
      expect(r).toEqual({ kvs: [], more: false, revision: rev });
    });

    it('gives one revision per changing transaction and none to reads, failed compares or no-op deletes', async () => {
      const s = await fresh();
      const r0 = await s.revision();
      const a = await s.put('a', '1');
      expect(a.revision).toBe(r0 + 1);
      expect(a.prevKv).toBeUndefined();
      await s.get('a');
      await s.range('');
      expect((await s.delete('missing')).revision).toBe(r0 + 1);
      expect((await s.deletePrefix('nothing/')).deleted).toBe(0);
      const failed = await s.txn({
        compare: [cmp.value('a', '=', 'x')],
        success: [op.put('a', '9')],
      });
      expect(failed).toEqual({ succeeded: false, revision: r0 + 1, responses: [] });
      const readOnly = await s.txn({ compare: [], success: [op.get('a'), op.range('')] });
      expect(readOnly.revision).toBe(r0 + 1);
      expect(await s.revision()).toBe(r0 + 1);

      const t = await s.txn({ compare: [], success: [op.put('b', '1'), op.put('c', '1')] });
      expect(t.revision).toBe(r0 + 2);
      expect((await s.get('b'))?.modRevision).toBe(r0 + 2);
      expect((await s.get('c'))?.modRevision).toBe(r0 + 2);

      const again = await s.put('a', '2');
      expect(again.revision).toBe(r0 + 3);
      expect(again.prevKv).toEqual({
        key: 'a',
        value: '1',
        createRevision: r0 + 1,
        modRevision: r0 + 1,
        version: 1,
      });
      expect(await s.get('a')).toEqual({
        key: 'a',
        value: '2',
        createRevision: r0 + 1,
        modRevision: r0 + 3,
        version: 2,
      });
      const d = await s.delete('a');
      expect(d).toMatchObject({ revision: r0 + 4, deleted: 1 });
      expect(d.prevKvs.map((k) => k.value)).toEqual(['2']);
      // A new incarnation: version and createRevision start again.
      await s.put('a', '3');
      expect(await s.get('a')).toMatchObject({
        createRevision: r0 + 5,
        modRevision: r0 + 5,
        version: 1,
      });
      expect(await s.revision()).toBe(r0 + 5);
    });

    it('compares every target with every operator, and a missing key as version 0 with no value', async () => {
      const s = await fresh();
      await s.put('k', 'm'); // create
      const { revision: mod } = await s.put('k', 'm'); // version 2
      const kv = (await s.get('k'))!;
      const holds = async (c: ReturnType<typeof cmp.value>) =>
        (await s.txn({ compare: [c], success: [] })).succeeded;

      expect(await holds(cmp.value('k', '=', 'm'))).toBe(true);
      expect(await holds(cmp.value('k', '!=', 'm'))).toBe(false);
      expect(await holds(cmp.value('k', '<', 'n'))).toBe(true);
      expect(await holds(cmp.value('k', '>', 'l'))).toBe(true);
      expect(await holds(cmp.value('k', '>', 'm'))).toBe(false);
      // Values order by their UTF-8 bytes: 'é' (0xc3 0xa9) sorts after 'z'.
      expect(await holds(cmp.value('k', '<', 'é'))).toBe(true);

      expect(await holds(cmp.version('k', '=', 2))).toBe(true);
      expect(await holds(cmp.version('k', '>', 1))).toBe(true);
      expect(await holds(cmp.version('k', '<', 2))).toBe(false);
      expect(await holds(cmp.version('k', '!=', 3))).toBe(true);

      expect(await holds(cmp.createRevision('k', '=', kv.createRevision))).toBe(true);
      expect(await holds(cmp.createRevision('k', '<', mod))).toBe(true);
      expect(await holds(cmp.createRevision('k', '>', kv.createRevision))).toBe(false);

      expect(await holds(cmp.modRevision('k', '=', mod))).toBe(true);
      expect(await holds(cmp.modRevision('k', '>', kv.createRevision))).toBe(true);
      expect(await holds(cmp.modRevision('k', '!=', mod))).toBe(false);

      expect(await holds(cmp.version('gone', '=', 0))).toBe(true);
      expect(await holds(cmp.createRevision('gone', '=', 0))).toBe(true);
      expect(await holds(cmp.modRevision('gone', '<', 1))).toBe(true);
      expect(await holds(cmp.value('gone', '=', ''))).toBe(false);
      expect(await holds(cmp.value('gone', '!=', 'x'))).toBe(false);

      // All compares must hold.
      expect(
        (
          await s.txn({
            compare: [cmp.version('k', '=', 2), cmp.value('k', '=', 'x')],
            success: [],
          })
        ).succeeded,
      ).toBe(false);
    });

    it('runs the success or the failure branch atomically, each op seeing the ones before it', async () => {
      const s = await fresh();
      await s.put('dev/a', '1');
      await s.put('dev/b', '2');
      await s.put('dev/c', '3');
      await s.put('other', 'x');
      const r0 = await s.revision();

      const ok = await s.txn({
        compare: [cmp.value('dev/a', '=', '1')],
        success: [
          op.put('dev/a', '10'),
          op.get('dev/a'),
          op.range('dev/', { limit: 2 }),
          op.delete('dev/c'),
          op.get('dev/c'),
          op.get('missing'),
        ],
        failure: [op.put('lost', '1')],
      });
      expect(ok.succeeded).toBe(true);
      expect(ok.revision).toBe(r0 + 1);
      expect(ok.responses.map((r) => r.type)).toEqual([
        'put',
        'get',
        'range',
        'delete',
        'get',
        'get',
      ]);
      expect(ok.responses[0]).toMatchObject({ type: 'put', prevKv: { key: 'dev/a', value: '1' } });
      expect(ok.responses[1]).toMatchObject({
        kv: { value: '10', modRevision: r0 + 1, version: 2 },
      });
      const range = ok.responses[2];
      expect(range?.type === 'range' && range.kvs.map((k) => [k.key, k.value])).toEqual([
        ['dev/a', '10'],
        ['dev/b', '2'],
      ]);
      expect(range?.type === 'range' && range.more).toBe(true);
      expect(ok.responses[3]).toMatchObject({
        deleted: 1,
        prevKvs: [{ key: 'dev/c', value: '3' }],
      });
      expect(ok.responses[4]).toEqual({ type: 'get' });
      expect(ok.responses[5]).toEqual({ type: 'get' });
      expect(await s.get('lost')).toBeUndefined();

      const no = await s.txn({
        compare: [cmp.value('dev/a', '=', '1')],
        success: [op.put('lost', '1')],
        failure: [op.deletePrefix('dev/'), op.range('dev/'), op.put('ran', 'failure')],
      });
      expect(no.succeeded).toBe(false);
      expect(no.revision).toBe(r0 + 2);
      expect(no.responses[0]).toMatchObject({ type: 'deletePrefix', deleted: 2 });
      const prevs = no.responses[0]?.type === 'deletePrefix' ? no.responses[0].prevKvs : [];
      expect(prevs.map((k) => k.key)).toEqual(['dev/a', 'dev/b']);
      expect(no.responses[1]).toEqual({ type: 'range', kvs: [], more: false });
      expect(await s.get('lost')).toBeUndefined();
      expect((await s.get('ran'))?.modRevision).toBe(r0 + 2);
      expect((await s.get('other'))?.value).toBe('x');

      // No failure branch: nothing runs, nothing changes.
      const none = await s.txn({
        compare: [cmp.version('other', '=', 0)],
        success: [op.put('x', '1')],
      });
      expect(none).toEqual({ succeeded: false, revision: r0 + 2, responses: [] });
    });

    it('refuses invalid transactions and arguments whole, changing nothing', async () => {
      const s = await fresh();
      await s.put('k', 'v');
      const r0 = await s.revision();
      const bad = [
        { compare: [], success: [op.put('d', '1'), op.put('d', '2')] },
        { compare: [], success: [op.put('d/x', '1'), op.deletePrefix('d/')] },
        { compare: [], success: [op.delete('d'), op.put('d', '1')] },
        { compare: [], success: [op.put('', '1')] },
        { compare: [cmp.version('', '=', 0)], success: [] },
        { compare: [cmp.version('k', '=', -1)], success: [] },
        { compare: [], success: [op.range('', { limit: -1 })] },
        {
          compare: [],
          success: [op.put('ok', '1')],
          failure: [op.put('e', '1'), op.put('e', '1')],
        },
      ];
      for (const req of bad) {
        expect(await rejectionCode(s.txn(req))).toBe('STORE_INVALID_ARGUMENT');
      }
      expect(await rejectionCode(s.get(''))).toBe('STORE_INVALID_ARGUMENT');
      expect(await rejectionCode(s.put('', 'v'))).toBe('STORE_INVALID_ARGUMENT');
      expect(await rejectionCode(s.range('', { limit: 1.5 }))).toBe('STORE_INVALID_ARGUMENT');
      expect(await rejectionCode(s.grantLease(0))).toBe('STORE_INVALID_ARGUMENT');
      expect(await rejectionCode(s.watch('', { onEvent: 1 as never }))).toBe(
        'STORE_INVALID_ARGUMENT',
      );
      expect(await s.revision()).toBe(r0);
      expect((await s.range('')).kvs.map((k) => k.key)).toEqual(['k']);
    });

    it('ranges by prefix in UTF-8 byte order, with limit and more, and at a past revision', async () => {
      const s = await fresh();
      for (const k of ['p/z', 'p/é', 'p/a', 'p/b', 'q', 'p']) await s.put(k, k);
      const all = await s.range('p/');
      expect(all.kvs.map((k) => k.key)).toEqual(['p/a', 'p/b', 'p/z', 'p/é']);
      expect(all.more).toBe(false);
      expect(all.revision).toBe(await s.revision());
      const two = await s.range('p/', { limit: 2 });
      expect(two.kvs.map((k) => k.key)).toEqual(['p/a', 'p/b']);
      expect(two.more).toBe(true);
      expect((await s.range('p/', { limit: 4 })).more).toBe(false);
      expect((await s.range('', { limit: 0 })).kvs).toHaveLength(6);

      const at = await s.revision();
      await s.put('p/a', 'changed');
      await s.delete('p/b');
      await s.put('p/c', 'new');
      const past = await s.range('p/', { revision: at });
      expect(past.kvs.map((k) => [k.key, k.value])).toEqual([
        ['p/a', 'p/a'],
        ['p/b', 'p/b'],
        ['p/z', 'p/z'],
        ['p/é', 'p/é'],
      ]);
      expect(past.revision).toBe(at + 3);
      expect((await s.range('p/', { revision: at, limit: 1 })).more).toBe(true);
      expect(await rejectionCode(s.range('p/', { revision: at + 100 }))).toBe(
        'STORE_FUTURE_REVISION',
      );
    });

    it('reads a range in pages from a start key, now and at a past revision', async () => {
      const s = await fresh();
      for (const k of ['p/a', 'p/b', 'p/c', 'p/é', 'q/a', 'p']) await s.put(k, k);
      const keys = async (from: string, o: { limit?: number; revision?: number } = {}) =>
        (await s.range('p/', { ...o, from })).kvs.map((k) => k.key);
      expect(await keys('p/b')).toEqual(['p/b', 'p/c', 'p/é']);
      expect(await keys('p/b\0')).toEqual(['p/c', 'p/é']);
      const page = await s.range('p/', { from: 'p/a\0', limit: 1 });
      expect([page.kvs.map((k) => k.key), page.more]).toEqual([['p/b'], true]);
      expect(await keys('p/é\0')).toEqual([]);
      expect((await s.range('', { from: 'p/é' })).kvs.map((k) => k.key)).toEqual(['p/é', 'q/a']);
      const at = await s.revision();
      await s.delete('p/c');
      await s.put('p/bb', 'new');
      expect(await keys('p/b\0', { revision: at })).toEqual(['p/c', 'p/é']);
      expect(await keys('p/b\0', { revision: at, limit: 1 })).toEqual(['p/c']);
      expect(await keys('p/b\0')).toEqual(['p/bb', 'p/é']);
      expect(await rejectionCode(s.range('p/', { from: 'q/a' }))).toBe('STORE_INVALID_ARGUMENT');
    });

    it('compare-and-swap helpers succeed on a current view and fail on a stale one', async () => {
      const s = await fresh();
      const c = await s.createIfAbsent('x', 'v1');
      expect(c.succeeded).toBe(true);
      expect(c.kv).toMatchObject({ key: 'x', value: 'v1', version: 1, modRevision: c.revision });
      const again = await s.createIfAbsent('x', 'other');
      expect(again).toMatchObject({ succeeded: false, revision: c.revision, kv: { value: 'v1' } });

      const u = await s.updateIf('x', 'v2', c.kv!.modRevision);
      expect(u).toMatchObject({ succeeded: true, kv: { value: 'v2', version: 2 } });
      const stale = await s.updateIf('x', 'v3', c.kv!.modRevision);
      expect(stale).toMatchObject({ succeeded: false, kv: { value: 'v2' } });
      expect((await s.updateIf('y', 'new', 0)).succeeded).toBe(true);
      expect((await s.updateIf('z', 'new', 5)).kv).toBeUndefined();

      expect((await s.deleteIf('x', c.kv!.modRevision)).succeeded).toBe(false);
      const d = await s.deleteIf('x', u.kv!.modRevision);
      expect(d).toMatchObject({ succeeded: true, kv: { value: 'v2' } });
      expect(await s.get('x')).toBeUndefined();
    });

    it('watches from a revision: history, then live events, in order, none twice, only its prefix', async () => {
      const s = await fresh();
      const first = await s.put('w/a', '1');
      await s.put('elsewhere', 'x');
      await s.txn({ compare: [], success: [op.put('w/b', '1'), op.put('w/c', '1')] });
      const { events, errors } = await collect(s, 'w/', first.revision);
      await s.put('w/a', '2');
      await s.delete('w/b');
      await s.deletePrefix('w/');
      await waitFor(() => events.length >= 7, 5000, 'seven events');
      await new Promise((r) => setTimeout(r, 100));
      const r = first.revision;
      expect(events.map(brief)).toEqual([
        ['put', 'w/a', '1', r],
        ['put', 'w/b', '1', r + 2],
        ['put', 'w/c', '1', r + 2],
        ['put', 'w/a', '2', r + 3],
        ['delete', 'w/b', '', r + 4],
        ['delete', 'w/a', '', r + 5],
        ['delete', 'w/c', '', r + 5],
      ]);
      expect(events[0]!.prevKv).toBeUndefined();
      expect(events[3]!.prevKv).toMatchObject({ value: '1', modRevision: r });
      expect(events[4]!.kv).toEqual({
        key: 'w/b',
        value: '',
        createRevision: 0,
        modRevision: r + 4,
        version: 0,
      });
      expect(events[4]!.prevKv).toMatchObject({ key: 'w/b', value: '1', version: 1 });
      expect(events[1]!.kv).toMatchObject({ createRevision: r + 2, version: 1 });
      expect(errors).toEqual([]);
    });

    it('a watch from now sees only later writes; cancel stops it at once', async () => {
      const s = await fresh();
      await s.put('n/before', '1');
      const { events, w } = await collect(s, 'n/');
      const p = await s.put('n/after', '1');
      await waitFor(() => events.length >= 1, 5000, 'the event');
      expect(events.map(brief)).toEqual([['put', 'n/after', '1', p.revision]]);
      await w.cancel();
      await s.put('n/late', '1');
      await new Promise((r) => setTimeout(r, 200));
      expect(events).toHaveLength(1);
    });

    it('a watch from a revision not reached yet waits for it', async () => {
      const s = await fresh();
      const r = await s.revision();
      const { events } = await collect(s, '', r + 2);
      await s.put('a', '1');
      await s.put('b', '1');
      await waitFor(() => events.length >= 1, 5000, 'the event');
      await new Promise((res) => setTimeout(res, 100));
      expect(events.map(brief)).toEqual([['put', 'b', '1', r + 2]]);
    });

    it('a watch whose onEvent throws ends with that error', async () => {
      const s = await fresh();
      const boom = new Error('boom');
      const errors: unknown[] = [];
      let calls = 0;
      const w = await s.watch('', {
        onEvent: () => {
          calls++;
          throw boom;
        },
        onError: (e) => errors.push(e),
      });
      watchers.push(w);
      await s.put('a', '1');
      await s.put('b', '1');
      await waitFor(() => errors.length > 0, 5000, 'onError');
      await new Promise((r) => setTimeout(r, 100));
      expect(errors).toEqual([boom]);
      expect(calls).toBe(1);
    });

    const reconnectTitle =
      'a watch survives its connection being cut while writes go on: each event once, in order';
    (h.disconnect ? it : it.skip)(
      h.disconnect ? reconnectTitle : `${reconnectTitle} (skipped: ${h.noDisconnectReason})`,
      async () => {
        const s = await fresh();
        const start = (await s.revision()) + 1;
        const { events, errors } = await collect(s, 'r/', start);
        const acked: number[] = [];
        // Writes go on through the cuts; a write that fails retryably is tried again
        // (it may have happened: the history, not our count, is the truth).
        const writer = (async () => {
          for (let i = 0; i < 60; i++) {
            for (;;) {
              try {
                acked.push((await s.put(`r/${i % 7}`, `v${i}`)).revision);
                break;
              } catch (e) {
                if (!isStoreError(e) || !e.retryable) throw e;
                await new Promise((r) => setTimeout(r, 50));
              }
            }
            if (i % 3 === 0) await new Promise((r) => setTimeout(r, 10));
          }
        })();
        await waitFor(() => events.length >= 10, 10_000, 'the first events');
        await h.disconnect!(s);
        await waitFor(() => events.length >= 30, 20_000, 'events after the first cut');
        await h.disconnect!(s);
        await writer;
        const last = acked[acked.length - 1]!;
        await waitFor(
          () => events.length > 0 && events[events.length - 1]!.revision >= last,
          20_000,
          'the last write',
        );
        // The model: what a new watch replays from history for the same range.
        const replay = await collect(s, 'r/', start);
        await waitFor(
          () =>
            replay.events.length > 0 && replay.events[replay.events.length - 1]!.revision >= last,
          10_000,
          'the replay',
        );
        await new Promise((r) => setTimeout(r, 200));
        expect(events.map(brief)).toEqual(replay.events.map(brief));
        const revs = events.map((e) => e.revision);
        expect(revs).toEqual([...revs].sort((a, b) => a - b));
        expect(new Set(revs).size).toBe(revs.length);
        for (const r of acked) expect(revs).toContain(r);
        expect(errors).toEqual([]);
      },
      60_000,
    );

    it('compaction: reads and watches below the point fail with STORE_COMPACTED and say where history starts', async () => {
      const s = await fresh();
      const a = await s.put('c/k', '1');
      await s.put('c/k', '2');
      const b = await s.put('c/k', '3');
      await s.put('c/k', '4');
      await s.compact(b.revision);
      expect(await s.compactRevision()).toBe(b.revision);

      const e1 = await rejection(s.range('c/', { revision: a.revision }));
      expect(isStoreError(e1, 'STORE_COMPACTED') && e1.compactRevision).toBe(b.revision);
      expect((await s.range('c/', { revision: b.revision })).kvs[0]?.value).toBe('3');

      const e2 = await rejection(s.watch('c/', { fromRevision: a.revision, onEvent: () => {} }));
      expect(isStoreError(e2, 'STORE_COMPACTED') && e2.compactRevision).toBe(b.revision);
      const { events } = await collect(s, 'c/', b.revision);
      await waitFor(() => events.length >= 2, 5000, 'the kept history');
      expect(events.map((e) => e.kv.value)).toEqual(['3', '4']);

      const e3 = await rejection(s.compact(b.revision));
      expect(isStoreError(e3, 'STORE_COMPACTED') && e3.compactRevision).toBe(b.revision);
      expect(await rejectionCode(s.compact((await s.revision()) + 10))).toBe(
        'STORE_FUTURE_REVISION',
      );
    });

    it('leases: keys go when the lease expires (in one revision) or is revoked; then it is not found', async () => {
      const s = await fresh();
      const slack = h.leaseSlackMs ?? 3000;
      const short = await s.grantLease(1);
      expect(await s.keepAlive(short)).toBeGreaterThanOrEqual(1);
      await s.put('l/a', '1', { lease: short });
      await s.put('l/b', '1', { lease: short });
      expect((await s.get('l/a'))?.lease).toBe(short);
      const { events } = await collect(s, 'l/');
      const t0 = performance.now();
      await waitFor(async () => (await s.range('l/')).kvs.length === 0, 1000 + slack, 'expiry');
      expect(performance.now() - t0).toBeGreaterThan(300);
      await waitFor(() => events.length >= 2, 5000, 'the delete events');
      expect(events.map((e) => [e.type, e.kv.key])).toEqual([
        ['delete', 'l/a'],
        ['delete', 'l/b'],
      ]);
      expect(events[0]!.revision).toBe(events[1]!.revision);
      expect(await rejectionCode(s.keepAlive(short))).toBe('STORE_LEASE_NOT_FOUND');
      expect(await rejectionCode(s.put('l/c', '1', { lease: short }))).toBe(
        'STORE_LEASE_NOT_FOUND',
      );
      // Only the branch that runs needs its leases.
      const untaken = await s.txn({
        compare: [cmp.version('l/none', '=', 1)],
        success: [op.put('l/c', '1', { lease: short })],
      });
      expect(untaken.succeeded).toBe(false);

      const long = await s.grantLease(60);
      expect(await s.keepAlive(long)).toBe(60);
      await s.put('l/x', '1', { lease: long });
      await s.put('l/y', '1', { lease: long });
      await s.put('l/z', '1', { lease: long });
      await s.put('l/z', '2'); // a put without the lease detaches the key from it
      const before = await s.revision();
      await s.revokeLease(long);
      expect(await s.revision()).toBe(before + 1);
      expect((await s.range('l/')).kvs.map((k) => [k.key, k.value, k.lease])).toEqual([
        ['l/z', '2', undefined],
      ]);
      expect(await rejectionCode(s.revokeLease(long))).toBe('STORE_LEASE_NOT_FOUND');
      expect(await rejectionCode(s.keepAlive(long))).toBe('STORE_LEASE_NOT_FOUND');
      expect(await rejectionCode(s.keepAlive('12345'))).toBe('STORE_LEASE_NOT_FOUND');
      expect(await rejectionCode(s.revokeLease('no-such-lease'))).toBe('STORE_LEASE_NOT_FOUND');
    });

    it('close ends watches with STORE_CLOSED, fails later calls with it, and may be repeated', async () => {
      const s = await h.open();
      const { errors } = await collect(s, '');
      await s.close();
      await waitFor(() => errors.length > 0, 5000, 'onError');
      expect(errors.map((e) => isStoreError(e) && e.code)).toEqual(['STORE_CLOSED']);
      await s.close();
      expect(await rejectionCode(s.get('a'))).toBe('STORE_CLOSED');
      expect(await rejectionCode(s.put('a', '1'))).toBe('STORE_CLOSED');
      expect(await rejectionCode(s.range(''))).toBe('STORE_CLOSED');
      expect(await rejectionCode(s.watch('', { onEvent: () => {} }))).toBe('STORE_CLOSED');
      expect(await rejectionCode(s.grantLease(5))).toBe('STORE_CLOSED');
      expect(await rejectionCode(s.revision())).toBe('STORE_CLOSED');
    });
  });
}
