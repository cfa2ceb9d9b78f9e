// The transport: sockets, flow control and request dispatch on top of the
// socket-free pieces (HandshakeReader + Negotiation, TransmissionReader +
// validateRequest). One Connection per client; requests in flight live in
// reusable Slots so the data path allocates nothing per request.

import { EventEmitter } from 'node:events';
import net from 'node:net';
import type tls from 'node:tls';
import type { Backend, Extent, IoRequest } from './backend.js';
import { BufferPool, DEFAULT_THREAD_BUFFER_BYTES } from './buffers.js';
import { nbdError } from './errors.js';
import type { AccessControl, Export, ExportCatalog } from './export.js';
import type { IdentityMethod, RelayAnswer, RemoteLink } from './handover.js';
import { greeting, Negotiation, type Session } from './negotiation.js';
import {
  CHUNK_HEADER_SIZE,
  CMD,
  CMD_FLAG,
  cmdName,
  META_ID_BASE_ALLOCATION,
  NBD_ERR,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';
import {
  Decision,
  HandshakeReader,
  type HandshakeSink,
  type RequestHeader,
  TransmissionReader,
  type TransmissionSink,
} from './reader.js';
import type { ExportStats } from './stats.js';
import { type TlsCredentials, type TlsMode, tlsReadsInto } from './tls.js';
import { type ValidationContext, validateRequest } from './validate.js';
import { WorkerPool } from './workers.js';

export interface ServerOptions {
  catalog: ExportCatalog;
  /** Connections across all listeners; more are closed at once. */
  maxConnections?: number;
  /**
   * A client must finish the whole handshake, STARTTLS and the TLS handshake
   * included, within this time (default 10 s; 0: no deadline).
   */
  handshakeTimeoutMs?: number;
  /**
   * Connections still in handshake, counted apart from established ones. When
   * a new connection would exceed it, the oldest of them is closed: idle or
   * slow handshakes can never keep a prompt client out. Default 64.
   */
  maxHandshakes?: number;
  /**
   * Connections per source (TCP address, or what `sourceOf` says), all phases.
   * A source at its limit loses its oldest handshake first; if it has none, the
   * new connection is refused. 0 or unset: no limit.
   */
  maxPerSource?: number;
  /** The source a connection counts against for `maxPerSource` (default: its address, or "unix"). */
  sourceOf?: (raw: net.Socket) => string;
  /** Requests in flight per connection before reading stops. */
  maxInFlight?: number;
  /** Request/reply bytes held per connection before reading stops. */
  maxBufferedBytes?: number;
  /**
   * Data buffers (READ replies, WRITE payloads) all connections served by one
   * thread may hold at once; past it they stop reading until buffers come
   * back, and up to it returned buffers are kept for reuse (nbd/buffers.ts).
   * A connection with nothing in flight is always served. Default 16 MiB.
   */
  threadBufferedBytes?: number;
  /**
   * Threads serving established connections (nbd/WORKERS.md). 1 (the
   * default): everything on the calling thread, as before workers existed.
   */
  workers?: number;
  /**
   * A close-on-exec duplicate of a descriptor, or -errno: how a connection's
   * socket reaches a worker (Node has no dup). Required with workers > 1.
   */
  dupFd?: (fd: number) => number;
  /**
   * With workers: a STARTTLS connection moves to a worker before its TLS
   * handshake, so its crypto runs there (default true). Only for exports a
   * worker can serve (no fence): the agent turns it off in a cluster.
   */
  tlsOnWorkers?: boolean;
  /** Control-path log; the data path never logs. */
  log?: (level: 'debug' | 'info' | 'warn', msg: string) => void;
  /** Access check at GO / EXPORT_NAME: a message refuses with ERR_POLICY. */
  authorize?: (exp: Export, conn: Connection) => string | null;
  /** At GO / EXPORT_NAME: serve this export read-only to this connection. */
  readOnlyFor?: (exp: Export, conn: Connection) => boolean;
  /** STARTTLS; without it the server answers STARTTLS with ERR_UNSUP. */
  tls?: { mode: TlsMode; credentials: TlsCredentials };
  /**
   * Names the client when TLS does not (no TLS, or TLS without a client
   * certificate or PSK): e.g. by source address or Unix peer. Null: anonymous.
   */
  identify?: (conn: Connection) => string | null;
}

export interface ServerStats {
  connectionsTotal: number;
  connectionsRefused: number;
  requests: number[];
  errors: number;
  bytesRead: number;
  bytesWritten: number;
  /** Requests refused by an export's access control (EPERM before the backend). */
  denied: number;
  tlsHandshakes: number;
  tlsFailures: number;
  /** Handshakes not finished within the deadline. */
  handshakeTimeouts: number;
  /** Handshakes closed to make room for a newer connection. */
  handshakesEvicted: number;
}

const EMPTY = Buffer.alloc(0);
/** Every command allowed: the mask of a connection whose export has no access control. */
const ALL_COMMANDS = 0xffff;
/** Extents per READ before the rest is sent as data. */
const READ_MAX_EXTENTS = 16;
/**
 * READs shorter than this never ask the allocation map: they are read, and a
 * hole in them is sent as the zeroes the file reads as. On a file paged in 4 KiB
 * pieces (tens of thousands of data runs) the map's `lseek` calls cost more than
 * the read, and take the inode lock that writes hold; what a hole chunk saves on
 * a small read is a few KiB of zeroes on the wire.
 */
export const READ_MAP_MIN = 64 * 1024;
/** The largest write a TLS connection's replies reach the socket in (PacedOutput). */
export const TLS_PIECE = 128 * 1024;
/** Descriptors per BLOCK_STATUS reply. */
const STATUS_MAX_EXTENTS = 8192;

class Slot implements IoRequest {
  offset = 0;
  length = 0;
  buf: Buffer = EMPTY;
  bufOffset = 0;
  type = 0;
  flags = 0;
  cookieHi = 0;
  cookieLo = 0;
  /** Bytes counted against the connection's buffer cap. */
  charged = 0;
  /** The data buffer taken from the server's pool for this request, if any. */
  pooled: Buffer | null = null;
  /** Scratch for reply headers; lives until the reply is written. */
  readonly hdr = Buffer.allocUnsafe(1024);
  readonly extents: Extent[] = [];
  /** The NBD error to answer a refused WRITE with, once its payload is drained. */
  error = 0;
  /** The reply carried an error. */
  failed = false;
  /** performance.now() when the request was read. */
  start = 0;
  /** Whether `extents` describes the read (structured reads with holes). */
  mapped = false;
  readonly done: (errno: number) => void;
  readonly written: () => void;

  constructor(conn: Connection) {
    this.done = (errno) => conn.complete(this, errno);
    this.written = () => conn.release(this);
  }
}

type Phase = 'handshake' | 'transmission' | 'closing' | 'closed';

/** Where a connection's replies are written: its socket, or a PacedOutput over it. */
interface Output {
  write(b: Buffer, cb?: () => void): unknown;
}

/**
 * The replies of a TLS connection. Node's TLS socket encrypts a whole write
 * before any of it reaches the kernel, and starts the next write only once the
 * previous one is all there: a 1 MiB READ reply would be encrypted as a whole
 * while the client, having drained the socket, waits for it — and then the
 * server waits for the client. Written in pieces of TLS_PIECE, each once the
 * one before it is in the kernel, the server encrypts the next piece while the
 * client decrypts the last (as a TLS library that encrypts record by record
 * into a blocking socket does). Smaller writes pass straight through unless
 * pieces are being written, then they queue behind them: the byte order on
 * the wire is the order of write() calls.
 */
export class PacedOutput implements Output {
  private readonly queue: { b: Buffer; cb: (() => void) | undefined }[] = [];
  private head = 0;
  private busy = false;
  private readonly next = (): void => {
    this.busy = false;
    this.pump();
  };

  constructor(private readonly sock: net.Socket) {}

  write(b: Buffer, cb?: () => void): void {
    if (!this.busy && b.length <= TLS_PIECE) {
      this.sock.write(b, cb);
      return;
    }
    this.queue.push({ b, cb });
    if (!this.busy) this.pump();
  }

  private pump(): void {
    const q = this.queue;
    while (this.head < q.length) {
      const e = q[this.head]!;
      if (e.b.length <= TLS_PIECE || this.sock.destroyed) {
        // The last piece of a reply is not waited for: what follows is queued
        // behind it by the socket, and on a destroyed socket write() reports
        // the failure to the callback.
        this.head++;
        this.sock.write(e.b, e.cb);
        continue;
      }
      const piece = e.b.subarray(0, TLS_PIECE);
      e.b = e.b.subarray(TLS_PIECE);
      this.busy = true;
      this.sock.write(piece, this.next);
      return;
    }
    q.length = 0;
    this.head = 0;
  }
}

/** A connection that starts in transmission: handed over by another thread after its handshake. */
export interface Adoption {
  session: Session;
  identity: string;
  identityMethod: IdentityMethod;
  /** The id the connection had where its handshake ran (for the log). */
  id?: number;
}

/**
 * A worker's side of a TLS connection whose handshake options are decided on
 * the main thread (see WORKERS.md): what the worker tells it.
 */
export interface HandshakeRelay {
  secured(
    conn: Connection,
    identity: string | null,
    method: IdentityMethod,
    protocol: string | null,
  ): void;
  option(conn: Connection, opt: number, data: Buffer | null): void;
  tlsFailed(conn: Connection, message: string): void;
}

export class Connection implements HandshakeSink, TransmissionSink {
  readonly id: number;
  readonly remote: string;
  /** The socket as accepted (TCP or Unix), before any TLS. */
  readonly raw: net.Socket;
  /** What NBD is spoken over: `raw`, or the TLS socket on top of it. */
  socket: net.Socket;
  /** Where transmission replies are written: `socket`, paced once TLS is on. */
  private out: Output;
  /** Who the client is: certificate CN, PSK username, a mapped name, or 'anonymous'. */
  identity = 'anonymous';
  identityMethod: IdentityMethod = 'anonymous';
  /** The TLS version once STARTTLS completed, else null. */
  tlsProtocol: string | null = null;
  phase: Phase = 'handshake';
  session: Session | null = null;
  private readonly neg: Negotiation;
  private readonly hreader: HandshakeReader;
  private readonly treader: TransmissionReader;
  private backend: Backend | null = null;
  private vctx: ValidationContext | null = null;
  private stats: ExportStats | null = null;
  private readonly free: Slot[] = [];
  private inUse = 0;
  private bytesInUse = 0;
  /** Waiting for the server's buffer pool (see buffers.ts). */
  private waitingBuffers = false;
  /** The slot receiving a WRITE payload. */
  private current: Slot | null = null;
  private stalled = false;
  private pending: Buffer | null = null;
  private pendingPos = 0;
  private handshakeTimer: NodeJS.Timeout | null = null;
  private readonly maxInFlight: number;
  private readonly maxBytes: number;
  /**
   * A run the backend last reported as data: READs inside it skip the
   * allocation map. Only data is remembered: data that became a hole since
   * (another connection's TRIM) is read and sent as the zeroes it is, never
   * the other way round.
   */
  private dataFrom = 0;
  private dataTo = 0;
  /** Access control of the export being served, and this connection's cached answer. */
  private access: AccessControl | null = null;
  private accessGeneration = -1;
  private accessMask = ALL_COMMANDS;
  /** STARTTLS was acknowledged and the TLS handshake has not finished. */
  private upgrading = false;
  private idleWaiters: (() => void)[] = [];
  private readonly onDataBound = (chunk: Buffer): void => this.onData(chunk);
  private readonly onErrorBound = (err: Error): void =>
    this.server.log('debug', `conn ${this.id}: ${err.message}`);
  private readonly onCloseBound = (): void => this.onClose();
  private readonly onEndBound = (): void => {
    // The client half-closed: finish what is in flight, then close.
    if (this.phase === 'transmission') this.beginClosing();
    else this.socket.destroy();
  };

  constructor(
    private readonly server: NbdServer,
    socket: net.Socket,
    id: number,
    /** Whether the socket reads through readTarget()/onRead(). */
    private ownsReads = false,
    adopted?: Adoption | 'tls',
    registered?: (c: Connection) => void,
  ) {
    this.id = id;
    this.raw = socket;
    this.socket = socket;
    this.out = socket;
    this.remote = socket.remoteAddress ? `${socket.remoteAddress}:${socket.remotePort}` : 'unix';
    const o = server.options;
    this.maxInFlight = o.maxInFlight ?? 64;
    // No connection holds more than half of its thread's buffers: one that
    // stops reading its replies cannot take them all from the others.
    this.maxBytes = Math.min(o.maxBufferedBytes ?? 64 * 1024 * 1024, server.buffers.budget / 2);
    this.neg = new Negotiation(o.catalog, {
      authorize: o.authorize ? (exp) => o.authorize!(exp, this) : undefined,
      readOnlyFor: o.readOnlyFor ? (exp) => o.readOnlyFor!(exp, this) : undefined,
      tls: o.tls?.mode ?? 'off',
    });
    this.hreader = new HandshakeReader(this);
    this.treader = new TransmissionReader(this);
    const mapped = o.identify?.(this) ?? null;
    if (mapped !== null) {
      this.identity = mapped;
      this.identityMethod = 'mapped';
    }
    socket.setNoDelay?.(true);
    this.attach(socket);
    if (adopted === 'tls') {
      // STARTTLS was acknowledged on the main thread: the TLS handshake starts
      // here, and the options after it are decided there (the relay).
      this.relayed = true;
      this.upgrading = true;
      registered?.(this);
      this.startTls(socket);
      return;
    }
    if (adopted) {
      this.identity = adopted.identity;
      this.identityMethod = adopted.identityMethod;
      this.justAdopted = true;
      this.enterTransmission(adopted.session);
      this.justAdopted = false;
      return;
    }
    const t = o.handshakeTimeoutMs ?? 10_000;
    if (t > 0) {
      this.handshakeTimer = setTimeout(() => {
        this.server.stats.handshakeTimeouts++;
        this.server.log('debug', `conn ${id} ${this.remote}: handshake timed out`);
        this.dropHandshake();
      }, t);
      this.handshakeTimer.unref();
    }
    socket.write(greeting());
  }

  /** Close a connection still in handshake, the TLS socket and the raw one. */
  dropHandshake(): void {
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    if (this.link) {
      this.link.kill();
      return;
    }
    this.socket.destroy();
    this.raw.destroy();
  }

  private attach(sock: net.Socket, errors = true): void {
    sock.on('data', this.onDataBound);
    if (errors) sock.on('error', this.onErrorBound);
    sock.on('close', this.onCloseBound);
    sock.on('end', this.onEndBound);
  }

  private detach(sock: net.Socket): void {
    sock.off('data', this.onDataBound);
    sock.off('close', this.onCloseBound);
    sock.off('end', this.onEndBound);
    // The error listener stays: an error on the raw socket must not go unhandled.
  }

  get exportName(): string | null {
    return this.session?.export.name ?? null;
  }

  get requestsInFlight(): number {
    return this.inUse;
  }

  // ---- input ----

  private onData(chunk: Buffer): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    if (this.tlsProtocol !== null && !this.batching) this.startBatch();
    this.process(chunk, 0);
  }

  /**
   * TLS hands over one record per read, so a burst of pipelined requests
   * arrives as many reads in one turn of the loop. Their replies leave
   * together (one TLS record and one write) at the end of the turn, as they
   * would in one writev on a plain socket.
   */
  private startBatch(): void {
    this.batching = true;
    this.socket.cork();
    setImmediate(this.flushBatchBound);
  }

  private batching = false;
  private readonly flushBatchBound = (): void => {
    this.batching = false;
    this.socket.uncork();
  };

  /**
   * Where the socket's next read lands, when it reads into our buffers (see
   * NbdServer.accept): straight into the WRITE payload being received, so a
   * large payload is copied once, by the kernel; otherwise the connection's
   * receive buffer, reused for every read.
   */
  readTarget(): Buffer {
    if (this.phase === 'transmission') {
      const w = this.treader.copyWindow();
      if (w !== null) return w;
    } else if (this.phase === 'handshake') {
      // Handshakes read into one buffer shared by all connections (the
      // readers copy what they keep), so idle or slow ones cost no buffer.
      return handshakeBuffer();
    } else {
      return this.ownRecv ?? handshakeBuffer();
    }
    return this.recvBuf();
  }

  private ownRecv: Buffer | null = null;
  private readonly readTargetBound = (): Buffer => this.readTarget();
  private readonly onReadBound = (n: number, buf: Buffer): void => this.onRead(n, buf);

  /** The connection's own receive buffer, allocated at its first transmission-phase read. */
  private recvBuf(): Buffer {
    this.ownRecv ??= Buffer.allocUnsafeSlow(RECV_BUFFER);
    return this.ownRecv;
  }

  /** `n` bytes arrived in `buf`, the buffer readTarget() gave for this read. */
  onRead(n: number, buf: Buffer): void {
    if (this.phase === 'closed' || this.phase === 'closing') return;
    if (this.tlsProtocol !== null && !this.batching) this.startBatch();
    if (this.stalled) {
      // A TLS socket passes on every record it has decrypted, paused or not
      // (a plain one stops at once): they wait behind what is pending. Stalled,
      // readTarget() gave the receive buffer, which the next read overwrites.
      const rest = this.pending?.subarray(this.pendingPos) ?? EMPTY;
      this.pending = Buffer.concat([rest, buf.subarray(0, n)]);
      this.pendingPos = 0;
      return;
    }
    if (buf === this.ownRecv || buf === sharedHandshakeBuffer) {
      this.process(buf.subarray(0, n), 0);
      return;
    }
    try {
      this.treader.filledInPlace(n);
    } catch (e) {
      this.server.log(
        'warn',
        `conn ${this.id} ${this.remote}: internal error: ${(e as Error).message}`,
      );
      this.socket.destroy();
    }
  }

  /** Whether `b` is a view of the receive buffer, which the next read overwrites. */
  private inRecvBuf(b: Buffer): boolean {
    if (!this.ownsReads) return false;
    return (
      (this.ownRecv !== null && b.buffer === this.ownRecv.buffer) ||
      (sharedHandshakeBuffer !== null && b.buffer === sharedHandshakeBuffer.buffer)
    );
  }

  private process(chunk: Buffer, pos: number): void {
    const sock = this.socket;
    // Replies produced while this chunk is parsed (page-cache reads and writes
    // complete synchronously) leave in one writev.
    sock.cork();
    try {
      if (this.phase === 'handshake') {
        if (this.upgrading) {
          // Plaintext after STARTTLS, before the TLS handshake: an injection.
          this.server.log('info', `conn ${this.id} ${this.remote}: data after STARTTLS; dropping`);
          sock.destroy();
          return;
        }
        if (this.relayWait !== null) {
          this.relayWait.push(Buffer.from(chunk.subarray(pos)));
          return;
        }
        pos += this.hreader.feed(chunk, pos);
        const waiting = this.relayWait as Buffer[] | null;
        if (waiting !== null) {
          // Bytes after the option wait for the main thread's answer.
          if (pos < chunk.length) waiting.push(Buffer.from(chunk.subarray(pos)));
          sock.pause();
          return;
        }
        if (this.upgrading && pos < chunk.length) {
          this.server.log('info', `conn ${this.id} ${this.remote}: data after STARTTLS; dropping`);
          sock.destroy();
          return;
        }
      }
      if ((this.phase as Phase) !== 'transmission') return;
      if (this.moving !== null) {
        this.moving.push(Buffer.from(chunk.subarray(pos)));
        return;
      }
      if (this.justEstablished) {
        this.justEstablished = false;
        if (this.server.pool?.wants(this)) {
          this.moving = [Buffer.from(chunk.subarray(pos))];
          sock.pause();
          // The GO reply leaves with the uncork below; the worker writes only after it.
          sock.write(EMPTY, () => this.handOver());
          return;
        }
      }
      pos += this.treader.feed(chunk, pos);
      if (this.treader.stopped) return;
      if (pos < chunk.length || this.treader.hasStagedHeader) {
        this.stalled = true;
        if (pos < chunk.length && this.inRecvBuf(chunk)) {
          // Kept past this read: off the receive buffer (a rare path, at the caps).
          this.pending = Buffer.from(chunk.subarray(pos));
          this.pendingPos = 0;
        } else {
          this.pending = pos < chunk.length ? chunk : null;
          this.pendingPos = pos;
        }
        sock.pause();
      }
    } catch (e) {
      // A bug must cost this client its connection, never the server.
      this.server.log(
        'warn',
        `conn ${this.id} ${this.remote}: internal error: ${(e as Error).stack ?? e}`,
      );
      sock.destroy();
    } finally {
      sock.uncork();
    }
  }

  /** Bytes read before this connection existed (an adopted one's leftover). */
  feed(b: Buffer): void {
    if (b.length > 0) this.process(b, 0);
  }

  private maybeResume(): void {
    if (!this.stalled || this.phase !== 'transmission') return;
    this.stalled = false;
    const chunk = this.pending ?? EMPTY;
    const pos = this.pendingPos;
    this.pending = null;
    this.process(chunk, pos);
    if (!this.stalled && this.phase === 'transmission') this.socket.resume();
  }

  // ---- handshake sink ----

  clientFlags(flags: number): boolean {
    const err = this.neg.clientFlags(flags);
    if (err) {
      this.server.log('info', `conn ${this.id} ${this.remote}: ${err}; dropping`);
      this.socket.destroy();
      return false;
    }
    return true;
  }

  badMagic(): void {
    this.server.log('info', `conn ${this.id} ${this.remote}: bad option magic; dropping`);
    this.socket.destroy();
  }

  option(opt: number, data: Buffer | null): boolean {
    if (this.relayed) {
      this.relayWait = [];
      this.server.relay?.option(this, opt, data);
      return false;
    }
    const step = this.neg.option(opt, data);
    if (step.verdict !== 'starttls') for (const r of step.replies) this.socket.write(r);
    if (step.verdict === 'continue') return true;
    if (step.verdict === 'starttls') {
      // The ACK goes out in plaintext; the TLS handshake starts once it is on the wire.
      this.upgrading = true;
      const raw = this.socket;
      raw.pause();
      const move = this.server.pool?.wantsTls(this) ?? false;
      raw.write(step.replies[0]!, () => (move ? this.handOverTls(raw) : this.startTls(raw)));
      return false;
    }
    if (step.verdict === 'close') {
      this.server.log('info', `conn ${this.id} ${this.remote}: ${step.reason ?? 'closed'}`);
      this.phase = 'closing';
      this.socket.end();
      return false;
    }
    this.enterTransmission(this.neg.session!);
    return false;
  }

  private startTls(raw: net.Socket): void {
    if (this.phase !== 'handshake' || raw.destroyed) return;
    const creds = this.server.options.tls!.credentials;
    this.detach(raw);
    let sock: tls.TLSSocket;
    try {
      sock = creds.upgrade(
        raw,
        (s, peer) => {
          if (this.phase !== 'handshake') return;
          this.server.stats.tlsHandshakes++;
          this.upgrading = false;
          this.tlsProtocol = peer.protocol;
          if (peer.identity !== null) {
            this.identity = peer.identity;
            this.identityMethod = peer.method === 'psk' ? 'psk' : 'x509';
          }
          if (this.relayed) {
            this.server.relay?.secured(
              this,
              peer.identity,
              peer.method === 'psk' ? 'psk' : peer.identity !== null ? 'x509' : 'anonymous',
              peer.protocol,
            );
          } else {
            this.server.log(
              'debug',
              `conn ${this.id} ${this.remote}: ${peer.protocol ?? 'TLS'} as ${this.identity}`,
            );
          }
          this.hreader.resume();
          s.resume();
        },
        (message) => this.tlsFailed(message),
      );
    } catch (e) {
      this.tlsFailed((e as Error).message);
      return;
    }
    this.socket = sock;
    this.out = new PacedOutput(sock);
    // Decrypted bytes land where the plain path's reads do (readTarget).
    this.ownsReads = tlsReadsInto(sock, this.readTargetBound, this.onReadBound);
    sock.on('error', (err: Error & { code?: string; reason?: string }) =>
      this.tlsFailed(err.reason ?? err.code ?? err.message.split('\n')[0] ?? 'error'),
    );
    this.attach(sock, false);
  }

  private tlsFailed(message: string): void {
    if (this.upgrading) {
      this.upgrading = false;
      this.server.stats.tlsFailures++;
      // A relayed connection's failure is counted and logged on the main thread.
      if (this.relayed) this.server.relay?.tlsFailed(this, message);
      else
        this.server.log('info', `conn ${this.id} ${this.remote}: TLS handshake failed: ${message}`);
    } else {
      this.server.log('debug', `conn ${this.id}: ${message}`);
    }
    this.socket.destroy();
    this.raw.destroy();
  }

  private justAdopted = false;
  /** Handshake options go to the main thread (a TLS connection adopted by a worker). */
  private relayed = false;
  /** Bytes read while the main thread decides an option; null when not waiting. */
  private relayWait: Buffer[] | null = null;

  /** The main thread decided the relayed option. */
  relayAnswer(a: RelayAnswer): void {
    if (this.phase !== 'handshake' || this.socket.destroyed) return;
    const sock = this.socket;
    for (const r of a.replies) sock.write(r);
    if (a.verdict === 'close') {
      this.server.log('info', `conn ${this.id} ${this.remote}: ${a.reason ?? 'closed'}`);
      this.phase = 'closing';
      sock.end();
      return;
    }
    const rest = Buffer.concat(this.relayWait ?? []);
    this.relayWait = null;
    if (a.verdict === 'transmission') this.enterTransmission(a.session!);
    else this.hreader.resume();
    this.process(rest, 0);
    if (!this.stalled && this.relayWait === null && (this.phase as Phase) !== 'closed')
      sock.resume();
  }

  /** STARTTLS acknowledged: the raw socket goes to a worker, which runs the TLS handshake. */
  private handOverTls(raw: net.Socket): void {
    if (this.phase !== 'handshake' || raw.destroyed) return;
    const link = this.server.pool?.adoptTls(this) ?? null;
    if (link === null) {
      this.startTls(raw);
      return;
    }
    this.link = link;
    this.detach(raw);
    raw.destroy();
  }

  /**
   * @internal A relayed option of a connection a worker holds in handshake:
   * decided here, where the catalog and the access decisions are.
   */
  decideRelayed(opt: number, data: Buffer | null): RelayAnswer {
    const step = this.neg.option(opt, data);
    if (step.verdict === 'starttls') {
      return { replies: [], verdict: 'close', reason: 'STARTTLS twice' };
    }
    if (step.verdict === 'close') {
      this.server.log('info', `conn ${this.id} ${this.remote}: ${step.reason ?? 'closed'}`);
      return { replies: step.replies, verdict: 'close', reason: step.reason };
    }
    if (step.verdict === 'continue') return { replies: step.replies, verdict: 'continue' };
    this.enterTransmission(this.neg.session!);
    return { replies: step.replies, verdict: 'transmission', session: this.neg.session! };
  }

  /** @internal The worker finished this connection's TLS handshake. */
  relayedSecure(identity: string | null, method: IdentityMethod, protocol: string | null): void {
    this.server.stats.tlsHandshakes++;
    this.tlsProtocol = protocol;
    if (identity !== null) {
      this.identity = identity;
      this.identityMethod = method;
    }
    this.server.log(
      'debug',
      `conn ${this.id} ${this.remote}: ${protocol ?? 'TLS'} as ${this.identity}`,
    );
  }

  /** @internal The worker's TLS handshake of this connection failed. */
  relayedTlsFailed(message: string): void {
    this.server.stats.tlsFailures++;
    this.server.log('info', `conn ${this.id} ${this.remote}: TLS handshake failed: ${message}`);
  }

  /** Set by enterTransmission; the first bytes after it decide whether the connection moves. */
  private justEstablished = false;
  /** Bytes read between the handshake and the move to a worker; null when not moving. */
  private moving: Buffer[] | null = null;
  /** The worker serving this connection, once handed over; this object then stands for it. */
  private link: RemoteLink | null = null;
  private closedWaiters: (() => void)[] = [];

  /** The socket's descriptor, if Node exposes it (TCP and Unix sockets). */
  get fd(): number {
    const h = (this.socket as unknown as NodeSocketInternals)._handle as { fd?: number } | null;
    return typeof h?.fd === 'number' ? h.fd : -1;
  }

  /** Whether the connection is served by a worker thread. */
  get remoteServed(): boolean {
    return this.link !== null;
  }

  /** The GO reply is on the wire: give the connection to a worker, or keep serving it here. */
  private handOver(): void {
    const rest = this.moving;
    this.moving = null;
    if (rest === null || this.phase !== 'transmission' || this.socket.destroyed) return;
    const leftover = Buffer.concat(rest);
    const link = this.server.pool?.adopt(this, leftover) ?? null;
    if (link === null) {
      // Not possible after all: served here.
      this.process(leftover, 0);
      if (!this.stalled && this.phase === 'transmission') this.socket.resume();
      return;
    }
    this.link = link;
    // This thread's descriptor goes; the worker's duplicate keeps the connection.
    this.detach(this.socket);
    if (this.raw !== this.socket) this.detach(this.raw);
    this.socket.destroy();
  }

  /** @internal The worker closed the connection it served. */
  remoteClosed(): void {
    if (this.phase === 'closed') return;
    if (this.stats) {
      this.stats.connections--;
      this.stats.onConnections?.(this.stats.connections, -1);
    }
    this.phase = 'closed';
    this.link = null;
    for (const w of this.closedWaiters.splice(0)) w();
    for (const w of this.idleWaiters.splice(0)) w();
    this.server.forget(this);
  }

  /** @internal Counters of requests a worker served for this connection. */
  get exportStats(): ExportStats | null {
    return this.stats;
  }

  private enterTransmission(s: Session): void {
    this.justEstablished = this.server.pool !== null;
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.server.handshakeDone(this);
    this.session = s;
    this.backend = s.export.backend;
    this.stats = s.export.stats ?? null;
    if (this.stats) {
      this.stats.connections++;
      this.stats.onConnections?.(this.stats.connections, 1);
    }
    this.access = s.export.access ?? null;
    this.accessGeneration = -1;
    this.vctx = {
      flags: s.flags,
      size: s.export.backend.size,
      structured: s.structured,
      allocationContext: s.allocationContext,
    };
    this.phase = 'transmission';
    // Logged where the handshake was decided.
    if (this.justAdopted || this.relayed) return;
    this.server.log(
      'debug',
      `conn ${this.id} ${this.remote}: serving ${JSON.stringify(s.export.name)}`,
    );
  }

  // ---- transmission sink ----

  request(h: RequestHeader): Decision {
    if (h.magic !== REQUEST_MAGIC) {
      this.server.log('info', `conn ${this.id} ${this.remote}: bad request magic; dropping`);
      this.socket.destroy();
      return Decision.Stop;
    }
    if (h.type === CMD.DISC) {
      this.beginClosing();
      return Decision.Stop;
    }
    if (this.inUse >= this.maxInFlight) return Decision.Stall;
    let err = validateRequest(h, this.vctx!);
    let denied = false;
    const acc = this.access;
    if (acc !== null && err === 0) {
      // The fence first: a fenced agent's reservation state may be stale (a grant
      // made elsewhere while it was cut off), so it judges nothing, it holds.
      const g = acc.gate === undefined ? 'open' : acc.gate();
      if (g === 'hold') {
        acc.onOpen?.(this.wakeHeld);
        return Decision.Stall;
      }
      if (g === 'fail') err = NBD_ERR.EIO;
      else {
        if (acc.generation !== this.accessGeneration) {
          this.accessGeneration = acc.generation;
          this.accessMask = acc.mask(this.identity);
        }
        if ((this.accessMask & (1 << h.type)) === 0) {
          err = NBD_ERR.EPERM;
          denied = true;
        }
      }
    }
    const carries = !err && (h.type === CMD.READ || h.type === CMD.WRITE) ? h.length : 0;
    if (carries && this.inUse > 0) {
      if (this.bytesInUse + carries > this.maxBytes) return Decision.Stall;
      if (!this.server.buffers.fits(carries)) {
        // The thread's buffers are all in use: stop reading until some come back.
        if (!this.waitingBuffers) {
          this.waitingBuffers = true;
          this.server.buffers.wait(this.wakeBuffers);
        }
        return Decision.Stall;
      }
    }
    const slot = this.acquire(h, carries);
    this.server.stats.requests[h.type < 16 ? h.type : 15]!++;
    if (err) {
      this.server.stats.errors++;
      this.server.log('debug', `conn ${this.id}: ${cmdName(h.type)} refused with ${err}`);
      if (this.stats) this.stats.refused[h.type & 7]!++;
      if (denied) {
        this.server.stats.denied++;
        if (this.stats) this.stats.denied[h.type & 7]!++;
      }
      if (h.type === CMD.WRITE) {
        // Answer once the payload is drained: clients do not expect a reply
        // to a request they are still sending.
        slot.error = err;
        this.current = slot;
        return Decision.Discard;
      }
      this.sendError(slot, err);
      return Decision.None;
    }
    const backend = this.backend!;
    switch (h.type) {
      case CMD.READ:
        this.startRead(slot, backend);
        return Decision.None;
      case CMD.WRITE:
        this.current = slot;
        return Decision.Payload;
      case CMD.FLUSH:
        backend.flush(slot);
        return Decision.None;
      case CMD.TRIM:
        this.dataTo = 0;
        backend.trim(slot, (h.flags & CMD_FLAG.FUA) !== 0);
        return Decision.None;
      case CMD.WRITE_ZEROES:
        this.dataTo = 0;
        backend.zero(
          slot,
          (h.flags & CMD_FLAG.NO_HOLE) === 0,
          (h.flags & CMD_FLAG.FAST_ZERO) !== 0,
          (h.flags & CMD_FLAG.FUA) !== 0,
        );
        return Decision.None;
      case CMD.CACHE:
        backend.cache(slot);
        return Decision.None;
      case CMD.BLOCK_STATUS:
        this.blockStatus(slot, backend);
        return Decision.None;
      default:
        this.sendError(slot, NBD_ERR.EINVAL);
        return Decision.None;
    }
  }

  payloadView(chunk: Buffer, start: number): void {
    const slot = this.current!;
    this.current = null;
    if (this.inRecvBuf(chunk)) {
      // The backend may finish later, after the next read reused the buffer.
      this.usePooled(slot, slot.length);
      chunk.copy(slot.buf, 0, start, start + slot.length);
    } else {
      slot.buf = chunk;
      slot.bufOffset = start;
    }
    this.startWrite(slot);
  }

  payloadTarget(): Buffer {
    const slot = this.current!;
    this.usePooled(slot, slot.length);
    return slot.buf;
  }

  payloadTargetOffset(): number {
    return 0;
  }

  payloadFilled(): void {
    const slot = this.current!;
    this.current = null;
    this.startWrite(slot);
  }

  discardDone(): void {
    const slot = this.current!;
    this.current = null;
    this.sendError(slot, slot.error);
  }

  // ---- dispatch ----

  private acquire(h: RequestHeader, charge: number): Slot {
    let slot = this.free.pop();
    if (!slot) slot = new Slot(this);
    slot.type = h.type;
    slot.flags = h.flags;
    slot.cookieHi = h.cookieHi;
    slot.cookieLo = h.cookieLo;
    slot.offset = h.offset;
    slot.length = h.length;
    slot.buf = EMPTY;
    slot.bufOffset = 0;
    slot.mapped = false;
    slot.failed = false;
    slot.start = this.stats ? performance.now() : 0;
    slot.charged = charge;
    this.bytesInUse += charge;
    this.inUse++;
    return slot;
  }

  /** Called once a slot's reply has been handed to the kernel. */
  release(slot: Slot): void {
    const st = this.stats;
    if (st) {
      const io = slot.type === CMD.READ || slot.type === CMD.WRITE ? slot.length : 0;
      st.record(slot.type, io, slot.failed, (performance.now() - slot.start) / 1000);
    }
    this.inUse--;
    this.bytesInUse -= slot.charged;
    slot.charged = 0;
    slot.buf = EMPTY;
    this.free.push(slot);
    if (slot.pooled !== null) {
      const b = slot.pooled;
      slot.pooled = null;
      this.server.buffers.give(b);
    }
    if (this.inUse === 0 && this.idleWaiters.length > 0) {
      const waiters = this.idleWaiters;
      this.idleWaiters = [];
      for (const w of waiters) w();
    }
    if (this.stalled) this.maybeResume();
    else if (this.phase === 'closing' && this.inUse === 0) this.finishClosing();
  }

  /** Point the slot's `buf` at a buffer of the server's pool of at least `len` bytes. */
  private usePooled(slot: Slot, len: number): void {
    const pool = this.server.buffers;
    if (slot.pooled === null || slot.pooled.length < len) {
      if (slot.pooled !== null) pool.give(slot.pooled);
      slot.pooled = pool.take(len);
    }
    slot.buf = slot.pooled;
    slot.bufOffset = 0;
  }

  private readonly wakeBuffers = (): void => {
    this.waitingBuffers = false;
    if (this.stalled) this.maybeResume();
  };

  /** A held connection asks again (its access control's gate opened or now fails). */
  private readonly wakeHeld = (): void => {
    if (this.stalled) this.maybeResume();
  };

  private startWrite(slot: Slot): void {
    // The payload may have taken a while: the gate is asked again before the write.
    const g = this.access?.gate?.();
    if (g !== undefined && g !== 'open') {
      this.sendError(slot, NBD_ERR.EIO);
      return;
    }
    this.server.stats.bytesWritten += slot.length;
    this.backend!.write(slot, (slot.flags & CMD_FLAG.FUA) !== 0);
  }

  private startRead(slot: Slot, backend: Backend): void {
    const s = this.vctx!;
    if (
      s.structured &&
      slot.length >= READ_MAP_MIN &&
      backend.caps.extents &&
      !(slot.offset >= this.dataFrom && slot.offset + slot.length <= this.dataTo)
    ) {
      const ext = slot.extents;
      ext.length = 0;
      // First the one run the read starts in, asked to the end of the export:
      // a data run found spares the reads inside it the question (a written
      // file is one run: sequential reads ask a few times, then never).
      const ask = Math.max(slot.length, s.size - slot.offset);
      if (backend.extents(slot.offset, ask, 1, ext) === 0 && ext.length > 0) {
        const first = ext[0]!;
        if (first.hole && first.length >= slot.length) {
          // All hole: nothing to read.
          this.sendHole(slot);
          return;
        }
        if (!first.hole) {
          this.dataFrom = slot.offset;
          this.dataTo = slot.offset + first.length;
        }
        if (first.length < slot.length && !(slot.flags & CMD_FLAG.DF)) {
          // Data and holes: the runs inside the read only (on a fragmented file,
          // asking past it would walk runs nobody reads).
          ext.length = 0;
          slot.mapped =
            backend.extents(slot.offset, slot.length, READ_MAX_EXTENTS, ext) === 0 &&
            ext.length > 0;
        }
      }
    }
    this.server.stats.bytesRead += slot.length;
    this.usePooled(slot, slot.length);
    backend.read(slot);
  }

  /** Backend completion for every command. */
  complete(slot: Slot, errno: number): void {
    if (this.phase === 'closed') {
      this.release(slot);
      return;
    }
    if (errno !== 0) {
      this.server.stats.errors++;
      const fast = slot.type === CMD.WRITE_ZEROES && (slot.flags & CMD_FLAG.FAST_ZERO) !== 0;
      this.sendError(slot, nbdError(errno, fast));
      return;
    }
    if (slot.type === CMD.READ) this.sendData(slot);
    else this.sendSimple(slot, 0);
  }

  private blockStatus(slot: Slot, backend: Backend): void {
    const ext = slot.extents;
    ext.length = 0;
    const one = (slot.flags & CMD_FLAG.REQ_ONE) !== 0;
    const errno = backend.extents(slot.offset, slot.length, one ? 1 : STATUS_MAX_EXTENTS, ext);
    if (errno !== 0 || ext.length === 0) {
      this.sendError(slot, errno ? nbdError(errno) : NBD_ERR.EIO);
      return;
    }
    // Descriptors never reach past the request, so each length fits in 32 bits.
    let left = slot.length;
    let n = 0;
    for (const e of ext) {
      if (left === 0) break;
      n++;
      left -= Math.min(e.length, left);
    }
    const payload = 4 + 8 * n;
    this.usePooled(slot, payload);
    const b = slot.buf;
    b.writeUInt32BE(META_ID_BASE_ALLOCATION, 0);
    left = slot.length;
    let p = 4;
    for (let i = 0; i < n; i++) {
      const e = ext[i]!;
      const len = Math.min(e.length, left);
      left -= len;
      b.writeUInt32BE(len, p);
      b.writeUInt32BE(e.hole ? STATE_HOLE | STATE_ZERO : 0, p + 4);
      p += 8;
    }
    const h = slot.hdr;
    this.chunkHeader(h, 0, slot, REPLY_FLAG_DONE, REPLY_TYPE.BLOCK_STATUS, payload);
    const sock = this.socket;
    const out = this.out;
    sock.cork();
    out.write(h.subarray(0, CHUNK_HEADER_SIZE));
    out.write(b.subarray(0, payload), slot.written);
    sock.uncork();
  }

  // ---- replies ----

  private writable(slot: Slot): boolean {
    if (this.socket.destroyed || !this.socket.writable) {
      this.release(slot);
      return false;
    }
    return true;
  }

  private chunkHeader(
    h: Buffer,
    at: number,
    slot: Slot,
    flags: number,
    type: number,
    length: number,
  ): void {
    h.writeUInt32BE(STRUCTURED_REPLY_MAGIC, at);
    h.writeUInt16BE(flags, at + 4);
    h.writeUInt16BE(type, at + 6);
    h.writeUInt32BE(slot.cookieHi, at + 8);
    h.writeUInt32BE(slot.cookieLo, at + 12);
    h.writeUInt32BE(length, at + 16);
  }

  private sendSimple(slot: Slot, err: number): void {
    if (err) slot.failed = true;
    if (!this.writable(slot)) return;
    const h = slot.hdr;
    h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    h.writeUInt32BE(err, 4);
    h.writeUInt32BE(slot.cookieHi, 8);
    h.writeUInt32BE(slot.cookieLo, 12);
    this.out.write(h.subarray(0, 16), slot.written);
  }

  private sendError(slot: Slot, err: number): void {
    slot.failed = true;
    // READ and BLOCK_STATUS answer in structured form once it was negotiated.
    if (!this.vctx?.structured || (slot.type !== CMD.READ && slot.type !== CMD.BLOCK_STATUS)) {
      this.sendSimple(slot, err);
      return;
    }
    if (!this.writable(slot)) return;
    const h = slot.hdr;
    this.chunkHeader(h, 0, slot, REPLY_FLAG_DONE, REPLY_TYPE.ERROR, 6);
    h.writeUInt32BE(err, 20);
    h.writeUInt16BE(0, 24);
    this.out.write(h.subarray(0, 26), slot.written);
  }

  private sendHole(slot: Slot): void {
    if (!this.writable(slot)) return;
    const h = slot.hdr;
    this.chunkHeader(h, 0, slot, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_HOLE, 12);
    writeU64(h, 20, slot.offset);
    h.writeUInt32BE(slot.length, 28);
    this.out.write(h.subarray(0, 32), slot.written);
  }

  private sendData(slot: Slot): void {
    if (!this.writable(slot)) return;
    const sock = this.socket;
    const out = this.out;
    const h = slot.hdr;
    const data = slot.buf;
    const base = slot.bufOffset;
    if (!this.vctx!.structured) {
      h.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
      h.writeUInt32BE(0, 4);
      h.writeUInt32BE(slot.cookieHi, 8);
      h.writeUInt32BE(slot.cookieLo, 12);
      sock.cork();
      out.write(h.subarray(0, 16));
      out.write(data.subarray(base, base + slot.length), slot.written);
      sock.uncork();
      return;
    }
    if (!slot.mapped) {
      this.chunkHeader(h, 0, slot, REPLY_FLAG_DONE, REPLY_TYPE.OFFSET_DATA, 8 + slot.length);
      writeU64(h, 20, slot.offset);
      sock.cork();
      out.write(h.subarray(0, 28));
      out.write(data.subarray(base, base + slot.length), slot.written);
      sock.uncork();
      return;
    }
    // Mixed data and holes: one chunk per run, the last one marked DONE.
    // Whatever the extents did not cover is sent as data.
    const ext = slot.extents;
    const total = slot.length;
    let off = 0;
    let hp = 0;
    sock.cork();
    for (let i = 0; off < total; i++) {
      const e = i < ext.length ? ext[i]! : null;
      const len = e ? Math.min(e.length, total - off) : total - off;
      const done = off + len >= total ? REPLY_FLAG_DONE : 0;
      const cb = done ? slot.written : undefined;
      if (e?.hole) {
        this.chunkHeader(h, hp, slot, done, REPLY_TYPE.OFFSET_HOLE, 12);
        writeU64(h, hp + 20, slot.offset + off);
        h.writeUInt32BE(len, hp + 28);
        out.write(h.subarray(hp, hp + 32), cb);
        hp += 32;
      } else {
        this.chunkHeader(h, hp, slot, done, REPLY_TYPE.OFFSET_DATA, 8 + len);
        writeU64(h, hp + 20, slot.offset + off);
        out.write(h.subarray(hp, hp + 28));
        hp += 28;
        out.write(data.subarray(base + off, base + off + len), cb);
      }
      off += len;
    }
    sock.uncork();
  }

  // ---- closing ----

  private beginClosing(): void {
    if (this.phase === 'closed') return;
    if (this.phase === 'handshake') {
      this.socket.destroy();
      return;
    }
    this.phase = 'closing';
    this.socket.pause();
    // A request whose payload was still arriving can never complete now.
    const partial = this.current;
    if (partial) {
      this.current = null;
      partial.failed = true;
      this.release(partial);
    }
    if (this.inUse === 0) this.finishClosing();
  }

  private finished = false;

  private finishClosing(): void {
    if (this.finished) return;
    this.finished = true;
    // Everything queued is written, then the socket goes, whether or not the
    // client closes its side.
    this.socket.destroySoon();
  }

  /** Stop reading, let requests in flight finish, then close (graceful shutdown). */
  shutdown(): void {
    if (this.link) this.link.shutdown();
    else this.beginClosing();
  }

  /** Drop the connection now (deleted export, forced). */
  kill(): void {
    if (this.link) this.link.kill();
    else this.socket.destroy();
  }

  /**
   * Drop the connection now and read nothing more from it, not even what is
   * already buffered. Resolves once none of its requests is still in the
   * backend: after that, nothing this client sent can reach the export.
   */
  abort(): Promise<void> {
    if (this.link) return this.link.abort();
    if (this.phase !== 'closed') this.phase = 'closing';
    this.pending = null;
    this.stalled = false;
    const partial = this.current;
    if (partial) {
      this.current = null;
      partial.failed = true;
      this.release(partial);
    }
    this.socket.destroy();
    if (this.inUse === 0) return Promise.resolve();
    return new Promise((resolve) => this.idleWaiters.push(resolve));
  }

  private onClose(): void {
    if (this.stats && this.phase !== 'closed') {
      this.stats.connections--;
      this.stats.onConnections?.(this.stats.connections, -1);
    }
    if (this.handshakeTimer) clearTimeout(this.handshakeTimer);
    this.handshakeTimer = null;
    this.phase = 'closed';
    this.pending = null;
    this.server.forget(this);
  }

  /** Resolves once the socket has closed. */
  closed(): Promise<void> {
    if (this.link) return new Promise((resolve) => this.closedWaiters.push(resolve));
    if (this.phase === 'closed' || this.socket.closed) return Promise.resolve();
    return new Promise((resolve) => this.socket.once('close', () => resolve()));
  }
}

function writeU64(b: Buffer, at: number, v: number): void {
  b.writeUInt32BE(Math.floor(v / 0x100000000), at);
  b.writeUInt32BE(v >>> 0, at + 4);
}

export type ListenTarget = { host: string; port: number } | { path: string };

/** Per-connection receive buffer: headers, option data and small payloads land here. */
const RECV_BUFFER = 256 * 1024;
/** Where every connection in handshake reads; one for the process. */
let sharedHandshakeBuffer: Buffer | null = null;

/** Where a socket reads before its Connection exists (Node asks for a buffer at once). */
export function handshakeBuffer(): Buffer {
  sharedHandshakeBuffer ??= Buffer.allocUnsafeSlow(64 * 1024);
  return sharedHandshakeBuffer;
}

interface NodeSocketInternals {
  _handle?: unknown;
  _server?: net.Server | null;
  server?: net.Server | null;
}

/**
 * Node reads a socket into a fresh 64 KiB buffer per read, so a 1 MiB WRITE
 * costs 16 allocations, their garbage, page faults as the heap grows and
 * shrinks, and a copy into the request's buffer. `onread` lets the reader
 * choose the buffer of every read instead, but net.Server offers it only to
 * sockets it creates itself; so the accepted socket's handle, not yet reading
 * (pauseOnConnect), moves to a new Socket that has it. If the handle is not
 * where Node keeps it, the accepted socket is used as it is ('data' events).
 */
function ownReads(sock: net.Socket): {
  socket: net.Socket;
  owned: boolean;
  bind: (conn: Connection) => void;
} {
  const old = sock as unknown as NodeSocketInternals;
  const handle = old._handle;
  if (!handle) {
    sock.resume();
    return { socket: sock, owned: false, bind: () => {} };
  }
  let conn: Connection | null = null;
  old._handle = null;
  // `handle` is what net.Server itself passes; the public typings leave it out.
  const opts: net.SocketConstructorOpts & { handle: unknown; onread: net.OnReadOpts } = {
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: () => (conn ? conn.readTarget() : handshakeBuffer()),
      callback: (n: number, buf: Uint8Array) => {
        conn?.onRead(n, buf as Buffer);
        return true;
      },
    },
  };
  const socket = new net.Socket(opts);
  // The server counts its connections and waits for them on close(): the new
  // socket answers for the one it replaces.
  const fresh = socket as unknown as NodeSocketInternals;
  fresh._server = old._server ?? null;
  fresh.server = old.server ?? null;
  old._server = null;
  old.server = null;
  return {
    socket,
    owned: true,
    bind: (c) => {
      conn = c;
    },
  };
}

export class NbdServer extends EventEmitter {
  readonly connections = new Set<Connection>();
  readonly stats: ServerStats = {
    connectionsTotal: 0,
    connectionsRefused: 0,
    requests: new Array<number>(16).fill(0),
    errors: 0,
    bytesRead: 0,
    bytesWritten: 0,
    denied: 0,
    tlsHandshakes: 0,
    tlsFailures: 0,
    handshakeTimeouts: 0,
    handshakesEvicted: 0,
  };
  private readonly netServers: net.Server[] = [];
  private nextId = 1;
  private closing = false;
  /** The worker threads established connections move to (options.workers > 1), else null. */
  readonly pool: WorkerPool | null;
  /** Data buffers of the connections served on this thread (buffers.ts). */
  readonly buffers: BufferPool;

  constructor(readonly options: ServerOptions) {
    super();
    this.buffers = new BufferPool(options.threadBufferedBytes ?? DEFAULT_THREAD_BUFFER_BYTES);
    const n = options.workers ?? 1;
    if (n <= 1) this.pool = null;
    else if (options.dupFd) this.pool = new WorkerPool(this, n, options.dupFd);
    else throw new TypeError('ServerOptions: workers > 1 needs dupFd');
  }

  /** A worker's link to the main thread for relayed handshakes. */
  relay: HandshakeRelay | null = null;

  /**
   * Serve a TLS connection whose STARTTLS another thread acknowledged.
   * `registered` runs before the TLS handshake starts.
   */
  adoptTls(socket: net.Socket, id: number, registered: (c: Connection) => void): Connection {
    const conn = new Connection(this, socket, id, false, 'tls', registered);
    this.connections.add(conn);
    return conn;
  }

  /**
   * Serve a connection whose handshake another thread did (a worker's side of
   * the hand-over): `leftover` is what that thread read past the handshake.
   */
  adopt(socket: net.Socket, adoption: Adoption, leftover: Buffer, owned: boolean): Connection {
    const conn = new Connection(this, socket, adoption.id ?? this.nextId++, owned, adoption);
    this.connections.add(conn);
    conn.feed(leftover);
    return conn;
  }

  log(level: 'debug' | 'info' | 'warn', msg: string): void {
    this.options.log?.(level, msg);
  }

  /** Start listening; resolves with the bound address. */
  async listen(target: ListenTarget): Promise<net.AddressInfo | string> {
    await this.pool?.start();
    return this.listenOn(target);
  }

  private listenOn(target: ListenTarget): Promise<net.AddressInfo | string> {
    const srv = net.createServer(
      { noDelay: true, allowHalfOpen: true, pauseOnConnect: true },
      (sock) => this.accept(sock),
    );
    return new Promise((resolve, reject) => {
      srv.once('error', reject);
      const ready = (): void => {
        srv.off('error', reject);
        srv.on('error', (e) => this.log('warn', `listener: ${e.message}`));
        this.netServers.push(srv);
        const a = srv.address();
        resolve(a ?? '');
      };
      if ('path' in target) srv.listen(target.path, ready);
      else srv.listen(target.port, target.host, ready);
    });
  }

  private accept(sock: net.Socket, synced = false): void {
    const max = this.options.maxConnections ?? 256;
    const maxHs = Math.max(1, Math.min(this.options.maxHandshakes ?? 64, max));
    const perSource = this.options.maxPerSource ?? 0;
    const source = this.options.sourceOf?.(sock) ?? sock.remoteAddress ?? 'unix';
    let refuse: string | null = this.closing ? 'shutting down' : null;
    if (!refuse && perSource > 0) {
      const mine = this.bySource.get(source);
      if (mine && mine.size >= perSource) {
        // The source's own oldest handshake makes room, else it is refused.
        const victim = [...mine].find((c) => this.handshaking.has(c));
        if (victim) this.evict(victim);
        else refuse = `source ${source} at its limit of ${perSource}`;
      }
    }
    if (!refuse && this.handshaking.size >= maxHs) this.evictOldest();
    if (!refuse && this.live() >= max) {
      if (this.handshaking.size > 0) this.evictOldest();
      else refuse = 'connection limit';
    }
    if (refuse && !synced && this.pool !== null && this.pool.remotes > 0 && !this.closing) {
      // Workers may have seen some of their clients go and not told us yet: ask
      // them (their news arrives before their answer), then decide.
      void this.pool.sync().then(() => {
        if (!sock.destroyed) this.accept(sock, true);
      });
      return;
    }
    if (refuse) {
      this.stats.connectionsRefused++;
      this.log('warn', `refusing connection from ${source}: ${refuse}`);
      sock.destroy();
      return;
    }
    this.stats.connectionsTotal++;
    const { socket, owned, bind } = ownReads(sock);
    const conn = new Connection(this, socket, this.nextId++, owned);
    bind(conn);
    this.connections.add(conn);
    this.handshaking.add(conn);
    this.sourceOf.set(conn, source);
    let mine = this.bySource.get(source);
    if (!mine) {
      mine = new Set();
      this.bySource.set(source, mine);
    }
    mine.add(conn);
    this.emit('connection', conn);
  }

  /** Connections in handshake, oldest first (a Set keeps insertion order). */
  private readonly handshaking = new Set<Connection>();
  /** Closed by us and not yet gone: no longer counted. */
  private readonly evicted = new Set<Connection>();
  private readonly bySource = new Map<string, Set<Connection>>();
  private readonly sourceOf = new Map<Connection, string>();

  /** Connections in handshake now (for tests and metrics). */
  get handshakes(): number {
    return this.handshaking.size;
  }

  private live(): number {
    return this.connections.size - this.evicted.size;
  }

  private evictOldest(): void {
    const oldest = this.handshaking.values().next();
    if (!oldest.done) this.evict(oldest.value);
  }

  private evict(conn: Connection): void {
    this.stats.handshakesEvicted++;
    this.log('debug', `conn ${conn.id} ${conn.remote}: closed to make room for a new connection`);
    this.handshaking.delete(conn);
    this.evicted.add(conn);
    this.untrack(conn);
    conn.dropHandshake();
  }

  private untrack(conn: Connection): void {
    const source = this.sourceOf.get(conn);
    if (source === undefined) return;
    this.sourceOf.delete(conn);
    const mine = this.bySource.get(source);
    mine?.delete(conn);
    if (mine?.size === 0) this.bySource.delete(source);
  }

  /** @internal The connection reached transmission. */
  handshakeDone(conn: Connection): void {
    this.handshaking.delete(conn);
  }

  /** @internal */
  forget(conn: Connection): void {
    this.connections.delete(conn);
    this.handshaking.delete(conn);
    this.evicted.delete(conn);
    this.untrack(conn);
    this.emit('disconnect', conn);
  }

  /** Connections serving the named export. */
  connectionsTo(name: string): Connection[] {
    return [...this.connections].filter((c) => c.exportName === name);
  }

  /**
   * Graceful stop: stop accepting, let requests in flight finish, close every
   * connection. Connections still open after `timeoutMs` are dropped.
   */
  async close(timeoutMs = 30_000): Promise<void> {
    this.closing = true;
    const stopped = this.netServers.map(
      (l) => new Promise<void>((resolve) => l.close(() => resolve())),
    );
    for (const c of this.connections) c.shutdown();
    const all = Promise.all([...this.connections].map((c) => c.closed()));
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<void>((resolve) => {
      timer = setTimeout(() => {
        for (const c of this.connections) c.kill();
        resolve();
      }, timeoutMs);
    });
    await Promise.race([all, timeout]);
    clearTimeout(timer);
    await Promise.all(stopped);
    await this.pool?.close();
  }
}
