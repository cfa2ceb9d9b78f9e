// The campaign: a real 3-member etcd, three real agents on one shared pool,
// each reaching etcd through fault proxies; clients that do what operators and
// guests do, concurrently through all agents; faults on a schedule drawn from
// the seed; a recorded history; the checkers (nemesis/checkers.ts) on it.

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import {
  appendFileSync,
  existsSync,
  mkdirSync,
  mkdtempSync,
  readdirSync,
  readFileSync,
  rmSync,
  writeFileSync,
} from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { type ApiReply, httpRequest } from '../bench/api.js';
import { NbdClient } from '../nbd/client.js';
import { FaultProxy } from '../test/harness/fault-proxy.js';
import { type EtcdCluster, startEtcdCluster } from '../test/harness/local-etcd.js';
import { type Anomaly, checkAll, DEVICE_VERDICTS } from './checkers.js';
import type {
  AclOp,
  AgentFinal,
  AuditRow,
  Delivered,
  DeviceOp,
  Final,
  History,
  IoOp,
  Op,
  PrOp,
} from './history.js';
import { Recorder } from './history.js';
import type { Action, Outcome, Request } from './model.js';

export const FAULT_KINDS = [
  'kill',
  'freeze',
  'partition',
  'etcd-leader-kill',
  'etcd-freeze',
  'compact',
] as const;
export type FaultKind = (typeof FAULT_KINDS)[number];

export interface CampaignOptions {
  seed: number;
  /** How long clients and faults run (the checks and the settling come after). */
  seconds: number;
  /** Fault kinds to inject (default: all). */
  faults?: readonly FaultKind[];
  /** Environment for one agent (failpoints), by host name. */
  agentEnv?: Record<string, Record<string, string>>;
  /** Progress lines. */
  log?: (line: string) => void;
  /** Keep the history here as JSON. */
  historyFile?: string;
  /** Keep the work directory (agents' data and logs, agent.log each) and say where it is. */
  keep?: boolean;
  /**
   * What the random clients do besides PR commands and NBD I/O (default: all of it).
   * A run can leave out what a known, still open defect trips on: the checkers stay the same.
   */
  workload?: {
    /** Access-list changes. */
    acl?: boolean;
    /** Malformed PR requests (an unknown type), refused before the reservation logic. */
    malformed?: boolean;
    /** Device create, resize and delete. */
    catalog?: boolean;
    /** Webhook recipients and follow streams (the events check). */
    events?: boolean;
  };
  /** A scripted scenario in place of the random clients and faults (the checks are the same). */
  script?: (ctx: ScriptContext) => Promise<void>;
}

/** What a scripted scenario can do: the campaign's own recorded operations and faults. */
export interface ScriptContext {
  pr(host: string, device: string, req: Request): Promise<PrOp>;
  io(
    identity: string,
    host: string,
    device: string,
    cmd: 'read' | 'write',
    block: number,
  ): Promise<void>;
  acl(
    host: string,
    device: string,
    entries: { identity: string; access: string }[] | null,
  ): Promise<AclOp>;
  /** Cuts one agent off from etcd (all its proxies), until heal. */
  partition(host: string): void;
  heal(host: string): void;
  /** Everything recorded so far. */
  ops: readonly Op[];
}

export interface CampaignResult {
  history: History;
  anomalies: Anomaly[];
  stats: { ops: Record<string, number>; faults: Record<string, number>; seconds: number };
}

const HOSTS = ['a', 'b', 'c'] as const;
const IDENTITIES = ['host-a', 'host-b', 'host-c'] as const;
const ADDRESS: Record<string, string> = {
  'host-a': '127.0.0.1',
  'host-b': '127.0.0.2',
  'host-c': '127.0.0.3',
};
const KEYS: Record<string, string[]> = {
  'host-a': ['0xa1', '0xa2'],
  'host-b': ['0xb1', '0xb2'],
  'host-c': ['0xc1', '0xc2'],
};
const PR_DEVICES = ['p0', 'p1'];
const CATALOG = ['c0', 'c1', 'c2'];
const BLOCKS = 16;
const BLOCK = 4096;
const LEASE_TTL = 2;
const PR_CODES = new Set([
  'PR_CONFLICT',
  'PR_BAD_TYPE',
  'PR_BAD_KEY',
  'PR_INVALID_RELEASE',
  'PR_INVALID_REQUEST',
]);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** A small seeded generator (mulberry32): the schedule and every client's choices. */
export class Rng {
  private s: number;
  constructor(seed: number) {
    this.s = seed >>> 0;
  }
  next(): number {
    this.s = (this.s + 0x6d2b79f5) >>> 0;
    let t = this.s;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  }
  int(lo: number, hi: number): number {
    return lo + Math.floor(this.next() * (hi - lo + 1));
  }
  pick<T>(xs: readonly T[]): T {
    return xs[Math.floor(this.next() * xs.length)]!;
  }
  chance(p: number): boolean {
    return this.next() < p;
  }
  weighted<T extends string>(w: Record<T, number>): T {
    const entries = Object.entries(w) as [T, number][];
    let x = this.next() * entries.reduce((s, [, n]) => s + n, 0);
    for (const [k, n] of entries) {
      x -= n;
      if (x < 0) return k;
    }
    return entries[entries.length - 1]![0];
  }
}

export interface ScheduledFault {
  at: number;
  kind: FaultKind;
  target: number;
  ms: number;
}

/** The faults of a run: a pure function of the seed, the duration and the kinds. */
export function schedule(
  seed: number,
  seconds: number,
  kinds: readonly FaultKind[],
): ScheduledFault[] {
  const rng = new Rng(seed ^ 0x5eed);
  const out: ScheduledFault[] = [];
  if (kinds.length === 0) return out;
  let t = 3000;
  const end = seconds * 1000 - 4000;
  while (t < end) {
    const kind = rng.pick(kinds);
    const target = rng.int(0, 2);
    const ms =
      kind === 'freeze'
        ? LEASE_TTL * 1000 + rng.int(500, 2500)
        : kind === 'partition'
          ? rng.int(800, 5000)
          : kind === 'kill'
            ? rng.int(200, 2000)
            : kind === 'compact'
              ? 0
              : rng.int(800, 3000);
    out.push({ at: t, kind, target, ms });
    t += rng.int(1500, 5000);
  }
  return out;
}

function repoRoot(): string {
  let d = path.dirname(fileURLToPath(import.meta.url));
  while (!existsSync(path.join(d, 'package.json'))) d = path.dirname(d);
  return d;
}

function toolEnv(extra: Record<string, string> = {}): NodeJS.ProcessEnv {
  const { LIBNBD_DEBUG: _, BALLAST_FAILPOINTS: __, ...rest } = process.env;
  const PATH = ['/usr/bin', '/bin', process.env.PATH ?? '', '/usr/sbin', '/sbin'].join(':');
  return { ...rest, PATH, LANG: 'C', LC_ALL: 'C', ...extra };
}

/** One agent, its proxies to etcd and its process. */
class Agent {
  child: ChildProcess | null = null;
  exited: Promise<void> = Promise.resolve();
  nbdPort = 0;
  err = '';
  /** Being killed or restarted: clients see errors meanwhile. */
  busy = false;
  readonly config: string;

  constructor(
    readonly host: string,
    readonly dir: string,
    readonly proxies: FaultProxy[],
    shared: string,
    cluster: string,
    private readonly env: Record<string, string>,
  ) {
    mkdirSync(dir, { recursive: true });
    this.config = path.join(dir, 'agent.yaml');
    const identities = IDENTITIES.map((id) => `${ADDRESS[id]}=${id}`);
    writeFileSync(
      this.config,
      [
        `dataDir: ${path.join(dir, 'data')}`,
        `nbd: ${JSON.stringify({ listen: '127.0.0.1:0', socket: path.join(dir, 'nbd.sock'), identities })}`,
        `api: ${JSON.stringify({ listen: '127.0.0.1:0', socket: this.apiSocket })}`,
        'pools:',
        `  - ${JSON.stringify({ name: 'shared', path: shared, shared: true })}`,
        `cluster: ${JSON.stringify({ name: cluster, etcd: proxies.map((p) => p.url), host, leaseTtl: LEASE_TTL, holdTimeout: 3 })}`,
        `events: ${JSON.stringify({ deliveryTimeout: 2, retryCap: 1 })}`,
        '',
      ].join('\n'),
    );
  }

  get apiSocket(): string {
    return path.join(this.dir, 'api.sock');
  }

  get running(): boolean {
    return this.child !== null && this.child.exitCode === null && this.child.signalCode === null;
  }

  async start(): Promise<void> {
    this.err = '';
    const bin = path.join(repoRoot(), 'bin', 'ballast');
    const child = spawn(process.execPath, [bin, 'agent', '--config', this.config], {
      env: toolEnv(this.env),
      stdio: ['ignore', 'ignore', 'pipe'],
    });
    this.child = child;
    child.stderr?.on('data', (b: Buffer) => {
      this.err = (this.err + b.toString('utf8')).slice(-20_000);
      // each line stamped with the history's clock (seconds), to read beside the report
      const stamp = `[${(performance.now() / 1000).toFixed(3)}] `;
      const text = b.toString('utf8').replace(/\n(?=.)/g, `\n${stamp}`);
      appendFileSync(path.join(this.dir, 'agent.log'), stamp + text);
    });
    this.exited = new Promise((resolve) => child.once('exit', () => resolve()));
    const deadline = performance.now() + 90_000;
    for (;;) {
      if (child.exitCode !== null || child.signalCode !== null) {
        throw new Error(`agent ${this.host} exited at start:\n${this.err}`);
      }
      try {
        const r = await this.api('GET', '/v1/status', undefined, 5000);
        if (r.status === 200) {
          const st = r.body as { nbd: string[] };
          this.nbdPort = Number(st.nbd.find((a) => a.startsWith('127.'))?.split(':')[1] ?? 0);
          return;
        }
      } catch {}
      if (performance.now() > deadline)
        throw new Error(`agent ${this.host} did not come up:\n${this.err}`);
      await sleep(100);
    }
  }

  api(method: string, p: string, body?: unknown, timeoutMs = 60_000): Promise<ApiReply> {
    return httpRequest({ socketPath: this.apiSocket }, method, p, body, { timeoutMs });
  }

  signal(sig: NodeJS.Signals): void {
    if (this.running) this.child!.kill(sig);
  }

  async kill9(): Promise<void> {
    if (!this.running) return;
    this.child!.kill('SIGCONT');
    this.child!.kill('SIGKILL');
    await this.exited;
  }

  async stop(): Promise<void> {
    if (!this.running) return;
    this.child!.kill('SIGCONT');
    this.child!.kill('SIGTERM');
    const t = setTimeout(() => this.child?.kill('SIGKILL'), 20_000);
    await this.exited;
    clearTimeout(t);
  }
}

/** Classifies an API reply: ok, a definite no (with the code), or unknown. */
function verdict(r: ApiReply): {
  status: 'ok' | 'failed' | 'unknown';
  code?: string;
  note?: string;
} {
  if (r.status >= 200 && r.status < 300) return { status: 'ok' };
  const code = typeof r.body.code === 'string' ? r.body.code : `HTTP_${r.status}`;
  const msg = typeof r.body.message === 'string' ? r.body.message : r.text.slice(0, 200);
  const note = `${code}: ${msg}`;
  // made, not yet in force everywhere: for the client, it may or may not have happened
  if (code === 'BALLAST_CLUSTER_NOT_APPLIED') return { status: 'unknown', code, note };
  if (/\bNOT made\b/.test(msg)) return { status: 'failed', code, note };
  if (/may (or may not )?have (been|happened)|may have been made/i.test(msg)) {
    return { status: 'unknown', code, note };
  }
  if (code.startsWith('STORE_') || code === 'BALLAST_INTERNAL' || r.status >= 500) {
    return { status: 'unknown', code, note };
  }
  return { status: 'failed', code, note };
}

/** Not sent at all: the agent was not there to take the request. */
const notSent = (e: unknown) => /ENOENT|ECONNREFUSED/.test(String((e as Error).message ?? e));

const ERRNO: Record<number, string> = {
  1: 'EPERM',
  5: 'EIO',
  28: 'ENOSPC',
  108: 'ESHUTDOWN',
  22: 'EINVAL',
};

/** An SSE consumer of one agent's /v1/events that resumes from its last id, as EventSource does. */
class Follower {
  readonly got: Delivered[] = [];
  private last: string | undefined;
  private req: http.ClientRequest | null = null;
  private stopped = false;
  readonly done: Promise<void>;

  constructor(
    private readonly agent: Agent,
    since: string | undefined,
  ) {
    this.last = since;
    this.done = this.loop();
  }

  private async loop(): Promise<void> {
    while (!this.stopped) {
      await this.once().catch(() => {});
      if (!this.stopped) await sleep(300);
    }
  }

  private once(): Promise<void> {
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          socketPath: this.agent.apiSocket,
          path: '/v1/events?follow=1',
          headers: this.last ? { 'last-event-id': this.last } : {},
        },
        (res) => {
          if (res.statusCode !== 200) {
            res.resume();
            res.on('end', resolve);
            return;
          }
          let buf = '';
          res.setEncoding('utf8');
          res.on('data', (chunk: string) => {
            buf += chunk;
            for (;;) {
              const i = buf.indexOf('\n\n');
              if (i < 0) break;
              const block = buf.slice(0, i);
              buf = buf.slice(i + 2);
              const e = parseSse(block);
              if (e) {
                this.got.push(e);
                this.last = e.id;
              }
            }
          });
          res.on('end', resolve);
          res.on('error', reject);
          res.on('aborted', () => resolve());
        },
      );
      this.req = req;
      req.on('error', reject);
      req.end();
    });
  }

  async stop(): Promise<void> {
    this.stopped = true;
    this.req?.destroy();
    await this.done;
  }
}

function parseSse(block: string): Delivered | null {
  let id: string | undefined;
  let data = '';
  for (const line of block.split('\n')) {
    if (line.startsWith('id:')) id = line.slice(3).trim();
    else if (line.startsWith('data:')) data += line.slice(5).trim();
  }
  if (!id || !data) return null;
  try {
    const ce = JSON.parse(data) as Delivered;
    return { id, type: ce.type, subject: ce.subject, time: ce.time, data: ce.data };
  } catch {
    return null;
  }
}

/** A webhook recipient: records every delivery, duplicates included. */
class Hook {
  readonly got: Delivered[] = [];
  private server: http.Server;
  port = 0;
  constructor() {
    this.server = http.createServer((req, res) => {
      const chunks: Buffer[] = [];
      req.on('data', (c: Buffer) => chunks.push(c));
      req.on('end', () => {
        try {
          const ce = JSON.parse(Buffer.concat(chunks).toString('utf8')) as Delivered;
          this.got.push({
            id: ce.id,
            type: ce.type,
            subject: ce.subject,
            time: ce.time,
            data: ce.data,
          });
        } catch {}
        res.writeHead(204).end();
      });
    });
  }
  async start(): Promise<void> {
    await new Promise<void>((r) => this.server.listen(0, '127.0.0.1', r));
    this.port = (this.server.address() as AddressInfo).port;
  }
  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((r) => this.server.close(() => r()));
  }
}

function run(cmd: string, args: string[], timeoutMs = 20_000): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { env: toolEnv(), timeout: timeoutMs }, (e, stdout) =>
      e ? reject(e) : resolve(stdout),
    );
  });
}

function canonAcl(entries: { identity: string; access: string }[] | null): string | null {
  if (entries === null) return null;
  return entries
    .map((e) => `${e.identity}:${e.access}`)
    .sort()
    .join(',');
}

/** Runs one campaign and checks its history. */
export async function runCampaign(o: CampaignOptions): Promise<CampaignResult> {
  const log = o.log ?? (() => {});
  const kinds = o.faults ?? FAULT_KINDS;
  const work = { acl: true, malformed: true, catalog: true, events: true, ...o.workload };
  const rec = new Recorder();
  const root = mkdtempSync(path.join(os.tmpdir(), 'ballast-nemesis-'));
  // A run stopped by a signal exits without its finally: the work directory goes anyway.
  const dropRoot = () => {
    if (!o.keep) rmSync(root, { recursive: true, force: true });
  };
  process.once('exit', dropRoot);
  const shared = path.join(root, 'shared');
  mkdirSync(shared);
  const cluster = `n${o.seed}`;
  let etcd: EtcdCluster | null = null;
  const agents: Agent[] = [];
  const allProxies: FaultProxy[] = [];
  const hooks: Hook[] = [];
  const followers: Follower[] = [];
  const clients: NbdClient[] = [];
  const compactions: number[] = [];
  const t0 = performance.now();
  try {
    etcd = await startEtcdCluster({ size: 3, env: toolEnv() });
    for (const host of HOSTS) {
      const proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
      allProxies.push(...proxies);
      agents.push(
        new Agent(host, path.join(root, host), proxies, shared, cluster, o.agentEnv?.[host] ?? {}),
      );
    }
    for (const a of agents) await a.start();
    log(
      `nemesis: seed ${o.seed}: etcd and agents a, b, c up (${((performance.now() - t0) / 1000).toFixed(1)} s)`,
    );
    const A = agents[0]!;
    for (const d of PR_DEVICES) {
      const r = await A.api('POST', '/v1/devices', {
        name: d,
        size: `${(BLOCKS * BLOCK) / 1024}K`,
        pool: 'shared',
      });
      if (r.status !== 201) throw new Error(`creating ${d}: ${r.status} ${r.text}`);
    }
    for (let i = 0; i < (work.events ? 2 : 0); i++) {
      const h = new Hook();
      await h.start();
      hooks.push(h);
      const r = await A.api('POST', '/v1/notify', {
        name: `hook${i}`,
        url: `http://127.0.0.1:${h.port}/hook`,
      });
      if (r.status >= 300) throw new Error(`adding a recipient: ${r.status} ${r.text}`);
    }
    // Consumers are judged on what happened after they subscribed: the log up to here is not theirs.
    const baseline = (await readEventLog(A)).at(-1)?.id;
    if (work.events) for (const a of agents) followers.push(new Follower(a, baseline));

    const deadline = performance.now() + o.seconds * 1000;
    const live = () => performance.now() < deadline;
    const agentOf = (h: string) => agents[HOSTS.indexOf(h as (typeof HOSTS)[number])]!;

    // ---- NBD connections: one per identity, agent and device, reopened when lost ----
    const conns = new Map<string, { client: NbdClient; id: number } | null>();
    const openConn = async (identity: string, host: string, device: string) => {
      const k = `${identity}/${host}/${device}`;
      const have = conns.get(k);
      if (have) return have;
      const a = agentOf(host);
      if (!a.running || a.busy || a.nbdPort === 0) return null;
      try {
        const client = await NbdClient.connect(`nbd://127.0.0.1:${a.nbdPort}/${device}`, {
          localAddress: ADDRESS[identity]!,
          timeoutMs: 10_000,
        });
        clients.push(client);
        const c = rec.conn(device, identity, host);
        const entry = { client, id: c.id };
        conns.set(k, entry);
        return entry;
      } catch {
        return null;
      }
    };
    const dropConn = (identity: string, host: string, device: string) => {
      const k = `${identity}/${host}/${device}`;
      conns.get(k)?.client.destroy();
      conns.set(k, null);
    };

    const io = async (
      process: string,
      identity: string,
      host: string,
      device: string,
      cmd: 'read' | 'write',
      block: number,
      probe?: number,
    ) => {
      const c = await openConn(identity, host, device);
      if (!c) return;
      const op = rec.begin<IoOp>({
        kind: 'io',
        process,
        agent: host,
        device,
        identity,
        conn: c.id,
        cmd,
        block,
        ...(probe !== undefined ? { probe } : {}),
      });
      try {
        if (cmd === 'write') {
          op.tag = `w${op.id}`;
          const buf = Buffer.alloc(BLOCK);
          buf.write(`${op.tag}\0`, 0, 'latin1');
          const io = c.client.write(block * BLOCK, buf);
          await withTimeout(io, 60_000);
        } else {
          await withTimeout(c.client.read(block * BLOCK, BLOCK), 60_000);
        }
        rec.done(op, 'ok');
      } catch (e) {
        const errno = (e as { nbdErrno?: number }).nbdErrno;
        if (errno === 1) rec.done(op, 'failed', { errno: 'EPERM' } as Partial<IoOp>);
        else if (errno !== undefined) {
          rec.done(op, 'unknown', { note: ERRNO[errno] ?? `errno ${errno}` } as Partial<IoOp>);
        } else {
          rec.done(op, 'unknown', { note: (e as Error).message.slice(0, 80) } as Partial<IoOp>);
          dropConn(identity, host, device);
        }
      }
    };

    const prCall = async (process: string, host: string, device: string, req: Request) => {
      const a = agentOf(host);
      const op = rec.begin<PrOp>({ kind: 'pr', process, agent: host, device, req });
      let out: Outcome | undefined;
      try {
        const r = await a.api('POST', `/v1/devices/${device}/pr`, req, 60_000);
        const v = verdict(r);
        if (v.status === 'ok') {
          out = {
            ok: true,
            changed: r.body.changed === true,
            generation: Number(r.body.generation),
            preempted: (r.body.preempted as string[] | undefined) ?? [],
          };
          rec.done(op, 'ok', { out } as Partial<PrOp>);
        } else if (v.code && PR_CODES.has(v.code)) {
          rec.done(op, 'failed', {
            out: { ok: false, code: v.code },
            note: v.note,
          } as Partial<PrOp>);
        } else {
          rec.done(op, v.status, { note: v.note } as Partial<PrOp>);
        }
      } catch (e) {
        rec.done(op, notSent(e) ? 'failed' : 'unknown', {
          note: (e as Error).message.slice(0, 80),
        });
      }
      return { op, out };
    };
    const aclCall = async (
      process: string,
      host: string,
      device: string,
      entries: { identity: string; access: string }[] | null,
    ) => {
      const op = rec.begin<AclOp>({
        kind: 'acl',
        process,
        agent: host,
        device,
        entries: canonAcl(entries),
      });
      try {
        const r = await agentOf(host).api('PUT', `/v1/devices/${device}/acl`, { entries });
        const v = verdict(r);
        rec.done(op, v.status, v.note ? { note: v.note } : {});
      } catch (e) {
        rec.done(op, notSent(e) ? 'failed' : 'unknown', {
          note: (e as Error).message.slice(0, 80),
        });
      }
      return op;
    };

    // ---- clients ----
    const workers: Promise<void>[] = [];
    const prClient = async (n: number) => {
      const rng = new Rng(o.seed * 31 + n);
      const name = `pr${n}`;
      while (live()) {
        const device = rng.pick(PR_DEVICES);
        const host = rng.pick(HOSTS);
        const a = agentOf(host);
        // read the state now and then to choose keys that mean something
        let regs: Record<string, string> = {};
        try {
          const s = await a.api('GET', `/v1/devices/${device}/pr`, undefined, 10_000);
          for (const r of (s.body.registrations as
            | { identity: string; key: string }[]
            | undefined) ?? []) {
            regs[r.identity] = r.key;
          }
        } catch {
          regs = {};
        }
        const req = makeRequest(rng, regs, work.malformed);
        const { op, out } = await prCall(name, host, device, req);
        // a grant is in force on every agent when the command returns
        if (out?.ok && out.changed) {
          await Promise.all(
            HOSTS.map((h) =>
              io(
                name,
                req.as,
                h,
                device,
                rng.pick(['read', 'write'] as const),
                rng.int(0, BLOCKS - 1),
                op.id,
              ),
            ),
          );
        }
        await sleep(rng.int(5, 60));
      }
    };
    const ioClient = async (identity: string, host: string) => {
      const rng = new Rng(
        o.seed * 131 + IDENTITIES.indexOf(identity as never) * 7 + HOSTS.indexOf(host as never),
      );
      while (live()) {
        await io(
          `io-${identity}-${host}`,
          identity,
          host,
          rng.pick(PR_DEVICES),
          rng.chance(0.6) ? 'write' : 'read',
          rng.int(0, BLOCKS - 1),
        );
        await sleep(rng.int(10, 80));
      }
    };
    const catalogClient = async () => {
      const rng = new Rng(o.seed * 7 + 3);
      while (live()) {
        const name = rng.pick(CATALOG);
        const host = rng.pick(HOSTS);
        const action = rng.weighted({ create: 3, resize: 2, delete: 2 } as const);
        const mib = rng.int(1, 4);
        const op = rec.begin<DeviceOp>({
          kind: 'device',
          process: 'catalog',
          agent: host,
          action,
          name,
          ...(action !== 'delete' ? { size: mib * 2 ** 20 } : {}),
        });
        try {
          const a = agentOf(host);
          const r =
            action === 'create'
              ? await a.api('POST', '/v1/devices', { name, size: `${mib}M`, pool: 'shared' })
              : action === 'resize'
                ? await a.api('POST', `/v1/devices/${name}/resize`, { size: `${mib}M` })
                : await a.api('DELETE', `/v1/devices/${name}`);
          const v = verdict(r);
          rec.done(op, v.status, {
            ...(v.code ? { code: v.code } : {}),
            ...(v.note ? { note: v.note } : {}),
          });
          if (v.status === 'failed' && v.code && !DEVICE_VERDICTS.has(v.code)) op.code = v.code;
        } catch (e) {
          rec.done(op, notSent(e) ? 'failed' : 'unknown', {
            note: (e as Error).message.slice(0, 80),
          });
        }
        await sleep(rng.int(100, 600));
      }
    };
    const aclClient = async () => {
      const rng = new Rng(o.seed * 11 + 5);
      while (live()) {
        const device = rng.pick(PR_DEVICES);
        const host = rng.pick(HOSTS);
        // the three guests always keep rw: the access list changes nothing on their data path
        const entries = rng.chance(0.25)
          ? null
          : [
              ...IDENTITIES.map((identity) => ({ identity, access: 'rw' })),
              ...['guest-x', 'guest-y']
                .filter(() => rng.chance(0.5))
                .map((identity) => ({ identity, access: rng.pick(['ro', 'rw']) })),
            ];
        await aclCall('acl', host, device, entries);
        await sleep(rng.int(300, 1200));
      }
    };
    if (o.script) {
      // a scripted scenario instead of the random clients and faults
      workers.push(
        o.script({
          pr: async (host, device, req) => (await prCall('script', host, device, req)).op,
          io: (identity, host, device, cmd, block) =>
            io('script', identity, host, device, cmd, block),
          acl: (host, device, entries) => aclCall('script', host, device, entries),
          partition: (host) => {
            rec.fault('partition', host);
            for (const p of agentOf(host).proxies) p.partition();
          },
          heal: (host) => {
            for (const f of rec.faults)
              if (f.target === host && f.end === undefined) f.end = performance.now();
            for (const p of agentOf(host).proxies) p.heal();
          },
          ops: rec.ops,
        }),
      );
    } else {
      for (let n = 0; n < 3; n++) workers.push(prClient(n));
      for (const id of IDENTITIES) for (const h of HOSTS) workers.push(ioClient(id, h));
      if (work.catalog) workers.push(catalogClient());
      if (work.acl) workers.push(aclClient());
    }

    // ---- faults ----
    const plan = o.script ? [] : schedule(o.seed, o.seconds, kinds);
    const locks = new Set<string>();
    const faultTasks: Promise<void>[] = [];
    const start = performance.now();
    const inject = async (f: ScheduledFault) => {
      const e = etcd!;
      if (f.kind === 'compact') {
        const fault = rec.fault('compact', 'etcd');
        try {
          const st = JSON.parse(
            await run('etcdctl', [
              '--endpoints',
              e.endpoints.join(','),
              'endpoint',
              'status',
              '-w',
              'json',
            ]),
          ) as {
            Status: { header: { revision: number } };
          }[];
          const rev = Math.max(...st.map((s) => s.Status.header.revision));
          await run('etcdctl', ['--endpoints', e.endpoints.join(','), 'compact', String(rev)]);
          compactions.push(rev);
          fault.detail = `at revision ${rev}`;
        } catch (err) {
          fault.detail = `failed: ${(err as Error).message.split('\n')[0]}`;
        }
        fault.end = performance.now();
        return;
      }
      if (f.kind === 'etcd-leader-kill' || f.kind === 'etcd-freeze') {
        if (locks.has('etcd')) return;
        locks.add('etcd');
        try {
          if (f.kind === 'etcd-leader-kill') {
            const i = await e.leader();
            const fault = rec.fault(f.kind, e.members[i]!.name);
            await e.kill(i);
            await sleep(f.ms);
            await e.restart(i);
            fault.end = performance.now();
          } else {
            const pid = e.pid(f.target);
            if (pid === undefined) return;
            const fault = rec.fault(f.kind, e.members[f.target]!.name);
            process.kill(pid, 'SIGSTOP');
            await sleep(f.ms);
            process.kill(pid, 'SIGCONT');
            fault.end = performance.now();
          }
        } finally {
          locks.delete('etcd');
        }
        return;
      }
      const a = agents[f.target]!;
      if (locks.has(a.host)) return;
      locks.add(a.host);
      try {
        const fault = rec.fault(f.kind, a.host);
        if (f.kind === 'kill') {
          a.busy = true;
          await a.kill9();
          for (const id of IDENTITIES) for (const d of PR_DEVICES) dropConn(id, a.host, d);
          await sleep(f.ms);
          await startAgain(a, log);
          a.busy = false;
        } else if (f.kind === 'freeze') {
          a.signal('SIGSTOP');
          await sleep(f.ms);
          a.signal('SIGCONT');
        } else {
          for (const p of a.proxies) p.partition();
          await sleep(f.ms);
          for (const p of a.proxies) p.heal();
        }
        fault.end = performance.now();
      } finally {
        locks.delete(a.host);
      }
    };
    for (const f of plan) {
      const wait = start + f.at - performance.now();
      if (wait > 0) await sleep(wait);
      if (!live()) break;
      log(
        `nemesis: ${((performance.now() - t0) / 1000).toFixed(1)} s: ${f.kind} ${f.kind.startsWith('etcd') ? `m${f.target}` : HOSTS[f.target]} ${f.ms} ms`,
      );
      // a fault that does not end (an etcd member that never comes back healthy, a
      // status call that hangs) is reported, and must not hold the run or its lock forever
      faultTasks.push(
        bounded(
          inject(f),
          f.ms + 120_000,
          `fault ${f.kind} at ${(f.at / 1000).toFixed(1)} s`,
        ).catch((err: Error) => log(`nemesis: fault ${f.kind}: ${err.message}`)),
      );
    }
    await Promise.all(faultTasks);
    // every client stops within its own timeouts; one that does not is named, not waited for
    const pending = new Set(workers.map((_, i) => i));
    workers.forEach((w, i) => {
      void w.finally(() => pending.delete(i));
    });
    await bounded(Promise.all(workers), 180_000, 'clients stopping').catch((err: Error) =>
      log(
        `nemesis: ${err.message}: ${pending.size} client(s) still waiting; going on without them`,
      ),
    );
    log(
      `nemesis: clients stopped after ${((performance.now() - t0) / 1000).toFixed(1)} s, ${rec.ops.length} operations; settling`,
    );

    // ---- the end: heal, wait for the agents to agree, read everything back ----
    for (const p of allProxies) p.heal();
    for (const a of agents) {
      if (a.running) a.signal('SIGCONT');
      else if (!(await startAgain(a, log)))
        throw new Error(`agent ${a.host} does not start:\n${a.err}`);
    }
    for (const c of conns.values()) c?.client.destroy();
    const final = await settle(agents, hooks, followers, compactions, shared);
    if (baseline !== undefined) final.baseline = baseline;
    const history: History = {
      seed: o.seed,
      ops: rec.ops,
      conns: rec.conns,
      faults: rec.faults,
      final,
      prDevices: PR_DEVICES,
      blocks: BLOCKS,
    };
    if (o.historyFile) writeFileSync(o.historyFile, JSON.stringify(history));
    const anomalies = checkAll(history);
    const ops: Record<string, number> = {};
    for (const op of rec.ops)
      ops[`${op.kind}.${op.status}`] = (ops[`${op.kind}.${op.status}`] ?? 0) + 1;
    const faults: Record<string, number> = {};
    for (const f of rec.faults) faults[f.kind] = (faults[f.kind] ?? 0) + 1;
    for (const a of anomalies)
      if (a.check === 'convergence')
        log(
          `nemesis: agents' stderr tails:\n${agents.map((x) => `${x.host}: ${x.err.slice(-1500)}`).join('\n')}`,
        );
    return { history, anomalies, stats: { ops, faults, seconds: (performance.now() - t0) / 1000 } };
  } finally {
    for (const f of followers) await f.stop().catch(() => {});
    for (const c of clients) c.destroy();
    for (const a of agents) await a.kill9().catch(() => {});
    for (const h of hooks) await h.stop().catch(() => {});
    for (const p of allProxies) await p.close().catch(() => {});
    if (etcd) {
      for (let i = 0; i < 3; i++) {
        const pid = etcd.pid(i);
        if (pid !== undefined) process.kill(pid, 'SIGCONT');
      }
      await etcd.stop();
    }
    process.removeListener('exit', dropRoot);
    if (o.keep) log(`nemesis: the agents' data and logs (agent.log) are kept in ${root}`);
    else rmSync(root, { recursive: true, force: true });
  }
}

/** `p`, or an error once `ms` have passed without it settling. */
function bounded<T>(p: Promise<T>, ms: number, what: string): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    t = setTimeout(() => reject(new Error(`${what}: not done after ${ms / 1000} s`)), ms);
  });
  return Promise.race([p, timeout]).finally(() => clearTimeout(t));
}

/** Starts a killed agent, again while etcd has no quorum or the agent is cut off. */
async function startAgain(a: Agent, log: (l: string) => void): Promise<boolean> {
  for (let i = 0; ; i++) {
    try {
      await a.start();
      return true;
    } catch (err) {
      if (i >= 20) {
        log(`nemesis: agent ${a.host} restart: ${(err as Error).message}`);
        return false;
      }
      await sleep(500);
    }
  }
}

function withTimeout<T>(p: Promise<T>, ms: number): Promise<T> {
  let t: NodeJS.Timeout | undefined;
  return Promise.race([
    p,
    new Promise<never>((_, reject) => {
      t = setTimeout(() => reject(new Error(`no answer in ${ms} ms`)), ms);
    }),
  ]).finally(() => clearTimeout(t));
}

/** A PR command: every service action, several identities, keys that mostly mean something. */
function makeRequest(rng: Rng, regs: Record<string, string>, malformed: boolean): Request {
  const as = rng.pick(IDENTITIES);
  const others = IDENTITIES.filter((x) => x !== as);
  const action = rng.weighted({
    register: 3,
    'register-ignore': 1,
    reserve: 3,
    release: 2,
    clear: 0.4,
    preempt: 1.5,
    'preempt-abort': 2,
    'register-move': 1,
    bad: malformed ? 0.3 : 0,
  } as const);
  const own = regs[as];
  const key =
    own !== undefined && rng.chance(0.85) ? own : rng.chance(0.5) ? '0x0' : rng.pick(KEYS[as]!);
  const type = rng.pick([1, 3, 5, 6, 7, 8, 'WE', 'EA'] as const);
  if (action === 'bad') {
    return {
      action: rng.pick(['reserve', 'register', 'preempt'] as Action[]),
      as,
      key,
      type: 'XX',
    };
  }
  switch (action) {
    case 'register':
    case 'register-ignore':
      return { action, as, key, saKey: rng.chance(0.15) ? '0x0' : rng.pick(KEYS[as]!) };
    case 'reserve':
    case 'release':
      return { action, as, key, type };
    case 'clear':
      return { action, as, key };
    case 'preempt':
    case 'preempt-abort': {
      const victim = rng.pick(others);
      const saKey = rng.chance(0.1) ? '0x0' : (regs[victim] ?? rng.pick(KEYS[victim]!));
      return { action, as, key, saKey, type };
    }
    case 'register-move': {
      const target = rng.pick(others);
      return {
        action,
        as,
        key,
        saKey: rng.pick(KEYS[target]!),
        target,
        unregister: rng.chance(0.3),
      };
    }
  }
}

/** Waits for the agents to agree and the consumers to catch up, then reads everything back. */
async function settle(
  agents: Agent[],
  hooks: Hook[],
  followers: Follower[],
  compactions: number[],
  shared: string,
): Promise<Final> {
  const snapshot = async (a: Agent): Promise<AgentFinal> => {
    const devs = (await a.api('GET', '/v1/devices', undefined, 10_000)).body.devices as {
      name: string;
      size: number;
      state: string;
    }[];
    const pr: AgentFinal['pr'] = {};
    const acl: AgentFinal['acl'] = {};
    for (const d of PR_DEVICES) {
      const s = (await a.api('GET', `/v1/devices/${d}/pr`, undefined, 10_000)).body as {
        generation: number;
        registrations: { identity: string; key: string }[];
        reservation: { type: number | string; holder: string | null } | null;
      };
      const regs: Record<string, string> = {};
      for (const r of s.registrations ?? []) regs[r.identity] = r.key;
      const t = s.reservation ? typeNumber(s.reservation.type) : null;
      const ar = t === 7 || t === 8;
      pr[d] = {
        generation: s.generation,
        regs,
        reservation: s.reservation ? `${t}@${ar ? '*' : s.reservation.holder}` : '-',
      };
      const l = (await a.api('GET', `/v1/devices/${d}/acl`, undefined, 10_000)).body as {
        entries: { identity: string; access: string }[] | null;
      };
      acl[d] = canonAcl(l.entries ?? null);
    }
    return {
      agent: a.host,
      devices: (devs ?? [])
        .map((d) => ({ name: d.name, size: d.size, state: d.state }))
        .sort((x, y) => (x.name < y.name ? -1 : 1)),
      pr,
      acl,
    };
  };
  const began = performance.now();
  let finals: AgentFinal[] = [];
  let converged = false;
  while (performance.now() - began < 90_000) {
    try {
      finals = await Promise.all(agents.map(snapshot));
      const same = finals.every(
        (f) => JSON.stringify({ ...f, agent: '' }) === JSON.stringify({ ...finals[0]!, agent: '' }),
      );
      const ready = finals.every((f) => f.devices.every((d) => d.state === 'ready'));
      if (same && ready) {
        converged = true;
        break;
      }
    } catch {}
    await sleep(500);
  }
  const convergedAfterMs = performance.now() - began;
  const A = agents[0]!;
  const audit: Record<string, AuditRow[]> = {};
  const blocks: Record<string, string[]> = {};
  for (const d of PR_DEVICES) {
    const r = await A.api('GET', `/v1/devices/${d}/pr/audit`, undefined, 20_000);
    audit[d] = ((r.body.entries as AuditRow[] | undefined) ?? []).map((e) => ({
      ...e,
      ...(e.type !== undefined ? { type: typeNumber(e.type) as number } : {}),
    }));
    const file = readdirSync(shared).find((f) => f.startsWith(`${d}.`) && f.endsWith('.img'));
    const data = file ? readFileSync(path.join(shared, file)) : Buffer.alloc(0);
    blocks[d] = [];
    for (let b = 0; b < BLOCKS; b++) {
      const chunk = data.subarray(b * BLOCK, b * BLOCK + 64);
      const end = chunk.indexOf(0);
      blocks[d].push(chunk.subarray(0, end < 0 ? chunk.length : end).toString('latin1'));
    }
  }
  // the event log as it stands, then every consumer caught up with it
  const eventLog = await readEventLog(A);
  const lastId = eventLog[eventLog.length - 1]?.id;
  const consumers = () => ({
    ...Object.fromEntries(hooks.map((h, i) => [`recipient hook${i}`, h.got])),
    ...Object.fromEntries(followers.map((f, i) => [`follow stream of ${agents[i]!.host}`, f.got])),
  });
  const caughtUp = () =>
    Object.values(consumers()).every(
      (list) => lastId === undefined || list.some((e) => e.id === lastId),
    );
  const waitFrom = performance.now();
  while (!caughtUp() && performance.now() - waitFrom < 60_000) await sleep(250);
  return {
    agents: finals,
    converged,
    convergedAfterMs,
    audit,
    blocks,
    consumers: Object.fromEntries(Object.entries(consumers()).map(([k, v]) => [k, [...v]])),
    eventLog,
    compactions,
  };
}

function typeNumber(t: number | string): number | string {
  const names: Record<string, number> = { WE: 1, EA: 3, WERO: 5, EARO: 6, WEAR: 7, EAAR: 8 };
  if (typeof t === 'number') return t;
  return names[t.toUpperCase()] ?? (/^\d+$/.test(t) ? Number(t) : t);
}

async function readEventLog(a: Agent): Promise<Delivered[]> {
  const r = await a.api('GET', '/v1/events', undefined, 30_000);
  return r.text
    .split('\n\n')
    .map(parseSse)
    .filter((e): e is Delivered => e !== null);
}
