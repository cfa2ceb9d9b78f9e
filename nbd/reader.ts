// Incremental, socket-free parsers for what a client sends. They work on the
// chunks as they arrive, read headers in place (copying only when a header is
// split across chunks) and hand payloads over without buffering them whole.

import { IHAVEOPT, OPTION_HEADER_SIZE, REQUEST_HEADER_SIZE } from './protocol.js';

/** A request header, parsed in place into one reused object. */
export interface RequestHeader {
  magic: number;
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  /** May exceed 2^53 in theory; precision loss there only makes it "out of range". */
  offset: number;
  length: number;
}

export function newRequestHeader(): RequestHeader {
  return { magic: 0, flags: 0, type: 0, cookieHi: 0, cookieLo: 0, offset: 0, length: 0 };
}

export function parseRequestHeader(buf: Buffer, pos: number, out: RequestHeader): void {
  out.magic = buf.readUInt32BE(pos);
  out.flags = buf.readUInt16BE(pos + 4);
  out.type = buf.readUInt16BE(pos + 6);
  out.cookieHi = buf.readUInt32BE(pos + 8);
  out.cookieLo = buf.readUInt32BE(pos + 12);
  out.offset = buf.readUInt32BE(pos + 16) * 0x100000000 + buf.readUInt32BE(pos + 20);
  out.length = buf.readUInt32BE(pos + 24);
}

/** What the sink wants done with a request it has just seen. */
export enum Decision {
  /** No payload follows (or it was already dealt with). */
  None = 0,
  /** A payload of `length` bytes follows and the sink wants it. */
  Payload = 1,
  /** A payload of `length` bytes follows and must be read and dropped. */
  Discard = 2,
  /** The sink cannot take this request yet: stop, and offer it again on the next feed. */
  Stall = 3,
  /** Stop reading for good (DISC, or a fatal protocol error). */
  Stop = 4,
}

export interface TransmissionSink {
  /** A complete header. A bad magic is reported here too; the sink decides. */
  request(h: RequestHeader): Decision;
  /** The whole payload is inside `chunk` at `start`: the sink may keep a view of it. */
  payloadView(chunk: Buffer, start: number): void;
  /** The payload is split across chunks: give the buffer to copy it into (`length` bytes at the returned offset). */
  payloadTarget(): Buffer;
  payloadTargetOffset(): number;
  /** Called once the copied payload is complete. */
  payloadFilled(): void;
  /** Called once a discarded payload has been fully skipped. */
  discardDone(): void;
}

enum TState {
  Header = 0,
  Copy = 1,
  Discard = 2,
  Stopped = 3,
}

/**
 * Transmission-phase parser. `feed` consumes as much of the chunk as it can and
 * returns how many bytes it used; fewer than offered means the sink stalled or
 * stopped, and the caller keeps the rest to offer again.
 */
export class TransmissionReader {
  readonly header: RequestHeader = newRequestHeader();
  private state = TState.Header;
  private readonly staging = Buffer.alloc(REQUEST_HEADER_SIZE);
  private staged = 0;
  private remaining = 0;
  private target: Buffer | null = null;
  private targetPos = 0;

  constructor(private readonly sink: TransmissionSink) {}

  get stopped(): boolean {
    return this.state === TState.Stopped;
  }

  /** Bytes of payload still expected (for diagnostics and tests). */
  get pending(): number {
    return this.remaining;
  }

  feed(chunk: Buffer, start = 0, end = chunk.length): number {
    let pos = start;
    // A header staged across chunks and stalled is offered again even when
    // no new bytes come with this call.
    while (pos < end || this.hasStagedHeader) {
      switch (this.state) {
        case TState.Header: {
          let hpos: number;
          let hbuf: Buffer;
          if (this.staged === 0 && end - pos >= REQUEST_HEADER_SIZE) {
            hbuf = chunk;
            hpos = pos;
          } else {
            const take = Math.min(REQUEST_HEADER_SIZE - this.staged, end - pos);
            chunk.copy(this.staging, this.staged, pos, pos + take);
            // A stall must not lose the staged bytes: they stay staged and the
            // consumed input is accounted for here.
            this.staged += take;
            pos += take;
            if (this.staged < REQUEST_HEADER_SIZE) return pos - start;
            hbuf = this.staging;
            hpos = 0;
          }
          parseRequestHeader(hbuf, hpos, this.header);
          const d = this.sink.request(this.header);
          if (d === Decision.Stall) return pos - start;
          if (hbuf === chunk) pos += REQUEST_HEADER_SIZE;
          this.staged = 0;
          if (d === Decision.Stop) {
            this.state = TState.Stopped;
            return pos - start;
          }
          if (d === Decision.Payload) {
            const len = this.header.length;
            if (len === 0) {
              this.sink.payloadView(chunk, pos);
            } else if (end - pos >= len) {
              this.sink.payloadView(chunk, pos);
              pos += len;
            } else {
              this.target = this.sink.payloadTarget();
              this.targetPos = this.sink.payloadTargetOffset();
              this.remaining = len;
              this.state = TState.Copy;
            }
          } else if (d === Decision.Discard) {
            this.remaining = this.header.length;
            this.state = TState.Discard;
            if (this.remaining === 0) {
              this.state = TState.Header;
              this.sink.discardDone();
            }
          }
          break;
        }
        case TState.Copy: {
          const take = Math.min(this.remaining, end - pos);
          chunk.copy(this.target!, this.targetPos, pos, pos + take);
          this.targetPos += take;
          this.remaining -= take;
          pos += take;
          if (this.remaining === 0) {
            this.target = null;
            this.state = TState.Header;
            this.sink.payloadFilled();
          }
          break;
        }
        case TState.Discard: {
          const take = Math.min(this.remaining, end - pos);
          this.remaining -= take;
          pos += take;
          if (this.remaining === 0) {
            this.state = TState.Header;
            this.sink.discardDone();
          }
          break;
        }
        case TState.Stopped:
          return pos - start;
      }
    }
    return pos - start;
  }

  /**
   * The rest of the WRITE payload being received, as a view of the sink's
   * target, for a transport that can read straight into it (no copy); null
   * when no payload is being received.
   */
  copyWindow(): Buffer | null {
    if (this.state !== TState.Copy) return null;
    return this.target!.subarray(this.targetPos, this.targetPos + this.remaining);
  }

  /** `n` bytes landed in the buffer copyWindow() returned, in place. */
  filledInPlace(n: number): void {
    if (this.state !== TState.Copy || n > this.remaining) {
      throw new Error(`filledInPlace(${n}) outside a payload window`);
    }
    this.targetPos += n;
    this.remaining -= n;
    if (this.remaining === 0) {
      this.target = null;
      this.state = TState.Header;
      this.sink.payloadFilled();
    }
  }

  /** True when a complete header sits staged, waiting for the sink to accept it. */
  get hasStagedHeader(): boolean {
    return this.state === TState.Header && this.staged === REQUEST_HEADER_SIZE;
  }
}

export interface HandshakeSink {
  /** The client's 32-bit flags. Return false to stop reading. */
  clientFlags(flags: number): boolean;
  /** A bad IHAVEOPT magic: the stream is garbage. Reading stops. */
  badMagic(): void;
  /**
   * A complete option. `data` is null when the payload was larger than the
   * reader's limit and was skipped. Return false to stop reading (GO,
   * EXPORT_NAME, ABORT, or a fatal error).
   */
  option(opt: number, data: Buffer | null): boolean;
}

enum HState {
  Flags = 0,
  OptHeader = 1,
  OptData = 2,
  OptSkip = 3,
  Stopped = 4,
}

/** Handshake-phase parser: client flags, then option after option. */
export class HandshakeReader {
  private state = HState.Flags;
  private readonly staging = Buffer.alloc(OPTION_HEADER_SIZE);
  private staged = 0;
  private opt = 0;
  private data: Buffer | null = null;
  private filled = 0;
  private remaining = 0;

  constructor(
    private readonly sink: HandshakeSink,
    /** Largest option payload kept; larger ones are skipped and reported as null. */
    private readonly maxOptionLength = 65536,
  ) {}

  get stopped(): boolean {
    return this.state === HState.Stopped;
  }

  stop(): void {
    this.state = HState.Stopped;
  }

  /** Read options again after a stop that was not the end (STARTTLS). */
  resume(): void {
    this.state = HState.OptHeader;
    this.staged = 0;
  }

  feed(chunk: Buffer, start = 0, end = chunk.length): number {
    let pos = start;
    while (pos < end) {
      switch (this.state) {
        case HState.Flags:
        case HState.OptHeader: {
          const need = this.state === HState.Flags ? 4 : OPTION_HEADER_SIZE;
          const take = Math.min(need - this.staged, end - pos);
          chunk.copy(this.staging, this.staged, pos, pos + take);
          this.staged += take;
          pos += take;
          if (this.staged < need) break;
          this.staged = 0;
          if (this.state === HState.Flags) {
            this.state = HState.OptHeader;
            if (!this.sink.clientFlags(this.staging.readUInt32BE(0))) this.state = HState.Stopped;
            break;
          }
          if (this.staging.readBigUInt64BE(0) !== IHAVEOPT) {
            this.state = HState.Stopped;
            this.sink.badMagic();
            break;
          }
          this.opt = this.staging.readUInt32BE(8);
          const len = this.staging.readUInt32BE(12);
          if (len > this.maxOptionLength) {
            this.remaining = len;
            this.state = HState.OptSkip;
          } else {
            this.data = Buffer.allocUnsafe(len);
            this.filled = 0;
            this.state = HState.OptData;
            if (len === 0) this.deliver(this.data);
          }
          break;
        }
        case HState.OptData: {
          const data = this.data!;
          const take = Math.min(data.length - this.filled, end - pos);
          chunk.copy(data, this.filled, pos, pos + take);
          this.filled += take;
          pos += take;
          if (this.filled === data.length) this.deliver(data);
          break;
        }
        case HState.OptSkip: {
          const take = Math.min(this.remaining, end - pos);
          this.remaining -= take;
          pos += take;
          if (this.remaining === 0) this.deliver(null);
          break;
        }
        case HState.Stopped:
          return pos - start;
      }
    }
    return pos - start;
  }

  private deliver(data: Buffer | null): void {
    this.data = null;
    this.state = HState.OptHeader;
    if (!this.sink.option(this.opt, data)) this.state = HState.Stopped;
  }
}
