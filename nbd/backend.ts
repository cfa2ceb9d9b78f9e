import { closeSync } from 'node:fs';

// The contract between the NBD server and whatever stores the bytes.
// A backend declares what it can do; the server derives the transmission
// flags from that and never asks for an operation the backend did not claim.

/** What a backend can do. The advertised NBD flags follow from these. */
export interface BackendCaps {
  /** Writes are possible at all (false: a read-only export). */
  readonly write: boolean;
  /** FLUSH does something (a durable store). */
  readonly flush: boolean;
  /** Per-write durability (FUA) is honoured. */
  readonly fua: boolean;
  /** TRIM deallocates. */
  readonly trim: boolean;
  /** WRITE_ZEROES is supported (natively or emulated). */
  readonly zero: boolean;
  /** WRITE_ZEROES can be done without writing the zeroes byte by byte. */
  readonly fastZero: boolean;
  /** CACHE (prefetch) is supported. */
  readonly cache: boolean;
  /** Allocation extents (holes / data) can be reported. */
  readonly extents: boolean;
  /** Writes flushed on one connection are visible to every other connection. */
  readonly multiConn: boolean;
  /** The medium is rotational (an advisory hint to clients). */
  readonly rotational: boolean;
}

/**
 * One I/O in flight. The server owns these objects and reuses them, so a
 * backend must not keep a reference after calling `done`.
 */
export interface IoRequest {
  /** Byte offset in the export. */
  offset: number;
  /** Byte count. */
  length: number;
  /** Data: the destination of a read, the source of a write (exactly `length` bytes from `bufOffset`). */
  buf: Buffer;
  bufOffset: number;
  /**
   * Completion: 0 on success, or a positive errno (EIO, ENOSPC, ENOTSUP, ...).
   * Called exactly once, and possibly synchronously from inside the backend
   * method that received the request (e.g. a read served from the page cache).
   */
  done(errno: number): void;
}

/** One run of the allocation map: `length` bytes that are all hole or all data. */
export interface Extent {
  length: number;
  /** A hole reads as zeroes and has no storage behind it. */
  hole: boolean;
}

export interface Backend {
  /** Export size in bytes. */
  readonly size: number;
  readonly caps: BackendCaps;

  read(req: IoRequest): void;
  /** `fua`: the data must be durable before `done`. */
  write(req: IoRequest, fua: boolean): void;
  flush(req: IoRequest): void;
  /** Deallocate the range (reads after it return zeroes). */
  trim(req: IoRequest, fua: boolean): void;
  /**
   * Make the range read as zeroes. `mayTrim`: deallocating is allowed (no NO_HOLE flag).
   * `fast`: fail with ENOTSUP instead of doing it slowly (FAST_ZERO).
   */
  zero(req: IoRequest, mayTrim: boolean, fast: boolean, fua: boolean): void;
  /** Prefetch the range into cache. */
  cache(req: IoRequest): void;
  /**
   * The allocation map of [offset, offset+length), synchronously: appends at
   * most `max` extents to `out` (the last may extend past the range but never
   * past the export). Returns 0, or a positive errno.
   */
  extents(offset: number, length: number, max: number, out: Extent[]): number;
  /** Release resources; called once no request is in flight. */
  close(): Promise<void>;
  /**
   * Describe this backend for another thread (a worker serving connections),
   * with duplicated descriptors; null if it cannot be shared. Absent: never.
   */
  share?(): SharedBackend | null;
}

/**
 * A backend described so that another thread of this process can serve it
 * (nbd/WORKERS.md): `module` exports `factory`, which builds the backend from
 * `data`. The descriptors in `fds` are duplicates owned by the receiver (its
 * backend closes them); whoever does not adopt the description closes them
 * with releaseShared().
 */
export interface SharedBackend {
  module: string;
  factory: string;
  data: unknown;
  fds: number[];
}

/** Builds the backend a SharedBackend describes (in the thread that will serve it). */
export async function adoptBackend(s: SharedBackend): Promise<Backend> {
  const m = (await import(s.module)) as Record<string, unknown>;
  const f = m[s.factory];
  if (typeof f !== 'function') throw new Error(`${s.module} has no backend factory ${s.factory}`);
  return await (f as (d: unknown) => Backend | Promise<Backend>)(s.data);
}

/** Closes the descriptors of a description that will not be adopted. */
export function releaseShared(s: SharedBackend): void {
  for (const fd of s.fds) closeQuietly(fd);
}

/** Closes a descriptor this thread owns; one already gone is no error. */
export function closeQuietly(fd: number): void {
  try {
    closeSync(fd);
  } catch {}
}
