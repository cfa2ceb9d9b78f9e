// The scale benchmark (`npm run bench -- --suite scale`; options in
// bench/scale-options.ts, the method in BENCHMARKING.md "Scale"): how a cluster's
// costs grow with its hosts and its devices. Per member count, a fresh 3-member
// etcd, three real agents (A, B, C) and hollow members (bench/hollow.ts); per
// device count, the cluster seeded up to it and measured through agent A, from
// etcd's own metrics and from /proc.
//
// Tables (Markdown) go to stdout, progress to stderr, every sample to
// bench-results/scale.json.

import { existsSync } from 'node:fs';
import { mkdir, mkdtemp, rm } from 'node:fs/promises';
import os from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { EtcdStore } from '../cluster/etcd-store.js';
import { NbdClient } from '../nbd/client.js';
import { type EtcdCluster, startEtcdCluster } from '../test/harness/local-etcd.js';
import { failOver } from './cluster.js';
import { BenchAgent } from './cluster-agent.js';
import { fmtMs, markdownTable, metricSum, type Percentiles, percentiles } from './cluster-stats.js';
import {
  eachLimited,
  type HollowMember,
  HollowProcess,
  hollowScript,
  type SeedDevice,
} from './hollow.js';
import { cpuSeconds, killAll, run } from './proc.js';
import { writeResults } from './results.js';
import { parseScaleOptions, SCALE_USAGE, type ScaleOptions } from './scale-options.js';
import { ballastInvocation } from './servers.js';

const log = (msg: string): void => {
  process.stderr.write(`[bench:scale] ${msg}\n`);
};

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

/** Hollow pools when there are no hollow members to spread them over (0 members: a seeder). */
const SEED_POOLS = 10;
/** Devices seeded between two waits for etcd to go quiet. */
const SEED_CHUNK = 500;
/** Devices are this big: records only matter here (1 MiB, sparse on the real agents). */
const DEVICE_SIZE = 2 ** 20;
/** Hosts that serve pool m, where the timed changes go: A, B and C. */
const SERVING = 3;
/** Changes before the timed ones, not recorded (JIT, connections). */
const WARMUP = 5;
/** The idle window that etcd's background rates are read over. */
const IDLE_MS = 3000;

const mib = (kib: number | undefined): number => (kib ?? Number.NaN) / 1024;

// ---- the layout of one cluster ----------------------------------------------------

interface Layout {
  /** Hollow pools: pool k is declared by 2 + k mod 3 consecutive members (its hosts). */
  pools: { name: string; path: string; hosts: string[] }[];
  members: HollowMember[];
  /** The hollow processes' members, --group each; the last group is the churn group. */
  groups: HollowMember[][];
  /** The members killed at once (each also declares its own pool cp<i>, which C serves). */
  churn: HollowMember[];
  /** Real pool directories: m (A, B, C), r (B, C, the joining agent), cp<i> (C). */
  m: string;
  r: string;
  cp: string[];
}

const hostName = (i: number): string => `h${String(i).padStart(4, '0')}`;

function makeLayout(members: number, opts: ScaleOptions, root: string): Layout {
  const k = members > 0 ? members : SEED_POOLS;
  const pools = Array.from({ length: k }, (_, i) => ({
    name: `hp${i}`,
    // Under the run's directory, never made: only hollow members declare these.
    path: join(root, 'hollow-pools', `hp${i}`),
    hosts: [] as string[],
  }));
  const list: HollowMember[] = Array.from({ length: members }, (_, i) => ({
    host: hostName(i),
    pools: [],
  }));
  for (const [i, p] of pools.entries()) {
    const width = Math.min(2 + (i % 3), members);
    for (let d = 0; d < width; d++) {
      const m = list[(i + d) % members]!;
      m.pools.push({ name: p.name, path: p.path });
      p.hosts.push(m.host);
    }
  }
  const nChurn = Math.min(opts.churn, members);
  const churn = list.slice(members - nChurn);
  const cp = churn.map((_, i) => join(root, 'pools', `cp${i}`));
  for (const [i, m] of churn.entries()) m.pools.push({ name: `cp${i}`, path: cp[i]! });
  const groups: HollowMember[][] = [];
  const rest = list.slice(0, members - nChurn);
  for (let i = 0; i < rest.length; i += opts.group) groups.push(rest.slice(i, i + opts.group));
  if (churn.length > 0) groups.push(churn);
  return {
    pools,
    members: list,
    groups,
    churn,
    m: join(root, 'pools', 'm'),
    r: join(root, 'pools', 'r'),
    cp,
  };
}

/** The seeded device j: its name, its pool, and the member that creates it. */
function seeded(j: number, layout: Layout): { name: string; pool: number } {
  return { name: `s${String(j).padStart(6, '0')}`, pool: j % layout.pools.length };
}

/** How many seeded devices pool k holds when `devices` are seeded. */
function perPool(k: number, pools: number, devices: number): number {
  return Math.floor(devices / pools) + (k < devices % pools ? 1 : 0);
}

// ---- etcd's own figures -------------------------------------------------------------

interface EtcdSample {
  t: number;
  /** Member 0's MVCC counters: every member applies every write. */
  puts: number;
  deletes: number;
  txns: number;
  /** Raft proposals committed: write requests (txn, put, lease grant and revoke...). */
  proposals: number;
  /** Watch events sent, all members. */
  events: number;
  /** Client messages received (unary requests and stream messages), all members. */
  messages: number;
  watchers: number;
  streams: number;
  keys: number;
  dbBytes: number;
  dbInUseBytes: number;
  /** CPU seconds of the three etcd processes. */
  cpu: number;
}

async function etcdSample(etcd: EtcdCluster): Promise<EtcdSample> {
  const texts = await Promise.all(
    etcd.members.map(async (m) => (await fetch(`${m.metricsUrl}/metrics`)).text()),
  );
  const first = texts[0]!;
  const all = (metric: string) => texts.reduce((a, t) => a + metricSum(t, metric), 0);
  return {
    t: performance.now(),
    puts: metricSum(first, 'etcd_mvcc_put_total'),
    deletes: metricSum(first, 'etcd_mvcc_delete_total'),
    txns: metricSum(first, 'etcd_mvcc_txn_total'),
    proposals: metricSum(first, 'etcd_server_proposals_committed_total'),
    events: all('etcd_debugging_mvcc_events_total'),
    messages: all('grpc_server_msg_received_total'),
    watchers: all('etcd_debugging_mvcc_watcher_total'),
    streams: all('etcd_debugging_mvcc_watch_stream_total'),
    keys: metricSum(first, 'etcd_debugging_mvcc_keys_total'),
    dbBytes: metricSum(first, 'etcd_mvcc_db_total_size_in_bytes'),
    dbInUseBytes: metricSum(first, 'etcd_mvcc_db_total_size_in_use_in_bytes'),
    cpu: [0, 1, 2].reduce((a, i) => a + cpuSeconds(etcd.pid(i) ?? -1), 0),
  };
}

/** etcd's current revision. */
async function revisionOf(etcd: EtcdCluster): Promise<number> {
  const text = await (await fetch(`${etcd.members[0]!.metricsUrl}/metrics`)).text();
  return metricSum(text, 'etcd_debugging_mvcc_current_revision');
}

/**
 * Waits until etcd takes no more writes (no raft proposal for a second; at most
 * `maxMs`): what a change sets off after its answer (acks, stamps) counts with it.
 */
async function quiesce(etcd: EtcdCluster, maxMs = 60_000): Promise<EtcdSample> {
  const end = performance.now() + maxMs;
  let prev = await etcdSample(etcd);
  for (;;) {
    await sleep(1000);
    const cur = await etcdSample(etcd);
    if (cur.proposals - prev.proposals <= 1 || performance.now() > end) return cur;
    prev = cur;
  }
}

type Rates = Pick<EtcdSample, 'puts' | 'deletes' | 'proposals' | 'events' | 'messages' | 'cpu'>;

/** Per second, between two samples. */
function rates(a: EtcdSample, b: EtcdSample): Rates {
  const s = (b.t - a.t) / 1000;
  return {
    puts: (b.puts - a.puts) / s,
    deletes: (b.deletes - a.deletes) / s,
    proposals: (b.proposals - a.proposals) / s,
    events: (b.events - a.events) / s,
    messages: (b.messages - a.messages) / s,
    cpu: (b.cpu - a.cpu) / s,
  };
}

interface PerChange {
  /** Keys written (put or deleted) per change, the idle rate taken off. */
  keyWrites: number;
  /** Write requests (raft proposals) per change. */
  requests: number;
  /** Watch events sent per change (the fan-out). */
  events: number;
  /** etcd CPU milliseconds per change (three members). */
  etcdCpuMs: number;
  /** Keys written per change by their first path segment (not net of idle writes). */
  byPrefix?: Record<string, number>;
}

/**
 * The keys the cluster wrote between two revisions, counted by their first path
 * segment (`acks`, `devices`, `notify`...): where a change's writes go. Read back
 * from etcd's history after the fact, so that it adds no watcher while measuring.
 */
async function writesByPrefix(
  cl: { name: string; etcd: EtcdCluster },
  from: number,
  to: number,
): Promise<Record<string, number>> {
  const out: Record<string, number> = {};
  const store = await EtcdStore.connect({
    endpoints: cl.etcd.endpoints,
    prefix: `/ballast/${cl.name}/`,
  });
  try {
    let last = performance.now();
    let reached = false;
    const w = await store.watch('', {
      fromRevision: from + 1,
      onEvent: (ev) => {
        last = performance.now();
        if (ev.revision > to) {
          reached = true;
          return;
        }
        const seg = ev.kv.key.split('/')[0]!;
        out[seg] = (out[seg] ?? 0) + 1;
      },
    });
    // Until a later event, or quiet for half a second (the last writes may be elsewhere).
    const end = performance.now() + 10_000;
    while (!reached && performance.now() - last < 500 && performance.now() < end) await sleep(50);
    await w.cancel();
  } finally {
    await store.close();
  }
  return out;
}

function perChange(a: EtcdSample, b: EtcdSample, n: number, idle: Rates): PerChange {
  const s = (b.t - a.t) / 1000;
  const net = (d: number, rate: number) => Math.max(0, d - rate * s) / n;
  return {
    keyWrites: net(b.puts - a.puts + b.deletes - a.deletes, idle.puts + idle.deletes),
    requests: net(b.proposals - a.proposals, idle.proposals),
    events: net(b.events - a.events, idle.events),
    etcdCpuMs: net(b.cpu - a.cpu, idle.cpu) * 1000,
  };
}

/** PR changes of one identity on one device through one agent: a register, then its unregister. */
class PrToggle {
  private on = false;

  constructor(
    private readonly a: BenchAgent,
    private readonly device: string,
    private readonly as: string,
  ) {}

  /** One change; its latency in ms. */
  async once(): Promise<number> {
    const body = this.on
      ? { action: 'register', as: this.as, key: '0x9', saKey: '0' }
      : { action: 'register', as: this.as, key: '0', saKey: '0x9' };
    const t0 = performance.now();
    await this.a.must('POST', `/v1/devices/${this.device}/pr`, body, 200);
    this.on = !this.on;
    return performance.now() - t0;
  }

  async times(n: number): Promise<number[]> {
    const out: number[] = [];
    for (let i = 0; i < n; i++) out.push(await this.once());
    return out;
  }

  /** Back to back until `until` settles (it must not reject unseen). */
  async during(until: Promise<unknown>): Promise<number[]> {
    let done = false;
    const settled = until.then(
      () => {
        done = true;
      },
      () => {
        done = true;
      },
    );
    const out: number[] = [];
    while (!done) out.push(await this.once());
    await settled;
    return out;
  }
}

// ---- one cluster --------------------------------------------------------------------

interface Ctx {
  opts: ScaleOptions;
  tmp: string;
  ballast: { command: string; args: string[] };
  agents: Set<BenchAgent>;
  hollows: Set<HollowProcess>;
  /** RSS of a hollow process holding one member (the Node baseline each process pays). */
  hollowBaselineKiB: number;
}

interface Cluster {
  members: number;
  name: string;
  root: string;
  etcd: EtcdCluster;
  layout: Layout;
  a: BenchAgent;
  b: BenchAgent;
  c: BenchAgent;
  /** The process that holds each hollow member. */
  byHost: Map<string, HollowProcess>;
  procs: HollowProcess[];
  seeded: number;
  /** Seeding time per batch, and how many creates were tried again. */
  seeds: { from: number; to: number; ms: number; retried: number }[];
  /** The timed PR changes: identity x on device prdev through A. */
  pr: PrToggle;
  /** Milliseconds until every hollow member had joined, at the start. */
  hollowStartMs: number;
}

function realAgent(
  ctx: Ctx,
  cl: { root: string; name: string; etcd: EtcdCluster },
  host: string,
  pools: { name: string; path: string }[],
): BenchAgent {
  return new BenchAgent(
    {
      dir: join(cl.root, host),
      pools: pools.map((p) => ({ ...p, shared: true })),
      cluster: { name: cl.name, etcd: cl.etcd.endpoints, host, leaseTtl: ctx.opts.ttl },
    },
    ctx.ballast,
  );
}

function hollowSpec(ctx: Ctx, cl: Cluster, tag: string, members: HollowMember[], parallel = 16) {
  return {
    cluster: { name: cl.name, etcd: cl.etcd.endpoints, leaseTtl: ctx.opts.ttl },
    dir: join(cl.root, `hollow-${tag}`),
    members,
    parallel,
  };
}

function spawnHollow(ctx: Ctx, spec: ReturnType<typeof hollowSpec>): HollowProcess {
  const p = new HollowProcess(spec);
  ctx.hollows.add(p);
  void p.exited.then(() => ctx.hollows.delete(p));
  return p;
}

async function startCluster(ctx: Ctx, members: number): Promise<Cluster> {
  const root = join(ctx.tmp, `m${members}`);
  await mkdir(root, { recursive: true });
  const t0 = performance.now();
  const etcd = await startEtcdCluster({ size: 3, heartbeatMs: 100, electionMs: 1000, dir: root });
  log(`${members} members: etcd up in ${fmtMs(performance.now() - t0)} ms`);
  const name = `scale-${members}`;
  const layout = makeLayout(members, ctx.opts, root);
  const base = { root, name, etcd };
  const m = { name: 'm', path: layout.m };
  const r = { name: 'r', path: layout.r };
  const cps = layout.cp.map((path, i) => ({ name: `cp${i}`, path }));
  const a = realAgent(ctx, base, 'a', [m]);
  const b = realAgent(ctx, base, 'b', [m, r]);
  const c = realAgent(ctx, base, 'c', [m, r, ...cps]);
  const cl: Cluster = {
    members,
    ...base,
    layout,
    a,
    b,
    c,
    byHost: new Map(),
    procs: [],
    seeded: 0,
    seeds: [],
    pr: new PrToggle(a, 'prdev', 'x'),
    hollowStartMs: 0,
  };
  try {
    await populate(ctx, cl);
  } catch (e) {
    await stopCluster(ctx, cl, true);
    throw e;
  }
  return cl;
}

/** Starts the real agents and the hollow members of a cluster. */
async function populate(ctx: Ctx, cl: Cluster): Promise<void> {
  const { root, members, layout } = cl;
  for (const x of [cl.a, cl.b, cl.c]) {
    ctx.agents.add(x);
    await x.start();
  }
  if (ctx.hollowBaselineKiB === 0) {
    // One member alone: what any hollow process costs before its members.
    const one = spawnHollow(
      ctx,
      hollowSpec(ctx, cl, 'baseline', [
        { host: 'baseline', pools: [{ name: 'baseline', path: join(root, 'hollow-pools', 'b') }] },
      ]),
    );
    await one.ready;
    await sleep(1000);
    ctx.hollowBaselineKiB = (await one.call<HollowStats>('stats')).rssKiB;
    await one.stop();
    log(`a hollow process with one member: RSS ${mib(ctx.hollowBaselineKiB).toFixed(0)} MiB`);
  }
  const th = performance.now();
  for (const [g, group] of layout.groups.entries()) {
    const p = spawnHollow(ctx, hollowSpec(ctx, cl, `g${g}`, group));
    const ready = await p.ready;
    cl.procs.push(p);
    for (const mm of group) cl.byHost.set(mm.host, p);
    log(`${members} members: hollow group ${g} (${group.length}) joined in ${fmtMs(ready.ms)} ms`);
  }
  cl.hollowStartMs = performance.now() - th;
}

/** The real agents' own devices: pool r (B), the PR and probe devices and fail-over's (A). */
async function realDevices(ctx: Ctx, cl: Cluster): Promise<void> {
  const t0 = performance.now();
  await eachLimited(
    Array.from({ length: ctx.opts.serve }, (_, i) => `r${String(i).padStart(4, '0')}`),
    8,
    async (name) => {
      await cl.b.must('POST', '/v1/devices', { name, size: '1M', pool: 'r' }, 201);
    },
  );
  for (const name of ['prdev', 'probe', 'fo']) {
    await cl.a.must('POST', '/v1/devices', { name, size: '1M', pool: 'm' }, 201);
  }
  for (const [i] of cl.layout.churn.entries()) {
    await cl.c.must('POST', '/v1/devices', { name: `c${i}`, size: '1M', pool: `cp${i}` }, 201);
  }
  log(
    `${cl.members} members: ${ctx.opts.serve} devices in pool r, ${cl.layout.churn.length} churn devices: ` +
      `${fmtMs(performance.now() - t0)} ms`,
  );
}

/** Seeds the cluster up to `devices` through hollow members' create path. */
async function seedTo(ctx: Ctx, cl: Cluster, devices: number): Promise<void> {
  if (devices <= cl.seeded) return;
  const t0 = performance.now();
  let seeder: HollowProcess | undefined;
  if (cl.members === 0) {
    // No hollow members: one per hollow pool makes its devices, then they all leave.
    seeder = spawnHollow(
      ctx,
      hollowSpec(
        ctx,
        cl,
        `seeders-${devices}`,
        cl.layout.pools.map((p, k) => ({
          host: `seeder${k}`,
          pools: [{ name: p.name, path: p.path }],
        })),
      ),
    );
    await seeder.ready;
  }
  // In chunks, each after etcd has gone quiet again: the members apply what the last one
  // set off (acks, event stamps) before more comes. A create refused (a member cut off
  // from etcd for a moment by its own load: NOT made) is tried again, up to 3 times.
  let retried = 0;
  try {
    for (let from = cl.seeded; from < devices; from += SEED_CHUNK) {
      let todo = Array.from(
        { length: Math.min(SEED_CHUNK, devices - from) },
        (_, i) => from + i,
      ).map((j) => {
        const d = seeded(j, cl.layout);
        const pool = cl.layout.pools[d.pool]!;
        const host = seeder ? `seeder${d.pool}` : pool.hosts[0]!;
        return { host, name: d.name, size: DEVICE_SIZE, pool: pool.name };
      });
      for (let attempt = 1; todo.length > 0; attempt++) {
        const byProc = new Map<HollowProcess, SeedDevice[]>();
        for (const d of todo) {
          const proc = seeder ?? cl.byHost.get(d.host)!;
          byProc.set(proc, [...(byProc.get(proc) ?? []), d]);
        }
        const per = Math.max(1, Math.ceil(ctx.opts.seedParallel / byProc.size));
        const results = await Promise.all(
          [...byProc].map(([p, list]) =>
            p.call<{ failed: { name: string; error: string }[] }>('seed', {
              devices: list,
              parallel: per,
            }),
          ),
        );
        const failed = results.flatMap((r) => r.failed);
        if (failed.length === 0) break;
        if (attempt >= 3) {
          throw new Error(
            `seeding: ${failed.length} create(s) failed 3 times, e.g. ${failed[0]!.name}: ${failed[0]!.error}`,
          );
        }
        log(
          `${cl.members} members: ${failed.length} create(s) refused (e.g. ${failed[0]!.error}); again once etcd is quiet`,
        );
        retried += failed.length;
        const names = new Set(failed.map((f) => f.name));
        todo = todo.filter((d) => names.has(d.name));
        await quiesce(cl.etcd);
      }
      await quiesce(cl.etcd);
    }
  } finally {
    await seeder?.stop();
  }
  const ms = performance.now() - t0;
  cl.seeds.push({ from: cl.seeded, to: devices, ms, retried });
  log(
    `${cl.members} members: seeded ${cl.seeded} -> ${devices} devices in ${(ms / 1000).toFixed(1)} s ` +
      `(${(((devices - cl.seeded) / ms) * 1000).toFixed(0)}/s${retried > 0 ? `; ${retried} creates tried again` : ''})`,
  );
  cl.seeded = devices;
  // History is compacted as an operator's etcd would: the db size below is what is in use.
  const store = await EtcdStore.connect({ endpoints: cl.etcd.endpoints, prefix: '/scale-bench/' });
  try {
    await store.compact(await store.revision());
  } finally {
    await store.close();
  }
}

/** What a hollow process says of itself (bench/hollow.ts, `stats`). */
interface HollowStats {
  rssKiB: number;
  loopDelayP99Ms: number;
  loopDelayMaxMs: number;
  keepaliveFailures: number;
  reRegistrations: number;
}

/** Every hollow process's stats, summed (RSS, counts) or the worst (event loop delay). */
async function hollowStats(cl: Cluster): Promise<HollowStats> {
  const all = await Promise.all(cl.procs.map((p) => p.call<HollowStats>('stats')));
  const sum = (f: (x: HollowStats) => number) => all.reduce((a, x) => a + f(x), 0);
  const worst = (f: (x: HollowStats) => number) => Math.max(0, ...all.map(f));
  return {
    rssKiB: sum((x) => x.rssKiB),
    loopDelayP99Ms: worst((x) => x.loopDelayP99Ms),
    loopDelayMaxMs: worst((x) => x.loopDelayMaxMs),
    keepaliveFailures: sum((x) => x.keepaliveFailures),
    reRegistrations: sum((x) => x.reRegistrations),
  };
}

/** Every member leaves (or, `crash`, is killed), etcd stops, the directory goes. */
async function stopCluster(ctx: Ctx, cl: Cluster, crash = false): Promise<void> {
  const procs = [...ctx.hollows].filter((p) => p.spec.dir.startsWith(cl.root));
  await Promise.all(procs.map((p) => (crash ? p.kill() : p.stop()).catch(() => {})));
  for (const x of [cl.a, cl.b, cl.c]) {
    if (x.running) await (crash ? x.kill9() : x.stop().catch(() => x.kill9()));
    ctx.agents.delete(x);
  }
  await cl.etcd.stop();
  await rm(cl.root, { recursive: true, force: true }).catch(() => {});
}

// ---- measurements -------------------------------------------------------------------

type OpKind = 'create' | 'resize' | 'pr' | 'delete';
const OP_KINDS: readonly OpKind[] = ['create', 'resize', 'pr', 'delete'];

interface LatencyResult {
  members: number;
  devices: number;
  ops: Record<OpKind, number[]>;
  perChange: Record<OpKind, PerChange>;
  idle: Rates;
  etcd: Pick<EtcdSample, 'keys' | 'dbBytes' | 'dbInUseBytes' | 'watchers' | 'streams'>;
  rssMiB: { a: number; b: number; c: number };
  hollow: {
    processes: number;
    rssMiB: number;
    perMemberMiB: number;
    /** The worst hollow process's event loop delay over the measurement, ms. */
    loopDelayP99Ms: number;
    loopDelayMaxMs: number;
    /** Keepalives the hollow members failed, and leases they lost, during the measurement. */
    keepaliveFailures: number;
    reRegistrations: number;
  };
  seedPerSecond: number;
}

async function latencyPart(ctx: Ctx, cl: Cluster, devices: number): Promise<LatencyResult> {
  const n = ctx.opts.ops;
  const a = cl.a;
  const h0 = await hollowStats(cl);
  const i0 = await quiesce(cl.etcd);
  await sleep(IDLE_MS);
  const i1 = await etcdSample(cl.etcd);
  const idle = rates(i0, i1);
  const ops = {} as Record<OpKind, number[]>;
  const per = {} as Record<OpKind, PerChange>;
  const dev = (i: number) => `t${devices}-${i < 0 ? `w${-i}` : i}`;
  const phase = async (kind: OpKind, changes: number, fn: (i: number) => Promise<unknown>) => {
    // The warm-up changes go before the first sample.
    for (let i = 0; i < WARMUP; i++) await fn(-1 - i);
    const before = await quiesce(cl.etcd);
    const from = await revisionOf(cl.etcd);
    const samples: number[] = [];
    for (let i = 0; i < n; i++) {
      const t0 = performance.now();
      await fn(i);
      samples.push(performance.now() - t0);
    }
    const after = await quiesce(cl.etcd);
    const to = await revisionOf(cl.etcd);
    ops[kind] = samples;
    per[kind] = perChange(before, after, changes, idle);
    const by = await writesByPrefix(cl, from, to);
    per[kind].byPrefix = Object.fromEntries(
      Object.entries(by).map(([k, v]) => [k, Math.round((v / changes) * 10) / 10]),
    );
  };
  await phase('create', n, (i) =>
    a.must('POST', '/v1/devices', { name: dev(i), size: '1M', pool: 'm' }, 201),
  );
  await phase('resize', n, (i) =>
    a.must('POST', `/v1/devices/${dev(i)}/resize`, { size: '2M' }, 200),
  );
  // One PR change per sample: a register, then its unregister.
  await phase('pr', n, () => cl.pr.once());
  await phase('delete', n, (i) => a.must('DELETE', `/v1/devices/${dev(i)}`, undefined, 200));
  // etcd at rest: the end of the idle window.
  const st = i1;
  const h1 = await hollowStats(cl);
  const hollowKiB = h1.rssKiB;
  const last = cl.seeds.at(-1);
  return {
    members: cl.members,
    devices,
    ops,
    perChange: per,
    idle,
    etcd: {
      keys: st.keys,
      dbBytes: st.dbBytes,
      dbInUseBytes: st.dbInUseBytes,
      watchers: st.watchers,
      streams: st.streams,
    },
    rssMiB: {
      a: mib(cl.a.memory()?.vmRss),
      b: mib(cl.b.memory()?.vmRss),
      c: mib(cl.c.memory()?.vmRss),
    },
    hollow: {
      processes: cl.procs.length,
      rssMiB: mib(hollowKiB),
      perMemberMiB:
        cl.members > 0
          ? mib(hollowKiB - cl.procs.length * ctx.hollowBaselineKiB) / cl.members
          : Number.NaN,
      loopDelayP99Ms: h1.loopDelayP99Ms,
      loopDelayMaxMs: h1.loopDelayMaxMs,
      keepaliveFailures: h1.keepaliveFailures - h0.keepaliveFailures,
      reRegistrations: h1.reRegistrations - h0.reRegistrations,
    },
    seedPerSecond: last ? ((last.to - last.from) / last.ms) * 1000 : Number.NaN,
  };
}

interface JoinResult {
  members: number;
  devices: number;
  healthyMs: number;
  servingMs: number;
  rssMiB: number;
}

/** Reads a block of each device through `socket` until every one answers; resolves when all have. */
async function readEach(
  socket: string,
  names: readonly string[],
  deadlineMs: number,
): Promise<void> {
  await eachLimited(names, 8, async (name) => {
    for (;;) {
      try {
        const nbd = await NbdClient.connect(`nbd+unix:///${name}?socket=${socket}`, {
          timeoutMs: 5000,
        });
        try {
          await nbd.read(0, 512);
          return;
        } finally {
          await nbd.close().catch(() => {});
        }
      } catch (e) {
        if (performance.now() > deadlineMs) throw new Error(`${name} never served: ${e}`);
        await sleep(20);
      }
    }
  });
}

async function joinPart(ctx: Ctx, cl: Cluster, devices: number): Promise<JoinResult> {
  const j = realAgent(ctx, cl, `joiner-${devices}`, [{ name: 'r', path: cl.layout.r }]);
  ctx.agents.add(j);
  const t0 = performance.now();
  const healthyMs = await j.start(120_000);
  const names = Array.from({ length: ctx.opts.serve }, (_, i) => `r${String(i).padStart(4, '0')}`);
  await readEach(j.nbdSocket, names, t0 + 120_000);
  const servingMs = performance.now() - t0;
  const rssMiB = mib(j.memory()?.vmRss);
  await j.stop();
  ctx.agents.delete(j);
  log(
    `${cl.members} members, ${devices} devices: a joining agent healthy in ${fmtMs(healthyMs)} ms, ` +
      `serving its ${names.length} devices in ${fmtMs(servingMs)} ms, RSS ${rssMiB.toFixed(0)} MiB`,
  );
  return { members: cl.members, devices, healthyMs, servingMs, rssMiB };
}

interface ChurnResult {
  members: number;
  devices: number;
  hosts: number;
  /** From the kill to each reservation's preempt answered, ms. */
  preemptMs: number[];
  /** How each preempt settled the killed host (expired expected). */
  how: Record<string, number>;
  /** From the spawn to every new member joined, and to every one serving its devices, ms. */
  joinHealthyMs: number;
  joinServingMs: number;
  probe: { before: number[]; kill: number[]; join: number[] };
}

async function churnPart(ctx: Ctx, cl: Cluster): Promise<ChurnResult> {
  const churn = cl.layout.churn;
  const proc = cl.byHost.get(churn[0]!.host)!;
  const keyOf = (i: number) => `0x${(i + 1).toString(16)}`;
  // Each churn member's identity holds Write Exclusive on its device; C is registered.
  await eachLimited(churn, 8, async (m, i) => {
    await proc.call('pr', {
      host: m.host,
      device: `c${i}`,
      body: { action: 'register', saKey: keyOf(i) },
    });
    await proc.call('pr', {
      host: m.host,
      device: `c${i}`,
      body: { action: 'reserve', key: keyOf(i), type: 'WE' },
    });
    await cl.c.must(
      'POST',
      `/v1/devices/c${i}/pr`,
      { action: 'register', as: 'c', saKey: '0xc' },
      200,
    );
  });
  const probe = new PrToggle(cl.a, 'probe', 'p');
  await probe.times(WARMUP);
  const before = await probe.times(20);

  const t0 = performance.now();
  proc.signal('SIGKILL');
  const how: Record<string, number> = {};
  const preemptMs: number[] = [];
  const preempts = eachLimited(churn, churn.length, async (m, i) => {
    for (;;) {
      const r = await cl.c.api('POST', `/v1/devices/c${i}/pr`, {
        action: 'preempt-abort',
        as: 'c',
        key: '0xc',
        saKey: keyOf(i),
        type: 'WE',
      });
      if (r.status === 200) {
        preemptMs.push(performance.now() - t0);
        const hosts = (r.body.settled as { hosts?: { host: string; how: string }[] })?.hosts ?? [];
        const h = hosts.find((x) => x.host === m.host)?.how ?? 'not waited for';
        how[h] = (how[h] ?? 0) + 1;
        return;
      }
      if (performance.now() - t0 > 120_000) throw new Error(`preempt of c${i}: ${r.text}`);
      await sleep(50);
    }
  });
  const kill = await probe.during(preempts);
  await preempts;
  await proc.exited;
  cl.procs = cl.procs.filter((p) => p !== proc);
  log(
    `${cl.members} members: ${churn.length} killed; every reservation preempted ` +
      `${fmtMs(Math.max(...preemptMs))} ms after the kill (${JSON.stringify(how)})`,
  );

  // As many new members at once, declaring what the killed ones did.
  const joiners = churn.map((m, i) => ({ host: `j${String(i).padStart(4, '0')}`, pools: m.pools }));
  const expect: Record<string, number> = {};
  for (const jm of joiners) {
    expect[jm.host] = jm.pools.reduce((n, p) => {
      const k = cl.layout.pools.findIndex((x) => x.name === p.name);
      return n + (k >= 0 ? perPool(k, cl.layout.pools.length, cl.seeded) : 1);
    }, 0);
  }
  const t1 = performance.now();
  const jp = spawnHollow(ctx, hollowSpec(ctx, cl, 'joiners', joiners, joiners.length));
  const joined = (async () => {
    await jp.ready;
    const healthy = performance.now() - t1;
    await jp.call('serving', { expect, timeoutMs: 300_000 });
    return { healthy, serving: performance.now() - t1 };
  })();
  const join = await probe.during(joined);
  const j = await joined;
  cl.procs.push(jp);
  log(
    `${cl.members} members: ${joiners.length} joined at once: all healthy in ${fmtMs(j.healthy)} ms, ` +
      `serving in ${fmtMs(j.serving)} ms`,
  );
  return {
    members: cl.members,
    devices: cl.seeded,
    hosts: churn.length,
    preemptMs,
    how,
    joinHealthyMs: j.healthy,
    joinServingMs: j.serving,
    probe: { before, kill, join },
  };
}

interface FailoverResult {
  members: number;
  devices: number;
  ttl: number;
  preemptMs: number;
  writeMs: number;
  howA: string;
}

async function failoverPart(ctx: Ctx, cl: Cluster): Promise<FailoverResult> {
  const s = await failOver(cl.a, cl.b, ctx.opts.ttl, (m) => log(`fail-over: ${m}`));
  ctx.agents.delete(cl.a);
  log(
    `${cl.members} members: fail-over: preempt answered ${fmtMs(s.preemptMs)} ms after the kill, ` +
      `B's write ${fmtMs(s.writeMs)} ms (A ${s.howA})`,
  );
  return {
    members: cl.members,
    devices: cl.seeded,
    ttl: s.ttl,
    preemptMs: s.preemptMs,
    writeMs: s.writeMs,
    howA: s.howA,
  };
}

// ---- the report ---------------------------------------------------------------------

interface Results {
  latency: LatencyResult[];
  join: JoinResult[];
  churn: ChurnResult[];
  failover: FailoverResult[];
  clusters: { members: number; hollowStartMs: number; seeds: Cluster['seeds'] }[];
  errors: { members: number; devices?: number; part: string; error: string }[];
}

const label = (members: number) => `${members + 3} (${members} hollow)`;
const pcts = (xs: number[]): Percentiles => percentiles(xs);

function tables(r: Results, opts: ScaleOptions): string {
  const out: string[] = [];
  if (r.latency.length > 0) {
    out.push(
      'Latency through agent A (ms; each change after the previous answered; device served by A, B, C)\n',
      markdownTable(
        ['members', 'devices', ...OP_KINDS.flatMap((k) => [`${k} p50`, `${k} p99`])],
        r.latency.map((x) => [
          label(x.members),
          String(x.devices),
          ...OP_KINDS.flatMap((k) => [fmtMs(pcts(x.ops[k]).p50), fmtMs(pcts(x.ops[k]).p99)]),
        ]),
        2,
      ),
      '\netcd per change (idle rates taken off): keys written / write requests / watch events sent / etcd CPU ms\n',
      markdownTable(
        ['members', 'devices', ...OP_KINDS],
        r.latency.map((x) => [
          label(x.members),
          String(x.devices),
          ...OP_KINDS.map((k) => {
            const p = x.perChange[k];
            return `${p.keyWrites.toFixed(1)} / ${p.requests.toFixed(1)} / ${p.events.toFixed(0)} / ${p.etcdCpuMs.toFixed(1)}`;
          }),
        ]),
        2,
      ),
      '\nWhere the key writes of a change go (per change, by key prefix; fewest and most members, most devices)\n',
      markdownTable(
        ['members', 'devices', 'change', 'keys written by prefix'],
        byPrefixRows(r.latency),
        4,
      ),
      '\netcd at rest, and memory\n',
      markdownTable(
        [
          'members',
          'devices',
          'seeded/s',
          'db MiB (in use)',
          'keys',
          'watchers',
          'watch streams',
          'idle msgs/s',
          'idle etcd CPU %',
          'RSS A / B / C MiB',
          'hollow MiB per member',
          'hollow loop delay p99 / max ms',
          'hollow keepalive failures',
        ],
        r.latency.map((x) => [
          label(x.members),
          String(x.devices),
          Number.isFinite(x.seedPerSecond) ? x.seedPerSecond.toFixed(0) : '-',
          `${(x.etcd.dbBytes / 2 ** 20).toFixed(1)} (${(x.etcd.dbInUseBytes / 2 ** 20).toFixed(1)})`,
          String(x.etcd.keys),
          String(x.etcd.watchers),
          String(x.etcd.streams),
          x.idle.messages.toFixed(0),
          (x.idle.cpu * 100).toFixed(0),
          `${x.rssMiB.a.toFixed(0)} / ${x.rssMiB.b.toFixed(0)} / ${x.rssMiB.c.toFixed(0)}`,
          Number.isFinite(x.hollow.perMemberMiB) ? x.hollow.perMemberMiB.toFixed(2) : '-',
          x.members > 0
            ? `${fmtMs(x.hollow.loopDelayP99Ms)} / ${fmtMs(x.hollow.loopDelayMaxMs)}`
            : '-',
          x.members > 0 ? String(x.hollow.keepaliveFailures) : '-',
        ]),
        2,
      ),
    );
    const behind = r.latency.filter((x) => x.hollow.keepaliveFailures > 0);
    if (behind.length > 0) {
      out.push(
        `\n**The hollow members did not keep up** at ${behind.map((x) => `${label(x.members)} with ${x.devices} devices`).join('; ')}: ` +
          'they failed keepalives (and lost leases) during the measurement, so the figures there measure this machine running them, not the cluster.',
      );
    }
  }
  if (r.join.length > 0) {
    out.push(
      `\nA real agent joining with pool r (${opts.serve} devices)\n`,
      markdownTable(
        ['members', 'devices', 'to /healthz, ms', 'to serving all, ms', 'RSS MiB'],
        r.join.map((x) => [
          label(x.members),
          String(x.devices),
          fmtMs(x.healthyMs),
          fmtMs(x.servingMs),
          x.rssMiB.toFixed(0),
        ]),
        2,
      ),
    );
  }
  if (r.churn.length > 0) {
    out.push(
      "\nChurn: hollow members killed at once, then as many joining at once; probe = A's PR changes meanwhile (ms)\n",
      markdownTable(
        [
          'members',
          'devices',
          'hosts',
          'kill → all preempted',
          'how',
          'join → all healthy',
          'join → all serving',
          'probe p50/p99 before',
          'during kill',
          'during join',
        ],
        r.churn.map((x) => {
          const pp = (xs: number[]) => `${fmtMs(pcts(xs).p50)} / ${fmtMs(pcts(xs).p99)}`;
          return [
            label(x.members),
            String(x.devices),
            String(x.hosts),
            fmtMs(Math.max(...x.preemptMs)),
            Object.entries(x.how)
              .map(([k, v]) => `${v} ${k}`)
              .join(', '),
            fmtMs(x.joinHealthyMs),
            fmtMs(x.joinServingMs),
            pp(x.probe.before),
            pp(x.probe.kill),
            pp(x.probe.join),
          ];
        }),
        2,
      ),
    );
  }
  if (r.failover.length > 0) {
    out.push(
      `\nFail-over: kill -9 of A holding Write Exclusive; B preempts and writes (lease TTL ${opts.ttl} s)\n`,
      markdownTable(
        ['members', 'devices', 'kill → preempt answered, ms', 'kill → B writes, ms', 'A was'],
        r.failover.map((x) => [
          label(x.members),
          String(x.devices),
          fmtMs(x.preemptMs),
          fmtMs(x.writeMs),
          x.howA,
        ]),
        2,
      ),
    );
  }
  return out.join('\n');
}

function byPrefixRows(lat: LatencyResult[]): string[][] {
  if (lat.length === 0) return [];
  const d = Math.max(...lat.map((x) => x.devices));
  const ms = lat.filter((x) => x.devices === d).map((x) => x.members);
  const pick = [...new Set([Math.min(...ms), Math.max(...ms)])];
  return pick.flatMap((m) => {
    const x = lat.find((y) => y.members === m && y.devices === d)!;
    return OP_KINDS.map((k) => [
      label(m),
      String(d),
      k,
      Object.entries(x.perChange[k].byPrefix ?? {})
        .sort((a, b) => b[1] - a[1])
        .map(([p, v]) => `${p} ${v}`)
        .join(', '),
    ]);
  });
}

interface Goal {
  goal: string;
  measured: string;
  verdict: 'met' | 'not met' | 'not measured';
}

function goals(r: Results, opts: ScaleOptions): Goal[] {
  const out: Goal[] = [];
  const lat = r.latency;
  const lo = Math.min(...lat.map((x) => x.members));
  const hi = Math.max(...lat.map((x) => x.members));
  const ds = [...new Set(lat.map((x) => x.devices))];
  const find = (m: number, d: number) => lat.find((x) => x.members === m && x.devices === d);
  // 1. latency at the most members within 1.5x of the fewest, same devices, same serving hosts
  const ratios: string[] = [];
  let worst = 0;
  for (const d of ds) {
    const a = find(lo, d);
    const b = find(hi, d);
    if (!a || !b || lo === hi) continue;
    const at: string[] = [];
    for (const k of ['create', 'resize', 'pr'] as const) {
      for (const p of ['p50', 'p99'] as const) {
        const q = pcts(b.ops[k])[p] / pcts(a.ops[k])[p];
        worst = Math.max(worst, q);
        at.push(`${k} ${p} ${q.toFixed(2)}x`);
      }
    }
    ratios.push(`${d} devices: ${at.join(', ')}`);
  }
  out.push({
    goal:
      lat.length > 0
        ? `latency at ${label(hi)} members within 1.5x of ${label(lo)}, devices served by ${SERVING} hosts`
        : `latency at the most members within 1.5x of the fewest, devices served by ${SERVING} hosts`,
    measured: ratios.length > 0 ? `worst ${worst.toFixed(2)}x; ${ratios.join('; ')}` : '-',
    verdict: ratios.length === 0 ? 'not measured' : worst <= 1.5 ? 'met' : 'not met',
  });
  // 2. etcd writes per change <= serving agents + 2
  let most = 0;
  let where = '';
  for (const x of lat) {
    for (const k of ['create', 'resize', 'pr', 'delete'] as const) {
      if (x.perChange[k].keyWrites > most) {
        most = x.perChange[k].keyWrites;
        where = `${k} at ${label(x.members)}, ${x.devices} devices`;
      }
    }
  }
  out.push({
    goal: `etcd key writes per change <= serving agents + 2 (${SERVING + 2})`,
    measured: lat.length > 0 ? `at most ${most.toFixed(1)} (${where})` : '-',
    verdict: lat.length === 0 ? 'not measured' : most <= SERVING + 2 ? 'met' : 'not met',
  });
  // 3. a real agent's RSS independent of the devices it does not serve (+-10 %, fewest to most devices)
  const spread: string[] = [];
  let rssOk = true;
  let rssSeen = false;
  for (const m of [...new Set(r.join.map((x) => x.members))]) {
    const xs = r.join.filter((x) => x.members === m).sort((a, b) => a.devices - b.devices);
    if (xs.length < 2) continue;
    rssSeen = true;
    const q = xs.at(-1)!.rssMiB / xs[0]!.rssMiB - 1;
    if (Math.abs(q) > 0.1) rssOk = false;
    spread.push(
      `${label(m)}: ${xs[0]!.rssMiB.toFixed(0)} MiB at ${xs[0]!.devices} → ${xs.at(-1)!.rssMiB.toFixed(0)} MiB at ${xs.at(-1)!.devices} (${q >= 0 ? '+' : ''}${(q * 100).toFixed(0)} %)`,
    );
  }
  out.push({
    goal: `a real agent serving ${opts.serve} devices: RSS within ±10 % from the fewest to the most devices in the cluster`,
    measured: spread.join('; ') || '-',
    verdict: !rssSeen ? 'not measured' : rssOk ? 'met' : 'not met',
  });
  // 4. a joining host serving 100 devices healthy in < 3 s with the most devices in the cluster
  const dmax = Math.max(...r.join.map((x) => x.devices));
  const joins = r.join.filter((x) => x.devices === dmax);
  out.push({
    goal: `a joining agent serving ${opts.serve} devices healthy in < 3 s with ${Number.isFinite(dmax) ? dmax : '-'} devices in the cluster`,
    measured:
      joins
        .map(
          (x) => `${label(x.members)}: ${fmtMs(x.healthyMs)} ms (serving ${fmtMs(x.servingMs)} ms)`,
        )
        .join('; ') || '-',
    verdict:
      joins.length === 0
        ? 'not measured'
        : joins.every((x) => x.healthyMs < 3000)
          ? 'met'
          : 'not met',
  });
  // 5. fail-over < lease TTL + 1 s at the most members
  const fo = r.failover.filter((x) => x.members === Math.max(...r.failover.map((y) => y.members)));
  out.push({
    goal: `fail-over < lease TTL + 1 s (${opts.ttl + 1} s) at the most members`,
    measured:
      fo
        .map((x) => `${label(x.members)}: B writes ${fmtMs(x.writeMs)} ms after the kill`)
        .join('; ') || '-',
    verdict:
      fo.length === 0
        ? 'not measured'
        : fo.every((x) => x.writeMs < (opts.ttl + 1) * 1000)
          ? 'met'
          : 'not met',
  });
  return out;
}

// ---- the suite ----------------------------------------------------------------------

export async function scaleMain(argv: string[], root: string): Promise<number> {
  let opts: ScaleOptions;
  try {
    opts = parseScaleOptions(argv);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${SCALE_USAGE}`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(SCALE_USAGE);
    return 0;
  }
  const ballastPath = isAbsolute(opts.ballast) ? opts.ballast : resolve(root, opts.ballast);
  const outPath = isAbsolute(opts.out) ? opts.out : resolve(root, opts.out);
  if (!existsSync(ballastPath) || !existsSync(hollowScript())) {
    log(`${ballastPath} or ${hollowScript()} does not exist (npm run build first)`);
    return 2;
  }
  try {
    if ((await run('etcd', ['--version'], 20_000)).code !== 0) throw new Error('no etcd');
  } catch {
    log('missing tools; install with:  apt-get install -y etcd-server');
    return 2;
  }
  const tmp = await mkdtemp(join(opts.dir ?? os.tmpdir(), 'ballast-bench-scale-'));
  const ctx: Ctx = {
    opts,
    tmp,
    ballast: ballastInvocation(ballastPath),
    agents: new Set(),
    hollows: new Set(),
    hollowBaselineKiB: 0,
  };
  const onSignal = (sig: NodeJS.Signals): void => {
    log(`${sig}: stopping`);
    for (const p of ctx.hollows) p.signal('SIGKILL');
    killAll();
    void rm(tmp, { recursive: true, force: true }).finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const loadStart = os.loadavg();
  const startedAt = new Date().toISOString();
  log(
    `members ${opts.members.join(',')} (+3 real agents); devices ${opts.devices.join(',')}; ` +
      `${opts.ops} changes per kind; parts ${opts.parts.join(', ')}; lease TTL ${opts.ttl} s; ${tmp}`,
  );
  const results: Results = {
    latency: [],
    join: [],
    churn: [],
    failover: [],
    clusters: [],
    errors: [],
  };
  const attempt = async (
    members: number,
    part: string,
    fn: () => Promise<void>,
    devices?: number,
  ): Promise<boolean> => {
    try {
      await fn();
      return true;
    } catch (e) {
      log(
        `${members} members${devices ? `, ${devices} devices` : ''}: ${part} FAILED: ${(e as Error).stack ?? e}`,
      );
      results.errors.push({ members, devices, part, error: (e as Error).message });
      return false;
    }
  };
  try {
    for (const members of opts.members) {
      let cl: Cluster | undefined;
      const up = await attempt(members, 'start', async () => {
        cl = await startCluster(ctx, members);
        await realDevices(ctx, cl);
      });
      if (!up || !cl) {
        if (cl) await stopCluster(ctx, cl, true);
        continue;
      }
      const c = cl;
      let seeded = true;
      for (const devices of opts.devices) {
        seeded = await attempt(members, 'seed', () => seedTo(ctx, c, devices), devices);
        // A cluster that could not be seeded is not measured further.
        if (!seeded) break;
        if (opts.parts.includes('latency')) {
          await attempt(
            members,
            'latency',
            async () => {
              const x = await latencyPart(ctx, c, devices);
              results.latency.push(x);
              log(
                `${members} members, ${devices} devices: create p50 ${fmtMs(pcts(x.ops.create).p50)} ms, ` +
                  `PR p50 ${fmtMs(pcts(x.ops.pr).p50)} ms, ${x.perChange.create.keyWrites.toFixed(1)} key writes per create`,
              );
            },
            devices,
          );
        }
        if (opts.parts.includes('join')) {
          await attempt(
            members,
            'join',
            async () => void results.join.push(await joinPart(ctx, c, devices)),
            devices,
          );
        }
      }
      if (seeded && opts.parts.includes('churn') && c.layout.churn.length > 0) {
        await attempt(
          members,
          'churn',
          async () => void results.churn.push(await churnPart(ctx, c)),
        );
      }
      if (seeded && opts.parts.includes('failover')) {
        await attempt(
          members,
          'failover',
          async () => void results.failover.push(await failoverPart(ctx, c)),
        );
      }
      results.clusters.push({ members, hollowStartMs: c.hollowStartMs, seeds: c.seeds });
      await stopCluster(ctx, c);
    }
  } finally {
    for (const p of ctx.hollows) p.signal('SIGKILL');
    for (const a of ctx.agents) await a.kill9();
    await rm(tmp, { recursive: true, force: true }).catch(() => {});
  }
  const loadEnd = os.loadavg();
  const verdicts = goals(results, opts);
  process.stdout.write(
    `\nScale: 3-member etcd on loopback, 3 real agents + hollow members; ${os.cpus().length} CPUs, ` +
      `load average ${loadStart[0]?.toFixed(1)} at start, ${loadEnd[0]?.toFixed(1)} at end; ` +
      `lease TTL ${opts.ttl} s\n\n${tables(results, opts)}\n\nGoals (issue 27)\n\n` +
      `${markdownTable(
        ['goal', 'measured', 'verdict'],
        verdicts.map((g) => [g.goal, g.measured, g.verdict]),
        3,
      )}\n`,
  );
  if (results.errors.length > 0) {
    process.stdout.write(
      `\n${results.errors.length} part(s) failed: ${results.errors.map((e) => `${e.part} at ${e.members} members`).join(', ')} (see the log)\n`,
    );
  }
  await writeResults(
    outPath,
    { startedAt, loadStart, options: opts },
    {
      hollowBaselineMiB: mib(ctx.hollowBaselineKiB),
      results,
      goals: verdicts,
    },
  );
  log(`raw results: ${outPath}`);
  return results.errors.length > 0 ? 1 : 0;
}
