// EtcdStore under faults, on a real 3-member etcd: the leader killed mid-run,
// one member or all of them partitioned away by the fault proxy, history
// compacted while a watch was cut off. Each test records what happened (acked
// writes, error codes, delivered events) and checks it afterwards against the
// history etcd replays to a fresh watch. Also: prefixes as etcdctl sees them,
// status and member list.
import { randomBytes } from 'node:crypto';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { isStoreError, op, type WatchEvent, type Watcher } from '../agent/store/store.js';
import { FaultProxy } from '../test/harness/fault-proxy.js';
import { ETCD_TOOLS, type EtcdCluster, startEtcdCluster } from '../test/helpers/etcd.js';
import { waitFor } from '../test/helpers/store-contract.js';
import { describeWithTools, runOk } from '../test/helpers/tools.js';
import { scaled } from '../test/helpers/wait.js';
import { EtcdStore, type EtcdStoreOptions } from './etcd-store.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const brief = (e: WatchEvent) => [e.type, e.kv.key, e.kv.value, e.revision];
const RETRYABLE = ['STORE_UNAVAILABLE', 'STORE_TIMEOUT'];

describeWithTools([...ETCD_TOOLS], 'EtcdStore on a real etcd, under faults', () => {
  let cluster: EtcdCluster;
  let proxies: FaultProxy[] = [];
  const stores: EtcdStore[] = [];
  const watchers: Watcher[] = [];

  beforeAll(async () => {
    cluster = await startEtcdCluster({ size: 3 });
    proxies = await Promise.all(cluster.endpoints.map((e) => FaultProxy.start(e)));
  });

  afterEach(async () => {
    for (const w of watchers.splice(0)) await w.cancel();
    for (const s of stores.splice(0)) await s.close();
    for (const p of proxies) p.heal();
    for (let i = 0; i < cluster.members.length; i++) {
      if (!cluster.running(i)) await cluster.restart(i);
    }
  });

  afterAll(async () => {
    for (const p of proxies) await p.close();
    await cluster?.stop();
  });

  const newPrefix = () => `/faults/${randomBytes(6).toString('hex')}/`;

  async function open(
    prefix: string,
    how: 'direct' | 'proxied' | 'leader-first',
    extra: Partial<EtcdStoreOptions> = {},
  ): Promise<EtcdStore> {
    let endpoints = how === 'proxied' ? proxies.map((p) => p.url) : cluster.endpoints;
    if (how === 'leader-first') {
      const l = await cluster.leader();
      endpoints = [endpoints[l]!, ...endpoints.filter((_, i) => i !== l)];
    }
    const s = await EtcdStore.connect({ endpoints, prefix, timeoutMs: 1000, ...extra });
    stores.push(s);
    return s;
  }

  async function collect(s: EtcdStore, prefix: string, fromRevision: number) {
    const events: WatchEvent[] = [];
    const errors: unknown[] = [];
    const w = await s.watch(prefix, {
      fromRevision,
      onEvent: (e) => events.push(e),
      onError: (e) => errors.push(e),
    });
    watchers.push(w);
    return { events, errors, w };
  }

  /** A put retried while it fails retryably; the codes it saw are recorded. */
  async function putRetrying(s: EtcdStore, key: string, value: string, codes: string[]) {
    for (;;) {
      try {
        return (await s.put(key, value)).revision;
      } catch (e) {
        if (!isStoreError(e) || !e.retryable) throw e;
        codes.push(e.code);
        await sleep(50);
      }
    }
  }

  /** The watch delivered exactly what etcd's history holds from `start` up to `last`. */
  async function expectSameAsHistory(
    s: EtcdStore,
    events: WatchEvent[],
    prefix: string,
    start: number,
    last: number,
  ) {
    await waitFor(
      () => events.length > 0 && events[events.length - 1]!.revision >= last,
      15_000,
      `the watch to reach revision ${last}`,
    );
    const replay = await collect(s, prefix, start);
    await waitFor(
      () => replay.events.length > 0 && replay.events[replay.events.length - 1]!.revision >= last,
      10_000,
      'the replay',
    );
    await sleep(100);
    expect(events.map(brief)).toEqual(replay.events.map(brief));
    const revs = events.map((e) => e.revision);
    expect(new Set(revs).size).toBe(revs.length);
  }

  it('keeps its keys under its prefix, as etcdctl sees them, and never touches another prefix', async () => {
    const root = newPrefix();
    const a = await open(`${root}a/`, 'direct');
    const b = await open(`${root}b/`, 'direct');
    const pa = await a.put('k', '1');
    await b.put('k', '2');
    const ctl = await runOk('etcdctl', [
      `--endpoints=${cluster.endpoints.join(',')}`,
      'get',
      '--prefix',
      root,
      '-w',
      'json',
    ]);
    const j = JSON.parse(ctl.stdout) as {
      header: { revision: number };
      kvs: { key: string; value: string; mod_revision: number }[];
    };
    const kvs = j.kvs.map((kv) => [
      Buffer.from(kv.key, 'base64').toString(),
      Buffer.from(kv.value, 'base64').toString(),
      kv.mod_revision,
    ]);
    expect(kvs).toEqual([
      [`${root}a/k`, '1', pa.revision],
      [`${root}b/k`, '2', pa.revision + 1],
    ]);
    expect(j.header.revision).toBe(await a.revision());

    const { events } = await collect(a, '', (await a.revision()) + 1);
    await b.put('other', 'x');
    await runOk('etcdctl', [`--endpoints=${cluster.endpoints[1]}`, 'put', `${root}a/fromctl`, 'v']);
    await waitFor(() => events.length >= 1, 5000, 'the event');
    await sleep(100);
    expect(events.map((e) => [e.kv.key, e.kv.value])).toEqual([['fromctl', 'v']]);
    expect((await a.get('fromctl'))?.value).toBe('v');

    const d = await a.deletePrefix('');
    expect(d.prevKvs.map((k) => k.key)).toEqual(['fromctl', 'k']);
    expect((await b.range('')).kvs.map((k) => k.key)).toEqual(['k', 'other']);
  });

  it("etcd's request limits answer STORE_INVALID_ARGUMENT, whichever layer enforces them", async () => {
    const s = await open(newPrefix(), 'direct');
    const mib = 1024 * 1024;
    // etcd's --max-request-bytes (1.5 MiB), then gRPC's message limit (2 MiB).
    for (const size of [1.8 * mib, 3 * mib]) {
      const e = await s.put('big', 'x'.repeat(size)).catch((x: unknown) => x);
      expect(isStoreError(e, 'STORE_INVALID_ARGUMENT')).toBe(true);
    }
    // --max-txn-ops (128).
    const ops = Array.from({ length: 200 }, (_, i) => op.put(`k${i}`, 'v'));
    const e = await s.txn({ compare: [], success: ops }).catch((x: unknown) => x);
    expect(isStoreError(e, 'STORE_INVALID_ARGUMENT')).toBe(true);
    expect((await s.range('')).kvs).toEqual([]);
  });

  it('status and memberList report every member and the one leader; a dead member is reported, not thrown', async () => {
    const s = await open(newPrefix(), 'direct');
    const st = await s.status();
    const leader = await cluster.leader();
    expect(st.endpoints.map((e) => [e.url, e.ok, e.memberId])).toEqual(
      cluster.members.map((m) => [m.clientUrl, true, m.id]),
    );
    expect(st.endpoints.filter((e) => e.leader).map((e) => e.memberId)).toEqual([
      cluster.members[leader]!.id,
    ]);
    expect(st.leaderId).toBe(cluster.members[leader]!.id);
    expect(st.endpoints[0]!.version).toMatch(/^3\.\d+\.\d+/);
    expect(st.endpoints[0]!.dbSize).toBeGreaterThan(0);
    expect(st.revision).toBeGreaterThanOrEqual(1);
    expect(st.raftTerm).toBeGreaterThanOrEqual(1);
    expect(st.clusterId).toMatch(/^[0-9a-f]{16}$/);

    const members = await s.memberList();
    expect(members.map((m) => [m.name, m.id, m.clientUrls]).sort()).toEqual(
      cluster.members.map((m) => [m.name, m.id, [m.clientUrl]]).sort(),
    );
    expect(members.every((m) => !m.isLearner)).toBe(true);

    const victim = (leader + 1) % 3;
    await cluster.kill(victim);
    const after = await s.status();
    expect(after.endpoints.map((e) => e.ok)).toEqual([0, 1, 2].map((i) => i !== victim));
    expect(after.endpoints[victim]!.error).toMatch(/etcd status/);
    expect(after.leaderId).toBe(cluster.members[leader]!.id);
  });

  it('killing the leader mid-run: calls fail only retryably during the election, succeed after, and the watch loses nothing', async () => {
    const prefix = newPrefix();
    // The store talks to the leader: its calls and its watch lose their member.
    const s = await open(prefix, 'leader-first', { timeoutMs: 2000 });
    const start = (await s.revision()) + 1;
    const { events, errors } = await collect(s, 'k/', start);
    const codes: string[] = [];
    const acked: number[] = [];
    // A member's lease, kept alive through the election.
    const lease = await s.grantLease(3);
    await s.put('member', 'me', { lease });
    let keeping = true;
    let lastKept = performance.now();
    let longestGap = 0;
    const keeper = (async () => {
      while (keeping) {
        const sent = performance.now();
        try {
          await s.keepAlive(lease);
          longestGap = Math.max(longestGap, sent - lastKept);
          lastKept = sent;
        } catch (e) {
          if (!isStoreError(e) || !e.retryable) throw e;
          codes.push(e.code);
        }
        await sleep(300);
      }
    })();
    let killed = -1;
    for (let i = 0; i < 80; i++) {
      acked.push(await putRetrying(s, `k/${i % 5}`, `v${i}`, codes));
      if (i === 20) {
        killed = await cluster.leader();
        expect(s.currentEndpoint()).toBe(cluster.endpoints[killed]);
        await cluster.kill(killed);
      }
      // Reads too: retryable failures only.
      if (i % 10 === 5) {
        try {
          await s.range('k/', { limit: 2 });
        } catch (e) {
          if (!isStoreError(e) || !e.retryable) throw e;
          codes.push(e.code);
        }
      }
    }
    keeping = false;
    await keeper;
    expect(killed).toBeGreaterThanOrEqual(0);
    expect(cluster.running(killed)).toBe(false);
    expect(longestGap).toBeLessThan(3000);
    expect((await s.get('member'))?.lease).toBe(lease);
    for (const c of codes) expect(RETRYABLE).toContain(c);
    const newLeader = await cluster.leader();
    expect(newLeader).not.toBe(killed);
    await expectSameAsHistory(s, events, 'k/', start, acked[acked.length - 1]!);
    for (const r of acked) expect(events.map((e) => e.revision)).toContain(r);
    expect(errors).toEqual([]);
    expect(s.watchResumes).toBeGreaterThanOrEqual(1);
    console.log(
      `leader kill: ${codes.length} retryable failures (${[...new Set(codes)].join(', ') || 'none'}), ` +
        `${s.watchResumes} watch resumes, longest keepalive gap ${longestGap.toFixed(0)} ms`,
    );
  });

  it('a partitioned member: the call in flight times out within its deadline, later calls go to another member, the watch resumes there', async () => {
    const prefix = newPrefix();
    const s = await open(prefix, 'proxied');
    const start = (await s.revision()) + 1;
    const { events, errors } = await collect(s, '', start);
    await s.put('a', '0');
    await waitFor(() => events.length === 1, 5000, 'the first event');
    const cut = proxies.find((p) => p.url === s.currentEndpoint())!;
    cut.partition();

    const t0 = performance.now();
    const code = await s.get('a').then(
      () => 'ok',
      (e: unknown) => (isStoreError(e) ? e.code : String(e)),
    );
    const took = performance.now() - t0;
    expect(code).toBe('STORE_TIMEOUT');
    expect(took).toBeLessThan(1000 + 300);
    expect(s.currentEndpoint()).not.toBe(cut.url);

    const codes: string[] = [];
    let last = 0;
    for (let i = 1; i <= 10; i++) last = await putRetrying(s, `k${i % 3}`, `v${i}`, codes);
    for (const c of codes) expect(RETRYABLE).toContain(c);
    await expectSameAsHistory(s, events, '', start, last);
    expect(s.watchResumes).toBeGreaterThanOrEqual(1);
    expect(errors).toEqual([]);
  });

  it('a partition from every member: each call fails retryably within its deadline; after healing calls work and the watch catches up', async () => {
    const prefix = newPrefix();
    const deadline = 500;
    // what a call may take past its deadline: timers fire late on a busy machine
    const late = scaled(300);
    const s = await open(prefix, 'proxied', { timeoutMs: deadline });
    const direct = await open(prefix, 'direct');
    const lease = await s.grantLease(30);
    const start = (await s.revision()) + 1;
    const { events, errors } = await collect(s, '', start);
    await direct.put('before', '1');
    await waitFor(() => events.length === 1, 5000, 'the first event');

    for (const p of proxies) p.partition();
    const calls: [string, () => Promise<unknown>][] = [
      ['get', () => s.get('before')],
      ['range', () => s.range('')],
      ['put', () => s.put('during', 'x')],
      ['txn', () => s.txn({ compare: [], success: [op.put('t', '1')] })],
      ['revision', () => s.revision()],
      ['keepAlive', () => s.keepAlive(lease)],
      ['grantLease', () => s.grantLease(5)],
      // Held requests reach etcd once healed (they may happen): nothing here may break what follows.
      ['revokeLease', () => s.revokeLease('12345')],
      ['compact', () => s.compact(start)],
      ['compactRevision', () => s.compactRevision()],
      ['watch', () => s.watch('', { fromRevision: start, onEvent: () => {} })],
      ['memberList', () => s.memberList()],
    ];
    // All at once: each call must end by its own deadline.
    const results = await Promise.all(
      calls.map(async ([name, call]) => {
        const t0 = performance.now();
        const got = await call().then(
          () => 'ok',
          (e: unknown) => (isStoreError(e) ? e.code : String(e)),
        );
        const took = performance.now() - t0;
        // Meanwhile the cluster itself goes on.
        await direct.put(`during/${name}`, 'x');
        return [name, RETRYABLE.includes(got), took < deadline + late];
      }),
    );
    expect(results).toEqual(calls.map(([name]) => [name, true, true]));
    const t0 = performance.now();
    const st = await s.status();
    expect(performance.now() - t0).toBeLessThan(deadline + late);
    expect(st.endpoints.map((e) => e.ok)).toEqual([false, false, false]);

    // Long enough for the watch to find its stream silent and start over.
    await sleep(2 * deadline + 300);
    expect(s.watchResumes).toBeGreaterThanOrEqual(1);
    for (const p of proxies) p.heal();
    await waitFor(
      async () =>
        s.get('before').then(
          () => true,
          () => false,
        ),
      10_000,
      'calls to work again',
    );
    expect(await s.keepAlive(lease)).toBe(30);
    const last = (await direct.put('after', '1')).revision;
    await expectSameAsHistory(s, events, '', start, last);
    expect(errors).toEqual([]);
  });

  it('close() ends calls in flight with STORE_CLOSED at once, even against a silent peer; onRoundTrip sees every call', async () => {
    const seen: [string, number][] = [];
    const s = await open(newPrefix(), 'proxied', {
      timeoutMs: 5000,
      onRoundTrip: (name, seconds) => seen.push([name, seconds]),
    });
    await s.put('k', 'v');
    await s.get('k');
    await s.keepAlive(await s.grantLease(10));
    expect(seen.map(([n]) => n)).toEqual(['txn', 'range', 'lease_grant', 'lease_keepalive']);
    for (const [, sec] of seen) expect(sec).toBeGreaterThan(0);

    for (const p of proxies) p.partition();
    const pending = [s.get('k'), s.put('k', 'w'), s.revision()].map((p) =>
      p.then(
        () => 'ok',
        (e: unknown) => (isStoreError(e) ? e.code : String(e)),
      ),
    );
    await sleep(100);
    const t0 = performance.now();
    await s.close();
    expect(await Promise.all(pending)).toEqual(['STORE_CLOSED', 'STORE_CLOSED', 'STORE_CLOSED']);
    expect(performance.now() - t0).toBeLessThan(500);
  });

  it('compactRevision() finds a compaction another client made (etcdctl), each time it moves', async () => {
    const s = await open(newPrefix(), 'direct');
    const other = await open(newPrefix(), 'direct');
    const points: number[] = [];
    for (let round = 0; round < 3; round++) {
      for (let i = 0; i < 40; i++) await other.put(`k${i % 4}`, String(i));
      const point = (await s.revision()) - 7 * round - 3;
      await runOk('etcdctl', [`--endpoints=${cluster.endpoints[2]}`, 'compaction', String(point)]);
      const t0 = performance.now();
      expect(await s.compactRevision()).toBe(point);
      points.push(performance.now() - t0);
      expect(await s.compactRevision()).toBe(point);
    }
    console.log(`compactRevision(): ${points.map((ms) => ms.toFixed(1)).join(', ')} ms`);
  });

  it('a quiet watch keeps its stream: etcd answers the progress requests that check it', async () => {
    const s = await open(newPrefix(), 'direct', { timeoutMs: 300 });
    const { events, errors } = await collect(s, '', (await s.revision()) + 1);
    // Five deadlines of silence: the watch asked for progress several times.
    await sleep(1500);
    expect(s.watchResumes).toBe(0);
    await s.put('k', 'v');
    await waitFor(() => events.length === 1, 5000, 'the event');
    expect(errors).toEqual([]);
  });

  it('a watch that cannot resume because history was compacted meanwhile ends with STORE_COMPACTED', async () => {
    const prefix = newPrefix();
    const s = await open(prefix, 'proxied');
    const direct = await open(prefix, 'direct');
    const start = (await s.revision()) + 1;
    const { events, errors } = await collect(s, '', start);
    await direct.put('a', '1');
    await waitFor(() => events.length === 1, 5000, 'the first event');
    for (const p of proxies) p.partition();
    await direct.put('b', '1');
    const c = await direct.put('c', '1');
    await direct.compact(c.revision);
    for (const p of proxies) {
      p.reset();
      p.heal();
    }
    await waitFor(() => errors.length > 0, 15_000, 'onError');
    expect(errors).toHaveLength(1);
    const e = errors[0];
    expect(isStoreError(e, 'STORE_COMPACTED') && e.compactRevision).toBe(c.revision);
    expect(events.map((x) => x.kv.key)).toEqual(['a']);
  });
});
