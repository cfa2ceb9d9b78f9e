// An NBD client: fixed newstyle handshake (STRUCTURED_REPLY, SET_META_CONTEXT
// base:allocation, GO with INFO_BLOCK_SIZE), then many requests in flight over one
// TCP or Unix socket. The wire format lives in client-codec.ts; this is the transport.
//
// TLS: `startTls` is the hook — when given, STARTTLS is negotiated first and the hook
// turns the plain socket into an encrypted stream; everything after runs over it.

import { existsSync, readFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import type { Duplex } from 'node:stream';
import tls from 'node:tls';
import {
  type ExportInfo,
  encodeGoPayload,
  encodeMetaContextPayload,
  encodeOption,
  encodeRequest,
  NbdClientError,
  type NbdTarget,
  parseInfo,
  parseNbdUri,
  parseOptionReplyHeader,
  REQUEST_SIZE,
  ReplyReader,
  type ReplySink,
} from './client-codec.js';
import {
  BLOCK_SIZE_MAX,
  CMD,
  CMD_FLAG,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  META_BASE_ALLOCATION,
  NBD_ERR,
  NBDMAGIC,
  nbdErrName,
  OPT,
  optName,
  REP,
  repName,
  TFLAG,
} from './protocol.js';

export { NbdClientError, type NbdTarget, parseNbdUri } from './client-codec.js';

export interface NbdClientOptions {
  /** Overrides the export name of the URI/target. */
  exportName?: string;
  /** Negotiate structured replies (default true). */
  structuredReplies?: boolean;
  /** Ask for base:allocation so blockStatus works (default true; needs structured replies). */
  blockStatus?: boolean;
  /** Requests in flight at once (default 64). */
  maxInFlight?: number;
  /** Give up connecting and negotiating after this long (default 30 s). */
  timeoutMs?: number;
  /** TCP: the local address to connect from (servers may name clients by it). */
  localAddress?: string;
  /** TLS hook: negotiate STARTTLS and run the session over the stream this returns. */
  startTls?: (socket: net.Socket) => Promise<Duplex>;
  /**
   * X.509 credentials for STARTTLS (used by nbds:// URIs, or to force TLS): a directory
   * laid out as libnbd and QEMU expect (ca-cert.pem, and for a client certificate
   * client-cert.pem + client-key.pem), or the PEM contents. Ignored when startTls is set.
   */
  tls?: TlsCredentials;
}

export interface TlsCredentials {
  dir?: string;
  ca?: string | Buffer;
  cert?: string | Buffer;
  key?: string | Buffer;
  /** The name the server certificate must carry (default: the host, or localhost for Unix sockets). */
  servername?: string;
}

/** Reads what exists of DIR/ca-cert.pem, client-cert.pem, client-key.pem. */
function loadCredentials(c: TlsCredentials): {
  ca?: Buffer | string;
  cert?: Buffer | string;
  key?: Buffer | string;
} {
  const out: { ca?: Buffer | string; cert?: Buffer | string; key?: Buffer | string } = {};
  const read = (name: string): Buffer | undefined => {
    if (!c.dir) return undefined;
    const p = path.join(c.dir, name);
    if (!existsSync(p)) return undefined;
    try {
      return readFileSync(p);
    } catch (e) {
      throw new NbdClientError('NBD_TLS_CREDENTIALS', `cannot read ${p}: ${(e as Error).message}`);
    }
  };
  const ca = c.ca ?? read('ca-cert.pem');
  const cert = c.cert ?? read('client-cert.pem');
  const key = c.key ?? read('client-key.pem');
  if (ca) out.ca = ca;
  if (cert) out.cert = cert;
  if (key) out.key = key;
  return out;
}

/** The startTls hook for X.509 credentials. */
export function x509StartTls(
  c: TlsCredentials,
  defaultName: string,
): (s: net.Socket) => Promise<Duplex> {
  const creds = loadCredentials(c);
  return (socket) =>
    new Promise((resolve, reject) => {
      const t = tls.connect({ socket, servername: c.servername ?? defaultName, ...creds });
      t.once('secureConnect', () => resolve(t));
      t.once('error', (e: Error) =>
        reject(
          new NbdClientError('NBD_TLS_FAILED', `TLS handshake failed: ${e.message}`, { cause: e }),
        ),
      );
    });
}

export interface Extent {
  offset: number;
  length: number;
  /** base:allocation flags: STATE_HOLE (1), STATE_ZERO (2). */
  flags: number;
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  buf: Buffer | null;
  bufPos: number;
  errno: number;
  message: string;
  extents: Extent[] | null;
  resolve: () => void;
  reject: (e: Error) => void;
}

function errorFromReply(type: number, errno: number, message: string): NbdClientError {
  const name = NBD_ERR_NAMES.has(errno) ? nbdErrName(errno) : 'EIO';
  const what = Object.entries(CMD).find(([, v]) => v === type)?.[0] ?? String(type);
  return new NbdClientError(
    `NBD_${name}`,
    `${what} failed: NBD_${name}${message ? ` (${message})` : ''}`,
    { nbdErrno: errno },
  );
}
const NBD_ERR_NAMES = new Set<number>(Object.values(NBD_ERR));
const REP_NAMES: Record<number, true> = Object.fromEntries(
  Object.values(REP).map((v) => [v, true]),
);

/** Buffered pulls from a stream, for the handshake only. */
class HandshakeIo {
  private chunks: Buffer[] = [];
  private have = 0;
  private waiter: (() => void) | null = null;
  private failure: Error | null = null;
  private readonly onData = (b: Buffer) => {
    this.chunks.push(b);
    this.have += b.length;
    this.wake();
  };
  private readonly onEnd = () =>
    this.fail(
      new NbdClientError('NBD_DISCONNECTED', 'server closed the connection during the handshake'),
    );
  private readonly onError = (e: Error) =>
    this.fail(
      new NbdClientError('NBD_DISCONNECTED', `connection failed: ${e.message}`, { cause: e }),
    );

  constructor(readonly stream: Duplex) {
    stream.on('data', this.onData);
    stream.on('end', this.onEnd);
    stream.on('close', this.onEnd);
    stream.on('error', this.onError);
  }

  fail(e: Error): void {
    if (!this.failure) this.failure = e;
    this.wake();
  }

  private wake(): void {
    const w = this.waiter;
    this.waiter = null;
    w?.();
  }

  async read(n: number): Promise<Buffer> {
    while (this.have < n) {
      if (this.failure) throw this.failure;
      await new Promise<void>((r) => {
        this.waiter = r;
      });
    }
    const all = this.chunks.length === 1 ? (this.chunks[0] as Buffer) : Buffer.concat(this.chunks);
    const out = all.subarray(0, n);
    const rest = all.subarray(n);
    this.chunks = rest.length ? [rest] : [];
    this.have = rest.length;
    return Buffer.from(out);
  }

  write(b: Buffer): void {
    this.stream.write(b);
  }

  /** Stops listening; returns what was read past the handshake. */
  detach(): Buffer {
    this.stream.off('data', this.onData);
    this.stream.off('end', this.onEnd);
    this.stream.off('close', this.onEnd);
    this.stream.off('error', this.onError);
    const rest = Buffer.concat(this.chunks);
    this.chunks = [];
    this.have = 0;
    return rest;
  }
}

function connectSocket(target: NbdTarget, localAddress?: string): net.Socket {
  return target.kind === 'unix'
    ? net.connect(target.path)
    : net.connect({
        host: target.host,
        port: target.port,
        ...(localAddress ? { localAddress } : {}),
      });
}

export class NbdClient {
  readonly size: number;
  readonly flags: number;
  readonly exportName: string;
  readonly structured: boolean;
  /** base:allocation was negotiated. */
  readonly allocation: boolean;
  readonly minBlock: number;
  readonly preferredBlock: number;
  readonly maxBlock: number;
  readonly description: string | undefined;

  private readonly pending = new Map<number, Pending>();
  private nextCookie = 1;
  private inFlight = 0;
  private readonly maxInFlight: number;
  private readonly slotWaiters: (() => void)[] = [];
  private drainWaiters: (() => void)[] = [];
  private broken: NbdClientError | null = null;
  private closing = false;
  private readonly reader: ReplyReader;
  private readonly header = Buffer.alloc(REQUEST_SIZE);
  private allocationContext = -1;

  private constructor(
    private readonly stream: Duplex,
    info: Required<Pick<ExportInfo, 'size' | 'flags'>> & ExportInfo,
    o: {
      exportName: string;
      structured: boolean;
      allocationContext: number;
      maxInFlight: number;
      leftover: Buffer;
    },
  ) {
    this.size = info.size;
    this.flags = info.flags;
    this.exportName = o.exportName;
    this.structured = o.structured;
    this.allocationContext = o.allocationContext;
    this.allocation = o.allocationContext >= 0;
    this.minBlock = info.minBlock ?? 1;
    this.preferredBlock = info.preferredBlock ?? 4096;
    // Without INFO_BLOCK_SIZE, 32 MiB is what the spec says every server takes.
    this.maxBlock = Math.min(info.maxBlock ?? BLOCK_SIZE_MAX, BLOCK_SIZE_MAX);
    this.description = info.description;
    this.maxInFlight = o.maxInFlight;
    this.reader = new ReplyReader(this.sink());
    stream.on('data', (b: Buffer) => {
      try {
        this.reader.feed(b);
      } catch (e) {
        this.fail(e as NbdClientError);
        this.stream.destroy();
      }
    });
    stream.on('drain', () => {
      const w = this.drainWaiters;
      this.drainWaiters = [];
      for (const f of w) f();
    });
    const gone = () =>
      this.fail(
        new NbdClientError(
          'NBD_DISCONNECTED',
          this.closing ? 'connection closed' : 'server closed the connection',
        ),
      );
    stream.on('end', gone);
    stream.on('close', gone);
    stream.on('error', (e: Error) =>
      this.fail(
        new NbdClientError('NBD_DISCONNECTED', `connection failed: ${e.message}`, { cause: e }),
      ),
    );
    if (o.leftover.length) this.reader.feed(o.leftover);
  }

  /** Connects to `nbd://…`, `nbd+unix://…` or a parsed target and opens the export. */
  static async connect(
    target: string | NbdTarget,
    opts: NbdClientOptions = {},
  ): Promise<NbdClient> {
    const t = typeof target === 'string' ? parseNbdUri(target) : target;
    const exportName = opts.exportName ?? t.exportName;
    if (!opts.startTls && (t.tls || opts.tls)) {
      const name = t.kind === 'tcp' && net.isIP(t.host) === 0 ? t.host : 'localhost';
      opts = { ...opts, startTls: x509StartTls(opts.tls ?? {}, name) };
    }
    const timeoutMs = opts.timeoutMs ?? 30_000;
    const sock = connectSocket(t, opts.localAddress);
    let timer: NodeJS.Timeout | undefined;
    let io: HandshakeIo | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(() => {
        const e = new NbdClientError('NBD_TIMEOUT', `no NBD handshake within ${timeoutMs} ms`);
        io?.fail(e);
        sock.destroy();
        reject(e);
      }, timeoutMs);
    });
    timeout.catch(() => {});
    try {
      await Promise.race([
        new Promise<void>((resolve, reject) => {
          const onErr = (e: NodeJS.ErrnoException) =>
            reject(
              new NbdClientError(
                'NBD_CONNECT_FAILED',
                `cannot connect to ${t.kind === 'unix' ? t.path : `${t.host}:${t.port}`}: ${e.code ?? e.message}`,
                { cause: e },
              ),
            );
          sock.once('error', onErr);
          sock.once('connect', () => {
            sock.off('error', onErr);
            resolve();
          });
        }),
        timeout,
      ]);
      sock.setNoDelay(true);
      io = new HandshakeIo(sock);
      const result = await Promise.race([NbdClient.handshake(io, sock, exportName, opts), timeout]);
      return result;
    } catch (e) {
      sock.destroy();
      throw e;
    } finally {
      clearTimeout(timer);
    }
  }

  private static async handshake(
    first: HandshakeIo,
    sock: net.Socket,
    exportName: string,
    opts: NbdClientOptions,
  ): Promise<NbdClient> {
    let io = first;
    const hello = await io.read(18);
    if (hello.readBigUInt64BE(0) !== NBDMAGIC)
      throw new NbdClientError('NBD_PROTOCOL', 'not an NBD server (no NBDMAGIC)');
    if (hello.readBigUInt64BE(8) !== IHAVEOPT)
      throw new NbdClientError('NBD_PROTOCOL', 'oldstyle NBD servers are not supported');
    const hflags = hello.readUInt16BE(16);
    if (!(hflags & FLAG_FIXED_NEWSTYLE))
      throw new NbdClientError('NBD_PROTOCOL', 'the server does not speak fixed newstyle');
    const noZeroes = (hflags & FLAG_NO_ZEROES) !== 0;
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(FLAG_C_FIXED_NEWSTYLE | (noZeroes ? FLAG_C_NO_ZEROES : 0));
    io.write(cflags);

    /** Sends an option and collects its replies up to ACK or an error. */
    const option = async (
      opt: number,
      data: Buffer,
      onReply: (type: number, payload: Buffer) => void,
    ): Promise<{ ok: true } | { ok: false; type: number; message: string }> => {
      io.write(encodeOption(opt, data));
      for (;;) {
        const h = parseOptionReplyHeader(await io.read(20));
        if (h.option !== opt)
          throw new NbdClientError(
            'NBD_PROTOCOL',
            `reply to ${optName(h.option)} while waiting for ${optName(opt)}`,
          );
        if (h.length > 16 * 1024 * 1024)
          throw new NbdClientError('NBD_PROTOCOL', `option reply of ${h.length} bytes`);
        const payload = await io.read(h.length);
        if (h.type === REP.ACK) return { ok: true };
        if (h.type & 0x80000000)
          return { ok: false, type: h.type, message: payload.toString('utf8') };
        onReply(h.type, payload);
      }
    };
    const optionError = (opt: number, r: { type: number; message: string }) =>
      new NbdClientError(
        r.type in REP_NAMES ? `NBD_REP_${repName(r.type)}` : 'NBD_REP_ERR_UNKNOWN_REPLY',
        `${optName(opt)} refused: NBD_REP_${repName(r.type)}${r.message ? ` (${r.message})` : ''}`,
      );

    let stream: Duplex = sock;
    if (opts.startTls) {
      const r = await option(OPT.STARTTLS, Buffer.alloc(0), () => {});
      if (!r.ok) throw optionError(OPT.STARTTLS, r);
      io.detach();
      stream = await opts.startTls(sock);
      io = new HandshakeIo(stream);
    }

    let structured = false;
    if (opts.structuredReplies !== false) {
      const r = await option(OPT.STRUCTURED_REPLY, Buffer.alloc(0), () => {});
      structured = r.ok;
    }
    // qemu-nbd numbers base:allocation 0, so -1 means none.
    let allocationContext = -1;
    if (structured && opts.blockStatus !== false) {
      const r = await option(
        OPT.SET_META_CONTEXT,
        encodeMetaContextPayload(exportName, [META_BASE_ALLOCATION]),
        (type, p) => {
          if (
            type === REP.META_CONTEXT &&
            p.length >= 4 &&
            p.toString('utf8', 4) === META_BASE_ALLOCATION
          )
            allocationContext = p.readUInt32BE(0);
        },
      );
      // A server without meta contexts still serves data; block status is then unavailable.
      if (!r.ok) allocationContext = -1;
    }
    const info: ExportInfo = {};
    const go = await option(OPT.GO, encodeGoPayload(exportName, [INFO.BLOCK_SIZE]), (type, p) => {
      if (type === REP.INFO) parseInfo(p, info);
    });
    if (!go.ok) {
      if (go.type === REP.ERR_UNSUP) {
        // A server without GO: fall back to EXPORT_NAME, which has no error reply.
        io.write(encodeOption(OPT.EXPORT_NAME, Buffer.from(exportName, 'utf8')));
        const b = await io.read(noZeroes ? 10 : 134);
        info.size = Number(b.readBigUInt64BE(0));
        info.flags = b.readUInt16BE(8);
      } else throw optionError(OPT.GO, go);
    }
    if (info.size === undefined || info.flags === undefined)
      throw new NbdClientError('NBD_PROTOCOL', 'the server sent no NBD_INFO_EXPORT');
    const leftover = io.detach();
    return new NbdClient(
      stream,
      { ...info, size: info.size, flags: info.flags },
      {
        exportName,
        structured,
        allocationContext,
        maxInFlight: opts.maxInFlight ?? 64,
        leftover,
      },
    );
  }

  get readOnly(): boolean {
    return (this.flags & TFLAG.READ_ONLY) !== 0;
  }
  get canFlush(): boolean {
    return (this.flags & TFLAG.SEND_FLUSH) !== 0;
  }
  get canFua(): boolean {
    return (this.flags & TFLAG.SEND_FUA) !== 0;
  }
  get canTrim(): boolean {
    return (this.flags & TFLAG.SEND_TRIM) !== 0;
  }
  get canZero(): boolean {
    return (this.flags & TFLAG.SEND_WRITE_ZEROES) !== 0;
  }
  get canFastZero(): boolean {
    return (this.flags & TFLAG.SEND_FAST_ZERO) !== 0;
  }
  get canMultiConn(): boolean {
    return (this.flags & TFLAG.CAN_MULTI_CONN) !== 0;
  }
  /** Requests sent and not yet answered. */
  get requestsInFlight(): number {
    return this.inFlight;
  }

  private sink(): ReplySink {
    return {
      simpleReadLength: (cookie) => {
        const p = this.pending.get(cookie);
        if (!p) return null;
        return p.type === CMD.READ ? p.length : 0;
      },
      readTarget: (cookie, offset, length) => {
        const p = this.pending.get(cookie);
        if (!p || p.type !== CMD.READ || !p.buf) return null;
        if (offset < 0) return { buf: p.buf, pos: p.bufPos };
        if (offset < p.offset || offset + length > p.offset + p.length)
          throw new NbdClientError('NBD_PROTOCOL', 'read data outside the requested range');
        return { buf: p.buf, pos: p.bufPos + (offset - p.offset) };
      },
      hole: (cookie, offset, length) => {
        const p = this.pending.get(cookie);
        if (!p?.buf) return;
        if (offset < p.offset || offset + length > p.offset + p.length)
          throw new NbdClientError('NBD_PROTOCOL', 'hole outside the requested range');
        const s = p.bufPos + (offset - p.offset);
        p.buf.fill(0, s, s + length);
      },
      blockStatus: (cookie, context, ext) => {
        const p = this.pending.get(cookie);
        if (!p || context !== this.allocationContext) return;
        p.extents ??= [];
        let off = p.offset;
        for (let i = 0; i + 1 < ext.length; i += 2) {
          const length = ext[i] as number;
          p.extents.push({ offset: off, length, flags: ext[i + 1] as number });
          off += length;
        }
      },
      error: (cookie, errno, message) => {
        const p = this.pending.get(cookie);
        if (p && p.errno === 0) {
          p.errno = errno || NBD_ERR.EIO;
          p.message = message;
        }
      },
      done: (cookie) => {
        const p = this.pending.get(cookie);
        if (!p) return;
        this.pending.delete(cookie);
        this.release();
        if (p.errno) p.reject(errorFromReply(p.type, p.errno, p.message));
        else p.resolve();
      },
    };
  }

  private fail(e: NbdClientError): void {
    if (this.broken) return;
    this.broken = e;
    for (const p of this.pending.values()) p.reject(e);
    this.pending.clear();
    for (const w of this.slotWaiters.splice(0)) w();
    for (const w of this.drainWaiters.splice(0)) w();
  }

  private release(): void {
    this.inFlight--;
    const w = this.slotWaiters.shift();
    w?.();
  }

  private async submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload: Buffer | null,
    readBuf: Buffer | null,
    readPos: number,
    extents: Extent[] | null,
  ): Promise<void> {
    while (this.inFlight >= this.maxInFlight && !this.broken) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
    if (this.broken) throw this.broken;
    if (this.closing) throw new NbdClientError('NBD_CLOSED', 'the client is closed');
    const cookie = this.nextCookie;
    this.nextCookie = (this.nextCookie + 1) >>> 0 || 1;
    this.inFlight++;
    const done = new Promise<void>((resolve, reject) => {
      this.pending.set(cookie, {
        type,
        offset,
        length,
        buf: readBuf,
        bufPos: readPos,
        errno: 0,
        message: '',
        extents,
        resolve,
        reject,
      });
    });
    const h = payload ? Buffer.allocUnsafe(REQUEST_SIZE) : this.header;
    encodeRequest(h, 0, flags, type, cookie, offset, length);
    let ok: boolean;
    if (payload) {
      this.stream.cork();
      this.stream.write(h);
      ok = this.stream.write(payload);
      process.nextTick(() => this.stream.uncork());
    } else {
      ok = this.stream.write(Buffer.from(h));
    }
    if (!ok && !this.broken) await new Promise<void>((r) => this.drainWaiters.push(r));
    return done;
  }

  private check(offset: number, length: number, write: boolean, cmd: string): void {
    if (this.broken) throw this.broken;
    if (!Number.isSafeInteger(offset) || offset < 0 || !Number.isSafeInteger(length) || length < 0)
      throw new NbdClientError('NBD_BAD_RANGE', `${cmd}: bad offset ${offset} or length ${length}`);
    if (offset + length > this.size)
      throw new NbdClientError(
        'NBD_BAD_RANGE',
        `${cmd} of ${length} bytes at ${offset} is past the end of the ${this.size}-byte export`,
      );
    if (write && this.readOnly)
      throw new NbdClientError('NBD_READ_ONLY', `${cmd}: the export is read-only`);
  }

  /** Reads `length` bytes at `offset` (split into requests of at most maxBlock). */
  async read(offset: number, length: number, into?: Buffer, intoPos = 0): Promise<Buffer> {
    this.check(offset, length, false, 'read');
    const buf = into ?? Buffer.alloc(length);
    const parts: Promise<void>[] = [];
    for (let done = 0; done < length; ) {
      const n = Math.min(this.maxBlock, length - done);
      parts.push(this.submit(CMD.READ, 0, offset + done, n, null, buf, intoPos + done, null));
      done += n;
    }
    await Promise.all(parts);
    return into ? buf.subarray(intoPos, intoPos + length) : buf;
  }

  /** Writes `data` at `offset`; `fua` asks for it to be durable before the reply. */
  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.check(offset, data.length, true, 'write');
    const flags = this.fuaFlag(opts.fua);
    const parts: Promise<void>[] = [];
    for (let done = 0; done < data.length; ) {
      const n = Math.min(this.maxBlock, data.length - done);
      parts.push(
        this.submit(
          CMD.WRITE,
          flags,
          offset + done,
          n,
          data.subarray(done, done + n),
          null,
          0,
          null,
        ),
      );
      done += n;
    }
    await Promise.all(parts);
  }

  private fuaFlag(fua: boolean | undefined): number {
    if (!fua) return 0;
    if (!this.canFua) throw new NbdClientError('NBD_UNSUPPORTED', 'the export does not take FUA');
    return CMD_FLAG.FUA;
  }

  async flush(): Promise<void> {
    if (this.broken) throw this.broken;
    if (!this.canFlush)
      throw new NbdClientError('NBD_UNSUPPORTED', 'the export does not take FLUSH');
    await this.submit(CMD.FLUSH, 0, 0, 0, null, null, 0, null);
  }

  /** Lengths on the wire are 32-bit: longer ranges go as several requests. */
  private async ranged(type: number, flags: number, offset: number, length: number): Promise<void> {
    const step = 0x80000000; // 2 GiB, aligned to any sane block size
    const parts: Promise<void>[] = [];
    for (let done = 0; done < length; ) {
      const n = Math.min(step, length - done);
      parts.push(this.submit(type, flags, offset + done, n, null, null, 0, null));
      done += n;
    }
    await Promise.all(parts);
  }

  async trim(offset: number, length: number, opts: { fua?: boolean } = {}): Promise<void> {
    this.check(offset, length, true, 'trim');
    if (!this.canTrim) throw new NbdClientError('NBD_UNSUPPORTED', 'the export does not take TRIM');
    await this.ranged(CMD.TRIM, this.fuaFlag(opts.fua), offset, length);
  }

  async writeZeroes(
    offset: number,
    length: number,
    opts: { fua?: boolean; noHole?: boolean; fastZero?: boolean } = {},
  ): Promise<void> {
    this.check(offset, length, true, 'write_zeroes');
    if (!this.canZero)
      throw new NbdClientError('NBD_UNSUPPORTED', 'the export does not take WRITE_ZEROES');
    let flags = this.fuaFlag(opts.fua);
    if (opts.noHole) flags |= CMD_FLAG.NO_HOLE;
    if (opts.fastZero) {
      if (!this.canFastZero)
        throw new NbdClientError('NBD_UNSUPPORTED', 'the export does not take FAST_ZERO');
      flags |= CMD_FLAG.FAST_ZERO;
    }
    await this.ranged(CMD.WRITE_ZEROES, flags, offset, length);
  }

  /** base:allocation extents from `offset`; the server may describe less than `length`. */
  async blockStatus(
    offset: number,
    length: number,
    opts: { reqOne?: boolean } = {},
  ): Promise<Extent[]> {
    this.check(offset, length, false, 'block_status');
    if (!this.allocation)
      throw new NbdClientError('NBD_UNSUPPORTED', 'base:allocation was not negotiated');
    const extents: Extent[] = [];
    await this.submit(
      CMD.BLOCK_STATUS,
      opts.reqOne ? CMD_FLAG.REQ_ONE : 0,
      offset,
      Math.min(length, 0xffffffff),
      null,
      null,
      0,
      extents,
    );
    return extents;
  }

  /** Waits for the requests in flight, sends DISC and closes. */
  async close(): Promise<void> {
    if (this.closing) return;
    while (this.inFlight > 0 && !this.broken) {
      await new Promise<void>((r) => this.slotWaiters.push(r));
    }
    this.closing = true;
    if (!this.broken) {
      const h = Buffer.alloc(REQUEST_SIZE);
      encodeRequest(h, 0, 0, CMD.DISC, 0, 0, 0);
      await new Promise<void>((resolve) => {
        this.stream.end(h, () => resolve());
        setTimeout(resolve, 2000).unref();
      });
    }
    this.stream.destroy();
  }

  /** Drops the connection now; requests in flight fail with NBD_DISCONNECTED. */
  destroy(): void {
    this.closing = true;
    this.stream.destroy();
    this.fail(new NbdClientError('NBD_DISCONNECTED', 'connection destroyed'));
  }
}
