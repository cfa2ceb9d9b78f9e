// One export made of several backends laid end to end: a device whose extents
// live in different files (possibly in different pools) is served as one
// address space.
//
// Extent i covers [starts[i], starts[i] + lengths[i]) of the export and maps to
// [0, lengths[i]) of its backend. A request inside one extent goes to that
// backend as it is (extent 0: the caller's own request object) or through a
// pooled adapter with the offset shifted; a request across extents is split
// into pooled parts on the same buffer, and completes once every part has,
// with the first error. Nothing is allocated per request once the pools are
// warm.
import { constants as osConstants } from 'node:os';
import {
  adoptBackend,
  type Backend,
  type BackendCaps,
  type Extent,
  type IoRequest,
  releaseShared,
  type SharedBackend,
} from '../nbd/backend.js';
import { BallastError } from './errors.js';

const { EINVAL } = osConstants.errno;

/** One extent of a concatenated export: the first `length` bytes of `backend`. */
export interface ConcatExtent {
  readonly backend: Backend;
  readonly length: number;
}

const EMPTY = Buffer.alloc(0);
/** Free objects kept per pool; more than this in flight at once are left to the GC. */
const POOL_MAX = 4096;

const counters = { parts: 0, joins: 0 };

/**
 * A request handed to a child backend: either a stand-in for a whole request
 * (`parent`, offset shifted) or one piece of a split request (`join`).
 */
class Part implements IoRequest {
  offset = 0;
  length = 0;
  buf: Buffer = EMPTY;
  bufOffset = 0;
  parent: IoRequest | null = null;
  join: Join | null = null;
  /** An own property, so a backend may call it detached. */
  readonly done: (errno: number) => void;

  constructor() {
    counters.parts++;
    this.done = (errno) => {
      const parent = this.parent;
      const join = this.join;
      if (parent === null && join === null) return; // a second done(): a child's bug
      // Back to the pool first: the completion below may start new requests.
      this.parent = null;
      this.join = null;
      this.buf = EMPTY;
      if (freeParts.length < POOL_MAX) freeParts.push(this);
      if (parent !== null) parent.done(errno);
      else join!.settle(errno);
    };
  }
}

/** The parts of one split request still in flight, and the first error among them. */
class Join {
  parent: IoRequest | null = null;
  pending = 0;
  errno = 0;

  constructor() {
    counters.joins++;
  }

  settle(errno: number): void {
    if (errno !== 0 && this.errno === 0) this.errno = errno;
    if (--this.pending !== 0) return;
    const parent = this.parent!;
    const result = this.errno;
    this.parent = null;
    this.errno = 0;
    if (freeJoins.length < POOL_MAX) freeJoins.push(this);
    parent.done(result);
  }
}

const freeParts: Part[] = [];
const freeJoins: Join[] = [];

function takePart(): Part {
  return freeParts.pop() ?? new Part();
}

/** A join holding one extra count, dropped by `settle(0)` once every part is issued. */
function takeJoin(parent: IoRequest): Join {
  const j = freeJoins.pop() ?? new Join();
  j.parent = parent;
  j.pending = 1;
  return j;
}

/**
 * Each child backend is held by every open ConcatBackend that uses it (a grown
 * device's old and new backends share their children); the last close() closes it.
 */
const holders = new WeakMap<Backend, number>();

const OP_READ = 0;
const OP_WRITE = 1;
const OP_TRIM = 2;
const OP_ZERO = 3;
const OP_CACHE = 4;

/** `within` results that are not an extent index. */
const SPLIT = -1;
const OUT_OF_RANGE = -2;

export class ConcatBackend implements Backend {
  readonly size: number;
  readonly caps: BackendCaps;
  /** The extents, in export order. */
  readonly parts: readonly ConcatExtent[];

  private readonly backends: Backend[];
  private readonly starts: number[];
  private readonly ends: number[];
  /** Whether extent i is its whole backend (its extent maps need no clamping). */
  private readonly whole: boolean[];
  /** Each distinct backend once, for flush and close. */
  private readonly unique: Backend[];
  /** Scratch for children's extent maps. */
  private readonly scratch: Extent[] = [];
  private closed = false;

  /**
   * @param extents in export order; each `length` a positive whole number of
   * bytes no larger than its backend. Takes a hold on every backend (see close()).
   */
  constructor(extents: readonly ConcatExtent[]) {
    if (extents.length === 0) {
      throw new BallastError('BALLAST_EXTENT_INVALID', 'a device needs at least one extent');
    }
    const backends: Backend[] = [];
    const starts: number[] = [];
    const ends: number[] = [];
    const whole: boolean[] = [];
    let size = 0;
    for (const [i, { backend, length }] of extents.entries()) {
      if (!(Number.isSafeInteger(length) && length > 0)) {
        throw new BallastError(
          'BALLAST_EXTENT_INVALID',
          `extent ${i} has length ${length}: expected a positive whole number of bytes`,
        );
      }
      if (length > backend.size) {
        throw new BallastError(
          'BALLAST_EXTENT_INVALID',
          `extent ${i} is ${length} bytes, longer than its ${backend.size}-byte backend`,
        );
      }
      if (!Number.isSafeInteger(size + length)) {
        throw new BallastError(
          'BALLAST_EXTENT_INVALID',
          'the extents add up to more than 2^53 bytes',
        );
      }
      backends.push(backend);
      starts.push(size);
      size += length;
      ends.push(size);
      whole.push(length === backend.size);
    }
    this.size = size;
    this.parts = Object.freeze(extents.map(({ backend, length }) => ({ backend, length })));
    this.backends = backends;
    this.starts = starts;
    this.ends = ends;
    this.whole = whole;
    this.unique = [...new Set(backends)];
    this.caps = combineCaps(this.unique.map((b) => b.caps));
    for (const b of this.unique) holders.set(b, (holders.get(b) ?? 0) + 1);
  }

  /**
   * The same device with `extra` appended: a new backend sharing this one's
   * children. Both stay usable; each must be closed (children close with the last).
   */
  withExtent(extra: ConcatExtent): ConcatBackend {
    if (this.closed) {
      throw new BallastError('BALLAST_EXTENT_INVALID', 'cannot grow a closed device backend');
    }
    return new ConcatBackend([...this.parts, extra]);
  }

  /** For another thread: each distinct child shared once, and the extents over them. */
  share(): SharedBackend | null {
    if (this.closed) return null;
    const children: SharedBackend[] = [];
    for (const b of this.unique) {
      const c = b.share?.() ?? null;
      if (c === null) {
        for (const done of children) releaseShared(done);
        return null;
      }
      children.push(c);
    }
    const data: SharedConcat = {
      children,
      parts: this.parts.map((p) => ({ child: this.unique.indexOf(p.backend), length: p.length })),
    };
    return {
      module: import.meta.url,
      factory: 'adoptConcat',
      data,
      fds: children.flatMap((c) => c.fds),
    };
  }

  // ---- routing -------------------------------------------------------------

  /** The index of the extent holding `offset` (the last one for `offset === size`). */
  private find(offset: number): number {
    const s = this.starts;
    let lo = 0;
    let hi = s.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >>> 1;
      if (s[mid]! <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** The extent the whole request falls in, SPLIT, or OUT_OF_RANGE. */
  private within(req: IoRequest): number {
    const offset = req.offset;
    const end = offset + req.length;
    if (!(offset >= 0 && req.length >= 0 && end <= this.size)) return OUT_OF_RANGE;
    const i = this.find(offset);
    return end <= this.ends[i]! ? i : SPLIT;
  }

  /** `req` itself for extent 0, else a pooled stand-in with the offset shifted. */
  private adapt(req: IoRequest, i: number): IoRequest {
    const start = this.starts[i]!;
    if (start === 0) return req;
    const p = takePart();
    p.parent = req;
    p.offset = req.offset - start;
    p.length = req.length;
    p.buf = req.buf;
    p.bufOffset = req.bufOffset;
    return p;
  }

  /** A request that spans extents (or is out of range): one part per extent. */
  private spread(op: number, req: IoRequest, route: number, x: boolean, y: boolean, z: boolean) {
    if (route === OUT_OF_RANGE) {
      req.done(EINVAL);
      return;
    }
    const j = takeJoin(req);
    const { offset, buf, bufOffset } = req;
    const end = offset + req.length;
    let pos = offset;
    for (let i = this.find(offset); pos < end; i++) {
      const start = this.starts[i]!;
      const n = Math.min(end, this.ends[i]!) - pos;
      const p = takePart();
      p.join = j;
      p.offset = pos - start;
      p.length = n;
      p.buf = buf;
      p.bufOffset = bufOffset + (pos - offset);
      j.pending++;
      issue(op, this.backends[i]!, p, x, y, z);
      pos += n;
    }
    j.settle(0);
  }

  // ---- Backend -------------------------------------------------------------

  read(req: IoRequest): void {
    const i = this.within(req);
    if (i >= 0) this.backends[i]!.read(this.adapt(req, i));
    else this.spread(OP_READ, req, i, false, false, false);
  }

  write(req: IoRequest, fua: boolean): void {
    const i = this.within(req);
    if (i >= 0) this.backends[i]!.write(this.adapt(req, i), fua);
    else this.spread(OP_WRITE, req, i, fua, false, false);
  }

  trim(req: IoRequest, fua: boolean): void {
    const i = this.within(req);
    if (i >= 0) this.backends[i]!.trim(this.adapt(req, i), fua);
    else this.spread(OP_TRIM, req, i, fua, false, false);
  }

  zero(req: IoRequest, mayTrim: boolean, fast: boolean, fua: boolean): void {
    const i = this.within(req);
    if (i >= 0) this.backends[i]!.zero(this.adapt(req, i), mayTrim, fast, fua);
    else this.spread(OP_ZERO, req, i, mayTrim, fast, fua);
  }

  cache(req: IoRequest): void {
    const i = this.within(req);
    if (i >= 0) this.backends[i]!.cache(this.adapt(req, i));
    else this.spread(OP_CACHE, req, i, false, false, false);
  }

  /** Flushes every distinct backend; the first error wins. */
  flush(req: IoRequest): void {
    const u = this.unique;
    if (u.length === 1) {
      u[0]!.flush(req);
      return;
    }
    const j = takeJoin(req);
    for (const b of u) {
      const p = takePart();
      p.join = j;
      p.offset = 0;
      p.length = 0;
      p.buf = req.buf;
      p.bufOffset = req.bufOffset;
      j.pending++;
      b.flush(p);
    }
    j.settle(0);
  }

  extents(offset: number, length: number, max: number, out: Extent[]): number {
    const end = Math.min(offset + length, this.size);
    if (max <= 0 || !(offset >= 0) || offset >= end) return 0;
    let i = this.find(offset);
    if (end <= this.ends[i]! && this.whole[i]!) {
      // Inside one extent that is its whole backend: the child's map is ours as it is.
      return this.backends[i]!.extents(offset - this.starts[i]!, end - offset, max, out);
    }
    const first = out.length;
    const tmp = this.scratch;
    let pushed = 0;
    let last: Extent | undefined;
    let pos = offset;
    for (; pos < end; i++) {
      const start = this.starts[i]!;
      const extLen = this.ends[i]! - start;
      const local = pos - start;
      const want = Math.min(end, this.ends[i]!) - pos;
      tmp.length = 0;
      // One more than the room left: the first run may merge into `last`.
      const errno = this.backends[i]!.extents(local, want, max - pushed + 1, tmp);
      if (errno !== 0) {
        tmp.length = 0;
        out.length = first;
        return errno;
      }
      let at = local;
      let full = true;
      for (const e of tmp) {
        // Clamp to the extent: the child's map may run on past it.
        const len = Math.min(e.length, extLen - at);
        if (len <= 0) break;
        if (last !== undefined && last.hole === e.hole) {
          last.length += len;
        } else if (pushed < max) {
          last = { length: len, hole: e.hole };
          out.push(last);
          pushed++;
        } else {
          full = false;
          break;
        }
        at += len;
      }
      tmp.length = 0;
      pos = start + at;
      // A child that stopped short (its max, or an empty answer): ours stops there too.
      if (!full || at < local + want) break;
    }
    return 0;
  }

  /**
   * Releases this backend's hold on its children, closing those no other open
   * ConcatBackend holds (for one that was never grown: all of them).
   */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const last: Backend[] = [];
    for (const b of this.unique) {
      const n = (holders.get(b) ?? 1) - 1;
      if (n > 0) holders.set(b, n);
      else {
        holders.delete(b);
        last.push(b);
      }
    }
    const results = await Promise.allSettled(last.map((b) => b.close()));
    for (const r of results) if (r.status === 'rejected') throw r.reason;
  }

  /** @internal Testing: adapter objects ever constructed (all ConcatBackends together). */
  static poolStats(): { parts: number; joins: number; freeParts: number; freeJoins: number } {
    return {
      parts: counters.parts,
      joins: counters.joins,
      freeParts: freeParts.length,
      freeJoins: freeJoins.length,
    };
  }
}

function issue(op: number, b: Backend, r: IoRequest, x: boolean, y: boolean, z: boolean): void {
  switch (op) {
    case OP_READ:
      b.read(r);
      break;
    case OP_WRITE:
      b.write(r, x);
      break;
    case OP_TRIM:
      b.trim(r, x);
      break;
    case OP_ZERO:
      b.zero(r, x, y, z);
      break;
    default:
      b.cache(r);
  }
}

/** What every child can do; rotational if any child is. */
function combineCaps(all: readonly BackendCaps[]): BackendCaps {
  const every = (k: Exclude<keyof BackendCaps, 'rotational'>) => all.every((c) => c[k]);
  return Object.freeze({
    write: every('write'),
    flush: every('flush'),
    fua: every('fua'),
    trim: every('trim'),
    zero: every('zero'),
    fastZero: every('fastZero'),
    cache: every('cache'),
    extents: every('extents'),
    multiConn: every('multiConn'),
    rotational: all.some((c) => c.rotational),
  });
}

interface SharedConcat {
  children: SharedBackend[];
  parts: { child: number; length: number }[];
}

/** The factory named by ConcatBackend.share(). */
export async function adoptConcat(d: unknown): Promise<ConcatBackend> {
  const { children, parts } = d as SharedConcat;
  const adopted: Backend[] = [];
  try {
    for (const c of children) adopted.push(await adoptBackend(c));
  } catch (e) {
    for (const b of adopted) await b.close().catch(() => {});
    for (const c of children.slice(adopted.length)) releaseShared(c);
    throw e;
  }
  return new ConcatBackend(parts.map((p) => ({ backend: adopted[p.child]!, length: p.length })));
}
