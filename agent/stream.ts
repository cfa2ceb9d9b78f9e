// A suspending guest's migration stream, taken and given back by the agent itself
// (docs/streams.md). stream-in: the agent listens on a Unix socket of its own, QEMU's
// `migrate unix:PATH` connects, and what arrives goes into [offset, end) of the device's
// files in large aligned writes (O_DIRECT where the file system has it), hashed as it
// goes, then fdatasync. stream-out: the agent reads [offset, offset+length) and sends it
// into QEMU's incoming socket (`migrate-incoming unix:PATH`), hashing every byte even if
// QEMU stops reading, so that a damaged stream is reported as such.
//
// One hop fewer than through the CLI and NBD: QEMU → agent → file. Every piece is
// checked as an NBD request of the same identity would be (the device's access mask,
// and the fencing gate of a shared device), and a PREEMPT AND ABORT of that identity
// stops the stream and waits for its writes in flight before it is acknowledged.

import { randomBytes } from 'node:crypto';
import fs from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { CMD } from '../nbd/protocol.js';
import type { RouteSet } from './api.js';
import { CHECKSUM_ALGS, type ChecksumAlg, type Checksummer, checksummer } from './checksum.js';
import { BallastError } from './errors.js';
import { type BallastNative, errnoName, loadNative } from './native.js';

/** Bytes per write or read; as many pieces are in flight at once as IN_FLIGHT. */
export const PIECE = 4 * 1024 * 1024;
const IN_FLIGHT = 4;
/** O_DIRECT offsets and lengths are multiples of this (any logical block size up to 4 KiB). */
export const DIRECT_ALIGN = 4096;
const DEFAULT_TIMEOUT_MS = 30_000;
const MAX_TIMEOUT_MS = 600_000;
/** A wait answers "still running" after at most this long (the CLI's client gives up at 120 s). */
const MAX_WAIT_MS = 60_000;
/** Finished streams are kept this long for GET and wait, then forgotten. */
const KEEP_MS = 300_000;

const READ_BIT = 1 << CMD.READ;
const WRITE_BIT = 1 << CMD.WRITE;

/** One extent of a device, as a stream sees it: the first `length` bytes of the file. */
export interface StreamExtent {
  path: string;
  length: number;
}

export interface StreamDevice {
  name: string;
  size: number;
  extents: StreamExtent[];
}

/** What the device's NBD export is checked with (agent/reservations.ts DeviceAccess). */
export interface StreamAccess {
  readonly generation: number;
  mask(identity: string): number;
  gate?(): 'open' | 'hold' | 'fail';
  onOpen?(wake: () => void): void;
  /** The fence token a write admitted now carries to its syscall (-1: none). */
  readonly fenceToken?: number;
}

export interface StreamDeps {
  /** The device as this agent serves it; throws its BallastError (not found, remote...). */
  device(name: string): StreamDevice;
  access(name: string): StreamAccess;
  /**
   * Who a caller of the API is, as an NBD client on the same kind of socket would be
   * (identity map, the host's identity on the Unix socket in a cluster), and why it
   * may not use a device without a name (the nbd.anonymous policy), or null.
   */
  identify(sock: net.Socket): { identity: string; refusal: string | null };
  log(msg: string): void;
  /** Where the private socket directories are made (default: the system's temp dir). */
  tmpDir?: string;
}

/** One part of a piece: `length` bytes at `fileOffset` of extent `index`, from `at` in the piece. */
export interface Part {
  index: number;
  fileOffset: number;
  at: number;
  length: number;
  direct: boolean;
}

/**
 * How [offset, offset+length) of a device made of extents of `lengths` maps to its files:
 * one part per extent touched, and where `align` > 0 each part split so that its aligned
 * middle can go O_DIRECT and only an unaligned head or tail goes through the page cache.
 * Throws if the range is past the extents' end.
 */
export function partsOf(
  lengths: readonly number[],
  offset: number,
  length: number,
  align = 0,
): Part[] {
  const out: Part[] = [];
  const end = offset + length;
  let start = 0;
  for (let i = 0; i < lengths.length && start < end; i++) {
    const len = lengths[i] as number;
    const from = Math.max(offset, start);
    const to = Math.min(end, start + len);
    if (from < to) {
      const fileFrom = from - start;
      const fileTo = to - start;
      const at = from - offset;
      const head = align > 0 ? Math.ceil(fileFrom / align) * align : fileTo;
      const tail = align > 0 ? Math.floor(fileTo / align) * align : fileTo;
      if (align > 0 && head < tail) {
        if (head > fileFrom) {
          out.push({ index: i, fileOffset: fileFrom, at, length: head - fileFrom, direct: false });
        }
        out.push({
          index: i,
          fileOffset: head,
          at: at + head - fileFrom,
          length: tail - head,
          direct: true,
        });
        if (fileTo > tail) {
          out.push({
            index: i,
            fileOffset: tail,
            at: at + tail - fileFrom,
            length: fileTo - tail,
            direct: false,
          });
        }
      } else {
        out.push({ index: i, fileOffset: fileFrom, at, length: fileTo - fileFrom, direct: false });
      }
    }
    start += len;
  }
  const covered = out.reduce((n, p) => n + p.length, 0);
  if (covered !== length) {
    throw new BallastError(
      'BALLAST_STREAM_RANGE',
      `${offset}+${length} is past the device's extents (${start} bytes)`,
    );
  }
  return out;
}

function wholeBytes(v: unknown, key: string): number | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
    throw new BallastError('BALLAST_BAD_REQUEST', `${key} must be a whole number of bytes`);
  }
  return v;
}

/**
 * The range a stream may touch: [offset, end) inside [0, size), end defaulting to size.
 * Throws BALLAST_STREAM_RANGE otherwise.
 */
export function streamRange(
  size: number,
  offset: number | undefined,
  end: number | undefined,
): { offset: number; end: number } {
  if (offset === undefined) {
    throw new BallastError('BALLAST_BAD_REQUEST', 'offset is required');
  }
  const e = end ?? size;
  if (e > size || offset >= e) {
    throw new BallastError(
      'BALLAST_STREAM_RANGE',
      `the range ${offset}..${e} is not inside the device (${size} bytes)`,
    );
  }
  return { offset, end: e };
}

function timeoutField(v: unknown): number {
  if (v === undefined || v === null) return DEFAULT_TIMEOUT_MS;
  if (typeof v !== 'number' || !Number.isFinite(v) || v < 100 || v > MAX_TIMEOUT_MS) {
    throw new BallastError(
      'BALLAST_BAD_REQUEST',
      `timeoutMs must be from 100 to ${MAX_TIMEOUT_MS} milliseconds`,
    );
  }
  return Math.round(v);
}

function algField(v: unknown): ChecksumAlg {
  if (v === undefined || v === null) return 'crc32';
  if (typeof v !== 'string' || !(CHECKSUM_ALGS as readonly string[]).includes(v)) {
    throw new BallastError(
      'BALLAST_BAD_REQUEST',
      `checksum must be one of ${CHECKSUM_ALGS.join(', ')}`,
    );
  }
  return v as ChecksumAlg;
}

function identityField(v: unknown): string | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || v.length === 0 || v.length > 256 || !/^[\x21-\x7e]+$/.test(v)) {
    throw new BallastError('BALLAST_BAD_REQUEST', 'as must be an identity name');
  }
  return v;
}

function ioError(what: string, errno: number): BallastError {
  return new BallastError('BALLAST_STREAM_IO', `${what}: ${errnoName(errno)}`);
}

/**
 * The NBD checks of one identity for one kind of command, asked before every piece:
 * the fencing gate first, whose 'hold' waits for it to open or fail (a fenced agent
 * judges nothing on the state it last knew), then the access mask (again whenever
 * the device's access generation changed).
 */
class Permission {
  private generation = -1;
  private mask = 0;

  constructor(
    private readonly access: StreamAccess,
    private readonly identity: string,
    private readonly bit: number,
    private readonly device: string,
  ) {}

  /** Resolves, once allowed, to the fence token the piece's writes carry (-1: none). */
  async allow(): Promise<number> {
    for (;;) {
      const a = this.access;
      // The fence first: a fenced agent's reservation state may be stale.
      const g = a.gate?.() ?? 'open';
      if (g === 'fail') {
        throw new BallastError(
          'BALLAST_STREAM_FENCED',
          `this agent has fenced itself: no I/O to the shared device ${this.device}`,
        );
      }
      if (g === 'hold') {
        await new Promise<void>((resolve) => (a.onOpen ? a.onOpen(resolve) : resolve()));
        continue;
      }
      if (a.generation !== this.generation) {
        this.generation = a.generation;
        this.mask = a.mask(this.identity);
      }
      if ((this.mask & this.bit) === 0) {
        throw new BallastError(
          'BALLAST_STREAM_DENIED',
          `identity ${this.identity} may not ${this.bit === WRITE_BIT ? 'write' : 'read'} device ${this.device} (its reservation or access list)`,
        );
      }
      return a.fenceToken ?? -1;
    }
  }
}

/** The device's extent files opened for the stream: our own descriptors, closed at its end. */
class Files {
  readonly fds: number[] = [];
  readonly direct: number[] = [];

  constructor(
    private readonly native: BallastNative,
    readonly lengths: number[],
  ) {}

  static open(native: BallastNative, dev: StreamDevice, write: boolean): Files {
    const f = new Files(
      native,
      dev.extents.map((e) => e.length),
    );
    try {
      for (const e of dev.extents) {
        f.fds.push(fs.openSync(e.path, write ? fs.constants.O_WRONLY : fs.constants.O_RDONLY));
        f.direct.push(write ? openDirect(e.path) : -1);
      }
    } catch (e) {
      f.close();
      const err = e as NodeJS.ErrnoException;
      throw new BallastError(
        'BALLAST_STREAM_IO',
        `cannot open the files of device ${dev.name}: ${err.code ?? err.message}`,
        { cause: e },
      );
    }
    return f;
  }

  /** Whether every extent could be opened O_DIRECT. */
  get allDirect(): boolean {
    return this.direct.every((d) => d >= 0);
  }

  /** `fence`: the token of the piece's admission (Permission.allow). */
  async write(buf: Buffer, offset: number, length: number, fence: number): Promise<void> {
    const parts = partsOf(this.lengths, offset, length, DIRECT_ALIGN);
    await Promise.all(
      parts.map(async (p) => {
        const direct = p.direct && (this.direct[p.index] as number) >= 0;
        const fd = direct ? (this.direct[p.index] as number) : (this.fds[p.index] as number);
        let done = 0;
        while (done < p.length) {
          // A short direct write leaves an aligned remainder only if it stopped on a block.
          const r = await this.native.pwriteAsync(
            fd,
            buf,
            p.at + done,
            p.length - done,
            p.fileOffset + done,
            direct,
            fence,
          );
          if (r === -this.native.constants.FENCED) {
            throw new BallastError(
              'BALLAST_STREAM_FENCED',
              'this agent has fenced itself: the write was refused before it reached the file',
            );
          }
          if (r < 0) throw ioError('write', -r);
          if (r === 0) throw ioError('write', os.constants.errno.EIO);
          done += r;
        }
      }),
    );
  }

  async read(buf: Buffer, offset: number, length: number): Promise<void> {
    const parts = partsOf(this.lengths, offset, length);
    await Promise.all(
      parts.map(async (p) => {
        let done = 0;
        while (done < p.length) {
          const n = await new Promise<number>((resolve, reject) =>
            fs.read(
              this.fds[p.index] as number,
              buf,
              p.at + done,
              p.length - done,
              p.fileOffset + done,
              (e, r) => (e ? reject(e) : resolve(r)),
            ),
          ).catch((e: NodeJS.ErrnoException) => {
            throw ioError('read', Math.abs(e.errno ?? os.constants.errno.EIO));
          });
          // Past the file's end (a file shorter than its record): zeroes, as NBD reads it.
          if (n === 0) {
            buf.fill(0, p.at + done, p.at + p.length);
            break;
          }
          done += n;
        }
      }),
    );
  }

  /**
   * Asks the kernel to start reading [offset, offset+length) into the page cache: a
   * stream written O_DIRECT is read back from the disk, and the reads in flight alone
   * leave it idle between them.
   */
  willNeed(offset: number, length: number): void {
    const advice = this.native.constants.POSIX_FADV_WILLNEED;
    for (const p of partsOf(this.lengths, offset, length)) {
      this.native.fadvise(this.fds[p.index] as number, p.fileOffset, p.length, advice);
    }
  }

  async sync(): Promise<void> {
    for (const fd of this.fds) {
      await new Promise<void>((resolve, reject) =>
        fs.fdatasync(fd, (e) =>
          e ? reject(ioError('fdatasync', Math.abs(e.errno ?? 5))) : resolve(),
        ),
      );
    }
  }

  close(): void {
    for (const fd of [...this.fds, ...this.direct]) {
      if (fd >= 0) {
        try {
          fs.closeSync(fd);
        } catch {}
      }
    }
    this.fds.length = 0;
    this.direct.length = 0;
  }
}

/** The file opened O_WRONLY | O_DIRECT, or -1 where the file system has no O_DIRECT. */
function openDirect(file: string): number {
  try {
    return fs.openSync(file, fs.constants.O_WRONLY | fs.constants.O_DIRECT);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EINVAL') return -1;
    throw e;
  }
}

export type StreamKind = 'in' | 'out';
export type StreamState = 'listening' | 'running' | 'done' | 'failed';

export interface StreamView {
  id: string;
  kind: StreamKind;
  device: string;
  identity: string;
  state: StreamState;
  offset: number;
  /** stream-in: where the area ends (no byte is written at or past it). */
  end?: number;
  /** stream-out: how many bytes are sent. */
  length?: number;
  /** stream-in: the socket QEMU connects to, while it listens. */
  socket?: string;
  bytes: number;
  /** Once done: of every byte taken (in) or read (out). */
  checksum?: string;
  /** Once done: from the connection to the data on disk (in) or sent (out). */
  ms?: number;
  /** stream-in: whether the aligned writes bypassed the page cache. */
  direct?: boolean;
  /** stream-out: bytes QEMU took before it closed its end, if it did. */
  sent?: number;
  peerClosed?: boolean;
  error?: { code: string; message: string };
}

class Job {
  readonly id = randomBytes(8).toString('hex');
  state: StreamState = 'listening';
  bytes = 0;
  sent = 0;
  peerClosed = false;
  checksum: string | undefined;
  ms: number | undefined;
  direct: boolean | undefined;
  socket: string | undefined;
  error: BallastError | null = null;
  /** Settles when the stream has ended, one way or the other (never rejects). */
  readonly finished: Promise<void>;
  private finish!: () => void;
  /** Stops the stream with `err` and resolves once nothing of it is in flight. */
  stop: (err: BallastError) => Promise<void> = async () => {};

  constructor(
    readonly kind: StreamKind,
    readonly device: string,
    readonly identity: string,
    readonly offset: number,
    readonly limit: number,
  ) {
    this.finished = new Promise((resolve) => {
      this.finish = resolve;
    });
  }

  get active(): boolean {
    return this.state === 'listening' || this.state === 'running';
  }

  succeed(): void {
    if (!this.active) return;
    this.state = 'done';
    this.finish();
  }

  fail(err: BallastError): void {
    if (!this.active) return;
    this.state = 'failed';
    this.error = err;
    this.finish();
  }

  view(): StreamView {
    return {
      id: this.id,
      kind: this.kind,
      device: this.device,
      identity: this.identity,
      state: this.state,
      offset: this.offset,
      ...(this.kind === 'in' ? { end: this.limit } : { length: this.limit }),
      ...(this.socket && this.state === 'listening' ? { socket: this.socket } : {}),
      bytes: this.bytes,
      ...(this.checksum !== undefined ? { checksum: this.checksum } : {}),
      ...(this.ms !== undefined ? { ms: Math.round(this.ms * 10) / 10 } : {}),
      ...(this.direct !== undefined ? { direct: this.direct } : {}),
      ...(this.kind === 'out' ? { sent: this.sent, peerClosed: this.peerClosed } : {}),
      ...(this.error ? { error: { code: this.error.code, message: this.error.message } } : {}),
    };
  }
}

function asBallast(e: unknown, what: string): BallastError {
  if (e instanceof BallastError) return e;
  const err = e as NodeJS.ErrnoException;
  return new BallastError('BALLAST_STREAM_IO', `${what}: ${err.code ?? err.message}`, {
    cause: e,
  });
}

/**
 * The read side of an accepted socket through `onread`, into buffers we choose: net.Server
 * offers it only to sockets it makes itself, so the handle (not reading yet: pauseOnConnect)
 * moves to a new Socket that has it, as the NBD server does (nbd/server.ts ownReads).
 * Null if the handle is not where Node keeps it; the caller then uses 'data' events.
 */
function adoptReads(
  sock: net.Socket,
  target: () => Buffer,
  onRead: (n: number) => void,
): net.Socket | null {
  const old = sock as unknown as { _handle?: unknown; _server?: unknown; server?: unknown };
  const handle = old._handle;
  if (!handle) return null;
  old._handle = null;
  const opts: net.SocketConstructorOpts & { handle: unknown; onread: net.OnReadOpts } = {
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: target,
      callback: (n: number) => {
        onRead(n);
        return true;
      },
    },
  };
  const s = new net.Socket(opts);
  const fresh = s as unknown as { _server?: unknown; server?: unknown };
  fresh._server = old._server ?? null;
  fresh.server = old.server ?? null;
  old._server = null;
  old.server = null;
  return s;
}

/** What a stream-in is asked for (POST /v1/devices/NAME/stream-in). */
interface InOptions {
  offset?: number;
  end?: number;
  checksum?: ChecksumAlg;
  timeoutMs?: number;
  identity: string;
}

/** What a stream-out is asked for (POST /v1/devices/NAME/stream-out). */
interface OutOptions extends Omit<InOptions, 'end'> {
  socket?: string;
  length?: number;
}

export class StreamManager {
  private readonly jobs = new Map<string, Job>();
  private native: BallastNative | null = null;
  /** The group QEMU runs in (the NBD socket's), given the stream socket; null: root only. */
  socketGroup: number | null = null;

  constructor(private readonly deps: StreamDeps) {}

  private lib(): BallastNative {
    this.native ??= loadNative();
    return this.native;
  }

  get(id: string): Job {
    const j = this.jobs.get(id);
    if (!j) {
      throw new BallastError('BALLAST_STREAM_NOT_FOUND', `no stream ${JSON.stringify(id)}`);
    }
    return j;
  }

  /** Devices whose stream is being set up (the checks before it is registered may wait). */
  private readonly starting = new Set<string>();

  /** Streams running (or waiting for their peer, or being set up) on a device. */
  activeOn(device: string): number {
    let n = this.starting.has(device) ? 1 : 0;
    for (const j of this.jobs.values()) if (j.device === device && j.active) n++;
    return n;
  }

  /**
   * PREEMPT AND ABORT of `identities` on `device`: their streams stop, and this resolves
   * once no write of theirs is in flight. The number stopped.
   */
  async abort(device: string, identities: ReadonlySet<string>): Promise<number> {
    const hit = [...this.jobs.values()].filter(
      (j) => j.device === device && j.active && identities.has(j.identity),
    );
    await Promise.all(
      hit.map((j) =>
        j.stop(
          new BallastError(
            'BALLAST_STREAM_DENIED',
            `identity ${j.identity} was preempted on device ${device}: the stream stopped`,
          ),
        ),
      ),
    );
    return hit.length;
  }

  /** Stops the streams of a device (it is being deleted or shrunk). */
  async stopOn(device: string): Promise<void> {
    await Promise.all(
      [...this.jobs.values()]
        .filter((j) => j.device === device && j.active)
        .map((j) =>
          j.stop(new BallastError('BALLAST_STREAM_CANCELLED', `device ${device} is being changed`)),
        ),
    );
  }

  /** Stops every stream (the agent is stopping). */
  async close(): Promise<void> {
    await Promise.all(
      [...this.jobs.values()]
        .filter((j) => j.active)
        .map((j) => j.stop(new BallastError('BALLAST_STREAM_CANCELLED', 'the agent is stopping'))),
    );
  }

  private register(j: Job): void {
    this.jobs.set(j.id, j);
    void j.finished.then(() => {
      setTimeout(() => this.jobs.delete(j.id), KEEP_MS).unref();
    });
  }

  private who(sock: net.Socket | undefined, as: string | undefined): string {
    if (as !== undefined) return as;
    if (!sock) return 'anonymous';
    const id = this.deps.identify(sock);
    if (id.refusal) throw new BallastError('BALLAST_STREAM_DENIED', id.refusal);
    return id.identity;
  }

  /** Runs `f` with `device` counted busy: one stream at a time per device. */
  private async exclusive<T>(device: string, f: () => Promise<T>): Promise<T> {
    if (this.activeOn(device) > 0) {
      throw new BallastError(
        'BALLAST_DEVICE_BUSY',
        `device ${device} already has a stream running; one at a time`,
      );
    }
    this.starting.add(device);
    try {
      return await f();
    } finally {
      this.starting.delete(device);
    }
  }

  /** Opens the listening socket of a stream-in; resolves with the job (state 'listening'). */
  startIn(name: string, o: InOptions): Promise<Job> {
    const dev = this.deps.device(name);
    return this.exclusive(dev.name, () => this.setupIn(dev, o));
  }

  private async setupIn(dev: StreamDevice, o: InOptions): Promise<Job> {
    const { offset, end } = streamRange(dev.size, o.offset, o.end);
    partsOf(
      dev.extents.map((e) => e.length),
      offset,
      end - offset,
    );
    const perm = new Permission(this.deps.access(dev.name), o.identity, WRITE_BIT, dev.name);
    await perm.allow();
    const files = Files.open(this.lib(), dev, true);
    const job = new Job('in', dev.name, o.identity, offset, end);
    job.direct = files.allDirect;
    let dir: string;
    try {
      dir = fs.mkdtempSync(path.join(this.deps.tmpDir ?? os.tmpdir(), 'ballast-stream-'));
    } catch (e) {
      files.close();
      throw asBallast(e, 'cannot make the stream socket directory');
    }
    const sock = path.join(dir, 'in.sock');
    job.socket = sock;
    const gid = this.socketGroup;
    const server = net.createServer({ pauseOnConnect: true, allowHalfOpen: true });
    const cleanup = () => {
      server.close();
      fs.rmSync(dir, { recursive: true, force: true });
    };
    try {
      await new Promise<void>((resolve, reject) => {
        server.once('error', reject);
        server.listen(sock, () => resolve());
      });
      // One connection, from QEMU: root's, and the group QEMU runs in when there is one.
      if (gid !== null) {
        fs.chownSync(dir, process.getuid?.() ?? 0, gid);
        fs.chmodSync(dir, 0o710);
        fs.chownSync(sock, process.getuid?.() ?? 0, gid);
        fs.chmodSync(sock, 0o660);
      } else {
        fs.chmodSync(sock, 0o600);
      }
    } catch (e) {
      cleanup();
      files.close();
      throw asBallast(e, 'cannot listen for the stream');
    }
    this.register(job);
    const timeoutMs = o.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    const timer = setTimeout(() => {
      cleanup();
      files.close();
      job.fail(
        new BallastError(
          'BALLAST_STREAM_TIMEOUT',
          `nobody connected to the stream socket of ${dev.name} within ${timeoutMs} ms`,
        ),
      );
    }, timeoutMs);
    job.stop = async (err) => {
      clearTimeout(timer);
      cleanup();
      files.close();
      job.fail(err);
    };
    server.once('connection', (c) => {
      clearTimeout(timer);
      cleanup();
      if (!job.active) {
        c.destroy();
        return;
      }
      this.receive(job, c, files, perm, end, checksummer(o.checksum ?? 'crc32'));
    });
    this.deps.log(
      `device ${dev.name}: stream-in for ${o.identity} at ${offset}..${end} on ${sock}${job.direct ? ' (O_DIRECT)' : ''}`,
    );
    return job;
  }

  /** The stream-in's data path, from the accepted connection to fdatasync. */
  private receive(
    job: Job,
    accepted: net.Socket,
    files: Files,
    perm: Permission,
    end: number,
    hash: Checksummer,
  ): void {
    const t0 = performance.now();
    job.state = 'running';
    const free: Buffer[] = [];
    const take = () => free.pop() ?? Buffer.allocUnsafeSlow(PIECE);
    let cur = take();
    let fill = 0;
    let pos = job.offset;
    let inFlight = 0;
    let paused = false;
    let ended = false;
    let failed: BallastError | null = null;
    const idle: (() => void)[] = [];
    const settle = () => {
      if (inFlight === 0) for (const w of idle.splice(0)) w();
    };
    const drained = () =>
      new Promise<void>((resolve) => {
        if (inFlight === 0) resolve();
        else idle.push(resolve);
      });
    let sock: net.Socket;
    const fail = (err: BallastError) => {
      if (failed) return;
      failed = err;
      sock.destroy();
      void drained().then(() => {
        files.close();
        job.fail(err);
      });
    };
    job.stop = async (err) => {
      fail(err);
      await drained();
    };
    const submit = () => {
      if (fill === 0 || failed) return;
      const buf = cur;
      const len = fill;
      const at = pos;
      if (at + len > end) {
        fail(
          new BallastError(
            'BALLAST_STREAM_NO_ROOM',
            `the stream outgrew its area of ${job.device} (${end - job.offset} bytes)`,
          ),
        );
        return;
      }
      pos += len;
      cur = take();
      fill = 0;
      hash.update(buf.subarray(0, len));
      inFlight++;
      if (inFlight >= IN_FLIGHT && !paused) {
        paused = true;
        sock.pause();
      }
      perm
        .allow()
        .then((fence) => (failed ? undefined : files.write(buf, at, len, fence)))
        .then(
          () => {
            inFlight--;
            free.push(buf);
            if (!failed) job.bytes += len;
            settle();
            if (paused && !failed && inFlight < IN_FLIGHT) {
              paused = false;
              sock.resume();
            }
            if (ended) void finish();
          },
          (e: unknown) => {
            inFlight--;
            fail(asBallast(e, 'write'));
            settle();
          },
        );
    };
    const onRead = (n: number) => {
      if (failed) return;
      fill += n;
      if (pos + fill > end) {
        submit(); // refuses it: nothing at or past `end` is written
        return;
      }
      if (fill === PIECE) submit();
    };
    let finishing = false;
    const finish = async () => {
      if (failed || finishing || inFlight > 0) return;
      finishing = true;
      try {
        await files.sync();
      } catch (e) {
        fail(asBallast(e, 'fdatasync'));
        return;
      }
      files.close();
      job.checksum = hash.digest();
      job.ms = performance.now() - t0;
      sock.end();
      job.succeed();
      this.deps.log(
        `device ${job.device}: stream-in of ${job.bytes} bytes in ${job.ms.toFixed(0)} ms, ${job.checksum}`,
      );
    };
    const adopted = adoptReads(accepted, () => cur.subarray(fill), onRead);
    if (adopted) {
      sock = adopted;
    } else {
      sock = accepted;
      sock.on('data', (chunk: Buffer) => {
        let at = 0;
        while (at < chunk.length && !failed) {
          const n = Math.min(chunk.length - at, PIECE - fill);
          chunk.copy(cur, fill, at, at + n);
          at += n;
          onRead(n);
        }
      });
    }
    sock.on('error', () => {});
    sock.on('end', () => {
      if (failed) return;
      ended = true;
      submit();
      void finish();
    });
    sock.on('close', () => {
      if (!ended && !failed) {
        fail(new BallastError('BALLAST_STREAM_IO', 'the stream connection broke'));
      }
    });
    sock.resume();
  }

  /** Connects to QEMU's incoming socket and sends [offset, offset+length) of the device. */
  startOut(name: string, o: OutOptions): Promise<Job> {
    const dev = this.deps.device(name);
    return this.exclusive(dev.name, () => this.setupOut(dev, o));
  }

  private async setupOut(dev: StreamDevice, o: OutOptions): Promise<Job> {
    if (typeof o.socket !== 'string' || !path.isAbsolute(o.socket)) {
      throw new BallastError('BALLAST_BAD_REQUEST', 'socket must be an absolute path');
    }
    if (o.length === undefined) throw new BallastError('BALLAST_BAD_REQUEST', 'length is required');
    const { offset } = streamRange(dev.size, o.offset, (o.offset ?? 0) + o.length);
    const length = o.length;
    partsOf(
      dev.extents.map((e) => e.length),
      offset,
      length,
    );
    const perm = new Permission(this.deps.access(dev.name), o.identity, READ_BIT, dev.name);
    await perm.allow();
    let st: fs.Stats;
    try {
      st = fs.lstatSync(o.socket);
    } catch (e) {
      throw new BallastError(
        'BALLAST_STREAM_SOCKET',
        `${o.socket}: ${(e as NodeJS.ErrnoException).code ?? (e as Error).message}`,
      );
    }
    if (!st.isSocket()) {
      throw new BallastError('BALLAST_STREAM_SOCKET', `${o.socket} is not a Unix socket`);
    }
    const files = Files.open(this.lib(), dev, false);
    const timeoutMs = o.timeoutMs ?? DEFAULT_TIMEOUT_MS;
    let c: net.Socket;
    try {
      c = await new Promise<net.Socket>((resolve, reject) => {
        const s = net.connect(o.socket as string);
        const t = setTimeout(() => {
          s.destroy();
          reject(
            new BallastError(
              'BALLAST_STREAM_TIMEOUT',
              `${o.socket} did not accept within ${timeoutMs} ms`,
            ),
          );
        }, timeoutMs);
        s.once('connect', () => {
          clearTimeout(t);
          resolve(s);
        });
        s.once('error', (e: NodeJS.ErrnoException) => {
          clearTimeout(t);
          reject(new BallastError('BALLAST_STREAM_SOCKET', `${o.socket}: ${e.code ?? e.message}`));
        });
      });
    } catch (e) {
      files.close();
      throw e;
    }
    const job = new Job('out', dev.name, o.identity, offset, length);
    job.state = 'running';
    this.register(job);
    this.deps.log(
      `device ${dev.name}: stream-out for ${o.identity} of ${offset}+${length} to ${o.socket}`,
    );
    void this.send(job, c, files, perm, checksummer(o.checksum ?? 'crc32'));
    return job;
  }

  private async send(
    job: Job,
    c: net.Socket,
    files: Files,
    perm: Permission,
    hash: Checksummer,
  ): Promise<void> {
    const t0 = performance.now();
    let stopped: BallastError | null = null as BallastError | null;
    const reads: Promise<{ buf: Buffer; n: number }>[] = [];
    let inFlight = 0;
    let idle: (() => void) | null = null;
    job.stop = async (err) => {
      stopped ??= err;
      c.destroy();
      while (inFlight > 0) await new Promise<void>((r) => (idle = r));
    };
    c.on('error', () => {});
    c.on('close', () => {
      if (job.sent < job.limit) job.peerClosed = true;
    });
    const free: Buffer[] = [];
    let next = 0;
    // Readahead this far past the reads in flight.
    const AHEAD = 16 * PIECE;
    let advised = 0;
    const more = () => {
      while (reads.length < IN_FLIGHT && next < job.limit && !stopped) {
        const n = Math.min(PIECE, job.limit - next);
        const at = job.offset + next;
        const want = Math.min(job.limit, next + AHEAD);
        if (want > advised) {
          files.willNeed(job.offset + advised, want - advised);
          advised = want;
        }
        const buf = free.pop() ?? Buffer.allocUnsafeSlow(PIECE);
        inFlight++;
        const p = perm
          .allow()
          .then(() => files.read(buf, at, n))
          .then(() => ({ buf, n }))
          .finally(() => {
            inFlight--;
            if (inFlight === 0) idle?.();
          });
        p.catch(() => {});
        reads.push(p);
        next += n;
      }
    };
    try {
      more();
      while (reads.length) {
        const { buf, n } = await (reads.shift() as Promise<{ buf: Buffer; n: number }>);
        if (stopped) throw stopped;
        more();
        const b = buf.subarray(0, n);
        hash.update(b);
        job.bytes += n;
        // Once QEMU has closed its end the rest is still read and hashed: the caller
        // tells a damaged stream from a refused one by the checksum.
        if (!c.destroyed && c.writable) {
          const ok = c.write(b, (e) => {
            if (!e) job.sent += n;
            free.push(buf);
          });
          if (!ok) {
            await new Promise<void>((resolve) => {
              const done = () => {
                c.off('drain', done);
                c.off('close', done);
                resolve();
              };
              c.on('drain', done);
              c.on('close', done);
            });
          }
        }
      }
      if (stopped) throw stopped;
      await new Promise<void>((resolve) => {
        if (c.destroyed) resolve();
        else c.end(() => resolve());
      });
      job.checksum = hash.digest();
      job.ms = performance.now() - t0;
      job.succeed();
      this.deps.log(
        `device ${job.device}: stream-out of ${job.bytes} bytes in ${job.ms.toFixed(0)} ms, ${job.checksum}${job.peerClosed ? ` (the peer closed after ${job.sent})` : ''}`,
      );
    } catch (e) {
      c.destroy();
      job.fail(stopped ?? asBallast(e, 'read'));
      while (inFlight > 0) await new Promise<void>((r) => (idle = r));
    } finally {
      files.close();
    }
  }

  /** Waits up to `ms` for the stream's end: its view, or its error thrown. */
  async wait(id: string, ms: number): Promise<StreamView> {
    const j = this.get(id);
    if (j.active) {
      let t: NodeJS.Timeout | undefined;
      await Promise.race([
        j.finished,
        new Promise<void>((resolve) => {
          t = setTimeout(resolve, Math.min(ms, MAX_WAIT_MS));
        }),
      ]);
      clearTimeout(t);
    }
    if (j.error) throw j.error;
    return j.view();
  }

  async cancel(id: string): Promise<StreamView> {
    const j = this.get(id);
    if (j.active) await j.stop(new BallastError('BALLAST_STREAM_CANCELLED', 'cancelled'));
    return j.view();
  }

  /** The API's routes (docs/streams.md). */
  routes(): RouteSet {
    return (route) => [
      route('POST', '/v1/devices/:name/stream-in', async (q, [name], body) => {
        const identity = this.who(q.socket, identityField(body.as));
        const job = await this.startIn(name as string, {
          offset: wholeBytes(body.offset, 'offset'),
          end: wholeBytes(body.end, 'end'),
          checksum: algField(body.checksum),
          timeoutMs: timeoutField(body.timeoutMs),
          identity,
        });
        return job.view();
      }),
      route('POST', '/v1/devices/:name/stream-out', async (q, [name], body) => {
        const identity = this.who(q.socket, identityField(body.as));
        const job = await this.startOut(name as string, {
          socket: body.socket as string | undefined,
          offset: wholeBytes(body.offset, 'offset'),
          length: wholeBytes(body.length, 'length'),
          checksum: algField(body.checksum),
          timeoutMs: timeoutField(body.timeoutMs),
          identity,
        });
        return job.view();
      }),
      route('GET', '/v1/streams/:id', async (_q, [id]) => this.get(id as string).view()),
      route('POST', '/v1/streams/:id/wait', async (_q, [id], body) => {
        const ms = body.timeoutMs === undefined ? MAX_WAIT_MS : timeoutField(body.timeoutMs);
        return this.wait(id as string, ms);
      }),
      route('DELETE', '/v1/streams/:id', async (_q, [id]) => this.cancel(id as string)),
    ];
  }
}
