// The cluster benchmarks (`npm run bench -- --suite cluster`, see BENCHMARKING.md):
// a real 3-member etcd on loopback ports and real `ballast agent` processes,
// each a "host" with its own directory, all declaring one shared pool. Every
// part uses a cluster name of its own (its own key prefix) in the one etcd.
//
// Tables (Markdown) go to stdout, progress to stderr, every sample to
// bench-results/cluster.json.

import { existsSync, linkSync, unlinkSync } from 'node:fs';
import { mkdtemp, open, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { isAbsolute, join, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import { Fence } from '../cluster/fence.js';
import { NbdClient } from '../nbd/client.js';
import { type EtcdCluster, startEtcdCluster } from '../test/harness/local-etcd.js';
import { BenchAgent } from './cluster-agent.js';
import { type ClusterBenchOptions, type Part, parseClusterOptions } from './cluster-options.js';
import {
  fmtMs,
  type HistogramSums,
  histogramDelta,
  histogramSums,
  markdownTable,
  median,
  type Percentiles,
  percentiles,
} from './cluster-stats.js';
import { JOBS, prefill, runFio } from './fio.js';
import { cpuSeconds, killAll, run } from './proc.js';
import { writeResults } from './results.js';
import { ballastInvocation } from './servers.js';

const log = (msg: string): void => {
  process.stderr.write(`[bench:cluster] ${msg}\n`);
};

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

interface Ctx {
  opts: ClusterBenchOptions;
  etcd: EtcdCluster;
  tmp: string;
  ballast: { command: string; args: string[] };
  /** Agents started and not yet stopped, so a failure takes them down. */
  agents: Set<BenchAgent>;
  seq: number;
}

/** A fresh cluster name (its own key prefix in the one etcd). */
function clusterName(ctx: Ctx, what: string): string {
  ctx.seq++;
  return `bench-${what}-${ctx.seq}`;
}

/** Agents for `hosts` of one cluster (or one single-host agent when `name` is null). */
function makeAgents(
  ctx: Ctx,
  name: string | null,
  hosts: string[],
  extra: { leaseTtl?: number; tcp?: boolean } = {},
): BenchAgent[] {
  const base = join(ctx.tmp, name ?? `single-${++ctx.seq}`);
  return hosts.map((host) => {
    const a = new BenchAgent(
      {
        dir: join(base, host),
        tcp: extra.tcp,
        ...(name === null
          ? {}
          : {
              shared: join(base, 'shared'),
              cluster: {
                name,
                etcd: ctx.etcd.endpoints,
                host,
                leaseTtl: extra.leaseTtl ?? 5,
              },
            }),
      },
      ctx.ballast,
    );
    return a;
  });
}

async function startAll(ctx: Ctx, agents: BenchAgent[]): Promise<void> {
  // One at a time: a cluster's agents join in a known order.
  for (const a of agents) {
    ctx.agents.add(a);
    await a.start();
  }
}

async function stopAll(ctx: Ctx, agents: BenchAgent[]): Promise<void> {
  await Promise.all(agents.map((a) => a.stop()));
  for (const a of agents) ctx.agents.delete(a);
}

/** Times `fn`; milliseconds. */
async function timed(fn: () => Promise<unknown>): Promise<number> {
  const t0 = performance.now();
  await fn();
  return performance.now() - t0;
}

const pctCells = (p: Percentiles): string[] => [
  String(p.n),
  fmtMs(p.p50),
  fmtMs(p.p90),
  fmtMs(p.p99),
  fmtMs(p.max),
];
const PCT_HEADER = ['n', 'p50 ms', 'p90 ms', 'p99 ms', 'max ms'];

// ---- where the time goes: the agent's store round trips, etcd's disk -----------

interface Scrape {
  store: Map<string, HistogramSums>;
  wal: HistogramSums;
  commit: HistogramSums;
}

async function scrape(ctx: Ctx, a: BenchAgent): Promise<Scrape> {
  const text = (await a.must('GET', '/metrics', undefined, 200)).text;
  const sum = (texts: string[], metric: string): HistogramSums => {
    const t = { count: 0, sum: 0 };
    for (const x of texts) {
      const h = histogramSums(x, metric).get('') ?? { count: 0, sum: 0 };
      t.count += h.count;
      t.sum += h.sum;
    }
    return t;
  };
  const etcdTexts = await Promise.all(
    ctx.etcd.endpoints.map(async (e) => (await fetch(`${e}/metrics`)).text()),
  );
  return {
    store: histogramSums(text, 'ballast_store_round_trip_seconds'),
    wal: sum(etcdTexts, 'etcd_disk_wal_fsync_duration_seconds'),
    commit: sum(etcdTexts, 'etcd_disk_backend_commit_duration_seconds'),
  };
}

/** Per operation: the store calls the agent made (count x mean) and etcd's disk syncs. */
function profileCells(before: Scrape, after: Scrape, ops: number): string[] {
  const d = histogramDelta(before.store, after.store);
  const calls = [...d]
    .sort((x, y) => y[1].sum - x[1].sum)
    .map(
      ([k, h]) =>
        `${k.replace(/^op="(.*)"$/, '$1')} ${(h.count / ops).toFixed(1)} x ${fmtMs((h.sum / h.count) * 1000)} ms`,
    );
  const mean = (a: HistogramSums, b: HistogramSums) =>
    a.count > b.count ? fmtMs(((a.sum - b.sum) / (a.count - b.count)) * 1000) : '-';
  const inStore = [...d.values()].reduce((t, h) => t + h.sum, 0);
  return [
    calls.join(', '),
    fmtMs((inStore / ops) * 1000),
    mean(after.wal, before.wal),
    mean(after.commit, before.commit),
  ];
}

const PROFILE_HEADER = [
  'store calls per op (count x mean)',
  'in store calls, ms/op',
  'etcd WAL fsync, mean ms',
  'etcd backend commit, mean ms',
];

// ---- 1. catalog operations --------------------------------------------------

interface CatalogResult {
  config: string;
  ops: Record<string, number[]>;
}

async function catalogPart(ctx: Ctx): Promise<{ table: string; raw: CatalogResult[] }> {
  const n = ctx.opts.ops;
  const configs: { label: string; cluster: boolean; agents: number }[] = [
    { label: 'single host, SQLite', cluster: false, agents: 1 },
    { label: 'etcd (3 members), 1 agent', cluster: true, agents: 1 },
    { label: 'etcd (3 members), 3 agents', cluster: true, agents: 3 },
  ];
  const raw: CatalogResult[] = [];
  const profiles: string[][] = [];
  for (const c of configs) {
    const name = c.cluster ? clusterName(ctx, 'catalog') : null;
    const agents = makeAgents(ctx, name, ['a', 'b', 'c'].slice(0, c.agents));
    await startAll(ctx, agents);
    const a = agents[0]!;
    const pool = a.servingPool;
    // Warm-up, not recorded: the first requests pay for JIT and connections.
    for (let i = 0; i < 10; i++) {
      await a.must('POST', '/v1/devices', { name: `w${i}`, size: '1M', pool }, 201);
      await a.must('POST', `/v1/devices/w${i}/resize`, { size: '2M' }, 200);
      await a.must('GET', '/v1/devices', undefined, 200);
      await a.must('DELETE', `/v1/devices/w${i}`, undefined, 200);
    }
    const ops: Record<string, number[]> = { create: [], resize: [], list: [], delete: [] };
    const before = c.cluster ? await scrape(ctx, a) : undefined;
    for (let i = 0; i < n; i++) {
      ops.create!.push(
        await timed(() => a.must('POST', '/v1/devices', { name: `d${i}`, size: '1M', pool }, 201)),
      );
    }
    if (before)
      profiles.push([c.label, 'create', ...profileCells(before, await scrape(ctx, a), n)]);
    for (let i = 0; i < n; i++) {
      ops.resize!.push(
        await timed(() => a.must('POST', `/v1/devices/d${i}/resize`, { size: '2M' }, 200)),
      );
    }
    for (let i = 0; i < n; i++) {
      ops.list!.push(await timed(() => a.must('GET', '/v1/devices', undefined, 200)));
    }
    for (let i = 0; i < n; i++) {
      ops.delete!.push(await timed(() => a.must('DELETE', `/v1/devices/d${i}`, undefined, 200)));
    }
    await stopAll(ctx, agents);
    raw.push({ config: c.label, ops });
    log(
      `catalog, ${c.label}: create p50 ${fmtMs(percentiles(ops.create!).p50)} ms, ` +
        `p99 ${fmtMs(percentiles(ops.create!).p99)} ms`,
    );
  }
  const rows: string[][] = [];
  for (const op of ['create', 'resize', 'list', 'delete']) {
    for (const r of raw) rows.push([op, r.config, ...pctCells(percentiles(r.ops[op]!))]);
  }
  const table =
    `${markdownTable(['operation', 'store', ...PCT_HEADER], rows, 2)}\n\n` +
    `Where a create's time goes (agent A's ballast_store_round_trip_seconds over the timed creates; ` +
    `etcd's disk metrics, all members)\n\n` +
    markdownTable(['store', 'operation', ...PROFILE_HEADER], profiles, 3);
  return { table, raw };
}

// ---- 2. watch propagation ---------------------------------------------------

interface PropagationSample {
  /** A's resize: request sent to answer received. */
  changeMs: number;
  /** From A's request sent to B's first answer showing the new size. */
  fromRequestMs: number;
  /** From A's answer received to B's first answer showing the new size (<= 0: B had it first). */
  fromAnswerMs: number;
  /** Polls of B it took. */
  polls: number;
}

async function propagationPart(
  ctx: Ctx,
): Promise<{ table: string; raw: PropagationSample[]; pollMs: number[] }> {
  const name = clusterName(ctx, 'watch');
  const agents = makeAgents(ctx, name, ['a', 'b', 'c']);
  await startAll(ctx, agents);
  const [a, b] = agents as [BenchAgent, BenchAgent];
  // A host-local device of A: A's changes to it are one etcd write each and A
  // answers without waiting for other hosts, so the change reaches B only
  // through B's watch. A grow is that one write, after the file was grown.
  await a.must('POST', '/v1/devices', { name: 'p', size: '1M', pool: 'local' }, 201);
  const samples: PropagationSample[] = [];
  // What one poll of B costs (B's answer from its cache).
  const pollMs: number[] = [];
  for (let i = 0; i < 50; i++) {
    pollMs.push(await timed(() => b.must('GET', '/v1/devices/p', undefined, 200)));
  }
  for (let i = -5; i < ctx.opts.ops; i++) {
    const size = (i + 7) * 2 ** 20;
    let answered = Number.NaN;
    const t0 = performance.now();
    const change = a.must('POST', '/v1/devices/p/resize', { size }, 200).then(() => {
      answered = performance.now();
    });
    // Back to back: each poll is sent as soon as the previous one answered.
    let polls = 0;
    let seen = Number.NaN;
    const deadline = t0 + 10_000;
    while (performance.now() < deadline) {
      polls++;
      const r = await b.must('GET', '/v1/devices/p', undefined, 200);
      if (r.body.size === size) {
        seen = performance.now();
        break;
      }
    }
    await change;
    if (!Number.isFinite(seen)) throw new Error(`B did not see size ${size} within 10 s`);
    if (i >= 0) {
      samples.push({
        changeMs: answered - t0,
        fromRequestMs: seen - t0,
        fromAnswerMs: seen - answered,
        polls,
      });
    }
  }
  await stopAll(ctx, agents);
  const row = (what: string, xs: number[]) => [what, ...pctCells(percentiles(xs))];
  const table = markdownTable(
    ['measure (3 agents; A grows its device, B polled)', ...PCT_HEADER],
    [
      row(
        'B shows it, from A request sent',
        samples.map((s) => s.fromRequestMs),
      ),
      row(
        'B shows it, after A answered (0 if before)',
        samples.map((s) => Math.max(0, s.fromAnswerMs)),
      ),
      row(
        'A resize (request to answer)',
        samples.map((s) => s.changeMs),
      ),
      row('one poll of B (GET /v1/devices/NAME)', pollMs),
    ],
  );
  const first = samples.filter((s) => s.fromAnswerMs <= 0).length;
  log(`propagation: B showed the change before A's answer arrived in ${first}/${samples.length}`);
  return { table, raw: samples, pollMs };
}

// ---- 3. agent start with many devices -----------------------------------------

interface StartSample {
  config: string;
  healthzMs: number;
  listedMs: number;
  rssMiB: number;
  hwmMiB: number;
}

/** Creates `n` devices through `a`, `parallel` requests at a time. */
async function createMany(a: BenchAgent, n: number, pool: string, parallel = 8): Promise<void> {
  let next = 0;
  const worker = async () => {
    for (;;) {
      const i = next++;
      if (i >= n) return;
      await a.must('POST', '/v1/devices', { name: `s${i}`, size: '1M', pool }, 201);
    }
  };
  await Promise.all(Array.from({ length: parallel }, worker));
}

/** Starts `a`, waits until it lists `want` devices; times both and reads its memory. */
async function timeStart(a: BenchAgent, want: number, config: string): Promise<StartSample> {
  const t0 = performance.now();
  const healthzMs = await a.start();
  let listedMs = Number.NaN;
  const deadline = performance.now() + 120_000;
  while (performance.now() < deadline) {
    const r = await a.must('GET', '/v1/devices', undefined, 200);
    const devs = r.body.devices;
    if (Array.isArray(devs) && devs.length === want) {
      listedMs = performance.now() - t0;
      break;
    }
    await sleep(5);
  }
  if (!Number.isFinite(listedMs)) throw new Error(`${config}: the agent never listed ${want}`);
  const mem = a.memory();
  return {
    config,
    healthzMs,
    listedMs,
    rssMiB: (mem?.vmRss ?? Number.NaN) / 1024,
    hwmMiB: (mem?.vmHwm ?? Number.NaN) / 1024,
  };
}

async function startPart(ctx: Ctx): Promise<{ table: string; raw: StartSample[] }> {
  const n = ctx.opts.devices;
  const rounds = ctx.opts.startRounds;
  const raw: StartSample[] = [];

  // The cluster: a seed agent creates the devices in the shared pool (so every
  // agent serves all of them) and stays up; new hosts join it.
  const name = clusterName(ctx, 'start');
  const hosts = ['seed', ...Array.from({ length: rounds }, (_, r) => `new${r}`)];
  const agents = makeAgents(ctx, name, hosts);
  const [seed, ...joiners] = agents as [BenchAgent, ...BenchAgent[]];
  await startAll(ctx, [seed]);
  const tc = performance.now();
  await createMany(seed, n, 'shared');
  log(`start: ${n} devices created in ${((performance.now() - tc) / 1000).toFixed(1)} s (etcd)`);
  const clusterLabel = `etcd, ${n} devices, a new host joins`;
  for (const j of joiners) {
    ctx.agents.add(j);
    const s = await timeStart(j, n, clusterLabel);
    raw.push(s);
    log(
      `start: ${clusterLabel}: healthz ${fmtMs(s.healthzMs)} ms, listed ${fmtMs(s.listedMs)} ms, RSS ${s.rssMiB.toFixed(0)} MiB`,
    );
    await stopAll(ctx, [j]);
  }
  // The seed itself restarted on its data dir.
  const restartLabel = `etcd, ${n} devices, a host restarts`;
  await stopAll(ctx, [seed]);
  for (let r = 0; r < rounds; r++) {
    ctx.agents.add(seed);
    raw.push(await timeStart(seed, n, restartLabel));
    await stopAll(ctx, [seed]);
  }

  // References: an empty cluster, and a single host (SQLite) with as many devices.
  const emptyName = clusterName(ctx, 'start-empty');
  const empty = makeAgents(ctx, emptyName, ['e0']);
  for (let r = 0; r < rounds; r++) {
    ctx.agents.add(empty[0]!);
    raw.push(await timeStart(empty[0]!, 0, 'etcd, 0 devices'));
    await stopAll(ctx, empty);
  }
  const [single] = makeAgents(ctx, null, ['single']) as [BenchAgent];
  await startAll(ctx, [single]);
  const ts = performance.now();
  await createMany(single, n, 'local');
  log(`start: ${n} devices created in ${((performance.now() - ts) / 1000).toFixed(1)} s (SQLite)`);
  await stopAll(ctx, [single]);
  for (let r = 0; r < rounds; r++) {
    ctx.agents.add(single);
    raw.push(await timeStart(single, n, `single host, SQLite, ${n} devices`));
    await stopAll(ctx, [single]);
  }

  const labels = [...new Set(raw.map((s) => s.config))];
  const rows = labels.map((l) => {
    const xs = raw.filter((s) => s.config === l);
    const m = (f: (s: StartSample) => number) => median(xs.map(f));
    return [
      l,
      String(xs.length),
      fmtMs(m((s) => s.healthzMs)),
      fmtMs(m((s) => s.listedMs)),
      `${fmtMs(Math.min(...xs.map((s) => s.listedMs)))}-${fmtMs(Math.max(...xs.map((s) => s.listedMs)))}`,
      m((s) => s.rssMiB).toFixed(0),
      m((s) => s.hwmMiB).toFixed(0),
    ];
  });
  const table = markdownTable(
    [
      'agent start',
      'starts',
      'to /healthz, ms',
      'to full list, ms',
      'range, ms',
      'RSS MiB',
      'peak RSS MiB',
    ],
    rows,
  );
  return { table, raw };
}

// ---- 4. PR change latency -----------------------------------------------------

async function prPart(
  ctx: Ctx,
): Promise<{ table: string; raw: Record<string, Record<string, number[]>> }> {
  const name = clusterName(ctx, 'pr');
  const agents = makeAgents(ctx, name, ['a', 'b', 'c']);
  const [a, b, c] = agents as [BenchAgent, BenchAgent, BenchAgent];
  await startAll(ctx, [a, b]);
  await a.must('POST', '/v1/devices', { name: 'prdev', size: '1M', pool: 'shared' }, 201);
  const pr = (body: Record<string, unknown>) =>
    a.must('POST', '/v1/devices/prdev/pr', { as: 'x', ...body }, 200);
  const raw: Record<string, Record<string, number[]>> = {};
  const profiles: string[][] = [];
  const measure = async (label: string, hosts: number) => {
    const out: Record<string, number[]> = { register: [], unregister: [] };
    let before: Scrape | undefined;
    for (let i = -5; i < ctx.opts.ops; i++) {
      if (i === 0) before = await scrape(ctx, a);
      const reg = await timed(() => pr({ action: 'register', key: '0', saKey: '0x1' }));
      const unreg = await timed(() => pr({ action: 'register', key: '0x1', saKey: '0' }));
      if (i < 0) continue; // warm-up
      out.register!.push(reg);
      out.unregister!.push(unreg);
    }
    // Every serving agent must have acked the last change: check the answer's premise.
    const show = await a.must('GET', '/v1/devices/prdev/pr', undefined, 200);
    const applied = (show.body.agents as { applied?: boolean }[] | undefined) ?? [];
    if (applied.length !== hosts || !applied.every((x) => x.applied)) {
      throw new Error(`pr: expected ${hosts} agents to have applied the change: ${show.text}`);
    }
    if (before)
      profiles.push([
        label,
        'register + unregister',
        ...profileCells(before, await scrape(ctx, a), 2 * ctx.opts.ops),
      ]);
    raw[label] = out;
    log(`pr, ${label}: register p99 ${fmtMs(percentiles(out.register!).p99)} ms`);
  };
  await measure('2 serving agents', 2);
  await startAll(ctx, [c]);
  await measure('3 serving agents', 3);
  await stopAll(ctx, agents);
  const rows: string[][] = [];
  for (const [label, ops] of Object.entries(raw)) {
    for (const [op, xs] of Object.entries(ops))
      rows.push([op, label, ...pctCells(percentiles(xs))]);
  }
  const table =
    `${markdownTable(['PR change via agent A', 'agents', ...PCT_HEADER], rows, 2)}\n\n` +
    `Where a PR change's time goes (as for creates)\n\n` +
    markdownTable(['agents', 'operation', ...PROFILE_HEADER], profiles, 3);
  return { table, raw };
}

// ---- 5. fail-over ---------------------------------------------------------------

export interface FailoverSample {
  ttl: number;
  /** kill -9 of A's agent to B's preempt-abort answered (200). */
  preemptMs: number;
  /** kill -9 to the first write through B, sent after the preempt answered, acknowledged. */
  writeMs: number;
  /** kill -9 to the first write through B acknowledged (writes retried every 10 ms from the kill). */
  firstAnyWriteMs: number;
  /** Preempt attempts (a timed-out attempt is retried). */
  attempts: number;
  /** How the preempt settled A ('expired' expected). */
  howA: string;
  /** Delay between the last setup step and the kill (random phase against A's keepalives). */
  phaseMs: number;
}

/**
 * One fail-over on device `fo`, which agents A and B (hosts `a` and `b`) serve: A's guest
 * (identity `a`; local clients are named after their host) holds Write Exclusive, B's
 * (`b`) is registered, and a write through B is refused. After a random 0-1 s (the phase
 * against A's keepalives, every TTL/3) A's agent gets kill -9; at once B's preempt-abort
 * is sent, again until it answers 200, while a writer tries 4 KiB through B every 10 ms;
 * then one more write through B. Resolves once A's process is gone.
 */
export async function failOver(
  a: BenchAgent,
  b: BenchAgent,
  ttl: number,
  log: (msg: string) => void,
): Promise<FailoverSample> {
  const pr = (via: BenchAgent, body: Record<string, unknown>) =>
    via.api('POST', '/v1/devices/fo/pr', body);
  await a.must('POST', '/v1/devices/fo/pr', { action: 'register', as: 'a', saKey: '0xa' }, 200);
  await a.must(
    'POST',
    '/v1/devices/fo/pr',
    { action: 'reserve', as: 'a', key: '0xa', type: 'WE' },
    200,
  );
  await b.must('POST', '/v1/devices/fo/pr', { action: 'register', as: 'b', saKey: '0xb' }, 200);
  const nbd = await NbdClient.connect(`nbd+unix:///fo?socket=${b.nbdSocket}`);
  try {
    const block = Buffer.alloc(4096, 0xbb);
    const refused = await nbd.write(0, block).then(
      () => false,
      () => true,
    );
    if (!refused) throw new Error('failover: B wrote while A held Write Exclusive');
    const phaseMs = Math.random() * 1000;
    await sleep(phaseMs);

    const t0 = performance.now();
    a.child?.proc.kill('SIGKILL');
    let firstAny = Number.NaN;
    let stop = false;
    const writer = (async () => {
      while (!stop) {
        const ok = await nbd.write(0, block).then(
          () => true,
          () => false,
        );
        if (ok) {
          firstAny = performance.now();
          return;
        }
        await sleep(10);
      }
    })();
    let attempts = 0;
    let answer: Awaited<ReturnType<typeof pr>> | undefined;
    while (performance.now() - t0 < (ttl + 30) * 1000) {
      attempts++;
      answer = await pr(b, {
        action: 'preempt-abort',
        as: 'b',
        key: '0xb',
        saKey: '0xa',
        type: 'WE',
      });
      if (answer.status === 200) break;
      log(`preempt answered ${answer.status} ${answer.text.trim()}; again`);
    }
    const preempted = performance.now();
    if (answer?.status !== 200) throw new Error('failover: the preempt never succeeded');
    await nbd.write(0, block);
    const wrote = performance.now();
    stop = true;
    await writer;
    await a.child?.exited;
    const settled = answer.body.settled as { hosts?: { host: string; how: string }[] } | undefined;
    return {
      ttl,
      preemptMs: preempted - t0,
      writeMs: wrote - t0,
      // The retrying writer may have stopped before its next try: the write after counts too.
      firstAnyWriteMs: Math.min(Number.isFinite(firstAny) ? firstAny : wrote, wrote) - t0,
      attempts,
      howA: settled?.hosts?.find((h) => h.host === 'a')?.how ?? '?',
      phaseMs,
    };
  } finally {
    await nbd.close().catch(() => {});
  }
}

async function failoverPart(ctx: Ctx): Promise<{ table: string; raw: FailoverSample[] }> {
  const raw: FailoverSample[] = [];
  for (const ttl of ctx.opts.ttls) {
    for (let r = 0; r < ctx.opts.failoverRounds; r++) {
      const name = clusterName(ctx, `failover-${ttl}s`);
      const agents = makeAgents(ctx, name, ['a', 'b'], { leaseTtl: ttl });
      const [a, b] = agents as [BenchAgent, BenchAgent];
      await startAll(ctx, agents);
      await a.must('POST', '/v1/devices', { name: 'fo', size: '1M', pool: 'shared' }, 201);
      const s = await failOver(a, b, ttl, (m) => log(`failover ttl ${ttl}: ${m}`));
      ctx.agents.delete(a);
      await stopAll(ctx, [b]);
      raw.push(s);
      log(
        `failover ttl ${ttl} s #${r + 1}: preempt answered ${fmtMs(s.preemptMs)} ms, ` +
          `first write after it ${fmtMs(s.writeMs)} ms, first write at all ${fmtMs(s.firstAnyWriteMs)} ms (A ${s.howA})`,
      );
    }
  }
  const rows = ctx.opts.ttls.map((ttl) => {
    const xs = raw.filter((s) => s.ttl === ttl);
    const w = xs.map((s) => s.writeMs);
    return [
      `${ttl} s`,
      String(xs.length),
      fmtMs(median(xs.map((s) => s.preemptMs))),
      fmtMs(median(w)),
      `${fmtMs(Math.min(...w))}-${fmtMs(Math.max(...w))}`,
      `${fmtMs(ttl * 1000 + 1000)}`,
      w.every((x) => x < ttl * 1000 + 1000) ? 'yes' : 'no',
      fmtMs(median(xs.map((s) => s.firstAnyWriteMs))),
    ];
  });
  const table = markdownTable(
    [
      'lease TTL',
      'fail-overs',
      'kill → preempt answered, ms',
      'kill → new holder write, ms',
      'range, ms',
      'goal, ms',
      'met',
      'kill → any write through B, ms',
    ],
    rows,
  );
  return { table, raw };
}

// ---- 6. data path: fence gate ------------------------------------------------------

interface DatapathRun {
  round: number;
  kind: 'cluster' | 'single';
  job: string;
  value: number;
  /** The agent's CPU (user + system) per request over the whole fio run (ramp included), microseconds. */
  cpuUsPerRequest: number;
  ok: boolean;
  error?: string;
}

/** Nanoseconds per Fence.gate() call with an open fence (what each request pays). */
function gateCostNs(iterations = 5_000_000): number {
  const deadline = performance.now() + 3_600_000;
  const fence = new Fence(
    { leaseValidUntil: () => deadline, canServe: () => true },
    { marginMs: 0, holdMs: 1000, log: () => {} },
  );
  let open = 0;
  for (let i = 0; i < 100_000; i++) if (fence.gate() === 'open') open++;
  const t0 = process.hrtime.bigint();
  for (let i = 0; i < iterations; i++) if (fence.gate() === 'open') open++;
  const ns = Number(process.hrtime.bigint() - t0) / iterations;
  fence.close();
  if (open !== iterations + 100_000) throw new Error('the fence closed during the measurement');
  return ns;
}

async function datasync(file: string): Promise<void> {
  const fh = await open(file, 'r+');
  try {
    await fh.datasync();
  } finally {
    await fh.close();
  }
}

/** Replaces a device's sparse file by a hard link to `image` (the agent is stopped). */
function linkImage(file: string, image: string): void {
  unlinkSync(file);
  linkSync(image, file);
}

async function deviceFile(a: BenchAgent, dev: string): Promise<string> {
  const r = await a.must('GET', `/v1/devices/${dev}`, undefined, 200);
  const file = (r.body.extents as { file?: string }[] | undefined)?.[0]?.file;
  if (typeof file !== 'string') throw new Error(`no file for ${dev}: ${r.text}`);
  return file;
}

async function datapathPart(
  ctx: Ctx,
): Promise<{ table: string; raw: DatapathRun[]; gateNs: number[] }> {
  const { opts } = ctx;
  const image = join(ctx.tmp, 'disk.img');
  await writeFile(image, '');
  await truncate(image, opts.sizeMiB * 2 ** 20);
  log(`datapath: pre-filling ${image} (${opts.sizeMiB} MiB)`);
  await prefill(image, opts.sizeMiB);
  const size = `${opts.sizeMiB}M`;
  // Both agents serve the same file: their device files are hard links to the image.
  const name = clusterName(ctx, 'datapath');
  const [ca] = makeAgents(ctx, name, ['d1']) as [BenchAgent];
  const [sa] = makeAgents(ctx, null, ['single']) as [BenchAgent];
  for (const [a, pool] of [
    [ca, 'shared'],
    [sa, 'local'],
  ] as const) {
    await startAll(ctx, [a]);
    await a.must('POST', '/v1/devices', { name: 'bench', size, pool, role: 'data' }, 201);
    const file = await deviceFile(a, 'bench');
    await stopAll(ctx, [a]);
    linkImage(file, image);
  }
  const kinds = [
    { kind: 'cluster' as const, agent: ca },
    { kind: 'single' as const, agent: sa },
  ];
  const runs: DatapathRun[] = [];
  for (let round = 1; round <= opts.rounds; round++) {
    const order = round % 2 === 1 ? kinds : [...kinds].reverse();
    for (const { kind, agent } of order) {
      await startAll(ctx, [agent]);
      // The device must be served before fio sizes it.
      await agent.must('GET', '/v1/devices/bench', undefined, 200);
      for (const job of opts.jobs) {
        const spec = JOBS[job];
        const cpu0 = cpuSeconds(agent.pid);
        const res = await runFio({
          uri: `nbd+unix:///bench?socket=${agent.nbdSocket}`,
          job: spec,
          runtime: opts.runtime,
          ramp: opts.ramp,
          outFile: join(ctx.tmp, 'fio.json'),
        });
        const cpu = cpuSeconds(agent.pid) - cpu0;
        const value = spec.metric === 'mibps' ? res.mibps : res.iops;
        // Requests over ramp + runtime, at the measured rate (1 MiB per sequential request).
        const requests =
          (spec.metric === 'mibps' ? res.mibps : res.iops) * (opts.runtime + opts.ramp);
        runs.push({
          round,
          kind,
          job,
          value,
          cpuUsPerRequest: (cpu / requests) * 1e6,
          ok: res.ok,
          ...(res.error ? { error: res.error } : {}),
        });
        log(
          `datapath r${round} ${kind} ${job}: ` +
            (res.ok
              ? (spec.metric === 'mibps'
                  ? `${value.toFixed(0)} MiB/s`
                  : `${Math.round(value)} IOPS`) +
                `, agent CPU ${((cpu / requests) * 1e6).toFixed(1)} us per request`
              : `FAILED ${res.error}`),
        );
      }
      await stopAll(ctx, [agent]);
      // Outside the measurement: no session starts with the previous one's dirty pages.
      await datasync(image);
    }
  }
  const gateNs = [gateCostNs(), gateCostNs(), gateCostNs()];
  const rows = opts.jobs.map((job) => {
    const spec = JOBS[job];
    const of = (k: string) => runs.filter((r) => r.ok && r.kind === k && r.job === job);
    const mc = median(of('cluster').map((r) => r.value));
    const ms = median(of('single').map((r) => r.value));
    const fmt = (v: number) =>
      spec.metric === 'mibps' ? v.toFixed(0) : Math.round(v).toLocaleString('en-US');
    const range = (k: string) => {
      const xs = of(k).map((r) => r.value);
      return xs.length === 0 ? '-' : `${fmt(Math.min(...xs))}-${fmt(Math.max(...xs))}`;
    };
    const cc = median(of('cluster').map((r) => r.cpuUsPerRequest));
    const cs = median(of('single').map((r) => r.cpuUsPerRequest));
    return [
      job,
      spec.metric === 'mibps' ? 'MiB/s' : 'IOPS',
      fmt(mc),
      fmt(ms),
      `${(mc / ms).toFixed(2)}x`,
      range('cluster'),
      range('single'),
      cc.toFixed(1),
      cs.toFixed(1),
      `${(cc / cs).toFixed(2)}x`,
    ];
  });
  const table = markdownTable(
    [
      'job',
      'unit',
      'cluster (shared pool)',
      'single host',
      'cluster/single',
      'cluster range',
      'single range',
      'agent CPU us/req, cluster',
      'single',
      'CPU cluster/single',
    ],
    rows,
    2,
  );
  return { table, raw: runs, gateNs };
}

// ---- the suite --------------------------------------------------------------------

async function haveTool(cmd: string, args: string[]): Promise<boolean> {
  try {
    return (await run(cmd, args, 20_000)).code === 0;
  } catch {
    return false;
  }
}

const TITLES: Record<Part, string> = {
  catalog: 'Catalog operations through the API (Unix socket), each after the previous answered',
  propagation: 'Watch propagation: a change committed through agent A until agent B shows it',
  start: 'Agent start',
  pr: 'PR change latency (register, then unregister, of one identity through agent A)',
  failover: 'Fail-over: kill -9 of the holder agent until the new holder writes through agent B',
  datapath: 'Data path: fio (nbd engine, Unix socket) through the agent, cluster vs single host',
};

export async function clusterMain(argv: string[], root: string): Promise<number> {
  let opts: ClusterBenchOptions;
  try {
    opts = parseClusterOptions(argv);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n`);
    return 2;
  }
  if (opts.help) {
    const { CLUSTER_USAGE } = await import('./cluster-options.js');
    process.stdout.write(CLUSTER_USAGE);
    return 0;
  }
  const ballastPath = isAbsolute(opts.ballast) ? opts.ballast : resolve(root, opts.ballast);
  const outPath = isAbsolute(opts.out) ? opts.out : resolve(root, opts.out);
  if (!existsSync(ballastPath)) {
    log(`${ballastPath} does not exist (npm run build first)`);
    return 2;
  }
  const missing: string[] = [];
  if (!(await haveTool('etcd', ['--version']))) missing.push('etcd-server');
  if (opts.parts.includes('datapath') && !(await haveTool('fio', ['--enghelp=nbd']))) {
    missing.push('fio');
  }
  if (missing.length > 0) {
    log(`missing tools; install with:  apt-get install -y ${missing.join(' ')}`);
    return 2;
  }

  const tmp = await mkdtemp(join(opts.dir ?? os.tmpdir(), 'ballast-bench-cluster-'));
  const loadStart = os.loadavg();
  const startedAt = new Date().toISOString();
  log(`parts: ${opts.parts.join(', ')}; temporary directory ${tmp}`);
  const t0 = performance.now();
  // etcd's own defaults for the election (100 ms heartbeat, 1 s election):
  // what an operator would run, and lease TTLs down to 2 s still work.
  const etcd = await startEtcdCluster({ size: 3, heartbeatMs: 100, electionMs: 1000, dir: tmp });
  log(`etcd: 3 members on ${etcd.endpoints.join(', ')} in ${fmtMs(performance.now() - t0)} ms`);
  const ctx: Ctx = {
    opts,
    etcd,
    tmp,
    ballast: ballastInvocation(ballastPath),
    agents: new Set(),
    seq: 0,
  };
  const onSignal = (sig: NodeJS.Signals): void => {
    log(`${sig}: stopping`);
    killAll();
    void etcd.stop().finally(() => process.exit(130));
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const results: Record<string, unknown> = {};
  const tables: { part: Part; table: string; note?: string }[] = [];
  let failures = 0;
  try {
    for (const part of opts.parts) {
      const tp = performance.now();
      log(`--- ${part}`);
      try {
        switch (part) {
          case 'catalog': {
            const r = await catalogPart(ctx);
            results.catalog = r.raw;
            tables.push({ part, table: r.table });
            break;
          }
          case 'propagation': {
            const r = await propagationPart(ctx);
            results.propagation = { samples: r.raw, pollMs: r.pollMs };
            tables.push({ part, table: r.table });
            break;
          }
          case 'start': {
            const r = await startPart(ctx);
            results.start = r.raw;
            tables.push({ part, table: r.table });
            break;
          }
          case 'pr': {
            const r = await prPart(ctx);
            results.pr = r.raw;
            tables.push({ part, table: r.table });
            break;
          }
          case 'failover': {
            const r = await failoverPart(ctx);
            results.failover = r.raw;
            tables.push({ part, table: r.table });
            break;
          }
          case 'datapath': {
            const r = await datapathPart(ctx);
            results.datapath = { runs: r.raw, gateNs: r.gateNs };
            tables.push({
              part,
              table: r.table,
              note: `Fence.gate() with an open fence: ${r.gateNs.map((x) => x.toFixed(0)).join(', ')} ns per call (3 x 5 M calls, in-process)`,
            });
            if (r.raw.some((x) => !x.ok)) failures++;
            break;
          }
        }
      } catch (e) {
        failures++;
        log(`${part} FAILED: ${(e as Error).stack ?? String(e)}`);
        for (const a of ctx.agents) {
          log(`agent ${a.host} output:\n${a.output().trimEnd()}`);
          await a.kill9();
        }
        ctx.agents.clear();
        results[part] = { error: (e as Error).message };
      }
      log(`--- ${part}: ${((performance.now() - tp) / 1000).toFixed(0)} s`);
    }
  } finally {
    for (const a of ctx.agents) await a.kill9();
    await etcd.stop();
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
  }

  const loadEnd = os.loadavg();
  process.stdout.write(
    `\nCluster benchmarks: 3-member etcd on loopback, ${os.cpus().length} CPUs, ` +
      `load average ${loadStart[0]?.toFixed(1)} at start, ${loadEnd[0]?.toFixed(1)} at end\n`,
  );
  for (const t of tables) {
    process.stdout.write(`\n${TITLES[t.part]}\n\n${t.table}\n${t.note ? `\n${t.note}\n` : ''}`);
  }
  await writeResults(
    outPath,
    { startedAt, loadStart, options: opts },
    {
      results,
      failures,
    },
  );
  log(`raw results: ${outPath}`);
  return failures > 0 ? 1 : 0;
}
