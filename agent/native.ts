// Loader for the N-API addon (native/ballast_native.c): the syscalls Node lacks.
// This module runs both as agent/native.ts (Vitest) and as dist/agent/native.js
// (after tsc), so the addon is found by walking up to the package root.
import { existsSync } from 'node:fs';
import { createRequire } from 'node:module';
import { constants as osConstants } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { BallastError } from './errors.js';

export interface NativeConstants {
  readonly SEEK_DATA: number;
  readonly SEEK_HOLE: number;
  readonly LOCK_SH: number;
  readonly LOCK_EX: number;
  readonly LOCK_NB: number;
  readonly LOCK_UN: number;
  readonly FALLOC_FL_KEEP_SIZE: number;
  readonly FALLOC_FL_PUNCH_HOLE: number;
  readonly FALLOC_FL_ZERO_RANGE: number;
  readonly POSIX_FADV_WILLNEED: number;
  readonly EAGAIN: number;
  readonly EOPNOTSUPP: number;
  readonly ENXIO: number;
  readonly EWOULDBLOCK: number;
  /** The errno of a write refused by its fence (EOWNERDEAD: no file system returns it). */
  readonly FENCED: number;
}

/** What a fence slot counted (fenceStats). */
export interface FenceStats {
  /** Writes and fallocates refused at the syscall. */
  refused: number;
  /** With timing on: the sum and the largest of the windows from check to syscall return. */
  windowNs: number;
  windowMaxNs: number;
  /** window[b]: windows of [2^b, 2^(b+1)) ns (bucket 0 also holds 0 and 1 ns). */
  window: number[];
  /** The same from the check to the last instruction before the syscall. */
  entryNs: number;
  entryMaxNs: number;
  entry: number[];
}

/**
 * The addon's functions. None of them throw on a failed syscall: they return
 * a NEGATIVE errno (they throw only on a wrong argument type).
 *
 * `fence` (writes and fallocate): a token from cluster/fence.ts (Fence.token), or
 * -1/absent for a file no fence guards. The addon asks that fence in the thread
 * that makes each syscall, immediately before it, and refuses with
 * -constants.FENCED once the fence's deadline has passed or it was closed since
 * the token was taken.
 */
export interface BallastNative {
  /** preadv2(RWF_NOWAIT) into buf[bufOff, bufOff+len): bytes read, or -errno (-EAGAIN: not cached). */
  preadNowait(fd: number, buf: Buffer, bufOff: number, len: number, pos: number): number;
  /** pwritev2(RWF_NOWAIT) from buf[bufOff, bufOff+len): bytes written, or -errno. */
  pwriteNowait(
    fd: number,
    buf: Buffer,
    bufOff: number,
    len: number,
    pos: number,
    fence?: number,
  ): number;
  /** A plain pwrite on this thread (may block): bytes or -errno. */
  pwriteInline(
    fd: number,
    buf: Buffer,
    bufOff: number,
    len: number,
    pos: number,
    fence?: number,
  ): number;
  /**
   * pwrite on the thread pool until all is written: resolves to the bytes written
   * (fewer only if a write failed after some progress) or -errno; never rejects.
   * `direct`: fd is O_DIRECT and pos/len are block-aligned (the buffer need not be).
   */
  pwriteAsync(
    fd: number,
    buf: Buffer,
    bufOff: number,
    len: number,
    pos: number,
    direct?: boolean,
    fence?: number,
  ): Promise<number>;
  /** lseek: the resulting offset, or -errno (-ENXIO from SEEK_DATA/SEEK_HOLE past the data). */
  lseek(fd: number, off: number, whence: number): number;
  /** flock: 0 or -errno (-EWOULDBLOCK with LOCK_NB when held elsewhere). */
  flock(fd: number, op: number): number;
  /** fallocate on the thread pool: resolves to 0 or -errno, never rejects. */
  fallocate(fd: number, mode: number, off: number, len: number, fence?: number): Promise<number>;
  /** posix_fadvise, synchronously: 0 or -errno. */
  fadvise(fd: number, off: number, len: number, advice: number): number;
  /** A close-on-exec duplicate of fd (F_DUPFD_CLOEXEC), or -errno. */
  dup(fd: number): number;
  /** close(2), synchronously: 0 or -errno. */
  close(fd: number): number;
  /** The uid of a Unix socket's peer (SO_PEERCRED), or -errno. */
  peerUid(fd: number): number;
  /** mkfifo(path, mode): 0 or -errno. */
  mkfifo(path: string, mode: number): number;
  /** fcntl(F_SETPIPE_SZ): the pipe's capacity after the call, or -errno. */
  setPipeSize(fd: number, bytes: number): number;
  /** A new fence slot, closed until fenceSet opens it; -ENOSPC past 256 per process. */
  fenceCreate(): number;
  /** Writes under `slot` pass only with this epoch, before this CLOCK_MONOTONIC deadline. */
  fenceSet(slot: number, epoch: number, deadlineNs: bigint): void;
  /** Whether the slot measures each checked write's window (check to syscall return). */
  fenceTiming(slot: number, on: boolean): void;
  fenceStats(slot: number): FenceStats;
  /** CLOCK_MONOTONIC now, in ns: the fence's clock. */
  monotonicNs(): bigint;
  readonly constants: NativeConstants;
}

const ADDON = join('build', 'Release', 'ballast_native.node');
const FUNCTIONS = [
  'preadNowait',
  'pwriteNowait',
  'pwriteInline',
  'pwriteAsync',
  'lseek',
  'flock',
  'fallocate',
  'fadvise',
  'dup',
  'close',
  'peerUid',
  'mkfifo',
  'setPipeSize',
  'fenceCreate',
  'fenceSet',
  'fenceTiming',
  'fenceStats',
  'monotonicNs',
];

let cached: BallastNative | undefined;

/** Where the addon would be: the first build/Release/ballast_native.node above this module. */
export function findAddon(): string | undefined {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const candidate = join(dir, ADDON);
    if (existsSync(candidate)) return candidate;
    const parent = dirname(dir);
    if (parent === dir) return undefined;
    dir = parent;
  }
}

/** The addon, loaded once. Throws BallastError('BALLAST_NATIVE_MISSING') if it is absent or stale. */
export function loadNative(): BallastNative {
  if (cached) return cached;
  const fix = 'run `npm install` (or `npx node-gyp rebuild`) in the Ballast package directory';
  const path = findAddon();
  if (!path) {
    throw new BallastError(
      'BALLAST_NATIVE_MISSING',
      `the native addon (${ADDON}) was not found above ${dirname(fileURLToPath(import.meta.url))}: ${fix}`,
    );
  }
  let mod: Partial<BallastNative>;
  try {
    mod = createRequire(import.meta.url)(path) as Partial<BallastNative>;
  } catch (cause) {
    const why = cause instanceof Error ? cause.message : String(cause);
    throw new BallastError(
      'BALLAST_NATIVE_MISSING',
      `the native addon ${path} could not be loaded (${why}): ${fix}`,
      { cause },
    );
  }
  const missing = FUNCTIONS.filter(
    (f) => typeof (mod as Record<string, unknown>)[f] !== 'function',
  );
  if (missing.length > 0 || typeof mod.constants !== 'object') {
    throw new BallastError(
      'BALLAST_NATIVE_MISSING',
      `the native addon ${path} is out of date (missing ${missing.join(', ') || 'constants'}): ${fix}`,
    );
  }
  cached = mod as BallastNative;
  return cached;
}

/** The symbolic name of a (positive) errno, as the addon's -errno results carry. */
export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(osConstants.errno)) {
    if (value === errno) return name;
  }
  return `errno ${errno}`;
}
