// The storage backend: one sparse regular file per export.
//
// Reads and writes first try preadv2/pwritev2 with RWF_NOWAIT on the event loop,
// which completes page-cached I/O without a thread-pool round trip; whatever
// that cannot do (not cached, unsupported, short) finishes on the libuv pool
// (fs.read; the addon's pwriteAsync, one write at a time). Writes reach the kernel
// in pieces of at most 64 KiB (native/ballast_native.c, WRITE_CHUNK). With cache
// 'none' (dump devices), aligned writes go to the pool with O_DIRECT instead.
// Holes are made with fallocate and reported with SEEK_DATA/SEEK_HOLE. A flock
// keeps two servers from serving one file. A file of a cluster's shared pool has
// a fence (cluster/fence.ts): every write and fallocate carries the fence's token
// from the moment the request reached the backend, and the addon checks it in
// the thread that makes the syscall, immediately before it.
import * as fs from 'node:fs';
import { constants as osConstants } from 'node:os';
import { dirname, join } from 'node:path';
import { promisify } from 'node:util';
import type { Backend, BackendCaps, Extent, IoRequest, SharedBackend } from '../nbd/backend.js';
import { BallastError } from './errors.js';
import { failpointArmed } from './failpoints.js';
import { type BallastNative, errnoName, loadNative } from './native.js';

const openAsync = promisify(fs.open);
const closeAsync = promisify(fs.close);
const fstatAsync = promisify(fs.fstat);
const ftruncateAsync = promisify(fs.ftruncate);
const fsyncAsync = promisify(fs.fsync);

const { EIO, ENOTSUP, ENOSYS, EOPNOTSUPP } = osConstants.errno;

/** A fence's token, read when a write is admitted (cluster/fence.ts Fence). */
export interface FenceToken {
  readonly token: number;
}

/** Zeroes are written in pieces of at most this size when fallocate cannot zero. */
const ZERO_CHUNK = 1 << 20;
let zeroBuf: Buffer | undefined;

/** Pool writes at least this long run alone (writePool). */
const POOL_LARGE = 256 * 1024;
/** Smaller pool writes run up to this many at once (libuv's pool has 4 threads). */
const POOL_PARALLEL = 4;

/** Largest write done on the event loop (larger ones always use the pool). */
const INLINE_MAX = 4 * 1024 * 1024;
/** An inline write slower than this means the page cache is pushing back... */
const INLINE_SLOW_MS = 2;
/** ...and writes use the thread pool for this long. */
const INLINE_BACKOFF_MS = 1000;

export type CacheMode = 'writeback' | 'none';
export const CACHE_MODES: readonly CacheMode[] = ['writeback', 'none'];

/** Offsets and lengths of O_DIRECT writes are multiples of this (any logical block size up to 4 KiB). */
const DIRECT_ALIGN = 4096;

export interface SparseFileOptions {
  /** Export size. Required to create a missing file; grows (sparsely) a smaller one. */
  size?: number;
  /** Open O_RDONLY under a shared lock; caps.write/trim/zero/fastZero are false. */
  readOnly?: boolean;
  /** Advertised rotational hint; detected from sysfs when absent. */
  rotational?: boolean;
  /**
   * 'none': writes aligned to 4 KiB bypass the host's page cache (O_DIRECT), as dump
   * devices' are: write-once data that would only push out what the host caches, and
   * whose flush then has nothing left to write back. Reads, and writes that are not
   * aligned, still use the page cache (the kernel keeps the two coherent). Falls back
   * to 'writeback' (see cacheMode) where the file system has no O_DIRECT.
   * Default 'writeback'.
   */
  cache?: CacheMode;
  /**
   * Several agents serve the file at once (a shared pool of a cluster, where the
   * reservations arbitrate writers): a shared lock, which still keeps out a server
   * that wants the file to itself.
   */
  sharedLock?: boolean;
  /**
   * The fence of a cluster's shared file: writes and fallocates are refused at
   * their syscall (EOWNERDEAD, answered EIO) once it has closed since they were
   * admitted, or its lease deadline has passed. Such a backend is not shared with
   * worker threads.
   */
  fence?: FenceToken;
  /** @internal Testing: false forces every read/write through the thread pool. */
  nowait?: boolean;
  /** @internal Testing: false acts as if fallocate were unsupported. */
  fallocate?: boolean;
}

/** A positive errno from a Node error (whose `errno` is negative). */
function errnoOf(err: NodeJS.ErrnoException): number {
  return err.errno ? Math.abs(err.errno) : EIO;
}

function isUnsupported(ret: number): boolean {
  return ret === -EOPNOTSUPP || ret === -ENOSYS;
}

export class SparseFileBackend implements Backend {
  readonly path: string;
  readonly fd: number;
  /** Changes only through resize(); connections already open keep the size they saw. */
  size: number;
  readonly caps: BackendCaps;

  // Hot path: the addon's functions held directly, so a read is one call.
  private readonly preadNowait: BallastNative['preadNowait'];
  private readonly pwriteNowait: BallastNative['pwriteNowait'];
  private readonly pwriteAsync: BallastNative['pwriteAsync'];
  private readonly native: BallastNative;
  private readonly eagain: number;
  // Cleared for good when the kernel/filesystem says the flag is unsupported
  // (ext4 rejects buffered RWF_NOWAIT writes with EOPNOTSUPP), to save a syscall.
  private readNowait: boolean;
  private writeNowait: boolean;
  /**
   * Where buffered NOWAIT writes are unsupported, writes still go to the page
   * cache on the event loop while that stays quick; a write that took longer
   * than INLINE_SLOW_MS (dirty-page throttling, a slow disk) sends writes to
   * the thread pool until `inlineAfter`.
   */
  private inlineWrites: boolean;
  private inlineAfter = 0;
  /** Writes for the thread pool, with the fence token of their admission. */
  private readonly poolWrites: { req: IoRequest; done: number; fua: boolean; fence: number }[] = [];
  /** The fence of a shared file (SparseFileOptions.fence). */
  private readonly fence: FenceToken | undefined;
  /** Pool writes running, and whether one of them is large. */
  private poolRunning = 0;
  private poolLarge = false;
  /** The file opened again with O_DIRECT (cache 'none'), or -1. */
  private readonly directFd: number;
  /** What the file is served with: 'none' only if O_DIRECT could be had. */
  readonly cacheMode: CacheMode;
  private readonly pwriteInline: BallastNative['pwriteInline'];
  private canPunch: boolean;
  private canZeroRange: boolean;
  private closed = false;

  private constructor(
    path: string,
    fd: number,
    size: number,
    caps: BackendCaps,
    native: BallastNative,
    opts: SparseFileOptions,
    directFd: number,
  ) {
    this.path = path;
    this.fd = fd;
    this.directFd = directFd;
    this.cacheMode = directFd >= 0 ? 'none' : 'writeback';
    this.size = size;
    this.caps = caps;
    this.native = native;
    this.preadNowait = native.preadNowait;
    this.pwriteNowait = native.pwriteNowait;
    this.pwriteAsync = native.pwriteAsync;
    this.pwriteInline = native.pwriteInline;
    this.inlineWrites = opts.nowait !== false && !opts.readOnly;
    this.eagain = -native.constants.EAGAIN;
    this.readNowait = opts.nowait !== false;
    this.writeNowait = opts.nowait !== false && !opts.readOnly;
    this.canPunch = opts.fallocate !== false;
    this.canZeroRange = opts.fallocate !== false;
    this.fence = opts.fence;
    if (failpointArmed('slow-writes') && this.fence) {
      // Every write through the pool, where the addon delays it: queued for certain.
      this.readNowait = this.writeNowait = this.inlineWrites = false;
    }
  }

  /** The token a write admitted now carries (-1: no fence). */
  private token(): number {
    return this.fence === undefined ? -1 : this.fence.token;
  }

  static async open(path: string, opts: SparseFileOptions = {}): Promise<SparseFileBackend> {
    const native = loadNative();
    const readOnly = opts.readOnly === true;
    const want = opts.size;
    if (want !== undefined && !(Number.isSafeInteger(want) && want >= 0)) {
      throw new BallastError(
        'BALLAST_SIZE_INVALID',
        `invalid size ${want} for ${path}: expected a whole number of bytes`,
      );
    }

    const { fd, created } = await openFile(path, want, readOnly);
    try {
      const st = await fstatAsync(fd);
      if (!st.isFile()) {
        throw new BallastError('BALLAST_FILE_INVALID', `${path} is not a regular file`);
      }
      const c = native.constants;
      const lockRet = native.flock(
        fd,
        (readOnly || opts.sharedLock ? c.LOCK_SH : c.LOCK_EX) | c.LOCK_NB,
      );
      if (lockRet === -c.EWOULDBLOCK) {
        throw new BallastError(
          'BALLAST_FILE_LOCKED',
          `${path} is in use by another Ballast server (it holds the file lock)`,
        );
      }
      if (lockRet < 0) {
        throw new BallastError('BALLAST_FILE_OPEN', `cannot lock ${path}: ${errnoName(-lockRet)}`);
      }
      // Sizes are checked under the lock: never resize a file someone else serves.
      let size = st.size;
      if (want !== undefined && want !== st.size) {
        if (want < st.size) {
          throw new BallastError(
            'BALLAST_SIZE_MISMATCH',
            `${path} is ${st.size} bytes, larger than the requested ${want}: refusing to truncate it`,
          );
        }
        if (readOnly) {
          throw new BallastError(
            'BALLAST_SIZE_MISMATCH',
            `${path} is ${st.size} bytes, smaller than the requested ${want}, and is opened read-only`,
          );
        }
        try {
          await ftruncateAsync(fd, want); // grows sparsely
        } catch (cause) {
          const errno = errnoOf(cause as NodeJS.ErrnoException);
          throw new BallastError(
            'BALLAST_FILE_OPEN',
            `cannot ${created ? 'create' : 'grow'} ${path} to ${want} bytes: ${errnoName(errno)}`,
            { cause },
          );
        }
        size = want;
      }
      const rotational = opts.rotational ?? (await detectRotational(st.dev));
      const caps: BackendCaps = {
        write: !readOnly,
        flush: true,
        fua: true,
        trim: !readOnly,
        zero: !readOnly,
        fastZero: !readOnly,
        cache: true,
        extents: true,
        multiConn: true,
        rotational,
      };
      const directFd = opts.cache === 'none' && !readOnly ? openDirect(path) : -1;
      return new SparseFileBackend(path, fd, size, caps, native, opts, directFd);
    } catch (err) {
      // Closing also drops the lock if it was taken.
      await closeAsync(fd).catch(() => {});
      throw err;
    }
  }

  // ---- hot path ----------------------------------------------------------

  read(req: IoRequest): void {
    if (this.readNowait) {
      const r = this.preadNowait(this.fd, req.buf, req.bufOffset, req.length, req.offset);
      if (r === req.length) {
        req.done(0);
        return;
      }
      if (r >= 0) {
        this.readPool(req, r); // short: partly cached, or end of file
        return;
      }
      if (r !== this.eagain) {
        if (!isUnsupported(r)) {
          req.done(-r);
          return;
        }
        this.readNowait = false;
      }
    }
    this.readPool(req, 0);
  }

  write(req: IoRequest, fua: boolean): void {
    const fence = this.token();
    if (this.directFd >= 0 && this.directOk(req.offset, req.length)) {
      this.writePool(req, 0, fua, fence);
      return;
    }
    if (this.writeNowait) {
      const r = this.pwriteNowait(this.fd, req.buf, req.bufOffset, req.length, req.offset, fence);
      if (r === req.length) {
        if (fua) this.sync(req);
        else req.done(0);
        return;
      }
      if (r >= 0) {
        this.writePool(req, r, fua, fence);
        return;
      }
      if (r !== this.eagain) {
        if (!isUnsupported(r)) {
          req.done(-r);
          return;
        }
        this.writeNowait = false;
      }
    }
    // While pool writes are queued, an inline one would only wait on their inode lock.
    if (this.inlineWrites && req.length <= INLINE_MAX && this.poolRunning === 0) {
      const t0 = performance.now();
      if (t0 >= this.inlineAfter) {
        const r = this.pwriteInline(this.fd, req.buf, req.bufOffset, req.length, req.offset, fence);
        const t1 = performance.now();
        if (t1 - t0 > INLINE_SLOW_MS) this.inlineAfter = t1 + INLINE_BACKOFF_MS;
        if (r === req.length) {
          if (fua) this.sync(req);
          else req.done(0);
        } else if (r >= 0) this.writePool(req, r, fua, fence);
        else req.done(-r);
        return;
      }
    }
    this.writePool(req, 0, fua, fence);
  }

  // ---- thread-pool fallbacks ---------------------------------------------

  /** Completes a read from `done` bytes on: past the end of the file on disk reads as zeroes. */
  private readPool(req: IoRequest, done: number): void {
    const fd = this.fd;
    const { buf, bufOffset, length, offset } = req;
    const step = (err: NodeJS.ErrnoException | null, n: number): void => {
      if (err) {
        req.done(errnoOf(err));
        return;
      }
      if (n === 0) {
        // End of file: the file was shrunk behind our back.
        buf.fill(0, bufOffset + done, bufOffset + length);
        req.done(0);
        return;
      }
      done += n;
      if (done < length) fs.read(fd, buf, bufOffset + done, length - done, offset + done, step);
      else req.done(0);
    };
    if (done >= length) req.done(0);
    else fs.read(fd, buf, bufOffset + done, length - done, offset + done, step);
  }

  /**
   * Queues a write for the thread pool, where writes start in the order they came.
   * A large one runs alone: a buffered write holds the file's inode lock for its whole
   * length, so a second one beside it only spins or sleeps on that lock (measured: a
   * fifth of the server's CPU in rwsem_spin_on_owner on a 2-CPU host while four pool
   * threads wrote 1 MiB each). Small ones hold it briefly and run up to
   * POOL_PARALLEL at once, which random 4 KiB writes need.
   */
  private writePool(req: IoRequest, done: number, fua: boolean, fence: number): void {
    if (done >= req.length) {
      if (fua) this.sync(req);
      else req.done(0);
      return;
    }
    this.poolWrites.push({ req, done, fua, fence });
    this.startPoolWrites();
  }

  private startPoolWrites(): void {
    for (;;) {
      const head = this.poolWrites[0];
      if (!head) return;
      const large = head.req.length - head.done >= POOL_LARGE;
      if (this.poolRunning > 0 && (large || this.poolLarge || this.poolRunning >= POOL_PARALLEL))
        return;
      this.poolWrites.shift();
      this.poolRunning++;
      this.poolLarge = large;
      this.runPoolWrite(head.req, head.done, head.fua, head.fence);
    }
  }

  private runPoolWrite(req: IoRequest, done: number, fua: boolean, fence: number): void {
    const { buf, bufOffset, length, offset } = req;
    const settle = (err: number): void => {
      this.poolRunning--;
      if (this.poolRunning === 0) this.poolLarge = false;
      this.startPoolWrites();
      if (err) req.done(err);
      else if (fua) this.sync(req);
      else req.done(0);
    };
    // Resolves to the bytes written, or -errno; a short write is retried from where it
    // stopped, which reports the error that stopped it.
    const step = (r: number): void => {
      if (r < 0) settle(-r);
      else if (r === 0) settle(EIO);
      else {
        done += r;
        if (done >= length) settle(0);
        else
          void this.pwriteAsync(
            this.fd,
            buf,
            bufOffset + done,
            length - done,
            offset + done,
            false,
            fence,
          ).then(step);
      }
    };
    const direct = this.directFd >= 0 && this.directOk(offset + done, length - done);
    void this.pwriteAsync(
      direct ? this.directFd : this.fd,
      buf,
      bufOffset + done,
      length - done,
      offset + done,
      direct,
      fence,
    ).then(step);
  }

  private directOk(offset: number, length: number): boolean {
    return offset % DIRECT_ALIGN === 0 && length % DIRECT_ALIGN === 0;
  }

  /** fdatasync on the pool, then done. */
  private sync(req: IoRequest): void {
    fs.fdatasync(this.fd, (err) => req.done(err ? errnoOf(err) : 0));
  }

  // ---- other commands ----------------------------------------------------

  flush(req: IoRequest): void {
    this.sync(req);
  }

  trim(req: IoRequest, fua: boolean): void {
    if (req.length === 0 || !this.canPunch) {
      // Trim is advisory: not deallocating is a valid outcome.
      this.finish(req, 0, fua);
      return;
    }
    const c = this.native.constants;
    this.native
      .fallocate(
        this.fd,
        c.FALLOC_FL_PUNCH_HOLE | c.FALLOC_FL_KEEP_SIZE,
        req.offset,
        req.length,
        this.token(),
      )
      .then((r) => {
        if (isUnsupported(r)) {
          this.canPunch = false;
          r = 0;
        }
        this.finish(req, r, fua);
      });
  }

  zero(req: IoRequest, mayTrim: boolean, fast: boolean, fua: boolean): void {
    if (req.length === 0) {
      this.finish(req, 0, fua);
      return;
    }
    void this.zeroAsync(req, mayTrim, fast, this.token()).then((r) => this.finish(req, r, fua));
  }

  /** 0, a negative errno, or -ENOTSUP when `fast` and only writing zeroes would do. */
  private async zeroAsync(
    req: IoRequest,
    mayTrim: boolean,
    fast: boolean,
    fence: number,
  ): Promise<number> {
    const n = this.native;
    const c = n.constants;
    const keep = c.FALLOC_FL_KEEP_SIZE;
    const { offset, length } = req;
    if (mayTrim && this.canPunch) {
      const r = await n.fallocate(this.fd, c.FALLOC_FL_PUNCH_HOLE | keep, offset, length, fence);
      if (!isUnsupported(r)) return r;
      this.canPunch = false;
    }
    if (this.canZeroRange) {
      const r = await n.fallocate(this.fd, c.FALLOC_FL_ZERO_RANGE | keep, offset, length, fence);
      if (!isUnsupported(r)) return r;
      this.canZeroRange = false;
    }
    if (!mayTrim && this.canPunch) {
      // No ZERO_RANGE (tmpfs, some network filesystems): punch, then allocate again.
      const r = await n.fallocate(this.fd, c.FALLOC_FL_PUNCH_HOLE | keep, offset, length, fence);
      if (r === 0) {
        // The range already reads as zeroes; failing to allocate it is only a lost hint.
        const a = await n.fallocate(this.fd, keep, offset, length, fence);
        return isUnsupported(a) ? 0 : a;
      }
      if (!isUnsupported(r)) return r;
      this.canPunch = false;
    }
    if (fast) return -ENOTSUP;
    return this.writeZeroes(offset, length, fence);
  }

  /** Writes zeroes in pieces of at most ZERO_CHUNK from one shared buffer. */
  private async writeZeroes(offset: number, length: number, fence: number): Promise<number> {
    zeroBuf ??= Buffer.alloc(ZERO_CHUNK);
    const end = offset + length;
    for (let pos = offset; pos < end; ) {
      const n = Math.min(ZERO_CHUNK, end - pos);
      const r = await this.pwriteAsync(this.fd, zeroBuf, 0, n, pos, false, fence);
      if (r < 0) return r;
      if (r === 0) return -EIO;
      pos += r;
    }
    return 0;
  }

  /** Completes a request from a 0/-errno result, after an fdatasync if `fua` and it succeeded. */
  private finish(req: IoRequest, ret: number, fua: boolean): void {
    if (ret < 0) req.done(-ret);
    else if (fua) this.sync(req);
    else req.done(0);
  }

  cache(req: IoRequest): void {
    // WILLNEED only queues readahead; it does not wait for the reads.
    const r = this.native.fadvise(
      this.fd,
      req.offset,
      req.length,
      this.native.constants.POSIX_FADV_WILLNEED,
    );
    req.done(r < 0 ? -r : 0);
  }

  extents(offset: number, length: number, max: number, out: Extent[]): number {
    const limit = this.size;
    // Runs are clamped to the requested range: a client asking for a single
    // extent (REQ_ONE) must not get one longer than its request.
    const end = Math.min(offset + length, limit);
    if (max <= 0 || offset >= end) return 0;
    const { lseek, constants: c } = this.native;
    const fd = this.fd;
    const start = out.length;
    let pushed = 0;
    let last: Extent | undefined;
    let pos = offset;
    while (pos < end) {
      let next: number;
      let hole: boolean;
      const data = lseek(fd, pos, c.SEEK_DATA);
      if (data < 0 && data !== -c.ENXIO) {
        out.length = start;
        return -data;
      }
      if (data < 0 || data > pos) {
        // A hole up to the next data (ENXIO: no data after pos, a hole to the end).
        hole = true;
        next = data < 0 ? limit : data;
      } else {
        const h = lseek(fd, pos, c.SEEK_HOLE);
        if (h < 0 && h !== -c.ENXIO) {
          out.length = start;
          return -h;
        }
        if (h >= 0 && h <= pos) continue; // the file changed between the two calls
        // ENXIO: the file shrank between the two calls, the rest reads as zeroes.
        hole = h < 0;
        next = h < 0 ? limit : h;
      }
      const len = Math.min(next, end) - pos;
      if (last && last.hole === hole) {
        last.length += len;
      } else {
        if (pushed >= max) break;
        last = { length: len, hole };
        out.push(last);
        pushed++;
      }
      pos += len;
    }
    return 0;
  }

  /**
   * Grow (sparsely) or shrink the file. Shrinking discards data past the new
   * end: the caller makes sure nobody is using it.
   */
  resize(newSize: number): Promise<void> {
    return this.setSize(newSize, false);
  }

  /**
   * Grows the device's view of the file to `newSize`; the file itself only if it
   * is smaller on disk. Never shortens it: on a shared file another agent may have
   * grown it further a moment ago (a grow of its own that committed, or a record
   * this agent has not applied yet), and its clients may write there already.
   */
  growTo(newSize: number): Promise<void> {
    return this.setSize(newSize, true);
  }

  private async setSize(newSize: number, growOnly: boolean): Promise<void> {
    if (!(Number.isSafeInteger(newSize) && newSize >= 0)) {
      throw new BallastError('BALLAST_SIZE_INVALID', `invalid size ${newSize} for ${this.path}`);
    }
    if (!this.caps.write) {
      throw new BallastError('BALLAST_READ_ONLY', `${this.path} is open read-only`);
    }
    if (!growOnly || (await fstatAsync(this.fd)).size < newSize) {
      await ftruncateAsync(this.fd, newSize);
      await fsyncAsync(this.fd);
    }
    this.size = newSize;
  }

  /**
   * The same open file for another thread: duplicated descriptors (sharing the
   * open file description, so the lock and O_DIRECT come along) and what this
   * backend learnt about the file system.
   */
  share(): SharedBackend | null {
    // A fenced file is served on the thread whose fence admits its writes.
    if (this.closed || this.fence !== undefined) return null;
    const fd = this.native.dup(this.fd);
    if (fd < 0) return null;
    let directFd = -1;
    if (this.directFd >= 0) {
      directFd = this.native.dup(this.directFd);
      if (directFd < 0) {
        fs.closeSync(fd);
        return null;
      }
    }
    const data: SharedFile = {
      path: this.path,
      fd,
      directFd,
      size: this.size,
      caps: this.caps,
      readNowait: this.readNowait,
      writeNowait: this.writeNowait,
      inlineWrites: this.inlineWrites,
      canPunch: this.canPunch,
      canZeroRange: this.canZeroRange,
    };
    return {
      module: import.meta.url,
      factory: 'adoptSparseFile',
      data,
      fds: directFd >= 0 ? [fd, directFd] : [fd],
    };
  }

  /** @internal adoptSparseFile(): a backend on descriptors another thread duplicated. */
  static adopt(d: SharedFile): SparseFileBackend {
    const b = new SparseFileBackend(
      d.path,
      d.fd,
      d.size,
      d.caps,
      loadNative(),
      { readOnly: !d.caps.write, nowait: d.inlineWrites || d.readNowait || d.writeNowait },
      d.directFd,
    );
    b.readNowait = d.readNowait;
    b.writeNowait = d.writeNowait;
    b.canPunch = d.canPunch;
    b.canZeroRange = d.canZeroRange;
    b.adopted = true;
    return b;
  }

  /** Opened on another thread's duplicates: closing must not drop that thread's lock. */
  private adopted = false;

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.adopted) {
      // Duplicates from another thread: closed without taking Node's fs bookkeeping along.
      if (this.directFd >= 0) this.native.close(this.directFd);
      this.native.close(this.fd);
      return;
    }
    this.native.flock(this.fd, this.native.constants.LOCK_UN);
    if (this.directFd >= 0) await closeAsync(this.directFd).catch(() => {});
    await closeAsync(this.fd);
  }
}

/** What SparseFileBackend.share() hands to another thread. */
export interface SharedFile {
  path: string;
  fd: number;
  directFd: number;
  size: number;
  caps: BackendCaps;
  readNowait: boolean;
  writeNowait: boolean;
  inlineWrites: boolean;
  canPunch: boolean;
  canZeroRange: boolean;
}

/** The factory named by SparseFileBackend.share(). */
export function adoptSparseFile(d: unknown): SparseFileBackend {
  return SparseFileBackend.adopt(d as SharedFile);
}

/** The file opened O_WRONLY | O_DIRECT, or -1 where the file system refuses O_DIRECT (tmpfs). */
function openDirect(path: string): number {
  try {
    return fs.openSync(path, fs.constants.O_WRONLY | fs.constants.O_DIRECT);
  } catch (cause) {
    const errno = errnoOf(cause as NodeJS.ErrnoException);
    if (errno === osConstants.errno.EINVAL) return -1;
    throw new BallastError(
      'BALLAST_FILE_OPEN',
      `cannot open ${path} for direct I/O: ${errnoName(errno)}`,
      { cause },
    );
  }
}

// ---- opening ---------------------------------------------------------------

/** Opens (or, given a size, creates) the file; nothing is resized here. */
async function openFile(
  path: string,
  size: number | undefined,
  readOnly: boolean,
): Promise<{ fd: number; created: boolean }> {
  const { O_RDONLY, O_RDWR, O_CREAT, O_EXCL } = fs.constants;
  for (;;) {
    let st: fs.Stats | undefined;
    try {
      st = await fs.promises.stat(path);
    } catch (cause) {
      const code = (cause as NodeJS.ErrnoException).code;
      if (code !== 'ENOENT') throw openError(path, cause);
    }
    if (!st) {
      if (size === undefined) {
        throw new BallastError(
          'BALLAST_FILE_NOT_FOUND',
          `${path} does not exist (give a size to create it)`,
        );
      }
      if (readOnly) {
        throw new BallastError(
          'BALLAST_FILE_NOT_FOUND',
          `${path} does not exist, and a read-only export does not create it`,
        );
      }
      try {
        // Guest memory may land here: readable by the owner only.
        return { fd: await openAsync(path, O_RDWR | O_CREAT | O_EXCL, 0o600), created: true };
      } catch (cause) {
        if ((cause as NodeJS.ErrnoException).code === 'EEXIST') continue; // raced a creator
        throw openError(path, cause);
      }
    }
    // Checked before opening: opening a FIFO read-only would block.
    if (!st.isFile()) {
      throw new BallastError(
        'BALLAST_FILE_INVALID',
        `${path} is ${st.isDirectory() ? 'a directory' : 'not a regular file'}`,
      );
    }
    try {
      return { fd: await openAsync(path, readOnly ? O_RDONLY : O_RDWR), created: false };
    } catch (cause) {
      if ((cause as NodeJS.ErrnoException).code === 'ENOENT') continue; // removed meanwhile
      throw openError(path, cause);
    }
  }
}

function openError(path: string, cause: unknown): BallastError {
  const e = cause as NodeJS.ErrnoException;
  if (e.code === 'EISDIR') {
    return new BallastError('BALLAST_FILE_INVALID', `${path} is a directory`, { cause });
  }
  return new BallastError('BALLAST_FILE_OPEN', `cannot open ${path}: ${e.code ?? e.message}`, {
    cause,
  });
}

// ---- rotational detection --------------------------------------------------

/** Major and minor numbers of a Linux dev_t (glibc's encoding). */
function splitDev(dev: number): [number, number] {
  const d = BigInt(dev);
  const major = ((d & 0xfff00n) >> 8n) | ((d & 0xfffff00000000000n) >> 32n);
  const minor = (d & 0xffn) | ((d & 0xffffff00000n) >> 12n);
  return [Number(major), Number(minor)];
}

/**
 * Whether the block device holding the file is rotational, from
 * /sys/dev/block/MAJ:MIN/queue/rotational (a partition has no queue/: its
 * parent device's is used). False when unknown (tmpfs, overlay, btrfs, NFS...).
 */
export async function detectRotational(dev: number): Promise<boolean> {
  const [major, minor] = splitDev(dev);
  if (major === 0) return false; // anonymous device: no block device behind it
  try {
    let dir = await fs.promises.realpath(`/sys/dev/block/${major}:${minor}`);
    for (let i = 0; i < 4 && dir.startsWith('/sys/devices/'); i++) {
      try {
        const text = await fs.promises.readFile(join(dir, 'queue', 'rotational'), 'utf8');
        return text.trim() === '1';
      } catch {
        dir = dirname(dir);
      }
    }
  } catch {
    // no such device in sysfs
  }
  return false;
}
