// A deliberately tiny hand-written NBD client for misbehaving on purpose.
// Constants from the NBD protocol spec (doc/proto.md).

import net from 'node:net';

export const NBDMAGIC = Buffer.from('NBDMAGIC', 'latin1');
export const IHAVEOPT = Buffer.from('IHAVEOPT', 'latin1');
export const OPT_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

// Handshake flags (server) and client flags.
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

// Options.
export const OPT_EXPORT_NAME = 1;
export const OPT_ABORT = 2;
export const OPT_LIST = 3;
export const OPT_INFO = 6;
export const OPT_GO = 7;
export const OPT_STRUCTURED_REPLY = 8;

// Option replies.
export const REP_ACK = 1;
export const REP_SERVER = 2;
export const REP_INFO = 3;
export const REP_FLAG_ERROR = 0x80000000;
export const REP_ERR_UNSUP = REP_FLAG_ERROR + 1;
export const REP_ERR_INVALID = REP_FLAG_ERROR + 3;
export const REP_ERR_UNKNOWN = REP_FLAG_ERROR + 6;
export const REP_ERR_TOO_BIG = REP_FLAG_ERROR + 9;

// Transmission flags.
export const TFLAG_HAS_FLAGS = 1 << 0;
export const TFLAG_READ_ONLY = 1 << 1;

// Commands.
export const CMD_READ = 0;
export const CMD_WRITE = 1;
export const CMD_DISC = 2;
export const CMD_FLUSH = 3;
export const CMD_TRIM = 4;
export const CMD_CACHE = 5;
export const CMD_WRITE_ZEROES = 6;
export const CMD_BLOCK_STATUS = 7;
export const CMD_FLAG_FUA = 1 << 0;

// Errors.
export const EPERM = 1;
export const EIO = 5;
export const ENOMEM = 12;
export const EINVAL = 22;
export const ENOSPC = 28;

export type Target = string | { port: number; host?: string };

/** One connection with a byte queue: `read(n)` waits for exactly n bytes. */
export class RawClient {
  readonly sock: net.Socket;
  private chunks: Buffer[] = [];
  private queued = 0;
  private wake: (() => void) | undefined;
  private ended = false;
  readonly closed: Promise<void>;
  /** Bytes received in total. */
  received = 0;

  private constructor(sock: net.Socket) {
    this.sock = sock;
    sock.on('data', (b: Buffer) => {
      this.chunks.push(b);
      this.queued += b.length;
      this.received += b.length;
      this.wake?.();
    });
    this.closed = new Promise((resolve) => {
      sock.on('close', () => {
        this.ended = true;
        this.wake?.();
        resolve();
      });
    });
    sock.on('error', () => {}); // EPIPE / ECONNRESET: seen as 'close'
  }

  static connect(target: Target): Promise<RawClient> {
    return new Promise((resolve, reject) => {
      const sock =
        typeof target === 'string'
          ? net.connect(target)
          : net.connect(target.port, target.host ?? '127.0.0.1');
      sock.once('connect', () => resolve(new RawClient(sock)));
      sock.once('error', reject);
    });
  }

  /** Talks over an already connected socket (e.g. a TLS socket after STARTTLS). */
  static over(sock: net.Socket): RawClient {
    return new RawClient(sock);
  }

  get isClosed(): boolean {
    return this.ended;
  }

  /** Exactly n bytes; rejects if the peer closes first or after timeoutMs. */
  async read(n: number, timeoutMs = 15_000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.queued < n) {
      if (this.ended) throw new Error(`connection closed after ${this.queued}/${n} bytes`);
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`timed out waiting for ${n} bytes (have ${this.queued})`);
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, left);
        this.wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      this.wake = undefined;
    }
    const all = Buffer.concat(this.chunks);
    this.chunks = all.length > n ? [all.subarray(n)] : [];
    this.queued -= n;
    return all.subarray(0, n);
  }

  /**
   * Resolves true once the data is handed to the kernel; false if the socket broke or
   * the peer stopped reading for timeoutMs.
   */
  write(data: Buffer, timeoutMs = 15_000): Promise<boolean> {
    return new Promise((resolve) => {
      if (this.ended || this.sock.destroyed) {
        resolve(false);
        return;
      }
      const t = setTimeout(() => resolve(false), timeoutMs);
      this.sock.write(data, (err) => {
        clearTimeout(t);
        resolve(!err);
      });
    });
  }

  /** 'closed' if the peer closed within timeoutMs, else 'open'. Discards what arrives. */
  async waitClose(timeoutMs = 15_000): Promise<'closed' | 'open'> {
    let timer: NodeJS.Timeout | undefined;
    const r = await Promise.race([
      this.closed.then(() => 'closed' as const),
      new Promise<'open'>((resolve) => {
        timer = setTimeout(() => resolve('open'), timeoutMs);
      }),
    ]);
    clearTimeout(timer);
    return r;
  }

  end(): void {
    this.sock.end();
  }

  destroy(): void {
    this.sock.destroy();
  }

  // --- handshake ---------------------------------------------------------------

  /** Reads 'NBDMAGIC' 'IHAVEOPT' and the 16-bit handshake flags. */
  async greeting(): Promise<number> {
    const b = await this.read(18);
    if (!b.subarray(0, 8).equals(NBDMAGIC) || !b.subarray(8, 16).equals(IHAVEOPT)) {
      throw new Error(`bad greeting ${b.toString('hex')}`);
    }
    return b.readUInt16BE(16);
  }

  sendClientFlags(flags: number): Promise<boolean> {
    const b = Buffer.alloc(4);
    b.writeUInt32BE(flags >>> 0);
    return this.write(b);
  }

  sendOption(option: number, data: Buffer = Buffer.alloc(0), declaredLength?: number) {
    const h = Buffer.alloc(16);
    IHAVEOPT.copy(h, 0);
    h.writeUInt32BE(option >>> 0, 8);
    h.writeUInt32BE((declaredLength ?? data.length) >>> 0, 12);
    return this.write(Buffer.concat([h, data]));
  }

  async readOptionReply(): Promise<{ option: number; type: number; data: Buffer }> {
    const h = await this.read(20);
    const magic = h.readBigUInt64BE(0);
    if (magic !== OPT_REPLY_MAGIC) throw new Error(`bad option reply magic ${magic.toString(16)}`);
    const len = h.readUInt32BE(16);
    return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data: await this.read(len) };
  }

  /** Greeting + NO_ZEROES + NBD_OPT_EXPORT_NAME: simple replies only. */
  async handshake(name: string): Promise<{ size: bigint; flags: number }> {
    const hs = await this.greeting();
    await this.sendClientFlags(
      FLAG_C_FIXED_NEWSTYLE | (hs & FLAG_NO_ZEROES ? FLAG_C_NO_ZEROES : 0),
    );
    await this.sendOption(OPT_EXPORT_NAME, Buffer.from(name, 'utf8'));
    const b = await this.read(10);
    if (!(hs & FLAG_NO_ZEROES)) await this.read(124);
    return { size: b.readBigUInt64BE(0), flags: b.readUInt16BE(8) };
  }

  // --- transmission ------------------------------------------------------------

  static request(r: {
    type: number;
    flags?: number;
    handle: bigint | number;
    offset: bigint | number;
    length: number;
    magic?: number;
  }): Buffer {
    const b = Buffer.alloc(28);
    b.writeUInt32BE(r.magic ?? REQUEST_MAGIC, 0);
    b.writeUInt16BE(r.flags ?? 0, 4);
    b.writeUInt16BE(r.type, 6);
    b.writeBigUInt64BE(BigInt(r.handle), 8);
    b.writeBigUInt64BE(BigInt(r.offset), 16);
    b.writeUInt32BE(r.length >>> 0, 24);
    return b;
  }

  /** A simple reply (structured replies were not negotiated). */
  async readSimpleReply(timeoutMs?: number): Promise<{ error: number; handle: bigint }> {
    const b = await this.read(16, timeoutMs);
    const magic = b.readUInt32BE(0);
    if (magic !== SIMPLE_REPLY_MAGIC) throw new Error(`bad reply magic ${magic.toString(16)}`);
    return { error: b.readUInt32BE(4), handle: b.readBigUInt64BE(8) };
  }
}
