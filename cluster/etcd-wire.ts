// The pure parts of the etcd store (etcd-store.ts), kept apart so that unit
// tests reach them without a cluster: the one error mapping, the key prefix,
// the watch cursor, lease ids and endpoint URLs.

import { status as GrpcStatus } from '@grpc/grpc-js';
import { prefixEnd, StoreError, type StoreErrorCode } from '../agent/store/store.js';

/** Our own per-call deadline fired (grpc's may not have yet: e.g. while connecting). */
export class CallDeadline extends Error {
  constructor(readonly ms: number) {
    super(`no answer within ${ms} ms`);
    this.name = 'CallDeadline';
  }
}

/** The shape of a grpc-js call error (ServiceError / StatusObject). */
interface GrpcErrorLike {
  code: number;
  details?: string;
  message?: string;
}

function isGrpcError(e: unknown): e is GrpcErrorLike {
  return (
    typeof e === 'object' &&
    e !== null &&
    typeof (e as { code?: unknown }).code === 'number' &&
    ('details' in e || 'metadata' in e)
  );
}

// etcd's error texts (server/etcdserver/api/v3rpc/rpctypes) and gRPC's, stable
// across 3.x. Matched on a fragment, since the "etcdserver: " / "mvcc: " heads vary.
const BY_TEXT: [string, StoreErrorCode][] = [
  ['required revision has been compacted', 'STORE_COMPACTED'],
  ['required revision is a future revision', 'STORE_FUTURE_REVISION'],
  ['lease not found', 'STORE_LEASE_NOT_FOUND'],
  // RESOURCE_EXHAUSTED, three ways: the disk quota, a message over gRPC's limit, overload.
  ['database space exceeded', 'STORE_IO'],
  ['larger than max', 'STORE_INVALID_ARGUMENT'],
  ['too many requests', 'STORE_UNAVAILABLE'],
];

/**
 * The one place where a failure of an etcd call becomes a StoreError.
 *
 * - after close(): STORE_CLOSED, whatever the call saw (its cancellation, mostly);
 * - our own deadline, or gRPC DEADLINE_EXCEEDED: STORE_TIMEOUT (retryable: a write
 *   may or may not have happened);
 * - etcd's "compacted" / "future revision" / "lease not found" texts: their codes
 *   (the caller adds compactRevision, which etcd's message does not carry);
 * - gRPC UNAVAILABLE (connection refused or lost, no leader, leader changed, etcd's
 *   own request timeout), CANCELLED (our liveness check cut the stream), and the
 *   transport's INTERNAL/UNKNOWN: STORE_UNAVAILABLE (retryable);
 * - INVALID_ARGUMENT (duplicate key in a txn, too many ops, request too large...)
 *   and FAILED_PRECONDITION, and a request over gRPC's message limit:
 *   STORE_INVALID_ARGUMENT;
 * - etcd's "database space exceeded" alarm: STORE_IO; "too many requests"
 *   (RESOURCE_EXHAUSTED too): STORE_UNAVAILABLE;
 * - PERMISSION_DENIED / UNAUTHENTICATED: STORE_UNAVAILABLE, not retryable.
 */
/**
 * grpc-js's connection failures end with an empty "Resolution note: " and nest the
 * socket error's own "Error: " prefix; what is left is the reason a user can act on.
 */
export function tidyGrpc(text: string): string {
  return text
    .replace(/\s*Resolution note:\s*$/, '')
    .replace(/Last error: Error: /g, 'Last error: ')
    .replace(/\.$/, '');
}

export function toStoreError(e: unknown, what: string, closed = false): StoreError {
  if (e instanceof StoreError) return e;
  if (closed) return new StoreError('STORE_CLOSED', `${what}: the store was closed`, { cause: e });
  if (e instanceof CallDeadline) {
    return new StoreError('STORE_TIMEOUT', `${what}: etcd gave ${e.message}`, { cause: e });
  }
  if (!isGrpcError(e)) {
    const msg = e instanceof Error ? e.message : String(e);
    return new StoreError('STORE_UNAVAILABLE', `${what}: ${msg}`, { cause: e });
  }
  const text = tidyGrpc(e.details || e.message || `gRPC status ${e.code}`);
  const msg = `${what}: ${text}`;
  for (const [fragment, code] of BY_TEXT) {
    if (text.includes(fragment)) return new StoreError(code, msg, { cause: e });
  }
  switch (e.code) {
    case GrpcStatus.DEADLINE_EXCEEDED:
      return new StoreError('STORE_TIMEOUT', msg, { cause: e });
    case GrpcStatus.UNAVAILABLE:
    case GrpcStatus.CANCELLED:
    case GrpcStatus.INTERNAL:
    case GrpcStatus.UNKNOWN:
    case GrpcStatus.ABORTED:
      return new StoreError('STORE_UNAVAILABLE', msg, { cause: e });
    case GrpcStatus.INVALID_ARGUMENT:
    case GrpcStatus.FAILED_PRECONDITION:
    case GrpcStatus.OUT_OF_RANGE:
      return new StoreError('STORE_INVALID_ARGUMENT', msg, { cause: e });
    case GrpcStatus.NOT_FOUND:
      return new StoreError('STORE_INVALID_ARGUMENT', msg, { cause: e });
    case GrpcStatus.RESOURCE_EXHAUSTED:
      return new StoreError('STORE_UNAVAILABLE', msg, { cause: e });
    case GrpcStatus.PERMISSION_DENIED:
    case GrpcStatus.UNAUTHENTICATED:
      return new StoreError('STORE_UNAVAILABLE', `${msg} (etcd refused access)`, {
        cause: e,
        retryable: false,
      });
    default:
      return new StoreError('STORE_UNAVAILABLE', msg, { cause: e });
  }
}

/**
 * The store's keys live under one prefix in etcd's flat key space. Callers
 * never see it, and every range, delete and watch is bounded by it.
 */
export class Keyspace {
  private readonly head: Buffer;

  constructor(readonly prefix: string) {
    if (typeof prefix !== 'string' || prefix === '') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'an etcd store needs a non-empty key prefix');
    }
    this.head = Buffer.from(prefix, 'utf8');
  }

  /** The etcd key of a store key. */
  key(k: string): Buffer {
    return Buffer.from(this.prefix + k, 'utf8');
  }

  /** The etcd range [key, range_end) of the store keys starting with `p` ('' = all of ours). */
  range(p: string): { key: Buffer; range_end: Buffer } {
    const full = this.prefix + p;
    // full is non-empty, so prefixEnd gives a bound.
    return { key: Buffer.from(full, 'utf8'), range_end: prefixEnd(full)! };
  }

  /** The store key of an etcd key; STORE_CORRUPT for a key outside the prefix (never asked for). */
  strip(k: Buffer): string {
    if (k.length < this.head.length || !k.subarray(0, this.head.length).equals(this.head)) {
      throw new StoreError('STORE_CORRUPT', `etcd returned a key outside ${this.prefix}`);
    }
    return k.subarray(this.head.length).toString('utf8');
  }

  /** A key no store key can be (store keys are non-empty): for revision-only reads. */
  probeKey(): Buffer {
    return this.head;
  }
}

/**
 * Where a watch resumes. It moves only with what was delivered: past the last
 * event of a response once the whole response was handed over (etcd never
 * splits a revision across responses unless asked to fragment, which we do
 * not). A response's header revision is never used: etcd may report progress
 * past events it has not sent on this stream yet.
 */
export class WatchCursor {
  constructor(
    /** The first revision not delivered yet: where a re-created watch starts. */
    public next: number,
  ) {}

  /** The events of one response that were not delivered before (a resumed watch may repeat some). */
  fresh<T extends { revision: number }>(events: readonly T[]): T[] {
    return events.filter((e) => e.revision >= this.next);
  }

  /** The events up to `revision` were delivered. */
  delivered(revision: number): void {
    if (revision + 1 > this.next) this.next = revision + 1;
  }
}

const INT64_MAX = (1n << 63n) - 1n;

/**
 * etcd's lease id (int64, decimal) from our string form; undefined when the
 * string cannot be an etcd lease (so no such lease exists).
 */
export function parseLeaseId(id: unknown): string | undefined {
  if (typeof id !== 'string' || !/^[1-9][0-9]{0,18}$/.test(id)) return undefined;
  return BigInt(id) <= INT64_MAX ? id : undefined;
}

/** An etcd uint64 id (decimal string from the wire) as 16 hex digits, as etcdctl prints ids. */
export function hexId(id: string | number | undefined): string {
  if (id === undefined || id === '' || id === '0' || id === 0) return '';
  return BigInt(id).toString(16).padStart(16, '0');
}

export interface Endpoint {
  /** host:port as grpc dials it. */
  target: string;
  tls: boolean;
  /** As given. */
  url: string;
}

/** 'http://127.0.0.1:2379', 'https://[::1]:2379' or '127.0.0.1:2379'. */
export function parseEndpoint(url: string): Endpoint {
  if (typeof url !== 'string' || url === '') {
    throw new StoreError('STORE_INVALID_ARGUMENT', 'an etcd endpoint must be a non-empty string');
  }
  const withScheme = /^[a-z]+:\/\//i.test(url) ? url : `http://${url}`;
  let u: URL;
  try {
    u = new URL(withScheme);
  } catch {
    throw new StoreError('STORE_INVALID_ARGUMENT', `bad etcd endpoint ${url}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new StoreError('STORE_INVALID_ARGUMENT', `etcd endpoint ${url}: use http:// or https://`);
  }
  if (!u.port || (u.pathname !== '/' && u.pathname !== '')) {
    throw new StoreError('STORE_INVALID_ARGUMENT', `etcd endpoint ${url}: give host:port only`);
  }
  return { target: `${u.hostname}:${u.port}`, tls: u.protocol === 'https:', url };
}
