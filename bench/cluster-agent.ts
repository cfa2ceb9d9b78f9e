// `ballast agent` processes for the cluster benchmarks: each one a "host" with
// its own directory (data dir, API and NBD sockets, a host-local pool), and,
// in a cluster, the shared pool directory every agent of that cluster declares.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { performance } from 'node:perf_hooks';
import { type ApiReply, apiRequest } from './api.js';
import { Child, memoryKiB } from './proc.js';

export interface ClusterSection {
  name: string;
  etcd: string[];
  host: string;
  leaseTtl?: number;
}

export interface AgentSpec {
  /** The host's own directory. */
  dir: string;
  /** The shared pool's directory (cluster only). */
  shared?: string;
  cluster?: ClusterSection;
  /** Also listen on 127.0.0.1 (a free port) for NBD. */
  tcp?: boolean;
  /** The pools, instead of `shared` (when given) and a host-local one. */
  pools?: { name: string; path: string; shared?: boolean }[];
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));

export class BenchAgent {
  child: Child | undefined;
  readonly config: string;
  readonly apiSocket: string;
  readonly nbdSocket: string;

  constructor(
    readonly spec: AgentSpec,
    private readonly ballast: { command: string; args: string[] },
  ) {
    const { dir } = spec;
    mkdirSync(join(dir, 'local'), { recursive: true });
    if (spec.shared) mkdirSync(spec.shared, { recursive: true });
    for (const p of spec.pools ?? []) mkdirSync(p.path, { recursive: true });
    this.apiSocket = join(dir, 'api.sock');
    this.nbdSocket = join(dir, 'nbd.sock');
    const cfg = {
      dataDir: join(dir, 'data'),
      nbd: { listen: spec.tcp ? '127.0.0.1:0' : false, socket: this.nbdSocket },
      api: { listen: false, socket: this.apiSocket },
      pools: spec.pools ?? [
        ...(spec.shared ? [{ name: 'shared', path: spec.shared, shared: true }] : []),
        { name: 'local', path: join(dir, 'local') },
      ],
      ...(spec.cluster ? { cluster: spec.cluster } : {}),
    };
    // JSON is YAML.
    this.config = join(dir, 'agent.yaml');
    writeFileSync(this.config, `${JSON.stringify(cfg, null, 2)}\n`);
  }

  get host(): string {
    return this.spec.cluster?.host ?? 'single';
  }

  get pid(): number {
    return this.child?.pid ?? -1;
  }

  get running(): boolean {
    return this.child?.running === true;
  }

  /** The pool a device that every agent serves goes to: the shared one in a cluster. */
  get servingPool(): string {
    return this.spec.shared ? 'shared' : 'local';
  }

  /**
   * Spawns the agent and waits until /healthz answers 200; resolves with the
   * milliseconds from spawn to that answer.
   */
  async start(timeoutMs = 60_000): Promise<number> {
    const t0 = performance.now();
    const child = new Child(this.ballast.command, [
      ...this.ballast.args,
      'agent',
      '--config',
      this.config,
    ]);
    this.child = child;
    const deadline = t0 + timeoutMs;
    for (;;) {
      if (!child.running) {
        throw new Error(
          `agent ${this.host} exited at start (${JSON.stringify(child.exitStatus)}):\n${child.output()}`,
        );
      }
      const ok = await apiRequest(this.apiSocket, 'GET', '/healthz', undefined, 2000).then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) return performance.now() - t0;
      if (performance.now() > deadline) {
        throw new Error(`agent ${this.host} did not answer /healthz within ${timeoutMs} ms`);
      }
      await sleep(5);
    }
  }

  api(method: string, path: string, body?: unknown): Promise<ApiReply> {
    return apiRequest(this.apiSocket, method, path, body);
  }

  /** Like api(), but throws unless the status is `want`. */
  async must(method: string, path: string, body: unknown, want: number): Promise<ApiReply> {
    const r = await this.api(method, path, body);
    if (r.status !== want) {
      throw new Error(`agent ${this.host}: ${method} ${path}: ${r.status} ${r.text}`);
    }
    return r;
  }

  memory(): { vmHwm: number; vmRss: number } | undefined {
    return this.child?.running ? memoryKiB(this.child.pid) : undefined;
  }

  /** SIGTERM (a clean leave); throws when the agent does not exit 0. */
  async stop(): Promise<void> {
    const c = this.child;
    if (!c?.running) return;
    const st = await c.stop(20_000);
    if (st.killed || st.code !== 0) {
      throw new Error(
        `agent ${this.host} did not stop cleanly (${JSON.stringify(st)}):\n${c.output()}`,
      );
    }
  }

  /** kill -9, as a crash; resolves once the process is gone. */
  async kill9(): Promise<void> {
    const c = this.child;
    if (!c?.running) return;
    c.proc.kill('SIGKILL');
    await c.exited;
  }

  output(): string {
    return this.child?.output() ?? '';
  }
}
