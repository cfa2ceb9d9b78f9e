// Hollow members of a cluster, many in one process: each one the agent that
// `ballast agent --hollow` runs (agentd/agent.ts) — its own host name, etcd
// connection, membership lease, watches, acks, fence, device and reservation
// managers — with no files, no NBD and no API listener. The scale benchmark
// (bench/scale.ts) and test/cluster/hollow.test.ts stand hundreds of hosts up
// this way beside a few real agents in one cluster.
//
// As a process, `node dist/bench/hollow.js SPEC.json` starts the members the
// spec lists (`parallel` at a time), prints one JSON line per member joined and
// one when all have, then takes commands, one JSON line each on stdin, and
// answers each with a JSON line carrying its id:
//
//   {"id":1,"cmd":"seed","devices":[{"host","name","size","pool"}],"parallel":32}
//       creates the devices through the members' device managers (the create path
//       of any agent: intent, ready record, the wait for the serving hosts)
//   {"id":2,"cmd":"pr","host":"h0001","device":"d","body":{"action":"register",...}}
//       a PR command through a member's reservation manager (the API's body)
//   {"id":3,"cmd":"serving","expect":{"h0001":12},"timeoutMs":60000}
//       waits until each host serves at least that many devices and its fence is
//       open; answers the milliseconds each took
//   {"id":4,"cmd":"stats"}     the process's RSS and heap, its event loop's delay since
//                              the last stats (p99, max), and its members' keepalive
//                              failures and re-registrations so far: whether it keeps up
//   {"id":5,"cmd":"stop"}      every member leaves cleanly; the process exits 0
//
// SIGTERM stops the members cleanly too; SIGKILL (or SIGSTOP) is a crash (or a
// freeze) of every host the process holds: their leases run out.

import { type ChildProcess, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { monitorEventLoopDelay, performance } from 'node:perf_hooks';
import { createInterface } from 'node:readline';
import { fileURLToPath } from 'node:url';
import { parseKey, parseType } from '../agent/pr.js';
import { Agent } from '../agentd/agent.js';
import { repoRoot } from './memory-guest.js';

export interface HollowMember {
  host: string;
  /** Shared pools it declares: a name and a path, as the real agents that share them have. */
  pools: { name: string; path: string }[];
}

export interface HollowSpec {
  /** The cluster: section every member gets (its own host added). */
  cluster: { name: string; etcd: string[]; leaseTtl?: number } & Record<string, unknown>;
  /** Data dirs (nothing is written there but the configs) and the members' log. */
  dir: string;
  members: HollowMember[];
  /** Members started at once (default 16). */
  parallel?: number;
}

export interface SeedDevice {
  host: string;
  name: string;
  size: number;
  pool: string;
}

/** Tries at starting one member before the whole process gives up. */
const START_ATTEMPTS = 5;

/** The API's token, so that a hollow member makes no token file (it has no TCP API). */
const TOKEN = 'hollow-member-no-api-listener';

function packageVersion(): string {
  try {
    const p = JSON.parse(readFileSync(path.join(repoRoot(), 'package.json'), 'utf8')) as {
      version?: string;
    };
    return p.version ?? '0.0.0';
  } catch {
    return '0.0.0';
  }
}

/** Runs `fn` over `items`, `parallel` at a time. */
export async function eachLimited<T>(
  items: readonly T[],
  parallel: number,
  fn: (item: T, index: number) => Promise<void>,
): Promise<void> {
  let next = 0;
  const worker = async () => {
    for (let i = next++; i < items.length; i = next++) await fn(items[i]!, i);
  };
  await Promise.all(Array.from({ length: Math.min(parallel, items.length) }, worker));
}

/** The members of one spec, in this process. */
export class HollowFleet {
  readonly agents = new Map<string, Agent>();
  /** Milliseconds from its start to joined (healthy), per host. */
  readonly joinedMs = new Map<string, number>();

  private constructor(private readonly log: (host: string, msg: string) => void) {}

  /** Starts every member; `onJoined` hears of each as it joins. */
  static async start(
    spec: HollowSpec,
    log: (host: string, msg: string) => void,
    onJoined?: (host: string, ms: number) => void,
  ): Promise<HollowFleet> {
    const fleet = new HollowFleet(log);
    const version = packageVersion();
    mkdirSync(spec.dir, { recursive: true });
    try {
      await eachLimited(spec.members, spec.parallel ?? 16, async (m) => {
        const t0 = performance.now();
        const configFile = fleet.writeConfig(spec, m);
        // A start that fails (etcd slow to answer on a loaded machine) is tried again,
        // as a host's service manager would restart its agent.
        let agent: Agent | undefined;
        for (let attempt = 1; !agent; attempt++) {
          try {
            agent = await Agent.start({
              configFile,
              version,
              hollow: true,
              log: (msg) => fleet.log(m.host, msg),
            });
          } catch (e) {
            if (attempt >= START_ATTEMPTS) throw e;
            fleet.log(m.host, `start failed (${(e as Error).message}); starting again`);
            await new Promise((r) => setTimeout(r, 250 * attempt));
          }
        }
        fleet.agents.set(m.host, agent);
        const ms = performance.now() - t0;
        fleet.joinedMs.set(m.host, ms);
        onJoined?.(m.host, ms);
      });
    } catch (e) {
      await fleet.stop();
      throw e;
    }
    return fleet;
  }

  private writeConfig(spec: HollowSpec, m: HollowMember): string {
    const cfg = {
      dataDir: path.join(spec.dir, m.host),
      nbd: { listen: false, socket: false },
      api: { listen: false, socket: false, token: TOKEN },
      pools: m.pools.map((p) => ({ name: p.name, path: p.path, shared: true })),
      cluster: { ...spec.cluster, host: m.host },
    };
    const file = path.join(spec.dir, `${m.host}.yaml`);
    // JSON is YAML.
    writeFileSync(file, `${JSON.stringify(cfg)}\n`);
    return file;
  }

  private agent(host: string): Agent {
    const a = this.agents.get(host);
    if (!a) throw new Error(`no hollow member ${host} in this process`);
    return a;
  }

  /** Creates devices through their members' device managers, `parallel` at a time. */
  async seed(
    devices: readonly SeedDevice[],
    parallel: number,
  ): Promise<{ created: number; ms: number; failed: { name: string; error: string }[] }> {
    const t0 = performance.now();
    const failed: { name: string; error: string }[] = [];
    let created = 0;
    await eachLimited(devices, parallel, async (d) => {
      try {
        await this.agent(d.host).devices.create({ name: d.name, size: d.size, pool: d.pool });
        created++;
      } catch (e) {
        // Asked again after an answer in doubt that was made after all.
        if ((e as { code?: string }).code === 'BALLAST_DEVICE_EXISTS') {
          created++;
          return;
        }
        failed.push({ name: d.name, error: (e as Error).message });
      }
    });
    return { created, ms: performance.now() - t0, failed };
  }

  /** A PR command through a member, with the API's body (keys as text, the type by name). */
  pr(host: string, device: string, body: Record<string, string>): Promise<unknown> {
    const key = (v: string | undefined) => (v === undefined ? undefined : parseKey(v));
    return this.agent(host).reservations.apply(device, {
      action: body.action as never,
      as: body.as ?? host,
      key: key(body.key) ?? 0n,
      saKey: key(body.saKey) ?? undefined,
      type: body.type === undefined ? undefined : (parseType(body.type) ?? undefined),
    });
  }

  /**
   * Resolves once each host in `expect` serves at least that many devices with its
   * fence open; the milliseconds each took (NaN past the deadline).
   */
  async serving(
    expect: Record<string, number>,
    timeoutMs: number,
  ): Promise<Record<string, number>> {
    const t0 = performance.now();
    const out: Record<string, number> = {};
    const left = new Set(Object.keys(expect));
    while (left.size > 0 && performance.now() - t0 < timeoutMs) {
      for (const h of left) {
        const a = this.agent(h);
        if (a.devices.liveNames().length >= expect[h]! && a.cluster?.canServe()) {
          out[h] = performance.now() - t0;
          left.delete(h);
        }
      }
      if (left.size > 0) await new Promise((r) => setTimeout(r, 20));
    }
    for (const h of left) out[h] = Number.NaN;
    return out;
  }

  /** Keepalive failures and re-registrations (after a lease was lost) of every member so far. */
  health(): { keepaliveFailures: number; reRegistrations: number } {
    let keepaliveFailures = 0;
    let reRegistrations = 0;
    for (const a of this.agents.values()) {
      keepaliveFailures += a.cluster?.stats.keepaliveFailures ?? 0;
      reRegistrations += a.cluster?.stats.reRegistrations ?? 0;
    }
    return { keepaliveFailures, reRegistrations };
  }

  /** Every member leaves cleanly (marks itself left, revokes its lease). */
  async stop(): Promise<void> {
    const all = [...this.agents.values()];
    this.agents.clear();
    await Promise.all(all.map((a) => a.stop().catch(() => {})));
  }
}

/** Where the built process script is (this file under dist/, wherever it is imported from). */
export function hollowScript(): string {
  return path.join(repoRoot(), 'dist', 'bench', 'hollow.js');
}

export interface HollowReady {
  members: number;
  ms: number;
  rssKiB: number;
}

/** A hollow-member process, seen from its parent: spawn, commands, signals. */
export class HollowProcess {
  readonly child: ChildProcess;
  /** Resolves when every member has joined; rejects if the process ends first. */
  readonly ready: Promise<HollowReady>;
  /** Milliseconds from spawn to each member joined. */
  readonly joinedAt = new Map<string, number>();
  readonly exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  private readonly spawnedAt = performance.now();
  private readonly calls = new Map<number, { resolve(v: unknown): void; reject(e: Error): void }>();
  private seq = 0;
  private stderr = '';
  private done = false;

  constructor(
    readonly spec: HollowSpec,
    opts: { env?: NodeJS.ProcessEnv; onJoined?: (host: string, msSinceSpawn: number) => void } = {},
  ) {
    mkdirSync(spec.dir, { recursive: true });
    const file = path.join(spec.dir, 'spec.json');
    writeFileSync(file, JSON.stringify(spec));
    this.child = spawn(process.execPath, [hollowScript(), file], {
      stdio: ['pipe', 'pipe', 'pipe'],
      env: opts.env ?? process.env,
    });
    this.child.stderr?.on('data', (b: Buffer) => {
      this.stderr = (this.stderr + b.toString('utf8')).slice(-16_384);
    });
    this.exited = new Promise((resolve) =>
      this.child.once('close', (code, signal) => {
        this.done = true;
        const err = new Error(`hollow process ${this.pid} ended (${signal ?? code})`);
        for (const c of this.calls.values()) c.reject(err);
        this.calls.clear();
        resolve({ code, signal });
      }),
    );
    this.ready = new Promise<HollowReady>((resolve, reject) => {
      void this.exited.then(({ code, signal }) =>
        reject(
          new Error(
            `hollow process ended (${signal ?? code}) before its members joined:\n${this.stderr}`,
          ),
        ),
      );
      createInterface({ input: this.child.stdout! }).on('line', (line) => {
        let m: Record<string, unknown>;
        try {
          m = JSON.parse(line) as Record<string, unknown>;
        } catch {
          return;
        }
        if (m.event === 'joined') {
          const ms = performance.now() - this.spawnedAt;
          this.joinedAt.set(String(m.host), ms);
          opts.onJoined?.(String(m.host), ms);
        } else if (m.event === 'ready') {
          resolve({
            members: Number(m.members),
            ms: performance.now() - this.spawnedAt,
            rssKiB: Number(m.rssKiB),
          });
        } else if (typeof m.id === 'number') {
          const c = this.calls.get(m.id);
          this.calls.delete(m.id);
          if (m.error !== undefined) c?.reject(new Error(String(m.error)));
          else c?.resolve(m.result);
        }
      });
    });
    this.ready.catch(() => {});
  }

  get pid(): number {
    return this.child.pid ?? -1;
  }

  get running(): boolean {
    return !this.done;
  }

  /** The tail of its stderr. */
  output(): string {
    return this.stderr;
  }

  /** One command; resolves with its answer's result. */
  call<T = unknown>(cmd: string, args: Record<string, unknown> = {}): Promise<T> {
    if (this.done) return Promise.reject(new Error('the hollow process has ended'));
    const id = ++this.seq;
    return new Promise<T>((resolve, reject) => {
      this.calls.set(id, { resolve: resolve as (v: unknown) => void, reject });
      this.child.stdin!.write(`${JSON.stringify({ id, cmd, ...args })}\n`);
    });
  }

  signal(sig: NodeJS.Signals): void {
    if (!this.done) this.child.kill(sig);
  }

  /** Every member leaves cleanly; SIGKILL if the process has not ended within `graceMs`. */
  async stop(graceMs = 60_000): Promise<void> {
    if (this.done) return;
    this.signal('SIGCONT');
    this.signal('SIGTERM');
    const t = setTimeout(() => this.signal('SIGKILL'), graceMs);
    await this.exited;
    clearTimeout(t);
  }

  /** kill -9: every member it holds crashes; resolves once it is gone. */
  async kill(): Promise<void> {
    this.signal('SIGKILL');
    await this.exited;
  }
}

// ---- the process ----

async function serve(specFile: string): Promise<void> {
  const spec = JSON.parse(readFileSync(specFile, 'utf8')) as HollowSpec;
  const logFile = createWriteStream(path.join(spec.dir, 'members.log'), { flags: 'a' });
  const say = (m: unknown) =>
    process.stdout.write(
      `${JSON.stringify(m, (_k, v: unknown) => (typeof v === 'bigint' ? v.toString() : v))}\n`,
    );
  const t0 = performance.now();
  const lag = monitorEventLoopDelay({ resolution: 10 });
  lag.enable();
  const fleet = await HollowFleet.start(
    spec,
    (host, msg) => logFile.write(`${new Date().toISOString()} ${host}: ${msg}\n`),
    (host, ms) => say({ event: 'joined', host, ms }),
  );
  say({
    event: 'ready',
    members: fleet.agents.size,
    ms: performance.now() - t0,
    rssKiB: Math.round(process.memoryUsage.rss() / 1024),
  });
  let stopping: Promise<void> | undefined;
  const stop = (): Promise<void> => {
    stopping ??= fleet.stop().then(() => {
      logFile.end();
    });
    return stopping;
  };
  process.on('SIGTERM', () => void stop().then(() => process.exit(0)));
  createInterface({ input: process.stdin }).on('line', (line) => {
    let req: Record<string, unknown> & { id: number; cmd: string };
    try {
      req = JSON.parse(line) as typeof req;
    } catch {
      return;
    }
    const run = async (): Promise<unknown> => {
      switch (req.cmd) {
        case 'seed':
          return fleet.seed(req.devices as SeedDevice[], Number(req.parallel ?? 32));
        case 'pr':
          return fleet.pr(String(req.host), String(req.device), req.body as Record<string, string>);
        case 'serving':
          return fleet.serving(
            req.expect as Record<string, number>,
            Number(req.timeoutMs ?? 60_000),
          );
        case 'stats': {
          const m = process.memoryUsage();
          const out = {
            rssKiB: Math.round(m.rss / 1024),
            heapUsedKiB: Math.round(m.heapUsed / 1024),
            members: fleet.agents.size,
            loopDelayP99Ms: lag.percentile(99) / 1e6,
            loopDelayMaxMs: lag.max / 1e6,
            ...fleet.health(),
          };
          lag.reset();
          return out;
        }
        case 'stop':
          await stop();
          setImmediate(() => process.exit(0));
          return { stopped: true };
        default:
          throw new Error(`unknown command ${JSON.stringify(req.cmd)}`);
      }
    };
    run().then(
      (result) => say({ id: req.id, result }),
      (e: unknown) => say({ id: req.id, error: (e as Error).message }),
    );
  });
}

if (process.argv[1] && path.resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  const file = process.argv[2];
  if (!file) {
    process.stderr.write('usage: node dist/bench/hollow.js SPEC.json\n');
    process.exit(2);
  }
  serve(file).catch((e: unknown) => {
    process.stderr.write(`hollow: ${(e as Error).stack ?? String(e)}\n`);
    process.exit(1);
  });
}
