// Runs `ballast agent` captive: a private data directory, pools and sockets in
// a fresh temp dir, TCP on 127.0.0.1 port 0 (the agent picks free ports and
// reports them in /v1/status), ready when /healthz answers on the API socket.
// Killed in afterAll if a test forgets it.

import { type ChildProcess, spawn } from 'node:child_process';
import { mkdirSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { type ApiReply, httpRequest as request } from '../../bench/api.js';
import { BALLAST_BIN, killAfterAll, makeTempDir } from './server.js';
import { type RunResult, run, toolEnv } from './tools.js';
import { until } from './wait.js';

export interface PoolSpec {
  name: string;
  /** Default: <dir>/pools/<name>. */
  path?: string;
  media?: string;
  quota?: string;
  overcommit?: number;
  shared?: boolean;
}

export interface AgentStartOptions {
  pools?: PoolSpec[];
  /** Extra `nbd:` keys, e.g. { tls: {...} }. */
  nbd?: Record<string, unknown>;
  /** Extra `api:` keys, e.g. { requireToken: true }. */
  api?: Record<string, unknown>;
  /** Environment for the agent (BALLAST_FAILPOINTS...). */
  env?: Record<string, string>;
  /** Reuse this directory (a restart after a crash). */
  dir?: string;
  /** A `cluster:` section (etcd endpoints, host, leaseTtl...). */
  cluster?: Record<string, unknown>;
  /** An `events:` section (rescanInterval, deliveryTimeout, retryCap...). */
  events?: Record<string, unknown>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export type { ApiReply };

/** One HTTP request over a Unix socket or to 127.0.0.1:port. */
export function httpRequest(
  where: { socketPath: string } | { port: number },
  method: string,
  urlPath: string,
  body?: unknown,
  headers: Record<string, string> = {},
): Promise<ApiReply> {
  return request(where, method, urlPath, body, { headers });
}

export class AgentHandle {
  child!: ChildProcess;
  exited!: Promise<number>;
  private err = '';
  nbdPort = 0;
  apiPort = 0;

  constructor(
    readonly dir: string,
    readonly configFile: string,
    readonly env: Record<string, string>,
  ) {}

  get dataDir(): string {
    return path.join(this.dir, 'data');
  }
  get apiSocket(): string {
    return path.join(this.dir, 'api.sock');
  }
  get nbdSocket(): string {
    return path.join(this.dir, 'nbd.sock');
  }
  stderr(): string {
    return this.err;
  }

  /** Spawns the agent; resolves once the API answers, rejects if it exits first. */
  async start(extraEnv: Record<string, string> = {}): Promise<void> {
    this.err = '';
    const child = spawn(process.execPath, [BALLAST_BIN, 'agent', '--config', this.configFile], {
      env: toolEnv({ ...this.env, ...extraEnv }),
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    killAfterAll(child);
    child.stderr?.on('data', (b: Buffer) => {
      this.err += b.toString('utf8');
    });
    let code: number | undefined;
    this.exited = new Promise<number>((resolve) =>
      child.once('exit', (c, s) => {
        code = c ?? (s === 'SIGKILL' ? 137 : s === 'SIGTERM' ? 143 : 128);
        resolve(code);
      }),
    );
    const deadline = Date.now() + 30_000;
    for (;;) {
      if (code !== undefined) throw new Error(`agent exited (${code}) at start:\n${this.err}`);
      try {
        const r = await this.api('GET', '/healthz');
        if (r.status === 200) break;
      } catch {}
      if (Date.now() > deadline) throw new Error(`agent did not come up:\n${this.err}`);
      await sleep(50);
    }
    const st = (await this.api('GET', '/v1/status')).body as { nbd: string[]; api: string[] };
    this.nbdPort = Number(st.nbd.find((a) => a.startsWith('127.'))?.split(':')[1] ?? 0);
    this.apiPort = Number(st.api.find((a) => a.startsWith('127.'))?.split(':')[1] ?? 0);
  }

  api(method: string, urlPath: string, body?: unknown): Promise<ApiReply> {
    return httpRequest({ socketPath: this.apiSocket }, method, urlPath, body);
  }

  /**
   * A change through this agent, asked again while the agent answers that it is cut off
   * from etcd (503, NOT made: nothing was sent). A test agent's 2 s lease can lapse on a
   * busy machine; until it has registered again it refuses every change, as it should.
   */
  async apiMade(method: string, urlPath: string, body?: unknown): Promise<ApiReply> {
    let r = await this.api(method, urlPath, body);
    await until('a change the agent is not cut off for', async () => {
      if (r.status !== 503 || !/cut off from etcd[\s\S]*NOT made/.test(r.text)) return true;
      r = await this.api(method, urlPath, body);
      return false;
    });
    return r;
  }

  /** `ballast ARGS` against this agent (BALLAST_AGENT=unix:...). */
  cli(...args: string[]): Promise<RunResult> {
    return run(process.execPath, [BALLAST_BIN, ...args], {
      env: { BALLAST_AGENT: `unix:${this.apiSocket}` },
    });
  }

  /** `ballast ARGS` against this agent's TCP API, with its token. */
  cliTcp(...args: string[]): Promise<RunResult> {
    return run(process.execPath, [
      BALLAST_BIN,
      ...args,
      '--agent',
      `http://127.0.0.1:${this.apiPort}`,
      '--token-file',
      path.join(this.dataDir, 'api-token'),
    ]);
  }

  /** SIGTERM; resolves with the exit code. */
  async stop(): Promise<number> {
    if (this.child.exitCode !== null || this.child.signalCode !== null) return this.exited;
    this.child.kill('SIGTERM');
    const t = setTimeout(() => this.child.kill('SIGKILL'), 20_000);
    const c = await this.exited;
    clearTimeout(t);
    return c;
  }

  /** kill -9, as a crash. */
  async kill9(): Promise<void> {
    this.child.kill('SIGKILL');
    await this.exited;
  }

  /** A qemu-io URI for a device, over the agent's NBD socket. */
  uri(device: string): string {
    return `nbd+unix:///${device}?socket=${this.nbdSocket}`;
  }
}

/** Writes the config for `opts` into `dir`. */
export function writeAgentConfig(dir: string, opts: AgentStartOptions = {}): string {
  const pools = (opts.pools ?? [{ name: 'default' }]).map((p) => ({
    ...p,
    path: p.path ?? path.join(dir, 'pools', p.name),
  }));
  const lines = [
    `dataDir: ${path.join(dir, 'data')}`,
    `nbd: ${JSON.stringify({ listen: '127.0.0.1:0', socket: path.join(dir, 'nbd.sock'), ...(opts.nbd ?? {}) })}`,
    `api: ${JSON.stringify({ listen: '127.0.0.1:0', socket: path.join(dir, 'api.sock'), ...(opts.api ?? {}) })}`,
    'pools:',
    ...pools.map((p) => `  - ${JSON.stringify(p)}`),
    ...(opts.cluster ? [`cluster: ${JSON.stringify(opts.cluster)}`] : []),
    ...(opts.events ? [`events: ${JSON.stringify(opts.events)}`] : []),
  ];
  const file = path.join(dir, 'agent.yaml');
  writeFileSync(file, `${lines.join('\n')}\n`);
  return file;
}

/** Starts an agent in a fresh temp dir (or opts.dir) with the given pools. */
export async function startAgent(opts: AgentStartOptions = {}): Promise<AgentHandle> {
  const dir = opts.dir ?? makeTempDir('ballast-ag-');
  mkdirSync(dir, { recursive: true });
  const file = writeAgentConfig(dir, opts);
  const a = new AgentHandle(dir, file, opts.env ?? {});
  await a.start();
  return a;
}
