// Real etcd clusters on loopback, for the tests and the benchmarks: 1 or 3
// members of Debian's etcd 3.4 on free loopback ports, each with its own
// temporary data directory. Tests start one per file (beforeAll) and share it
// by using their own key prefixes. The build compiles test/harness/ (without the
// tests) so that the benchmarks and nemesis campaigns start the same cluster.
//
// Election settings are short (heartbeat 50 ms, election 500 ms) so that a
// killed leader is replaced within about a second, and so that etcd's minimum
// lease TTL (1.5 election timeouts) is below one second: TTL 1 leases work.
// Health, member ids and leadership are read from each member's plain-HTTP
// metrics listener, so that they work the same when clients must use TLS.

import { type ChildProcess, spawn } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';

export interface EtcdMember {
  name: string;
  /** http://127.0.0.1:port, or https:// with `tls`. */
  clientUrl: string;
  /** http://127.0.0.1:port: /health and /metrics. */
  metricsUrl: string;
  clientPort: number;
  peerUrl: string;
  dataDir: string;
  /** etcd's member id, as 16 hex digits (as etcdctl prints it). */
  id: string;
}

export interface EtcdCluster {
  /** The members' client URLs, in member order. */
  endpoints: string[];
  members: EtcdMember[];
  /** Sends `signal` (default SIGKILL) to member `i` and waits until it has exited. */
  kill(i: number, signal?: NodeJS.Signals): Promise<void>;
  /** Starts member `i` again on its data directory and waits until it is healthy. */
  restart(i: number): Promise<void>;
  /** Whether member `i`'s process runs. */
  running(i: number): boolean;
  /** Member `i`'s process id while it runs (to freeze it with SIGSTOP). */
  pid(i: number): number | undefined;
  /** The index of the current leader (waits up to 10 s for one). */
  leader(): Promise<number>;
  /** Kills every member and removes the data directories. */
  stop(): Promise<void>;
}

export interface EtcdClusterOptions {
  /** 1 or 3 (default 3). */
  size?: 1 | 3;
  heartbeatMs?: number;
  electionMs?: number;
  /**
   * Serve clients over TLS with this server certificate and key, and require
   * client certificates signed by `ca` (PEM files). Peers talk plain HTTP.
   */
  tls?: { cert: string; key: string; ca: string } | undefined;
  /** Environment for the etcd processes (default: this process's). */
  env?: NodeJS.ProcessEnv;
  /** Where the data directories are made (default: the OS temp dir). */
  dir?: string;
}

type ClusterConfig = Required<Omit<EtcdClusterOptions, 'tls'>> & Pick<EtcdClusterOptions, 'tls'>;

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const srv = net.createServer();
    srv.once('error', reject);
    srv.listen(0, '127.0.0.1', () => {
      const addr = srv.address();
      const port = typeof addr === 'object' && addr ? addr.port : 0;
      srv.close(() => resolve(port));
    });
  });
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function getText(url: string): Promise<string> {
  const res = await fetch(url, { signal: AbortSignal.timeout(2000) });
  if (!res.ok) throw new Error(`${url}: HTTP ${res.status}`);
  return res.text();
}

/** This member's id (16 hex digits) and whether it leads, from its metrics. */
async function memberStatus(metricsUrl: string): Promise<{ id: string; leader: boolean }> {
  const text = await getText(`${metricsUrl}/metrics`);
  const id = /^etcd_server_id\{server_id="([0-9a-f]+)"\} 1$/m.exec(text)?.[1] ?? '';
  return { id: id.padStart(16, '0'), leader: /^etcd_server_is_leader 1$/m.test(text) };
}

async function healthy(metricsUrl: string): Promise<boolean> {
  try {
    return (
      (JSON.parse(await getText(`${metricsUrl}/health`)) as { health?: string }).health === 'true'
    );
  } catch {
    return false;
  }
}

class Cluster implements EtcdCluster {
  readonly members: EtcdMember[] = [];
  readonly endpoints: string[] = [];
  private readonly children: (ChildProcess | null)[] = [];
  private readonly logs: string[] = [];
  private readonly args: string[][] = [];
  private readonly onExit = () => {
    for (const c of this.children) c?.kill('SIGKILL');
    rmSync(this.root, { recursive: true, force: true });
  };

  constructor(
    readonly root: string,
    private readonly opts: ClusterConfig,
  ) {
    process.once('exit', this.onExit);
  }

  async init(): Promise<void> {
    const n = this.opts.size;
    const ports: number[] = [];
    while (ports.length < 3 * n) {
      const p = await freePort();
      if (!ports.includes(p)) ports.push(p);
    }
    const token = `ballast-local-${process.pid}-${path.basename(this.root)}`;
    const peers: string[] = [];
    for (let i = 0; i < n; i++) {
      const clientPort = ports[3 * i]!;
      const peerUrl = `http://127.0.0.1:${ports[3 * i + 1]!}`;
      const name = `m${i}`;
      this.members.push({
        name,
        clientUrl: `${this.opts.tls ? 'https' : 'http'}://127.0.0.1:${clientPort}`,
        metricsUrl: `http://127.0.0.1:${ports[3 * i + 2]!}`,
        clientPort,
        peerUrl,
        dataDir: path.join(this.root, name),
        id: '',
      });
      peers.push(`${name}=${peerUrl}`);
    }
    for (const m of this.members) {
      this.endpoints.push(m.clientUrl);
      this.args.push([
        '--name',
        m.name,
        '--data-dir',
        m.dataDir,
        '--listen-client-urls',
        m.clientUrl,
        '--advertise-client-urls',
        m.clientUrl,
        '--listen-metrics-urls',
        m.metricsUrl,
        ...(this.opts.tls
          ? [
              '--cert-file',
              this.opts.tls.cert,
              '--key-file',
              this.opts.tls.key,
              '--trusted-ca-file',
              this.opts.tls.ca,
              '--client-cert-auth',
            ]
          : []),
        '--listen-peer-urls',
        m.peerUrl,
        '--initial-advertise-peer-urls',
        m.peerUrl,
        '--initial-cluster',
        peers.join(','),
        '--initial-cluster-state',
        'new',
        '--initial-cluster-token',
        token,
        '--heartbeat-interval',
        String(this.opts.heartbeatMs),
        '--election-timeout',
        String(this.opts.electionMs),
        '--logger',
        'zap',
        '--log-level',
        'error',
        '--log-outputs',
        'stderr',
      ]);
      this.children.push(null);
      this.logs.push('');
    }
    for (let i = 0; i < n; i++) this.spawnMember(i);
    await Promise.all(this.members.map((_, i) => this.waitHealthy(i)));
    for (const m of this.members) m.id = (await memberStatus(m.metricsUrl)).id;
  }

  private spawnMember(i: number): void {
    const child = spawn('etcd', this.args[i]!, {
      env: this.opts.env,
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.logs[i] = '';
    child.stderr?.on('data', (b: Buffer) => {
      this.logs[i] = (this.logs[i]! + b.toString('utf8')).slice(-8000);
    });
    child.on('exit', () => {
      if (this.children[i] === child) this.children[i] = null;
    });
    this.children[i] = child;
  }

  private async waitHealthy(i: number): Promise<void> {
    const m = this.members[i]!;
    const deadline = performance.now() + 20_000;
    while (performance.now() < deadline) {
      if (!this.children[i]) {
        throw new Error(`etcd member ${m.name} exited while starting:\n${this.logs[i]}`);
      }
      if (await healthy(m.metricsUrl)) return;
      await sleep(50);
    }
    throw new Error(`etcd member ${m.name} did not become healthy in 20 s:\n${this.logs[i]}`);
  }

  running(i: number): boolean {
    return this.children[i] != null;
  }

  pid(i: number): number | undefined {
    return this.children[i]?.pid;
  }

  async kill(i: number, signal: NodeJS.Signals = 'SIGKILL'): Promise<void> {
    const child = this.children[i];
    if (!child) return;
    const exited = new Promise<void>((resolve) => child.once('exit', () => resolve()));
    child.kill(signal);
    await exited;
  }

  async restart(i: number): Promise<void> {
    if (this.children[i]) throw new Error(`etcd member ${i} is still running`);
    this.spawnMember(i);
    await this.waitHealthy(i);
  }

  async leader(): Promise<number> {
    const deadline = performance.now() + 10_000;
    while (performance.now() < deadline) {
      for (let i = 0; i < this.members.length; i++) {
        if (!this.children[i]) continue;
        try {
          if ((await memberStatus(this.members[i]!.metricsUrl)).leader) return i;
        } catch {
          // this member does not answer: ask the next
        }
      }
      await sleep(50);
    }
    throw new Error('the etcd cluster has no leader after 10 s');
  }

  async stop(): Promise<void> {
    process.removeListener('exit', this.onExit);
    await Promise.all(this.members.map((_, i) => this.kill(i)));
    rmSync(this.root, { recursive: true, force: true });
  }
}

/** Starts a real etcd cluster on loopback and waits until every member is healthy. */
export async function startEtcdCluster(opts: EtcdClusterOptions = {}): Promise<EtcdCluster> {
  const full: ClusterConfig = {
    size: opts.size ?? 3,
    heartbeatMs: opts.heartbeatMs ?? 50,
    electionMs: opts.electionMs ?? 500,
    tls: opts.tls,
    env: opts.env ?? process.env,
    dir: opts.dir ?? os.tmpdir(),
  };
  // Another process may take a port between our probe and etcd's bind: try afresh.
  let lastErr: unknown;
  for (let attempt = 0; attempt < 3; attempt++) {
    const root = mkdtempSync(path.join(full.dir, 'ballast-etcd-'));
    const c = new Cluster(root, full);
    try {
      await c.init();
      return c;
    } catch (e) {
      lastErr = e;
      await c.stop();
    }
  }
  throw lastErr;
}
