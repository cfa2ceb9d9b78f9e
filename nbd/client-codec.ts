// The client side of the wire, without sockets: encoders for options and requests,
// decoders for option replies, and an incremental parser for transmission replies
// (simple and structured) that copies read payloads straight into the caller's buffer.

import {
  CHUNK_HEADER_SIZE,
  IHAVEOPT,
  INFO,
  OPTION_REPLY_MAGIC,
  REPLY_FLAG_DONE,
  REPLY_TYPE,
  REQUEST_HEADER_SIZE,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  SIMPLE_REPLY_SIZE,
  STRUCTURED_REPLY_MAGIC,
} from './protocol.js';

/** Errors of the NBD client carry a stable `code` (docs/errors.md, "NBD client"). */
export class NbdClientError extends Error {
  readonly code: string;
  /** The NBD error value on the wire, for errors the server replied with. */
  readonly nbdErrno?: number;
  constructor(code: string, message: string, options?: { cause?: unknown; nbdErrno?: number }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'NbdClientError';
    this.code = code;
    if (options?.nbdErrno !== undefined) this.nbdErrno = options.nbdErrno;
  }
}

/** An option request: IHAVEOPT, option, length, data. */
export function encodeOption(opt: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(16 + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

/** The payload of NBD_OPT_GO / NBD_OPT_INFO: name, then the info types asked for. */
export function encodeGoPayload(name: string, infos: readonly number[]): Buffer {
  const n = Buffer.from(name, 'utf8');
  const b = Buffer.alloc(4 + n.length + 2 + 2 * infos.length);
  b.writeUInt32BE(n.length, 0);
  n.copy(b, 4);
  let p = 4 + n.length;
  b.writeUInt16BE(infos.length, p);
  p += 2;
  for (const i of infos) {
    b.writeUInt16BE(i, p);
    p += 2;
  }
  return b;
}

/** The payload of NBD_OPT_SET_META_CONTEXT / LIST_META_CONTEXT. */
export function encodeMetaContextPayload(name: string, queries: readonly string[]): Buffer {
  const parts: Buffer[] = [];
  const n = Buffer.from(name, 'utf8');
  const head = Buffer.alloc(4);
  head.writeUInt32BE(n.length, 0);
  parts.push(head, n);
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  parts.push(count);
  for (const q of queries) {
    const qb = Buffer.from(q, 'utf8');
    const l = Buffer.alloc(4);
    l.writeUInt32BE(qb.length, 0);
    parts.push(l, qb);
  }
  return Buffer.concat(parts);
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

/** Parses the 20-byte option reply header; throws NBD_PROTOCOL on a bad magic. */
export function parseOptionReplyHeader(b: Buffer): OptionReplyHeader {
  if (b.length < 20) throw new NbdClientError('NBD_PROTOCOL', 'short option reply header');
  if (b.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC)
    throw new NbdClientError('NBD_PROTOCOL', 'option reply without the reply magic');
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

export interface ExportInfo {
  size?: number;
  flags?: number;
  minBlock?: number;
  preferredBlock?: number;
  maxBlock?: number;
  name?: string;
  description?: string;
}

/** Merges one NBD_REP_INFO payload into `into`; unknown info types are ignored. */
export function parseInfo(data: Buffer, into: ExportInfo): void {
  if (data.length < 2) throw new NbdClientError('NBD_PROTOCOL', 'empty NBD_REP_INFO');
  const type = data.readUInt16BE(0);
  switch (type) {
    case INFO.EXPORT:
      if (data.length !== 12) throw new NbdClientError('NBD_PROTOCOL', 'bad NBD_INFO_EXPORT');
      into.size = Number(data.readBigUInt64BE(2));
      into.flags = data.readUInt16BE(10);
      return;
    case INFO.BLOCK_SIZE:
      if (data.length !== 14) throw new NbdClientError('NBD_PROTOCOL', 'bad NBD_INFO_BLOCK_SIZE');
      into.minBlock = data.readUInt32BE(2);
      into.preferredBlock = data.readUInt32BE(6);
      into.maxBlock = data.readUInt32BE(10);
      return;
    case INFO.NAME:
      into.name = data.toString('utf8', 2);
      return;
    case INFO.DESCRIPTION:
      into.description = data.toString('utf8', 2);
      return;
    default:
      return;
  }
}

/** Fills a request header into `b` at `pos` (28 bytes). Cookies are 32-bit, high word 0. */
export function encodeRequest(
  b: Buffer,
  pos: number,
  flags: number,
  type: number,
  cookie: number,
  offset: number,
  length: number,
): void {
  b.writeUInt32BE(REQUEST_MAGIC, pos);
  b.writeUInt16BE(flags, pos + 4);
  b.writeUInt16BE(type, pos + 6);
  b.writeUInt32BE(0, pos + 8);
  b.writeUInt32BE(cookie >>> 0, pos + 12);
  b.writeUInt32BE(Math.floor(offset / 0x100000000), pos + 16);
  b.writeUInt32BE(offset >>> 0, pos + 20);
  b.writeUInt32BE(length >>> 0, pos + 24);
}

export const REQUEST_SIZE = REQUEST_HEADER_SIZE;

/** What the reply parser needs to know about the request a reply belongs to. */
export interface ReplySink {
  /**
   * Where a simple reply's read payload goes, or a structured OFFSET_DATA chunk's data:
   * the buffer and the position in it for `offset` (the device offset of the data).
   * Return null when the cookie is unknown or the request is not a read.
   */
  readTarget(cookie: number, offset: number, length: number): { buf: Buffer; pos: number } | null;
  /** Length of a read request's payload, for simple replies (0 for other requests). */
  simpleReadLength(cookie: number): number | null;
  /** A structured OFFSET_HOLE chunk: the range reads as zeroes. */
  hole(cookie: number, offset: number, length: number): void;
  /** A BLOCK_STATUS chunk: context id and (length, flags) pairs. */
  blockStatus(cookie: number, context: number, extents: Uint32Array): void;
  /** An error (simple reply with error != 0, or an error chunk). */
  error(cookie: number, errno: number, message: string): void;
  /** The request is complete (simple reply, or structured chunk with DONE). */
  done(cookie: number): void;
}

enum RState {
  Header = 0,
  ReadData = 1,
  ChunkPayload = 2,
  Skip = 3,
}

/**
 * Incremental parser of transmission replies. `feed` takes every chunk the server
 * sends; throws NBD_PROTOCOL when the stream is out of sync (the connection is then
 * unusable).
 */
export class ReplyReader {
  private state = RState.Header;
  private readonly staging = Buffer.alloc(CHUNK_HEADER_SIZE);
  private staged = 0;
  private need = 0;
  private cookie = 0;
  private structured = false;
  private chunkFlags = 0;
  private chunkType = 0;
  private target: Buffer | null = null;
  private targetPos = 0;
  private payload: Buffer | null = null;
  private payloadPos = 0;
  /** A structured OFFSET_DATA chunk carries its offset first: data follows. */
  private dataOffset = 0;

  constructor(private readonly sink: ReplySink) {}

  feed(chunk: Buffer): void {
    let pos = 0;
    const end = chunk.length;
    while (pos < end) {
      switch (this.state) {
        case RState.Header: {
          // Simple replies are 16 bytes, chunk headers 20: read the magic first.
          const target =
            this.staged < 4 ? 4 : this.headerIsSimple() ? SIMPLE_REPLY_SIZE : CHUNK_HEADER_SIZE;
          const take = Math.min(target - this.staged, end - pos);
          chunk.copy(this.staging, this.staged, pos, pos + take);
          this.staged += take;
          pos += take;
          if (this.staged < target) continue;
          if (this.staged === 4) {
            const magic = this.staging.readUInt32BE(0);
            if (magic !== SIMPLE_REPLY_MAGIC && magic !== STRUCTURED_REPLY_MAGIC)
              throw new NbdClientError(
                'NBD_PROTOCOL',
                `reply with bad magic 0x${magic.toString(16)}`,
              );
            continue;
          }
          this.staged = 0;
          this.onHeader();
          break;
        }
        case RState.ReadData: {
          const take = Math.min(this.need, end - pos);
          if (this.target) chunk.copy(this.target, this.targetPos, pos, pos + take);
          this.targetPos += take;
          this.need -= take;
          pos += take;
          if (this.need === 0) this.finishReadData();
          break;
        }
        case RState.ChunkPayload: {
          const p = this.payload as Buffer;
          const take = Math.min(this.need, end - pos);
          chunk.copy(p, this.payloadPos, pos, pos + take);
          this.payloadPos += take;
          this.need -= take;
          pos += take;
          if (this.need === 0) this.onChunkPayload();
          break;
        }
        case RState.Skip: {
          const take = Math.min(this.need, end - pos);
          this.need -= take;
          pos += take;
          if (this.need === 0) this.endChunk();
          break;
        }
      }
    }
  }

  private headerIsSimple(): boolean {
    return this.staging.readUInt32BE(0) === SIMPLE_REPLY_MAGIC;
  }

  private onHeader(): void {
    const h = this.staging;
    this.cookie = h.readUInt32BE(12);
    if (h.readUInt32BE(0) === SIMPLE_REPLY_MAGIC) {
      this.structured = false;
      const errno = h.readUInt32BE(4);
      if (errno !== 0) {
        this.sink.error(this.cookie, errno, '');
        this.sink.done(this.cookie);
        return;
      }
      const len = this.sink.simpleReadLength(this.cookie);
      if (len === null)
        throw new NbdClientError('NBD_PROTOCOL', `reply for unknown cookie ${this.cookie}`);
      if (len > 0) {
        const t = this.sink.readTarget(this.cookie, -1, len);
        this.target = t?.buf ?? null;
        this.targetPos = t?.pos ?? 0;
        this.need = len;
        this.state = RState.ReadData;
        return;
      }
      this.sink.done(this.cookie);
      return;
    }
    this.structured = true;
    this.chunkFlags = h.readUInt16BE(4);
    this.chunkType = h.readUInt16BE(6);
    const length = h.readUInt32BE(16);
    if (this.sink.simpleReadLength(this.cookie) === null)
      throw new NbdClientError('NBD_PROTOCOL', `reply chunk for unknown cookie ${this.cookie}`);
    if (this.chunkType === REPLY_TYPE.OFFSET_DATA) {
      if (length < 8) throw new NbdClientError('NBD_PROTOCOL', 'short OFFSET_DATA chunk');
      // Read the 8-byte offset into the payload buffer first, then data into the target.
      this.payload = Buffer.alloc(8);
      this.payloadPos = 0;
      this.need = 8;
      this.dataOffset = length - 8;
      this.state = RState.ChunkPayload;
      return;
    }
    if (length === 0) {
      this.onChunkPayloadOf(Buffer.alloc(0));
      return;
    }
    if (length > 64 * 1024 * 1024)
      throw new NbdClientError('NBD_PROTOCOL', `reply chunk of ${length} bytes`);
    this.payload = Buffer.alloc(length);
    this.payloadPos = 0;
    this.need = length;
    this.state = RState.ChunkPayload;
  }

  private onChunkPayload(): void {
    const p = this.payload as Buffer;
    this.payload = null;
    if (this.chunkType === REPLY_TYPE.OFFSET_DATA) {
      const offset = Number(p.readBigUInt64BE(0));
      const dataLen = this.dataOffset;
      const t = this.sink.readTarget(this.cookie, offset, dataLen);
      if (!t) {
        this.need = dataLen;
        this.state = RState.Skip;
        if (dataLen === 0) this.endChunk();
        return;
      }
      this.target = t.buf;
      this.targetPos = t.pos;
      this.need = dataLen;
      this.state = RState.ReadData;
      if (dataLen === 0) this.finishReadData();
      return;
    }
    this.onChunkPayloadOf(p);
  }

  private onChunkPayloadOf(p: Buffer): void {
    const c = this.cookie;
    switch (this.chunkType) {
      case REPLY_TYPE.NONE:
        break;
      case REPLY_TYPE.OFFSET_HOLE:
        if (p.length !== 12) throw new NbdClientError('NBD_PROTOCOL', 'bad OFFSET_HOLE chunk');
        this.sink.hole(c, Number(p.readBigUInt64BE(0)), p.readUInt32BE(8));
        break;
      case REPLY_TYPE.BLOCK_STATUS: {
        if (p.length < 4 || (p.length - 4) % 8 !== 0)
          throw new NbdClientError('NBD_PROTOCOL', 'bad BLOCK_STATUS chunk');
        const ctx = p.readUInt32BE(0);
        const n = (p.length - 4) / 4;
        const ext = new Uint32Array(n);
        for (let i = 0; i < n; i++) ext[i] = p.readUInt32BE(4 + 4 * i);
        this.sink.blockStatus(c, ctx, ext);
        break;
      }
      default:
        if (this.chunkType & 0x8000) {
          if (p.length < 6) throw new NbdClientError('NBD_PROTOCOL', 'short error chunk');
          const errno = p.readUInt32BE(0);
          const mlen = p.readUInt16BE(4);
          const msg = p.toString('utf8', 6, Math.min(p.length, 6 + mlen));
          this.sink.error(c, errno, msg);
        }
        // Unknown non-error chunk types are ignored, as the spec allows.
        break;
    }
    this.endChunk();
  }

  private finishReadData(): void {
    this.target = null;
    if (this.structured) this.endChunk();
    else {
      this.state = RState.Header;
      this.sink.done(this.cookie);
    }
  }

  private endChunk(): void {
    this.state = RState.Header;
    if (this.chunkFlags & REPLY_FLAG_DONE) this.sink.done(this.cookie);
  }
}

/**
 * Parses `nbd://HOST[:PORT]/[EXPORT]`, `nbd+unix:///[EXPORT]?socket=PATH` and their TLS
 * forms `nbds://` and `nbds+unix://` (which set `tls`).
 */
export type NbdTarget =
  | { kind: 'tcp'; host: string; port: number; exportName: string; tls?: boolean }
  | { kind: 'unix'; path: string; exportName: string; tls?: boolean };

export function parseNbdUri(uri: string): NbdTarget {
  let u: URL;
  try {
    u = new URL(uri);
  } catch {
    throw new NbdClientError('NBD_BAD_URI', `not a URI: ${uri}`);
  }
  const exportName = decodeURIComponent(u.pathname.replace(/^\//, ''));
  const tls = u.protocol === 'nbds:' || u.protocol === 'nbds+unix:';
  if (u.protocol === 'nbd:' || u.protocol === 'nbds:') {
    if (!u.hostname) throw new NbdClientError('NBD_BAD_URI', `no host in ${uri}`);
    const port = u.port === '' ? 10809 : Number(u.port);
    const host = u.hostname.replace(/^\[(.*)\]$/, '$1');
    return tls
      ? { kind: 'tcp', host, port, exportName, tls }
      : { kind: 'tcp', host, port, exportName };
  }
  if (u.protocol === 'nbd+unix:' || u.protocol === 'nbds+unix:') {
    const path = u.searchParams.get('socket');
    if (!path) throw new NbdClientError('NBD_BAD_URI', `no ?socket= in ${uri}`);
    if (u.hostname) throw new NbdClientError('NBD_BAD_URI', `nbd+unix URI with a host: ${uri}`);
    return tls ? { kind: 'unix', path, exportName, tls } : { kind: 'unix', path, exportName };
  }
  throw new NbdClientError('NBD_BAD_URI', `unsupported scheme ${u.protocol} in ${uri}`);
}
