// The main thread's side of the worker threads that serve established
// connections (the design is in nbd/WORKERS.md). The main thread accepts,
// runs every handshake (TLS included) and keeps, for each connection it hands
// over, its Connection object as the stand-in the rest of the program sees:
// connectionsTo(), shutdown(), kill(), abort() and closed() reach the worker
// through here.
//
// Access answers travel through shared memory: one (generation, mask) pair of
// Int32 per handed-over connection. The export's AccessControl tells us of a
// change synchronously (subscribe), we write the new masks and bump the
// generations before returning, so a worker reads the new answer for every
// request it reads after the call that made the change returns.

import { availableParallelism } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Worker } from 'node:worker_threads';
import { closeQuietly, releaseShared, type SharedBackend } from './backend.js';
import type { AccessControl } from './export.js';
import type { IdentityMethod, RelayAnswer, RemoteLink } from './handover.js';
import type { Session } from './negotiation.js';
import type { ExportStats } from './stats.js';
import type { TlsCredentialOptions, TlsMode } from './tls.js';

/** Handed-over connections at once (each holds one slot of the shared access table). */
const SLOTS = 8192;

/** The cores this process may use: the default number of workers. */
export function defaultWorkers(): number {
  return Math.max(1, availableParallelism());
}

/** Main → worker. */
export type ToWorker =
  | ({ t: 'conn'; id: number; fd: number; leftover: Buffer } & SessionInfo)
  | { t: 'tls'; id: number; fd: number }
  | {
      t: 'optReply';
      id: number;
      replies: Buffer[];
      verdict: 'continue' | 'close' | 'transmission';
      reason?: string;
      session?: SessionInfo;
    }
  | { t: 'shutdown' | 'kill' | 'abort'; id: number }
  | { t: 'sync'; seq: number };

/** A negotiated session as a worker needs it. */
export interface SessionInfo {
  name: string;
  description: string;
  flags: number;
  structured: boolean;
  allocationContext: boolean;
  identity: string;
  identityMethod: IdentityMethod;
  backend: SharedBackend;
  /** Index into the shared access table, or -1: every command allowed. */
  slot: number;
}

/** Counters a worker collected since its last report, per connection. */
export interface StatsDelta {
  requests: Float64Array;
  errors: Float64Array;
  bytes: Float64Array;
  refused: Float64Array;
  denied: Float64Array;
  latency: Float64Array[];
  latencySum: Float64Array;
}

export interface ServerDelta {
  requests: number[];
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  denied: number;
}

/** Worker → main. */
export type FromWorker =
  | { t: 'ready' }
  | { t: 'stats'; server: ServerDelta; conns: { id: number; d: StatsDelta }[] }
  | { t: 'aborted'; id: number }
  | { t: 'closed'; id: number }
  | { t: 'synced'; seq: number }
  | {
      t: 'secure';
      id: number;
      identity: string | null;
      method: IdentityMethod;
      protocol: string | null;
    }
  | { t: 'opt'; id: number; opt: number; data: Uint8Array | null }
  | { t: 'tlsFailed'; id: number; message: string }
  | { t: 'log'; level: 'debug' | 'info' | 'warn'; msg: string };

export interface WorkerInit {
  access: SharedArrayBuffer;
  /** The TLS credentials' material, for connections whose TLS runs on the worker. */
  tls?: { mode: TlsMode; source: TlsCredentialOptions };
  maxInFlight?: number;
  maxBufferedBytes?: number;
  threadBufferedBytes?: number;
}

/** The worker's entry: next to this file, compiled (a .ts source runs it from dist/). */
function workerUrl(): URL {
  const here = import.meta.url;
  if (here.endsWith('.ts')) return new URL('../dist/nbd/worker.js', here);
  return new URL('./worker.js', here);
}

/** What the pool needs of the server whose connections it serves (NbdServer). */
export interface PoolServer {
  readonly options: {
    readonly maxInFlight?: number;
    readonly maxBufferedBytes?: number;
    readonly threadBufferedBytes?: number;
    readonly tls?: { mode: TlsMode; credentials: { source: TlsCredentialOptions } };
    readonly tlsOnWorkers?: boolean;
  };
  /** The server's counters: what the workers served is added to them. */
  readonly stats: ServerDelta;
  log(level: 'debug' | 'info' | 'warn', msg: string): void;
}

/** What the pool needs of a connection it hands over (the server's Connection). */
export interface PooledConnection {
  readonly id: number;
  readonly remote: string;
  /** The socket's descriptor, or -1. */
  readonly fd: number;
  readonly identity: string;
  readonly identityMethod: IdentityMethod;
  readonly tlsProtocol: string | null;
  readonly session: Session | null;
  readonly exportStats: ExportStats | null;
  decideRelayed(opt: number, data: Buffer | null): RelayAnswer;
  relayedSecure(identity: string | null, method: IdentityMethod, protocol: string | null): void;
  relayedTlsFailed(message: string): void;
  remoteClosed(): void;
}

interface Thread {
  worker: Worker;
  index: number;
  conns: Map<number, Remote>;
  ready: Promise<void>;
  dead: boolean;
}

/** One handed-over connection, as the main thread tracks it. */
class Remote implements RemoteLink {
  readonly abortWaiters: (() => void)[] = [];
  unsubscribe: (() => void) | null = null;

  constructor(
    readonly pool: WorkerPool,
    readonly thread: Thread,
    readonly conn: PooledConnection,
    public slot: number,
    public access: AccessControl | null,
  ) {}

  shutdown(): void {
    this.pool.send(this.thread, { t: 'shutdown', id: this.conn.id });
  }

  kill(): void {
    this.pool.send(this.thread, { t: 'kill', id: this.conn.id });
  }

  abort(): Promise<void> {
    return new Promise((resolve) => {
      this.abortWaiters.push(resolve);
      this.pool.send(this.thread, { t: 'abort', id: this.conn.id });
    });
  }
}

export class WorkerPool {
  private readonly threads: Thread[] = [];
  private readonly table: Int32Array;
  private readonly sab: SharedArrayBuffer;
  private readonly freeSlots: number[] = [];
  /** Handed-over connections by their export's access control, for change notices. */
  private readonly byAccess = new Map<
    AccessControl,
    { conns: Set<Remote>; unsubscribe: () => void }
  >();
  private started: Promise<void> | null = null;
  private closing = false;

  constructor(
    private readonly server: PoolServer,
    readonly size: number,
    /** A close-on-exec duplicate of a descriptor, or -errno (ServerOptions.dupFd). */
    private readonly dup: (fd: number) => number,
  ) {
    this.sab = new SharedArrayBuffer(SLOTS * 2 * 4);
    this.table = new Int32Array(this.sab);
    for (let i = SLOTS - 1; i >= 0; i--) this.freeSlots.push(i);
  }

  /** Starts the threads; resolves once each can take connections. */
  start(): Promise<void> {
    this.started ??= (async () => {
      for (let i = 0; i < this.size; i++) this.threads.push(this.spawn(i));
      await Promise.all(this.threads.map((t) => t.ready));
    })();
    return this.started;
  }

  private spawn(index: number): Thread {
    const o = this.server.options;
    const init: WorkerInit = {
      access: this.sab,
      maxInFlight: o.maxInFlight,
      maxBufferedBytes: o.maxBufferedBytes,
      threadBufferedBytes: o.threadBufferedBytes,
      tls: o.tls ? { mode: o.tls.mode, source: o.tls.credentials.source } : undefined,
    };
    const worker = new Worker(fileURLToPath(workerUrl()), {
      workerData: init,
      name: `nbd-worker-${index}`,
    });
    let ready!: () => void;
    let failed!: (e: Error) => void;
    const t: Thread = {
      worker,
      index,
      conns: new Map(),
      ready: new Promise<void>((resolve, reject) => {
        ready = resolve;
        failed = reject;
      }),
      dead: false,
    };
    worker.on('message', (m: FromWorker) => {
      if (m.t === 'ready') ready();
      else this.onMessage(t, m);
    });
    worker.on('error', (e) => {
      this.server.log('warn', `nbd worker ${index}: ${e.stack ?? e.message}`);
      failed(e);
    });
    worker.on('exit', (code) => {
      t.dead = true;
      for (const [seq] of this.syncWaiters) this.synced(t, seq);
      if (!this.closing) this.server.log('warn', `nbd worker ${index} exited (${code})`);
      // Its connections died with it.
      for (const r of [...t.conns.values()]) this.gone(t, r);
    });
    return t;
  }

  /** Connections each worker serves now, in worker order. */
  load(): number[] {
    return this.threads.map((t) => t.conns.size);
  }

  /** Connections served by the workers now. */
  get remotes(): number {
    let n = 0;
    for (const t of this.threads) n += t.conns.size;
    return n;
  }

  private syncSeq = 0;
  private readonly syncWaiters = new Map<number, { left: Set<Thread>; done: () => void }>();

  /** Resolves once every worker has answered: what they told before it has arrived. */
  sync(): Promise<void> {
    const seq = ++this.syncSeq;
    const live = this.threads.filter((t) => !t.dead);
    if (live.length === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.syncWaiters.set(seq, { left: new Set(live), done: resolve });
      for (const t of live) t.worker.postMessage({ t: 'sync', seq } satisfies ToWorker);
    });
  }

  private synced(t: Thread, seq: number): void {
    const w = this.syncWaiters.get(seq);
    if (!w) return;
    w.left.delete(t);
    if (w.left.size === 0) {
      this.syncWaiters.delete(seq);
      w.done();
    }
  }

  send(t: Thread, m: ToWorker): void {
    if (m.t === 'sync') return;
    if (t.dead) {
      const r = m.t === 'conn' ? undefined : t.conns.get(m.id);
      if (r) this.gone(t, r);
      return;
    }
    t.worker.postMessage(m);
  }

  /** Whether a connection just established should move to a worker. */
  wants(conn: PooledConnection): boolean {
    if (this.closing || this.threads.length === 0) return false;
    if (conn.tlsProtocol !== null) return false;
    const s = conn.session;
    return s !== null && this.wantsSession(s) && conn.fd >= 0;
  }

  /** Whether a connection that just got its STARTTLS acknowledged should do TLS on a worker. */
  wantsTls(conn: PooledConnection): boolean {
    if (this.closing || this.server.options.tlsOnWorkers === false) return false;
    if (!this.threads.some((t) => !t.dead)) return false;
    return conn.fd >= 0 && this.freeSlots.length > 0;
  }

  /** The least loaded live worker. */
  private pick(): Thread | null {
    let best: Thread | null = null;
    for (const c of this.threads)
      if (!c.dead && (!best || c.conns.size < best.conns.size)) best = c;
    return best;
  }

  /** Hands a connection over right after its STARTTLS: the worker runs the TLS handshake. */
  adoptTls(conn: PooledConnection): RemoteLink | null {
    const t = this.pick();
    if (!t) return null;
    const fd = this.dup(conn.fd);
    if (fd < 0) return null;
    const r = new Remote(this, t, conn, -1, null);
    t.conns.set(conn.id, r);
    t.worker.postMessage({ t: 'tls', id: conn.id, fd } satisfies ToWorker);
    this.server.log('debug', `conn ${conn.id} ${conn.remote}: TLS on worker ${t.index}`);
    return r;
  }

  /** A relayed option: decided here, answered to the worker. */
  private relayOption(t: Thread, r: Remote, opt: number, raw: Uint8Array | null): void {
    const data = raw === null ? null : Buffer.from(raw.buffer, raw.byteOffset, raw.byteLength);
    const a = r.conn.decideRelayed(opt, data);
    if (a.verdict !== 'transmission') {
      this.send(t, {
        t: 'optReply',
        id: r.conn.id,
        replies: a.replies,
        verdict: a.verdict,
        reason: a.reason,
      });
      return;
    }
    const s = a.session!;
    const shared = this.wantsSession(s) ? (s.export.backend.share?.() ?? null) : null;
    if (shared === null) {
      // Negotiated, but this export cannot be served off the main thread.
      this.server.log(
        'warn',
        `conn ${r.conn.id}: export ${s.export.name} cannot be served by a worker; closing`,
      );
      this.send(t, {
        t: 'optReply',
        id: r.conn.id,
        replies: [],
        verdict: 'close',
        reason: 'export not servable by a worker',
      });
      return;
    }
    const acc = s.export.access ?? null;
    if (acc) {
      r.slot = this.takeSlot(acc, r.conn);
      r.access = acc;
      this.watch(acc, r);
    }
    this.send(t, {
      t: 'optReply',
      id: r.conn.id,
      replies: a.replies,
      verdict: 'transmission',
      session: sessionInfo(s, r.conn, shared, r.slot),
    });
  }

  /** A slot of the shared access table, holding the connection's answer from `acc`. */
  private takeSlot(acc: AccessControl, conn: PooledConnection): number {
    const slot = this.freeSlots.pop()!;
    this.publish(slot, acc, conn);
    return slot;
  }

  /** Writes the connection's answer and bumps the slot's generation: workers read it from now on. */
  private publish(slot: number, acc: AccessControl, conn: PooledConnection): void {
    Atomics.store(this.table, slot * 2 + 1, acc.mask(conn.identity));
    Atomics.add(this.table, slot * 2, 1);
  }

  /** Whether a worker can serve this session's export (shareable, no fence). */
  private wantsSession(s: Session): boolean {
    if (typeof s.export.backend.share !== 'function') return false;
    const acc = s.export.access;
    if (acc) {
      if (typeof acc.subscribe !== 'function') return false;
      if (acc.gate !== undefined && acc.gated !== false) return false;
    }
    return this.freeSlots.length > 0;
  }

  /**
   * Hands the connection over: its socket and backend duplicated for a worker.
   * Returns the link the Connection then stands for, or null (served here).
   */
  adopt(conn: PooledConnection, leftover: Buffer): RemoteLink | null {
    const s = conn.session;
    const t = this.pick();
    if (!s || t === null || this.freeSlots.length === 0) return null;
    const fd = this.dup(conn.fd);
    if (fd < 0) return null;
    const shared = s.export.backend.share?.() ?? null;
    if (shared === null) {
      closeQuietly(fd);
      return null;
    }
    const acc = s.export.access ?? null;
    const slot = acc ? this.takeSlot(acc, conn) : -1;
    const r = new Remote(this, t, conn, slot, acc);
    this.server.log('debug', `conn ${conn.id} ${conn.remote}: served by worker ${t.index}`);
    if (acc) this.watch(acc, r);
    t.conns.set(conn.id, r);
    try {
      t.worker.postMessage({
        t: 'conn',
        id: conn.id,
        fd,
        leftover,
        ...sessionInfo(s, conn, shared, slot),
      } satisfies ToWorker);
    } catch (e) {
      this.server.log('warn', `conn ${conn.id}: cannot hand over: ${(e as Error).message}`);
      closeQuietly(fd);
      releaseShared(shared);
      this.release(t, r);
      return null;
    }
    return r;
  }

  private watch(acc: AccessControl, r: Remote): void {
    let w = this.byAccess.get(acc);
    if (!w) {
      const conns = new Set<Remote>();
      // Synchronous, inside the change: every worker sees it before the change returns.
      const unsubscribe = acc.subscribe!(() => {
        for (const c of conns) this.publish(c.slot, acc, c.conn);
      });
      w = { conns, unsubscribe };
      this.byAccess.set(acc, w);
    }
    w.conns.add(r);
  }

  private release(t: Thread, r: Remote): void {
    t.conns.delete(r.conn.id);
    if (r.access) {
      const w = this.byAccess.get(r.access);
      if (w) {
        w.conns.delete(r);
        if (w.conns.size === 0) {
          w.unsubscribe();
          this.byAccess.delete(r.access);
        }
      }
    }
    if (r.slot >= 0) {
      Atomics.store(this.table, r.slot * 2 + 1, 0);
      this.freeSlots.push(r.slot);
    }
  }

  private gone(t: Thread, r: Remote): void {
    this.release(t, r);
    for (const w of r.abortWaiters.splice(0)) w();
    r.conn.remoteClosed();
  }

  private onMessage(t: Thread, m: FromWorker): void {
    switch (m.t) {
      case 'log':
        this.server.log(m.level, m.msg);
        return;
      case 'stats':
        this.addStats(t, m.server, m.conns);
        return;
      case 'aborted': {
        const r = t.conns.get(m.id);
        if (r) for (const w of r.abortWaiters.splice(0)) w();
        return;
      }
      case 'closed': {
        const r = t.conns.get(m.id);
        if (r) this.gone(t, r);
        return;
      }
      case 'synced':
        this.synced(t, m.seq);
        return;
      case 'secure':
        t.conns.get(m.id)?.conn.relayedSecure(m.identity, m.method, m.protocol);
        return;
      case 'tlsFailed':
        t.conns.get(m.id)?.conn.relayedTlsFailed(m.message);
        return;
      case 'opt': {
        const r = t.conns.get(m.id);
        if (r) this.relayOption(t, r, m.opt, m.data);
        return;
      }
    }
  }

  private addStats(t: Thread, d: ServerDelta, conns: { id: number; d: StatsDelta }[]): void {
    const st = this.server.stats;
    for (let i = 0; i < d.requests.length; i++) st.requests[i]! += d.requests[i]!;
    st.errors += d.errors;
    st.bytesRead += d.bytesRead;
    st.bytesWritten += d.bytesWritten;
    st.denied += d.denied;
    for (const c of conns) {
      const es = t.conns.get(c.id)?.conn.exportStats;
      if (es) addExportStats(es, c.d);
    }
  }

  /** After every connection closed: the threads stop. */
  async close(): Promise<void> {
    this.closing = true;
    await Promise.all(this.threads.map((t) => (t.dead ? undefined : t.worker.terminate())));
  }
}

/** What a worker needs of an established connection's session: its backend shared, its slot. */
function sessionInfo(
  s: Session,
  conn: PooledConnection,
  backend: SharedBackend,
  slot: number,
): SessionInfo {
  return {
    name: s.export.name,
    description: s.export.description,
    flags: s.flags,
    structured: s.structured,
    allocationContext: s.allocationContext,
    identity: conn.identity,
    identityMethod: conn.identityMethod,
    backend,
    slot,
  };
}

function addExportStats(es: ExportStats, d: StatsDelta): void {
  const add = (a: Float64Array, b: Float64Array): void => {
    for (let i = 0; i < a.length && i < b.length; i++) a[i]! += b[i]!;
  };
  add(es.requests, d.requests);
  add(es.errors, d.errors);
  add(es.bytes, d.bytes);
  add(es.refused, d.refused);
  add(es.denied, d.denied);
  add(es.latencySum, d.latencySum);
  for (let i = 0; i < es.latency.length && i < d.latency.length; i++) {
    add(es.latency[i]!, d.latency[i]!);
  }
}
