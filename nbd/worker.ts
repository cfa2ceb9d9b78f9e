// A worker thread serving established connections (see nbd/WORKERS.md and
// nbd/workers.ts). The main thread did the handshake; here the connection's
// socket (a duplicated descriptor) and its export's backend (duplicated file
// descriptors) are adopted and served by the ordinary Connection code, on this
// thread's own event loop. Access answers are read from the shared table the
// main thread writes; counters go back to the main thread every 100 ms and
// when a connection closes.

import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import { adoptBackend, type Backend, closeQuietly, releaseShared } from './backend.js';
import { type AccessControl, StaticCatalog } from './export.js';
import type { Session } from './negotiation.js';
import { type Connection, handshakeBuffer, NbdServer } from './server.js';
import { ExportStats } from './stats.js';
import { TlsCredentials } from './tls.js';
import type {
  FromWorker,
  ServerDelta,
  SessionInfo,
  StatsDelta,
  ToWorker,
  WorkerInit,
} from './workers.js';

const port = parentPort!;
const init = workerData as WorkerInit;
const table = new Int32Array(init.access);

function post(m: FromWorker): void {
  port.postMessage(m);
}

function warn(id: number, e: unknown): void {
  post({ t: 'log', level: 'warn', msg: `conn ${id}: ${(e as Error).message}` });
}

/** One connection's access answer, as the main thread keeps it in the shared table. */
class SharedAccess implements AccessControl {
  constructor(private readonly slot: number) {}
  get generation(): number {
    return Atomics.load(table, this.slot * 2);
  }
  mask(): number {
    return Atomics.load(table, this.slot * 2 + 1);
  }
}

/**
 * The main thread's duplicated descriptor as this thread's socket. `onread` and
 * `pauseOnCreate` are in Node's documentation of net.Socket, not in its typings.
 */
function adoptSocket(fd: number, extra: Record<string, unknown>): net.Socket {
  return new net.Socket({
    fd,
    readable: true,
    writable: true,
    allowHalfOpen: true,
    ...extra,
  } as net.SocketConstructorOpts);
}

/** Buffers that crossed threads arrive as Uint8Array: Node's TLS wants Buffers. */
function buf(u: string | Uint8Array | undefined): string | Buffer | undefined {
  return u === undefined || typeof u === 'string' ? u : Buffer.from(u);
}

function credentials(): TlsCredentials | undefined {
  const src = init.tls?.source;
  if (!src) return undefined;
  return new TlsCredentials({
    cert: buf(src.cert as string | Uint8Array | undefined),
    key: buf(src.key as string | Uint8Array | undefined),
    ca: buf(src.ca as string | Uint8Array | undefined),
    psk: src.psk ? new Map([...src.psk].map(([u, k]) => [u, Buffer.from(k)])) : undefined,
  });
}

const creds = credentials();

const server = new NbdServer({
  catalog: new StaticCatalog([]),
  maxInFlight: init.maxInFlight,
  maxBufferedBytes: init.maxBufferedBytes,
  threadBufferedBytes: init.threadBufferedBytes,
  tls: creds && init.tls ? { mode: init.tls.mode, credentials: creds } : undefined,
  log: (level, msg) => post({ t: 'log', level, msg }),
});

server.relay = {
  secured(conn, identity, method, protocol) {
    const s = byConn.get(conn);
    if (s) post({ t: 'secure', id: s.id, identity, method, protocol });
  },
  option(conn, opt, data) {
    const s = byConn.get(conn);
    if (s) post({ t: 'opt', id: s.id, opt, data });
  },
  tlsFailed(conn, message) {
    const s = byConn.get(conn);
    if (s) post({ t: 'tlsFailed', id: s.id, message });
  },
};

/** STARTTLS was acknowledged on the main thread: the TLS handshake happens here. */
function adoptTls(m: Extract<ToWorker, { t: 'tls' }>): void {
  const s = serve(m.id);
  let socket: net.Socket;
  try {
    socket = adoptSocket(m.fd, { pauseOnCreate: true });
  } catch (e) {
    closeQuietly(m.fd);
    warn(m.id, e);
    finish(s);
    return;
  }
  // Registered before the TLS handshake can report anything.
  server.adoptTls(socket, m.id, (c) => {
    s.conn = c;
    byConn.set(c, s);
  });
}

/** The main thread decided a relayed option. */
async function optReply(m: Extract<ToWorker, { t: 'optReply' }>): Promise<void> {
  const s = byId.get(m.id);
  const conn = s?.conn;
  if (!s || !conn) return;
  const replies = m.replies.map((r) => Buffer.from(r.buffer, r.byteOffset, r.byteLength));
  if (m.verdict !== 'transmission') {
    conn.relayAnswer({ replies, verdict: m.verdict, reason: m.reason });
    return;
  }
  const info = m.session!;
  try {
    s.backend = await adoptBackend(info.backend);
  } catch (e) {
    releaseShared(info.backend);
    warn(m.id, e);
    conn.kill();
    return;
  }
  if (conn.phase !== 'handshake') {
    // Gone meanwhile: the disconnect handler has run already.
    await s.backend.close().catch(() => {});
    s.backend = null;
    return;
  }
  conn.relayAnswer({ replies, verdict: 'transmission', session: session(info, s.backend, s) });
}

/** The session the main thread negotiated, on this thread's adopted backend. */
function session(info: SessionInfo, backend: Backend, s: Served): Session {
  return {
    export: {
      name: info.name,
      description: info.description,
      backend,
      readOnly: false,
      stats: s.stats,
      access: info.slot >= 0 ? new SharedAccess(info.slot) : undefined,
    },
    flags: info.flags,
    structured: info.structured,
    allocationContext: info.allocationContext,
  };
}

interface Served {
  /** The main thread's id for the connection. */
  id: number;
  conn: Connection | null;
  backend: Backend | null;
  stats: ExportStats;
  /** A kill/abort that arrived while the backend was being adopted. */
  dropped: boolean;
  abortAsked: boolean;
}

const byId = new Map<number, Served>();
const byConn = new Map<Connection, Served>();

/** A connection the main thread handed over, known by its id from now on. */
function serve(id: number): Served {
  const s: Served = {
    id,
    conn: null,
    backend: null,
    stats: new ExportStats(),
    dropped: false,
    abortAsked: false,
  };
  byId.set(id, s);
  return s;
}

async function adoptConnection(m: Extract<ToWorker, { t: 'conn' }>): Promise<void> {
  const s = serve(m.id);
  try {
    s.backend = await adoptBackend(m.backend);
  } catch (e) {
    releaseShared(m.backend);
    closeQuietly(m.fd);
    warn(m.id, e);
    finish(s);
    return;
  }
  if (s.dropped) {
    closeQuietly(m.fd);
    await s.backend.close().catch(() => {});
    finish(s);
    return;
  }
  let conn: Connection | null = null;
  let socket: net.Socket;
  try {
    socket = adoptSocket(m.fd, {
      onread: {
        buffer: () => (conn ? conn.readTarget() : handshakeBuffer()),
        callback: (n: number, buf: Uint8Array) => {
          conn?.onRead(n, buf as Buffer);
          return true;
        },
      },
    });
  } catch (e) {
    closeQuietly(m.fd);
    await s.backend.close().catch(() => {});
    warn(m.id, e);
    finish(s);
    return;
  }
  conn = server.adopt(
    socket,
    {
      session: session(m, s.backend, s),
      identity: m.identity,
      identityMethod: m.identityMethod,
      id: m.id,
    },
    Buffer.from(m.leftover.buffer, m.leftover.byteOffset, m.leftover.byteLength),
    true,
  );
  s.conn = conn;
  byConn.set(conn, s);
  if (s.abortAsked) void abort(s);
}

/** The connection and its backend are gone: last counters, then the main thread hears. */
function finish(s: Served): void {
  if (!byId.has(s.id)) return;
  flushStats();
  byId.delete(s.id);
  post({ t: 'closed', id: s.id });
}

server.on('disconnect', (conn: Connection) => {
  const s = byConn.get(conn);
  if (!s) return;
  byConn.delete(conn);
  // The main thread hears at once (the socket is closed); the descriptors go once
  // none of its requests is in the backend.
  finish(s);
  void conn.abort().then(async () => {
    const b = s.backend;
    s.backend = null;
    await b?.close().catch(() => {});
  });
});

async function abort(s: Served): Promise<void> {
  if (!s.conn) {
    s.abortAsked = true;
    s.dropped = true;
    return;
  }
  await s.conn.abort();
  post({ t: 'aborted', id: s.id });
}

// ---- counters ----

const lastServer = {
  requests: new Array<number>(16).fill(0),
  errors: 0,
  bytesRead: 0,
  bytesWritten: 0,
  denied: 0,
};

function flushStats(): void {
  const st = server.stats;
  const d: ServerDelta = {
    requests: st.requests.map((v, i) => v - lastServer.requests[i]!),
    errors: st.errors - lastServer.errors,
    bytesRead: st.bytesRead - lastServer.bytesRead,
    bytesWritten: st.bytesWritten - lastServer.bytesWritten,
    denied: st.denied - lastServer.denied,
  };
  let any = d.errors !== 0 || d.bytesRead !== 0 || d.bytesWritten !== 0 || d.denied !== 0;
  for (const v of d.requests) if (v !== 0) any = true;
  lastServer.requests = [...st.requests];
  lastServer.errors = st.errors;
  lastServer.bytesRead = st.bytesRead;
  lastServer.bytesWritten = st.bytesWritten;
  lastServer.denied = st.denied;
  const conns: { id: number; d: StatsDelta }[] = [];
  for (const s of byId.values()) {
    const e = s.stats;
    let used = false;
    for (let i = 0; i < e.requests.length; i++)
      if (e.requests[i] !== 0 || e.refused[i] !== 0) used = true;
    if (!used) continue;
    conns.push({
      id: s.id,
      d: {
        requests: e.requests.slice(),
        errors: e.errors.slice(),
        bytes: e.bytes.slice(),
        refused: e.refused.slice(),
        denied: e.denied.slice(),
        latency: e.latency.map((l) => l.slice()),
        latencySum: e.latencySum.slice(),
      },
    });
    e.requests.fill(0);
    e.errors.fill(0);
    e.bytes.fill(0);
    e.refused.fill(0);
    e.denied.fill(0);
    e.latencySum.fill(0);
    for (const l of e.latency) l.fill(0);
  }
  if (any || conns.length > 0) post({ t: 'stats', server: d, conns });
}

setInterval(flushStats, 100).unref();

port.on('message', (m: ToWorker) => {
  if (m.t === 'conn') {
    void adoptConnection(m);
    return;
  }
  if (m.t === 'tls') {
    adoptTls(m);
    return;
  }
  if (m.t === 'optReply') {
    void optReply(m);
    return;
  }
  if (m.t === 'sync') {
    // Closes already seen by the loop are reported (their 'close' events run) first.
    const seq = m.seq;
    setImmediate(() => setImmediate(() => post({ t: 'synced', seq })));
    return;
  }
  const s = byId.get(m.id);
  if (!s) return;
  if (m.t === 'abort') {
    void abort(s);
    return;
  }
  if (!s.conn) {
    s.dropped = true;
    return;
  }
  if (m.t === 'shutdown') s.conn.shutdown();
  else s.conn.kill();
});

post({ t: 'ready' });
