// Notifications and the event stream of a cluster under etcd's faults: every etcd
// member frozen past the agents' lease TTL, a real compaction behind a recipient and a
// stream, a pool's medium changed while its agent was down. A real 3-member etcd, real
// agents, a real webhook receiver.

import { type ChildProcess, spawnSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { op } from '../../agent/store/store.js';
import { EtcdStore } from '../../cluster/etcd-store.js';
import { FaultProxy } from '../harness/fault-proxy.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { idKey, Receiver } from '../helpers/receiver.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools, run } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Seen {
  id: string;
  type: string;
  subject?: string;
  time: string;
  data: Record<string, unknown>;
}

/** `GET /v1/events` (history, no follow) with a Last-Event-ID, through curl on the Unix socket. */
function streamSince(a: AgentHandle, lastId: string): Seen[] {
  const r = spawnSync(
    'curl',
    [
      '-sN',
      '--unix-socket',
      a.apiSocket,
      '-H',
      `Last-Event-ID: ${lastId}`,
      'http://agent/v1/events',
    ],
    { encoding: 'utf8', timeout: 60_000 },
  );
  return r.stdout
    .split('\n')
    .filter((l) => l.startsWith('data: '))
    .map((l) => JSON.parse(l.slice(6)) as Seen);
}

describeWithTools(['etcd', 'etcdctl', 'curl'], 'cluster: events under etcd faults', () => {
  let etcd: EtcdCluster;
  let shared: string;
  const started: AgentHandle[] = [];
  const children: ChildProcess[] = [];
  const proxies: FaultProxy[] = [];

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    shared = makeTempDir('ballast-shared-');
  }, 60_000);
  afterAll(async () => {
    for (const c of children) c.kill('SIGKILL');
    for (const p of proxies) await p.close().catch(() => {});
    for (let i = 0; i < 3; i++) {
      const pid = etcd?.pid(i);
      if (pid) process.kill(pid, 'SIGCONT');
    }
    await Promise.all(started.map((a) => a.kill9().catch(() => {})));
    await etcd?.stop();
  });

  const clusterName = () => `t${randomBytes(4).toString('hex')}`;

  async function agent(
    cluster: string,
    host: string,
    extra: {
      dir?: string;
      pools?: import('../helpers/agent.js').PoolSpec[];
      /** etcd as this agent reaches it (e.g. through fault proxies). */
      endpoints?: string[];
      events?: Record<string, number>;
    } = {},
  ): Promise<AgentHandle> {
    for (let attempt = 0; ; attempt++) {
      try {
        const a = await startAgent({
          ...(extra.dir ? { dir: extra.dir } : {}),
          pools: extra.pools ?? [
            { name: 'shared', path: path.join(shared, cluster), shared: true },
            { name: 'local' },
          ],
          cluster: { name: cluster, etcd: extra.endpoints ?? etcd.endpoints, host, leaseTtl: 2 },
          events: { retryCap: 0.5, deliveryTimeout: 2, rescanInterval: 0, ...extra.events },
        });
        started.push(a);
        return a;
      } catch (e) {
        // etcd slow to answer on a loaded machine is not what these tests are about.
        if (attempt === 2 || !/BALLAST_CLUSTER_UNREACHABLE/.test(String(e))) throw e;
      }
    }
  }

  function signalAll(sig: NodeJS.Signals): void {
    for (let i = 0; i < 3; i++) {
      const pid = etcd.pid(i);
      if (pid) process.kill(pid, sig);
    }
  }

  it('delivery goes on after every etcd member was frozen past the lease TTL', async () => {
    const name = clusterName();
    const [a, b] = await Promise.all([agent(name, 'a'), agent(name, 'b')]);
    const rx = new Receiver();
    await rx.start();
    try {
      expect(
        (await a.cli('notify', 'add', 'ops', '--url', rx.url, '--types', 'device.*')).code,
      ).toBe(0);
      expect(
        (await a.cli('device', 'create', 'before', '--size', '1M', '--pool', 'local')).code,
      ).toBe(0);
      await until('the first delivered', () => rx.got.some((g) => g.subject === 'before'));
      // Frozen long enough that etcd expires the leases when it runs again: both agents
      // re-register (longer each time, should a keepalive slip through first).
      const lost = () => [a, b].some((x) => /lease lost, registered again/.test(x.stderr()));
      for (let i = 0; !lost(); i++) {
        if (i === 3) throw new Error('no agent lost its lease in three freezes of etcd');
        signalAll('SIGSTOP');
        await sleep((3 + 3 * i) * 1000);
        signalAll('SIGCONT');
        await etcd.leader();
        await until('an agent re-registered', lost, 20_000).catch(() => {});
      }
      for (const [x, d] of [
        [a, 'after-a'],
        [b, 'after-b'],
      ] as const) {
        await until(`${d} created`, async () => {
          const r = await x.cli('device', 'create', d, '--size', '1M', '--pool', 'local');
          return r.code === 0 || /EXISTS/.test(r.stderr);
        });
      }
      await until('both delivered after the blip', () =>
        ['after-a', 'after-b'].every((d) => rx.got.some((g) => g.subject === d)),
      );
      const ls = JSON.parse((await a.cli('notify', 'ls', '--json')).stdout) as {
        recipients: { deliveredBy: string | null; cursor: string | null }[];
      };
      expect(['a', 'b']).toContain(ls.recipients[0]!.deliveredBy);
      const keys = rx.ids().map(idKey);
      expect([...keys].sort((x, y) => x - y)).toEqual(keys);
    } finally {
      signalAll('SIGCONT');
      await rx.stop();
      await Promise.all([a.stop(), b.stop()]);
    }
  }, 180_000);

  it('behind a real compaction: the state at the oldest revision kept, then every event after it, the same on the webhook and the stream, each id with one time', async () => {
    const name = clusterName();
    const [a, b] = await Promise.all([agent(name, 'a'), agent(name, 'b')]);
    const rx = new Receiver();
    await rx.start();
    try {
      expect((await a.cli('notify', 'add', 'late', '--url', rx.url)).code).toBe(0);
      expect((await a.cli('device', 'create', 'x1', '--size', '1M', '--pool', 'local')).code).toBe(
        0,
      );
      await until('x1 delivered', () => rx.got.some((g) => g.subject === 'x1'));
      const before = rx.got.find((g) => g.subject === 'x1')!.id;
      await rx.stop(); // away: the cursor stays at x1
      expect((await a.cli('device', 'create', 'x2', '--size', '1M', '--pool', 'local')).code).toBe(
        0,
      );
      const acl = await a.api('PUT', '/v1/devices/x1/acl', {
        entries: [{ identity: 'host-a', access: 'rw' }],
      });
      expect(acl.status).toBe(200);
      const pr = await a.api('POST', '/v1/devices/x1/pr', {
        action: 'register',
        as: 'host-a',
        key: '0',
        saKey: '0xa1',
      });
      expect(pr.status, JSON.stringify(pr.body)).toBe(200);
      const status = await run('etcdctl', [
        '--endpoints',
        etcd.endpoints[0]!,
        'endpoint',
        'status',
        '-w',
        'json',
      ]);
      const point = (
        JSON.parse(status.stdout) as { Status: { header: { revision: number } } }[]
      )[0]!.Status.header.revision;
      // Still in the history after the compaction: these must all come.
      expect((await a.cli('device', 'create', 'y1', '--size', '1M', '--pool', 'local')).code).toBe(
        0,
      );
      expect(
        (await a.api('PUT', '/v1/devices/x2/acl', { entries: [{ identity: 'h', access: 'ro' }] }))
          .status,
      ).toBe(200);
      await b.kill9(); // member.expired: a change that stores no time
      const c = await run('etcdctl', ['--endpoints', etcd.endpoints[0]!, 'compact', String(point)]);
      expect(c.code, c.stderr).toBe(0);
      // The deliverer reads its cursor again (a restart), behind the compaction.
      await a.stop();
      await a.start();
      await rx.start(rx.port);
      await until('everything after the compaction delivered', () =>
        ['y1', 'b'].every((x) =>
          rx.got.some(
            (g) =>
              g.subject === x &&
              (g.type === 'io.ballast.device.created' || g.type === 'io.ballast.member.expired'),
          ),
        ),
      );
      const ids = rx.ids();
      const resync = rx.got.find((g) => g.type === 'io.ballast.resync')!;
      expect(resync.id).toBe(`${point}.999999`);
      const after = rx.got.filter((g) => idKey(g.id) > idKey(resync.id)).map((g) => g.type);
      expect(after).toEqual(
        expect.arrayContaining([
          'io.ballast.device.created',
          'io.ballast.acl.changed',
          'io.ballast.member.expired',
        ]),
      );
      // nothing from before the compaction point after the resync, ids in order
      expect(ids.slice(ids.indexOf(resync.id) + 1).every((i) => idKey(i) > idKey(resync.id))).toBe(
        true,
      );
      const keys = ids.map(idKey);
      expect([...keys].sort((x, y) => x - y)).toEqual(keys);
      const d = resync.data as {
        devices: { name: string; pools: string[] }[];
        reservations: Record<string, { registrations?: unknown[] } | null>;
        acls: Record<string, { identity: string }[]>;
        members: { host: string }[];
        tiers: Record<string, string[]>;
        media: Record<string, Record<string, string>>;
      };
      expect(d.devices.map((x) => x.name).sort()).toEqual(['x1', 'x2']);
      expect(d.acls.x1).toEqual([expect.objectContaining({ identity: 'host-a' })]);
      expect(JSON.stringify(d.reservations.x1)).toMatch(/0xa1|161/);
      expect(d.members.map((m) => m.host).sort()).toEqual(['a', 'b']);
      expect(Object.keys(d.media).sort()).toEqual(['a', 'b']);
      expect(d.tiers.x1).toHaveLength(1);
      expect(d.tiers.x1![0]).not.toBe('unknown');
      // The stream from the same cursor: the same resync (state and time), the same events.
      const streamed = streamSince(a, before);
      expect(streamed[0]).toMatchObject({ id: resync.id, time: resync.time, data: resync.data });
      const byId = new Map(rx.got.map((g) => [g.id, g]));
      for (const e of streamed) {
        const w = byId.get(e.id);
        if (w)
          expect({ id: e.id, time: e.time, data: e.data }).toEqual({
            id: w.id,
            time: w.time,
            data: w.data,
          });
      }
      expect(streamed.map((e) => e.id)).toEqual(
        expect.arrayContaining(
          rx.got.filter((g) => g.subject === 'y1' || g.subject === 'b').map((g) => g.id),
        ),
      );
      // Read again later: every id with the time it had.
      await sleep(50);
      const again = streamSince(a, before);
      expect(again.map((e) => [e.id, e.time])).toEqual(
        streamed
          .map((e) => [e.id, e.time])
          .concat(again.slice(streamed.length).map((e) => [e.id, e.time])),
      );
    } finally {
      await rx.stop().catch(() => {});
      await a.stop();
    }
  }, 180_000);
  it("a deliverer cut off from etcd with events still to send stops before the next one takes over: nothing it had queued arrives after the new leader's resync", async () => {
    const name = clusterName();
    const cut = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    proxies.push(...cut);
    // A answers slowly enough for the receiver to hold a delivery while A is cut off.
    const a = await agent(name, 'a', {
      endpoints: cut.map((p) => p.url),
      events: { deliveryTimeout: 60 },
    });
    const rx = new Receiver();
    await rx.start();
    const gen = await EtcdStore.connect({
      endpoints: etcd.endpoints,
      prefix: `/ballast/${name}/`,
      timeoutMs: 5000,
    });
    let b: AgentHandle | undefined;
    let release: () => void = () => {};
    const got = (g: string) => rx.got.find((x) => x.subject === g);
    // A delivery running on A shows in its metrics
    const delivering = async () =>
      /ballast_notify_recipient_lag_events\{recipient="lead"\}/.test(
        (await a.api('GET', '/metrics')).text,
      );
    // Events with their own time (as a fence records): sent without a store call.
    const fenced = (g: string) =>
      op.put(
        `events/${g}`,
        JSON.stringify({
          kind: 'member.fenced',
          subject: g,
          host: g,
          time: new Date().toISOString(),
          data: {},
        }),
      );
    try {
      expect(
        (await a.cli('notify', 'add', 'lead', '--url', rx.url, '--types', 'member.*')).code,
      ).toBe(0);
      await until('A delivers', async () => {
        const ls = JSON.parse((await a.cli('notify', 'ls', '--json')).stdout) as {
          recipients: { deliveredBy: string | null }[];
        };
        return ls.recipients[0]?.deliveredBy === 'a';
      });
      expect(await delivering()).toBe(true);
      b = await agent(name, 'b');
      await until('b joined, delivered by A', () => got('b') !== undefined);
      // g1 delivered by A: its answer waits until A is cut off, g2 still to send.
      const held = new Promise<void>((r) => {
        release = r;
      });
      rx.beforeAnswer = async (e) => {
        if (e.subject === 'g1') await held;
      };
      // g1 and g2 in one revision: both in A's queue when it posts g1.
      await gen.txn({ compare: [], success: [fenced('g1'), fenced('g2')] });
      await until('g1 posted', () => got('g1') !== undefined);
      for (const p of cut) p.partition();
      release();
      // Past g2, compacted: a new leader starting from the cursor resyncs beyond g2.
      await gen.txn({ compare: [], success: [fenced('g3')] });
      const point = await gen.revision();
      const c = await run('etcdctl', ['--endpoints', etcd.endpoints[0]!, 'compact', String(point)]);
      expect(c.code, c.stderr).toBe(0);
      await until('B took the delivery over, resync first', () =>
        rx.got.some((x) => x.type === 'io.ballast.resync'),
      );
      await gen.txn({ compare: [], success: [fenced('g4')] });
      await until('g4 delivered', () => got('g4') !== undefined);
      for (const p of cut) p.heal();
      // A back: it learns it no longer leads (its lease went) and stops; until then
      // anything it still sends would show.
      await until('A lost its lease and registered again', () =>
        /lease lost, registered again/.test(a.stderr()),
      );
      // and has no delivery of it running any more (by itself, or stopped by its sync)
      await until('A delivers no more', async () => !(await delivering()));
      await gen.txn({ compare: [], success: [fenced('g5')] });
      await until('g5 delivered', () => got('g5') !== undefined);
      // In id order: an event is first delivered after every one before it, and after
      // any resync before it (the state at its revision): a late one is a repeat or nothing.
      let last = 0;
      const late: string[] = [];
      const seen = new Set<string>();
      for (const e of rx.got) {
        if (e.type !== 'io.ballast.resync' && seen.has(e.id)) continue;
        seen.add(e.id);
        if (e.type !== 'io.ballast.resync' && idKey(e.id) <= last) {
          late.push(`${e.id} (${e.subject}) after ${last}`);
        }
        last = Math.max(last, idKey(e.id));
      }
      expect(late, rx.got.map((e) => `${e.id} ${e.type} ${e.subject}`).join('\n')).toEqual([]);
    } finally {
      for (const p of cut) p.heal();
      release();
      await gen.close();
      await rx.stop();
      await Promise.all([a.stop(), b?.stop()]);
    }
  }, 240_000);

  it('a delivery pass that fails mid-stream resumes from its cursor while events keep coming: none skipped', async () => {
    const name = clusterName();
    const cut = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    proxies.push(...cut);
    const a = await agent(name, 'a', { endpoints: cut.map((p) => p.url) });
    const rx = new Receiver();
    await rx.start();
    // Members come and go on etcd directly, all along: member.joined and member.expired
    // store no time, so the deliverer reads and writes notify/time/ for each, and an etcd
    // call that times out there fails its pass in the middle of the stream.
    const gen = await EtcdStore.connect({
      endpoints: etcd.endpoints,
      prefix: `/ballast/${name}/`,
      timeoutMs: 5000,
    });
    const delivered = (subject: string, type: string) =>
      rx.got.some((g) => g.subject === subject && g.type === `io.ballast.member.${type}`);
    let churning = true;
    const made: string[] = [];
    let churn = Promise.resolve();
    try {
      expect(
        (await a.cli('notify', 'add', 'churn', '--url', rx.url, '--types', 'member.*')).code,
      ).toBe(0);
      churn = (async () => {
        for (let i = 0; churning; i++) {
          try {
            await gen.put(`members/g${i}`, JSON.stringify({ version: 'test' }));
            await gen.delete(`members/g${i}`);
            made.push(`g${i}`);
          } catch {
            // etcd busy on a loaded machine: the next one
          }
          await sleep(50);
        }
      })();
      await until('the first delivered', () => made.length > 0 && rx.got.length > 0);
      const paused = () => (a.stderr().match(/notify churn: delivery paused/g) ?? []).length;
      // Cut A off from etcd while it delivers, until its pass fails (or a few seconds
      // went by with none: then it was between calls), heal, and again.
      let failed = 0;
      for (let round = 0; round < 10 && failed < 3; round++) {
        const before = paused();
        for (const p of cut) p.partition();
        await until('a pass failed', () => paused() > before, 4000).catch(() => {});
        for (const p of cut) p.heal();
        if (paused() > before) failed++;
        const next = made.length + 2;
        await until(`a member from g${next} on delivered after the heal`, () =>
          rx.got.some((g) => /^g\d+$/.test(g.subject ?? '') && Number(g.subject!.slice(1)) >= next),
        );
      }
      expect(failed, 'passes that failed mid-stream').toBeGreaterThan(0);
      churning = false;
      await churn;
      const last = made[made.length - 1]!;
      await until(`${last} delivered`, () => delivered(last, 'expired')).catch(() => {});
      const missing = made.flatMap((g) =>
        (['joined', 'expired'] as const)
          .filter((t) => !delivered(g, t))
          .map((t) => `${g} member.${t}`),
      );
      expect(
        { missing: missing.length, first: missing.slice(0, 12) },
        `of ${made.length * 2} events, ${failed} failed passes`,
      ).toEqual({ missing: 0, first: [] });
      // At least once, in id order: an id seen for the first time is after every id before it.
      const first = rx.ids().map(idKey);
      expect([...first].sort((x, y) => x - y)).toEqual(first);
    } finally {
      churning = false;
      await churn;
      await gen.close();
      for (const p of cut) p.heal();
      await rx.stop();
      await a.stop();
    }
  }, 240_000);
});
