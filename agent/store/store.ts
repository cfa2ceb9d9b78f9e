// The agent's durable local state, behind an interface modelled on etcd v3
// (KV, Txn, Watch, Lease) so that the cluster layer can later put an etcd
// implementation behind the same calls. SqliteStore (sqlite-store.ts) is the
// single-host implementation; MemoryStore (test/helpers/memory-store.ts) is for
// unit tests of callers.
//
// Semantics follow etcd v3 wherever the two could differ:
//
// - Keys and values are strings, stored as UTF-8. Keys order (in `range` and in
//   value comparisons) by their UTF-8 bytes, as etcd orders them. An empty key
//   is refused. Binary values are the caller's to encode (base64).
// - The store has one revision counter. A fresh store is at revision 1. Every
//   transaction that changes something is given the next revision, once, and
//   every key it writes carries that revision as its modRevision. Reads, failed
//   compares without writes, and deletes that delete nothing change nothing, so
//   they leave the revision alone.
// - Each key has a version: 1 when it is created, +1 on every put, and the key
//   is gone (version 0) after a delete. A missing key compares as version 0,
//   createRevision 0, modRevision 0; a `value` compare on a missing key is
//   always false (etcd cannot tell a missing value from an empty one).
// - Compaction forgets history: after `compact(r)`, reads at a revision below r
//   and watches from a revision below r fail with STORE_COMPACTED.
import { BallastError } from '../errors.js';

/** A key as stored. Revisions are store revisions; `lease` is set while the key is attached to one. */
export interface KeyValue {
  key: string;
  value: string;
  /** The revision of the put that created this incarnation of the key. */
  createRevision: number;
  /** The revision of the last put to the key. */
  modRevision: number;
  /** Puts since the key was created: 1 for a new key. */
  version: number;
  /** The lease the key is attached to, if any: the key is deleted when the lease expires or is revoked. */
  lease?: string;
}

export type CompareOp = '=' | '!=' | '<' | '>';

/** One comparison of a transaction's guard. All must hold for the success branch to run. */
export type Compare =
  | { key: string; target: 'value'; op: CompareOp; value: string }
  | {
      key: string;
      target: 'version' | 'createRevision' | 'modRevision';
      op: CompareOp;
      value: number;
    };

const numeric =
  (target: 'version' | 'createRevision' | 'modRevision') =>
  (key: string, op: CompareOp, value: number): Compare => ({ key, target, op, value });

/** Builders for Compare, so a guard reads `cmp.version('a', '=', 0)`. */
export const cmp = {
  value: (key: string, op: CompareOp, value: string): Compare => ({
    key,
    target: 'value',
    op,
    value,
  }),
  version: numeric('version'),
  createRevision: numeric('createRevision'),
  modRevision: numeric('modRevision'),
} as const;

/**
 * One operation of a transaction branch. Operations run in order and later ones
 * see what earlier ones wrote. As in etcd, a branch may not put the same key
 * twice nor put a key that one of its deletes covers (STORE_INVALID_ARGUMENT).
 */
export type Op =
  /** Write `value` to `key`. Without `lease`, the key is detached from any lease it had (etcd). */
  | { type: 'put'; key: string; value: string; lease?: string }
  | { type: 'delete'; key: string }
  /** Delete every key starting with `prefix` ('' = every key). */
  | { type: 'deletePrefix'; prefix: string }
  | { type: 'get'; key: string }
  /** The keys starting with `prefix`, in key order, at most `limit` of them (0 or absent: all). */
  | { type: 'range'; prefix: string; limit?: number };

/** Builders for Op. */
export const op = {
  put: (key: string, value: string, opts?: { lease?: string }): Op =>
    opts?.lease === undefined
      ? { type: 'put', key, value }
      : { type: 'put', key, value, lease: opts.lease },
  delete: (key: string): Op => ({ type: 'delete', key }),
  deletePrefix: (prefix: string): Op => ({ type: 'deletePrefix', prefix }),
  get: (key: string): Op => ({ type: 'get', key }),
  range: (prefix: string, opts?: { limit?: number }): Op =>
    opts?.limit === undefined
      ? { type: 'range', prefix }
      : { type: 'range', prefix, limit: opts.limit },
} as const;

/** The result of one Op, in the same position as the Op in its branch. */
export type OpResponse =
  | { type: 'put'; prevKv?: KeyValue }
  | { type: 'delete' | 'deletePrefix'; deleted: number; prevKvs: KeyValue[] }
  | { type: 'get'; kv?: KeyValue }
  | { type: 'range'; kvs: KeyValue[]; more: boolean };

export interface TxnRequest {
  compare: Compare[];
  success: Op[];
  failure?: Op[];
}

export interface TxnResult {
  /** Whether every compare held (and so `success` ran rather than `failure`). */
  succeeded: boolean;
  /** The store revision after the transaction: its own revision if it wrote anything. */
  revision: number;
  /** One response per Op of the branch that ran. */
  responses: OpResponse[];
}

export interface RangeOptions {
  /** At most this many keys (0 or absent: all). `more` tells whether some were left out. */
  limit?: number;
  /**
   * Read the keys as they were at this revision. It must be at least the
   * compaction point (else STORE_COMPACTED) and at most the current revision
   * (else STORE_FUTURE_REVISION). An implementation may refuse it with
   * STORE_UNSUPPORTED.
   */
  revision?: number;
  /**
   * Start at this key (inclusive) rather than at the prefix: for reading a long
   * range in pages (the last key of a page plus "\0"). It must start with the prefix.
   */
  from?: string;
}

export interface RangeResult {
  kvs: KeyValue[];
  /** Whether `limit` left keys out. */
  more: boolean;
  /** The store's current revision (not the one read at). */
  revision: number;
}

export interface PutResult {
  revision: number;
  prevKv?: KeyValue;
}

export interface DeleteResult {
  /** The store revision after the delete (unchanged if nothing was deleted). */
  revision: number;
  deleted: number;
  prevKvs: KeyValue[];
}

export interface CasResult {
  succeeded: boolean;
  revision: number;
  /** On success the key as written; on failure the key as it is (absent if it is missing). */
  kv?: KeyValue;
}

export interface WatchEvent {
  type: 'put' | 'delete';
  /**
   * The key after the event. For a delete: the key, an empty value, version 0,
   * createRevision 0 and modRevision = the deleting revision (as etcd sends it).
   */
  kv: KeyValue;
  /** The key before the event, if it existed. */
  prevKv?: KeyValue;
  /** The revision of the transaction that made the event. */
  revision: number;
}

export interface WatchOptions {
  /**
   * Deliver every event from this revision on (inclusive): first the ones
   * already in history, in order, then live ones, none missed and none twice.
   * Absent or 0: only events after the current revision. A revision below the
   * compaction point fails the watch with STORE_COMPACTED.
   */
  fromRevision?: number;
  /**
   * Called once per event, in revision order (and in operation order within a
   * revision), never synchronously inside the call that caused it.
   */
  onEvent(ev: WatchEvent): void;
  /**
   * Called at most once, when the watch ends by itself: the store was closed
   * (STORE_CLOSED, after the events already committed were delivered), the
   * watcher fell behind a compaction (STORE_COMPACTED, etcd only), or onEvent
   * threw (the thrown error; the watch is cancelled). Without onError, an error
   * thrown by onEvent is rethrown as an uncaught exception.
   */
  onError?(err: unknown): void;
}

export interface Watcher {
  /** Stop the watch. No event is delivered after cancel() is called. */
  cancel(): Promise<void>;
}

export interface Store {
  /** The key, or undefined if it is missing. */
  get(key: string): Promise<KeyValue | undefined>;
  /** The keys starting with `prefix` ('' = all), in key order. */
  range(prefix: string, opts?: RangeOptions): Promise<RangeResult>;
  /** If every compare holds run `success`, else `failure`; atomically, as one revision. */
  txn(req: TxnRequest): Promise<TxnResult>;

  put(key: string, value: string, opts?: { lease?: string }): Promise<PutResult>;
  delete(key: string): Promise<DeleteResult>;
  deletePrefix(prefix: string): Promise<DeleteResult>;
  /** Put only if the key is missing (compare version = 0). */
  createIfAbsent(key: string, value: string, opts?: { lease?: string }): Promise<CasResult>;
  /** Put only if the key's modRevision is still `modRevision` (0: only if it is missing). */
  updateIf(
    key: string,
    value: string,
    modRevision: number,
    opts?: { lease?: string },
  ): Promise<CasResult>;
  /** Delete only if the key's modRevision is still `modRevision`. `kv` is the key as it was. */
  deleteIf(key: string, modRevision: number): Promise<CasResult>;

  /**
   * Watch the keys starting with `prefix` ('' = all). Resolves once the watch
   * is in place, after which no write is missed; rejects with STORE_COMPACTED
   * if `fromRevision` is below the compaction point. A `fromRevision` beyond
   * the current revision simply waits for that revision.
   */
  watch(prefix: string, opts: WatchOptions): Promise<Watcher>;

  /**
   * A lease of `ttlSeconds` (a whole number >= 1). Keys put with it are deleted
   * (in one revision) when it expires or is revoked. Returns the lease id.
   */
  grantLease(ttlSeconds: number): Promise<string>;
  /** Restart the lease's TTL. Resolves to the TTL; STORE_LEASE_NOT_FOUND if it expired or never was. */
  keepAlive(id: string): Promise<number>;
  /** End the lease now and delete its keys. STORE_LEASE_NOT_FOUND if there is no such lease. */
  revokeLease(id: string): Promise<void>;

  /**
   * Forget the history before `revision`. STORE_COMPACTED if it is not above the
   * current compaction point, STORE_FUTURE_REVISION if it is above the current revision.
   */
  compact(revision: number): Promise<void>;
  /** The current store revision. */
  revision(): Promise<number>;
  /** The compaction point: history from this revision on is kept (0: none forgotten yet). */
  compactRevision(): Promise<number>;
  /** Close the store. Watches end with STORE_CLOSED; later calls fail with STORE_CLOSED. Idempotent. */
  close(): Promise<void>;
}

/**
 * Stable error codes. Match on these, not on messages.
 *
 * - STORE_CONFLICT: a compare-and-swap the caller required failed (see `requireSucceeded`).
 * - STORE_COMPACTED: the revision asked for has been compacted away. `compactRevision` says from where history is kept.
 * - STORE_FUTURE_REVISION: a read or compaction at a revision the store has not reached.
 * - STORE_CLOSED: the store was closed.
 * - STORE_CORRUPT: the database fails its integrity check, or its bookkeeping is inconsistent.
 * - STORE_SCHEMA: the database was written by a newer (or unknown) schema version.
 * - STORE_LOCKED: another process (or another open in this one) holds the store.
 * - STORE_LEASE_NOT_FOUND: the lease expired, was revoked, or never existed.
 * - STORE_INVALID_ARGUMENT: an empty key, a bad TTL or limit, a key put twice in one transaction...
 * - STORE_UNSUPPORTED: this implementation does not support the option.
 * - STORE_IO: the disk failed (I/O error, disk full, read-only file system).
 * - STORE_UNAVAILABLE: the backend cannot be reached for now (etcd: no leader, connection lost). Retryable.
 * - STORE_TIMEOUT: the backend did not answer in time (etcd). Retryable: the write may or may not have happened.
 */
export type StoreErrorCode =
  | 'STORE_CONFLICT'
  | 'STORE_COMPACTED'
  | 'STORE_FUTURE_REVISION'
  | 'STORE_CLOSED'
  | 'STORE_CORRUPT'
  | 'STORE_SCHEMA'
  | 'STORE_LOCKED'
  | 'STORE_LEASE_NOT_FOUND'
  | 'STORE_INVALID_ARGUMENT'
  | 'STORE_UNSUPPORTED'
  | 'STORE_IO'
  | 'STORE_UNAVAILABLE'
  | 'STORE_TIMEOUT';

const RETRYABLE: ReadonlySet<StoreErrorCode> = new Set(['STORE_UNAVAILABLE', 'STORE_TIMEOUT']);

export class StoreError extends BallastError {
  declare readonly code: StoreErrorCode;
  /** Whether the same call may succeed if tried again (a transient backend failure). */
  readonly retryable: boolean;
  /** For STORE_COMPACTED: the compaction point, from which history is still kept. */
  readonly compactRevision?: number;

  constructor(
    code: StoreErrorCode,
    message: string,
    options?: { cause?: unknown; compactRevision?: number; retryable?: boolean },
  ) {
    super(code, message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'StoreError';
    this.retryable = options?.retryable ?? RETRYABLE.has(code);
    if (options?.compactRevision !== undefined) this.compactRevision = options.compactRevision;
  }
}

export function isStoreError(e: unknown, code?: StoreErrorCode): e is StoreError {
  return e instanceof StoreError && (code === undefined || e.code === code);
}

/**
 * A change that failed with its verdict: `made` false (NOT made: nothing
 * changed, and nothing will) or null (may have been made: `outcome` resolves to
 * whether it was, once etcd answers). Not retryable by the store's callers:
 * the verdict is final, a retry is the operator's (or the command's) to make.
 * A cluster's guarded store (cluster/changes.ts) throws it.
 */
export class ChangeError extends StoreError {
  readonly made: false | null;
  readonly outcome: Promise<boolean> | undefined;

  constructor(
    code: 'STORE_UNAVAILABLE' | 'STORE_TIMEOUT',
    message: string,
    made: false | null,
    outcome?: Promise<boolean>,
    cause?: unknown,
  ) {
    super(code, message, { retryable: false, ...(cause === undefined ? {} : { cause }) });
    this.made = made;
    this.outcome = outcome;
  }
}

export function isChangeError(e: unknown): e is ChangeError {
  return e instanceof ChangeError;
}

/**
 * Runs a store call until it answers, through retryable failures (an etcd election, a
 * member restarting) for up to `forMs`; any other failure, or the last one, is thrown.
 */
export async function untilAnswered<T>(fn: () => Promise<T>, forMs = 20_000): Promise<T> {
  const until = performance.now() + forMs;
  for (;;) {
    try {
      return await fn();
    } catch (e) {
      if (!isStoreError(e) || !e.retryable || performance.now() > until) throw e;
      await new Promise((r) => setTimeout(r, 200));
    }
  }
}

/** Throw STORE_CONFLICT unless the CAS succeeded; returns the result for chaining. */
export function requireSucceeded<T extends { succeeded: boolean }>(res: T, what: string): T {
  if (!res.succeeded) throw new StoreError('STORE_CONFLICT', `${what}: the compare failed`);
  return res;
}

// ---- helpers shared by the implementations ----

/** The first key after every key that starts with `prefix`, as UTF-8 bytes; undefined for ''. */
export function prefixEnd(prefix: string): Buffer | undefined {
  if (prefix === '') return undefined;
  // No UTF-8 string contains the byte 0xff, so prefix + 0xff sorts after every
  // key that starts with prefix and before every other key that sorts after it.
  return Buffer.concat([Buffer.from(prefix, 'utf8'), Buffer.from([0xff])]);
}

/** Compares two strings by their UTF-8 bytes, as etcd orders keys and values. */
export function compareBytes(a: string, b: string): number {
  if (a === b) return 0;
  return Buffer.compare(Buffer.from(a, 'utf8'), Buffer.from(b, 'utf8'));
}

/** Evaluates one compare against the key's current state (undefined: missing). */
export function evalCompare(c: Compare, kv: KeyValue | undefined): boolean {
  let d: number;
  if (c.target === 'value') {
    if (kv === undefined) return false;
    d = compareBytes(kv.value, c.value);
  } else {
    const actual = kv === undefined ? 0 : kv[c.target];
    d = actual === c.value ? 0 : actual < c.value ? -1 : 1;
  }
  switch (c.op) {
    case '=':
      return d === 0;
    case '!=':
      return d !== 0;
    case '<':
      return d < 0;
    case '>':
      return d > 0;
    default:
      throw new StoreError('STORE_INVALID_ARGUMENT', `unknown compare operator ${String(c.op)}`);
  }
}

export function checkKey(key: unknown, what = 'key'): asserts key is string {
  if (typeof key !== 'string' || key === '') {
    throw new StoreError('STORE_INVALID_ARGUMENT', `${what} must be a non-empty string`);
  }
}

function checkCompare(c: Compare): void {
  checkKey(c.key, 'compare key');
  if (!['=', '!=', '<', '>'].includes(c.op)) {
    throw new StoreError('STORE_INVALID_ARGUMENT', `unknown compare operator ${String(c.op)}`);
  }
  if (c.target === 'value') {
    if (typeof c.value !== 'string') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'a value compare needs a string');
    }
  } else if (
    c.target === 'version' ||
    c.target === 'createRevision' ||
    c.target === 'modRevision'
  ) {
    if (!Number.isSafeInteger(c.value) || c.value < 0) {
      throw new StoreError(
        'STORE_INVALID_ARGUMENT',
        `a ${c.target} compare needs a whole number >= 0`,
      );
    }
  } else {
    throw new StoreError(
      'STORE_INVALID_ARGUMENT',
      `unknown compare target ${String((c as { target: unknown }).target)}`,
    );
  }
}

/** The lower bound of a range: `from` if given (it must lie within the prefix), else the prefix. */
export function rangeStart(prefix: string, from: string | undefined): string {
  if (from === undefined) return prefix;
  if (typeof from !== 'string' || !from.startsWith(prefix)) {
    throw new StoreError(
      'STORE_INVALID_ARGUMENT',
      `a range's start key must begin with its prefix ${JSON.stringify(prefix)}`,
    );
  }
  return from;
}

export function checkLimit(limit: number | undefined): number {
  if (limit === undefined) return 0;
  if (!Number.isSafeInteger(limit) || limit < 0) {
    throw new StoreError('STORE_INVALID_ARGUMENT', 'limit must be a whole number >= 0');
  }
  return limit;
}

/**
 * Validates a branch as etcd does: well-formed ops, no key put twice, and no
 * put of a key that a delete in the same branch covers.
 */
function checkBranch(ops: Op[]): void {
  const puts = new Set<string>();
  const deletedKeys: string[] = [];
  const deletedPrefixes: string[] = [];
  for (const o of ops) {
    switch (o.type) {
      case 'put':
        checkKey(o.key);
        if (typeof o.value !== 'string') {
          throw new StoreError('STORE_INVALID_ARGUMENT', `the value for ${o.key} must be a string`);
        }
        if (o.lease !== undefined && (typeof o.lease !== 'string' || o.lease === '')) {
          throw new StoreError('STORE_INVALID_ARGUMENT', 'a lease id must be a non-empty string');
        }
        if (puts.has(o.key)) {
          throw new StoreError('STORE_INVALID_ARGUMENT', `duplicate key given in txn: ${o.key}`);
        }
        puts.add(o.key);
        break;
      case 'delete':
        checkKey(o.key);
        deletedKeys.push(o.key);
        break;
      case 'deletePrefix':
        if (typeof o.prefix !== 'string') {
          throw new StoreError('STORE_INVALID_ARGUMENT', 'a prefix must be a string');
        }
        deletedPrefixes.push(o.prefix);
        break;
      case 'get':
        checkKey(o.key);
        break;
      case 'range':
        if (typeof o.prefix !== 'string') {
          throw new StoreError('STORE_INVALID_ARGUMENT', 'a prefix must be a string');
        }
        checkLimit(o.limit);
        break;
      default:
        throw new StoreError(
          'STORE_INVALID_ARGUMENT',
          `unknown op type ${String((o as { type: unknown }).type)}`,
        );
    }
  }
  for (const k of puts) {
    if (deletedKeys.includes(k) || deletedPrefixes.some((p) => k.startsWith(p))) {
      throw new StoreError('STORE_INVALID_ARGUMENT', `key ${k} is both put and deleted in one txn`);
    }
  }
}

export function checkTxn(req: TxnRequest): void {
  if (typeof req !== 'object' || req === null || !Array.isArray(req.compare)) {
    throw new StoreError('STORE_INVALID_ARGUMENT', 'a txn needs compare, success (and failure)');
  }
  if (!Array.isArray(req.success) || (req.failure !== undefined && !Array.isArray(req.failure))) {
    throw new StoreError('STORE_INVALID_ARGUMENT', 'a txn needs compare, success (and failure)');
  }
  for (const c of req.compare) checkCompare(c);
  checkBranch(req.success);
  if (req.failure) checkBranch(req.failure);
}

export function checkTtl(ttlSeconds: number): void {
  if (!Number.isSafeInteger(ttlSeconds) || ttlSeconds < 1) {
    throw new StoreError(
      'STORE_INVALID_ARGUMENT',
      'a lease TTL must be a whole number of seconds >= 1',
    );
  }
}

export function checkRevision(rev: number, what: string): void {
  if (!Number.isSafeInteger(rev) || rev < 0) {
    throw new StoreError('STORE_INVALID_ARGUMENT', `${what} must be a whole number >= 0`);
  }
}

/** The delete event's kv, as etcd sends it. */
export function tombstone(key: string, revision: number): KeyValue {
  return { key, value: '', createRevision: 0, modRevision: revision, version: 0 };
}

/**
 * The convenience calls, written once over `txn` so that every implementation
 * (SQLite now, etcd later) gives them the same meaning.
 */
export abstract class TxnStore implements Store {
  abstract get(key: string): Promise<KeyValue | undefined>;
  abstract range(prefix: string, opts?: RangeOptions): Promise<RangeResult>;
  abstract txn(req: TxnRequest): Promise<TxnResult>;
  abstract watch(prefix: string, opts: WatchOptions): Promise<Watcher>;
  abstract grantLease(ttlSeconds: number): Promise<string>;
  abstract keepAlive(id: string): Promise<number>;
  abstract revokeLease(id: string): Promise<void>;
  abstract compact(revision: number): Promise<void>;
  abstract revision(): Promise<number>;
  abstract compactRevision(): Promise<number>;
  abstract close(): Promise<void>;

  async put(key: string, value: string, opts?: { lease?: string }): Promise<PutResult> {
    const r = await this.txn({ compare: [], success: [op.put(key, value, opts)] });
    const res = r.responses[0];
    const out: PutResult = { revision: r.revision };
    if (res?.type === 'put' && res.prevKv) out.prevKv = res.prevKv;
    return out;
  }

  delete(key: string): Promise<DeleteResult> {
    return this.deleteOp(op.delete(key));
  }

  deletePrefix(prefix: string): Promise<DeleteResult> {
    return this.deleteOp(op.deletePrefix(prefix));
  }

  private async deleteOp(o: Op): Promise<DeleteResult> {
    const r = await this.txn({ compare: [], success: [o] });
    const res = r.responses[0];
    if (res?.type !== 'delete' && res?.type !== 'deletePrefix') {
      throw new StoreError('STORE_CORRUPT', 'a delete returned no delete response');
    }
    return { revision: r.revision, deleted: res.deleted, prevKvs: res.prevKvs };
  }

  createIfAbsent(key: string, value: string, opts?: { lease?: string }): Promise<CasResult> {
    return this.casPut(key, value, cmp.version(key, '=', 0), opts);
  }

  updateIf(
    key: string,
    value: string,
    modRevision: number,
    opts?: { lease?: string },
  ): Promise<CasResult> {
    return this.casPut(key, value, cmp.modRevision(key, '=', modRevision), opts);
  }

  private async casPut(
    key: string,
    value: string,
    guard: Compare,
    opts?: { lease?: string },
  ): Promise<CasResult> {
    const r = await this.txn({
      compare: [guard],
      success: [op.put(key, value, opts), op.get(key)],
      failure: [op.get(key)],
    });
    const got = r.responses[r.succeeded ? 1 : 0];
    const out: CasResult = { succeeded: r.succeeded, revision: r.revision };
    if (got?.type === 'get' && got.kv) out.kv = got.kv;
    return out;
  }

  async deleteIf(key: string, modRevision: number): Promise<CasResult> {
    const r = await this.txn({
      compare: [cmp.modRevision(key, '=', modRevision)],
      success: [op.delete(key)],
      failure: [op.get(key)],
    });
    const res = r.responses[0];
    const out: CasResult = { succeeded: r.succeeded, revision: r.revision };
    if (res?.type === 'delete' && res.prevKvs[0]) out.kv = res.prevKvs[0];
    if (res?.type === 'get' && res.kv) out.kv = res.kv;
    return out;
  }
}
