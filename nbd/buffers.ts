// The data buffers of one thread's connections: READ replies and WRITE
// payloads that are not views of a received chunk. One pool per NbdServer,
// hence per thread (a worker runs one server). It serves two ends:
//
// - Memory is bounded by the server, not by how many clients connect. The
//   pool hands out at most `budget` bytes at a time; a connection whose next
//   request does not fit stops reading until buffers come back (see
//   Connection.request). A connection with nothing in flight is always served,
//   so no client waits on another forever and no request is refused for size.
// - Nothing on the data path waits on the garbage collector. A returned
//   buffer is kept for the next request of any connection, so a burst of new
//   connections reuses the buffers of the ones before them. What is kept and
//   what is handed out stay within twice the budget together (room for the
//   requests of connections with nothing else in flight, which are served
//   past the budget): a buffer dropped to the collector is memory that stays
//   resident until V8 gets to it, and dropping one per request lets the
//   process grow well past what is in use.
//
// Buffers come in power-of-two classes from MIN_CLASS to MAX_CLASS; a larger
// request gets a buffer of its own, counted while in use and dropped after.

const MIN_CLASS_SHIFT = 12;
const MAX_CLASS_SHIFT = 21;
/** Largest buffer kept for reuse (2 MiB). */
export const MAX_CLASS = 1 << MAX_CLASS_SHIFT;
/** Default budget per thread. */
export const DEFAULT_THREAD_BUFFER_BYTES = 16 * 1024 * 1024;
/** Kept and handed-out buffers together stay within this many budgets. */
const KEEP_FACTOR = 2;

/** The size a request of `len` bytes is given (and counted as). */
export function classSize(len: number): number {
  if (len <= 1 << MIN_CLASS_SHIFT) return 1 << MIN_CLASS_SHIFT;
  if (len > MAX_CLASS) return len;
  return 2 ** Math.ceil(Math.log2(len));
}

function classIndex(size: number): number {
  return Math.log2(size) - MIN_CLASS_SHIFT;
}

export class BufferPool {
  /** Bytes handed out and not yet given back. */
  used = 0;
  /** Bytes kept in the free lists. */
  kept = 0;
  private readonly free: Buffer[][] = [];
  private waiters: (() => void)[] = [];
  private waking = false;
  private readonly cap: number;

  constructor(readonly budget: number) {
    this.cap = KEEP_FACTOR * budget;
    for (let i = MIN_CLASS_SHIFT; i <= MAX_CLASS_SHIFT; i++) this.free.push([]);
  }

  /** Whether a buffer for `len` bytes can be handed out now. */
  fits(len: number): boolean {
    return this.used + classSize(len) <= this.budget;
  }

  /** A buffer of at least `len` bytes; give it back with give(). */
  take(len: number): Buffer {
    const size = classSize(len);
    this.used += size;
    if (size <= MAX_CLASS) {
      const list = this.free[classIndex(size)]!;
      const b = list.pop();
      if (b !== undefined) {
        this.kept -= size;
        return b;
      }
      // Kept buffers of other sizes make room (the workload changed).
      if (this.used + this.kept > this.cap) this.trim(Math.max(0, this.cap - this.used));
    }
    return Buffer.allocUnsafeSlow(size);
  }

  give(b: Buffer): void {
    const size = b.length;
    this.used -= size;
    if (size <= MAX_CLASS && this.used + this.kept + size <= this.cap) {
      this.free[classIndex(size)]!.push(b);
      this.kept += size;
    }
    if (this.waiters.length > 0) this.wake();
  }

  /** Call `w` once buffers come back (a connection that stopped reading for want of them). */
  wait(w: () => void): void {
    this.waiters.push(w);
  }

  /** Drop kept buffers until at most `limit` bytes are kept. */
  trim(limit: number): void {
    for (let i = this.free.length - 1; i >= 0 && this.kept > limit; i--) {
      const list = this.free[i]!;
      while (list.length > 0 && this.kept > limit) {
        this.kept -= list.pop()!.length;
      }
    }
  }

  private wake(): void {
    // Everyone waiting asks again, oldest first; whoever still does not fit
    // waits again. Buffers given back during the round wake nobody: each
    // waiter has requests of its own in flight (a connection with none never
    // waits), so their return wakes it later.
    if (this.waking) return;
    this.waking = true;
    const ws = this.waiters;
    this.waiters = [];
    try {
      for (const w of ws) w();
    } finally {
      this.waking = false;
    }
  }
}
