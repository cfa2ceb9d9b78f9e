// The Store (agent/store/store.ts) on an etcd 3.4+ cluster, spoken to directly
// over gRPC (@grpc/grpc-js, etcd's own protos as the etcd3 package ships them).
// A thin client rather than the etcd3 library because the guarantees below need
// control the library hides: its watch resumes from response header revisions,
// its leases keep themselves alive, its retry policy re-sends calls.
//
// Keys: every key lives under `prefix` (Keyspace in etcd-wire.ts). Callers see
// keys without it; ranges, deletes and watches are bounded by it, so several
// stores (clusters, tests) share one etcd without seeing each other.
//
// Revisions: etcd's own. revision() is the header revision of a read;
// createRevision, modRevision and version are what etcd reports. The revision is
// the whole etcd cluster's, so other prefixes' writes advance it too.
//
// Leases: etcd leases; the id is etcd's int64 in decimal. keepAlive() is one
// round of LeaseKeepAlive (etcd answers TTL <= 0 for a lease it does not know:
// STORE_LEASE_NOT_FOUND). Nothing is kept alive behind the caller's back.
// etcd's minimum TTL is 1.5 election timeouts (2 s with default settings): a
// shorter TTL is granted as that minimum, and keepAlive() returns it.
//
// Compaction point: etcd does not report it, except to a watch that starts
// below it, and only after the watch was created. compactRevision() finds it by
// binary search with revision-only reads at past revisions (a read at r fails
// as compacted iff r < the point): about log2(revision) reads, each a few
// milliseconds on a LAN. It returns 0 when nothing was forgotten (a read at
// revision 1 works). The last point found is checked first next time (two
// reads when it has not moved).
//
// Watch: one gRPC stream per watch, created with prev_kv. The watcher keeps its
// own cursor, the revision after the last event it delivered; after any stream
// failure (member killed, connection reset, no leader, silence) it re-creates
// the watch from the cursor on the next endpoint, with backoff, so events come
// exactly once and in order across reconnects. A silent stream is found by
// asking etcd for progress (WatchProgressRequest) when nothing came for
// timeoutMs, and cut when nothing came for twice that. A resume below the
// compaction point ends the watch with onError(STORE_COMPACTED, compactRevision).
// watch() itself checks fromRevision against the compaction point first (one
// read at that revision), because etcd reports it only after "created".
//
// Calls: one endpoint at a time; a call that fails as unavailable or times out
// moves later calls to the next endpoint. Reads (get, range, revision) retry on
// the other endpoints within their deadline; writes never retry (a timed-out
// write may have happened: the caller decides). Every call has a deadline
// (timeoutMs), enforced by gRPC and by our own timer, so a black-holed peer
// cannot hang it. watch() and compactRevision() make several round trips within
// one deadline; a STORE_COMPACTED error may take one more to find the
// compaction point it reports. Calls carry etcd's "hasleader" metadata, so a
// member cut off from its quorum answers "no leader" at once instead of waiting.
//
// Errors: toStoreError (etcd-wire.ts) is the one mapping; see its comment.

import { readFileSync } from 'node:fs';
import { createRequire } from 'node:module';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import * as grpc from '@grpc/grpc-js';
import * as protoLoader from '@grpc/proto-loader';
import {
  type Compare,
  checkKey,
  checkLimit,
  checkRevision,
  checkTtl,
  checkTxn,
  type KeyValue,
  type Op,
  type OpResponse,
  type RangeOptions,
  type RangeResult,
  rangeStart,
  StoreError,
  type TxnRequest,
  type TxnResult,
  TxnStore,
  tombstone,
  type WatchEvent,
  type Watcher,
  type WatchOptions,
} from '../agent/store/store.js';
import {
  CallDeadline,
  type Endpoint,
  hexId,
  Keyspace,
  parseEndpoint,
  parseLeaseId,
  toStoreError,
  WatchCursor,
} from './etcd-wire.js';

export interface EtcdStoreOptions {
  /** Client URLs of the etcd members: http(s)://host:port. */
  endpoints: string[];
  /** Every key lives under this prefix, e.g. '/ballast/prod/'. Non-empty. */
  prefix: string;
  /** PEM files for https endpoints: the CA that signed etcd's certificates, and a client certificate and key. */
  ca?: string;
  cert?: string;
  key?: string;
  /** Deadline of each call, in ms (default 5000). */
  timeoutMs?: number;
  /** Called after each unary call (success or not) with its name and duration, for metrics. */
  onRoundTrip?: (op: string, seconds: number) => void;
}

export interface EtcdEndpointStatus {
  url: string;
  ok: boolean;
  /** Whether this member is the leader. */
  leader: boolean;
  /** 16 hex digits; '' when the member did not answer. */
  memberId: string;
  version?: string;
  dbSize?: number;
  error?: string;
}

export interface EtcdStatus {
  endpoints: EtcdEndpointStatus[];
  /** '' when no answering member knows a leader. */
  leaderId: string;
  revision: number;
  raftTerm: number;
  clusterId: string;
}

export interface EtcdMemberInfo {
  id: string;
  name: string;
  peerUrls: string[];
  clientUrls: string[];
  isLearner: boolean;
}

// ---- the wire messages we use (proto-loader with longs as decimal strings) ----

interface PbHeader {
  cluster_id: string;
  member_id: string;
  revision: string;
  raft_term: string;
}
interface PbKv {
  key: Buffer;
  create_revision: string;
  mod_revision: string;
  version: string;
  value: Buffer;
  lease: string;
}
interface PbRangeResponse {
  header: PbHeader;
  kvs: PbKv[];
  more: boolean;
}
interface PbResponseOp {
  response_range?: PbRangeResponse | null;
  response_put?: { prev_kv: PbKv | null } | null;
  response_delete_range?: { deleted: string; prev_kvs: PbKv[] } | null;
}
interface PbTxnResponse {
  header: PbHeader;
  succeeded: boolean;
  responses: PbResponseOp[];
}
interface PbEvent {
  type: number;
  kv: PbKv | null;
  prev_kv: PbKv | null;
}
interface PbWatchResponse {
  header: PbHeader | null;
  watch_id: string;
  created: boolean;
  canceled: boolean;
  compact_revision: string;
  cancel_reason: string;
  events: PbEvent[];
}
interface PbStatusResponse {
  header: PbHeader;
  version: string;
  dbSize: string;
  leader: string;
  raftTerm: string;
}
interface PbMember {
  ID: string;
  name: string;
  peerURLs: string[];
  clientURLs: string[];
  isLearner: boolean;
}

type Service = 'KV' | 'Watch' | 'Lease' | 'Cluster' | 'Maintenance';
type ServiceCtor = new (
  target: string,
  creds: grpc.ChannelCredentials,
  options?: grpc.ClientOptions,
) => grpc.Client;

let services: Record<Service, ServiceCtor> | undefined;

function loadServices(): Record<Service, ServiceCtor> {
  if (services) return services;
  const require = createRequire(import.meta.url);
  const dir = path.dirname(require.resolve('etcd3/package.json'));
  const def = protoLoader.loadSync(path.join(dir, 'proto', 'rpc.proto'), {
    keepCase: true,
    longs: String,
    // etcd's enum numbers, whatever names a proto file gives them.
    enums: Number,
    defaults: true,
    oneofs: true,
  });
  const pkg = grpc.loadPackageDefinition(def).etcdserverpb as unknown as Record<
    Service,
    ServiceCtor
  >;
  services = {
    KV: pkg.KV,
    Watch: pkg.Watch,
    Lease: pkg.Lease,
    Cluster: pkg.Cluster,
    Maintenance: pkg.Maintenance,
  };
  return services;
}

type UnaryMethod = (
  req: unknown,
  md: grpc.Metadata,
  opts: grpc.CallOptions,
  cb: (err: grpc.ServiceError | null, res: unknown) => void,
) => grpc.ClientUnaryCall;
type DuplexMethod = (
  md: grpc.Metadata,
  opts?: grpc.CallOptions,
) => grpc.ClientDuplexStream<unknown, unknown>;

/** One member: a channel and the service clients on it. */
class Member {
  readonly clients: Record<Service, grpc.Client>;
  private readonly channel: grpc.Channel;

  constructor(
    readonly endpoint: Endpoint,
    creds: grpc.ChannelCredentials,
  ) {
    const svc = loadServices();
    const options: grpc.ChannelOptions = {
      'grpc.max_receive_message_length': 64 * 1024 * 1024,
      // A restarted member is found again within a second.
      'grpc.initial_reconnect_backoff_ms': 100,
      'grpc.max_reconnect_backoff_ms': 1000,
      // One channel per member, not shared with other stores through grpc's global pool.
      'grpc.use_local_subchannel_pool': 1,
    };
    this.channel = new grpc.Channel(endpoint.target, creds, options);
    const mk = (s: Service) =>
      new svc[s](endpoint.target, creds, { channelOverride: this.channel });
    this.clients = {
      KV: mk('KV'),
      Watch: mk('Watch'),
      Lease: mk('Lease'),
      Cluster: mk('Cluster'),
      Maintenance: mk('Maintenance'),
    };
  }

  unary(service: Service, method: string): UnaryMethod {
    const c = this.clients[service] as unknown as Record<string, UnaryMethod>;
    const m = c[method];
    if (!m) throw new Error(`etcd ${service} has no method ${method}`);
    return m.bind(c);
  }

  duplex(service: Service, method: string): DuplexMethod {
    const c = this.clients[service] as unknown as Record<string, DuplexMethod>;
    const m = c[method];
    if (!m) throw new Error(`etcd ${service} has no method ${method}`);
    return m.bind(c);
  }

  close(): void {
    for (const c of Object.values(this.clients)) c.close();
    this.channel.close();
  }
}

// etcd's Compare.CompareTarget, Compare.CompareResult and mvccpb.Event.EventType numbers.
const COMPARE_TARGET = { version: 0, createRevision: 1, modRevision: 2, value: 3 } as const;
const COMPARE_FIELD = {
  version: 'version',
  createRevision: 'create_revision',
  modRevision: 'mod_revision',
  value: 'value',
} as const;
const COMPARE_RESULT = { '=': 0, '>': 1, '<': 2, '!=': 3 } as const;
const EVENT_DELETE = 1;

export class EtcdStore extends TxnStore {
  readonly prefix: string;
  readonly timeoutMs: number;
  /** How many times a watch stream was re-created after a failure (for metrics and tests). */
  watchResumes = 0;

  private readonly ks: Keyspace;
  private readonly members: Member[];
  private current = 0;
  private closed = false;
  private knownCompact = 0;
  private readonly calls = new Set<{ cancel(): void }>();
  private readonly watchers = new Set<EtcdWatcher>();
  private readonly onRoundTrip: ((op: string, seconds: number) => void) | undefined;

  private constructor(opts: EtcdStoreOptions) {
    super();
    this.ks = new Keyspace(opts.prefix);
    this.prefix = opts.prefix;
    this.timeoutMs = opts.timeoutMs ?? 5000;
    if (!Number.isSafeInteger(this.timeoutMs) || this.timeoutMs < 1) {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'timeoutMs must be a whole number >= 1');
    }
    this.onRoundTrip = opts.onRoundTrip;
    if (!Array.isArray(opts.endpoints) || opts.endpoints.length === 0) {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'an etcd store needs at least one endpoint');
    }
    const eps = opts.endpoints.map(parseEndpoint);
    const tls = eps.some((e) => e.tls) || opts.ca !== undefined;
    if (tls && eps.some((e) => !e.tls)) {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'etcd endpoints mix http and https');
    }
    const creds = tls ? sslCredentials(opts) : grpc.credentials.createInsecure();
    this.members = eps.map((e) => new Member(e, creds));
  }

  /**
   * A store on the etcd cluster at `endpoints`, under `prefix`. Connects lazily:
   * this resolves without contacting etcd; the first call fails with
   * STORE_UNAVAILABLE or STORE_TIMEOUT if no member answers.
   */
  static async connect(opts: EtcdStoreOptions): Promise<EtcdStore> {
    return new EtcdStore(opts);
  }

  // ---- calls ----

  private metadata(requireLeader = true): grpc.Metadata {
    const md = new grpc.Metadata();
    // etcd: fail at once with "no leader" rather than wait on a member cut off from its quorum.
    if (requireLeader) md.set('hasleader', 'true');
    return md;
  }

  private checkOpen(): void {
    if (this.closed) throw new StoreError('STORE_CLOSED', `etcd store ${this.prefix} is closed`);
  }

  /** The member after `m`, for the next calls, unless another failure moved on already. */
  private failedOver(m: Member): void {
    if (this.members[this.current] === m) this.current = (this.current + 1) % this.members.length;
  }

  private currentMember(): Member {
    return this.members[this.current]!;
  }

  /** One unary call on member `m` with the deadline; rejects with the raw failure. */
  private callOn<T>(
    m: Member,
    service: Service,
    method: string,
    req: unknown,
    ms: number,
    requireLeader = true,
  ): Promise<T> {
    return new Promise<T>((resolve, reject) => {
      let done = false;
      const finish = (err: unknown, res?: unknown) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        this.calls.delete(handle);
        if (err) reject(err);
        else resolve(res as T);
      };
      const call = m.unary(service, method)(
        req,
        this.metadata(requireLeader),
        { deadline: Date.now() + ms },
        (err, res) => finish(err, res),
      );
      const handle = { cancel: () => call.cancel() };
      this.calls.add(handle);
      const timer = setTimeout(() => {
        call.cancel();
        finish(new CallDeadline(ms));
      }, ms);
    });
  }

  /** The deadline (performance.now() ms) of a call that starts now. */
  private deadline(): number {
    return performance.now() + this.timeoutMs;
  }

  /**
   * A unary call on the current member. Reads (`retry`) go on to the other
   * members within the deadline when one is unavailable or slow. `end` is the
   * deadline of a call made of several round trips (default: timeoutMs from now).
   */
  private async call<T>(
    opName: string,
    service: Service,
    method: string,
    req: unknown,
    retry = false,
    end = this.deadline(),
  ): Promise<T> {
    this.checkOpen();
    const start = performance.now();
    let tries = 0;
    try {
      for (;;) {
        const m = this.currentMember();
        const left = Math.round(end - performance.now());
        if (left <= 0) throw toStoreError(new CallDeadline(this.timeoutMs), `etcd ${opName}`);
        try {
          return await this.callOn<T>(m, service, method, req, left);
        } catch (e) {
          const err = toStoreError(e, `etcd ${opName} (${m.endpoint.url})`, this.closed);
          if (err.retryable) this.failedOver(m);
          tries++;
          if (
            !retry ||
            !err.retryable ||
            tries >= this.members.length ||
            performance.now() >= end
          ) {
            throw err;
          }
        }
      }
    } finally {
      this.onRoundTrip?.(opName, (performance.now() - start) / 1000);
    }
  }

  // ---- conversions ----

  private kv(pb: PbKv): KeyValue {
    return toKv(this.ks, pb);
  }

  private leaseField(lease: string | undefined): string {
    if (lease === undefined) return '0';
    const id = parseLeaseId(lease);
    if (id === undefined) throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${lease} not found`);
    return id;
  }

  private requestOp(o: Op): unknown {
    switch (o.type) {
      case 'put':
        return {
          request_put: {
            key: this.ks.key(o.key),
            value: Buffer.from(o.value, 'utf8'),
            lease: this.leaseField(o.lease),
            prev_kv: true,
          },
        };
      case 'delete':
        return { request_delete_range: { key: this.ks.key(o.key), prev_kv: true } };
      case 'deletePrefix':
        return { request_delete_range: { ...this.ks.range(o.prefix), prev_kv: true } };
      case 'get':
        return { request_range: { key: this.ks.key(o.key) } };
      case 'range':
        return { request_range: { ...this.ks.range(o.prefix), limit: o.limit ?? 0 } };
    }
  }

  private compare(c: Compare): unknown {
    return {
      key: this.ks.key(c.key),
      target: COMPARE_TARGET[c.target],
      result: COMPARE_RESULT[c.op],
      [COMPARE_FIELD[c.target]]: c.target === 'value' ? Buffer.from(c.value, 'utf8') : c.value,
    };
  }

  private opResponse(o: Op, r: PbResponseOp | undefined): OpResponse {
    switch (o.type) {
      case 'put': {
        const prev = r?.response_put?.prev_kv;
        return prev ? { type: 'put', prevKv: this.kv(prev) } : { type: 'put' };
      }
      case 'delete':
      case 'deletePrefix': {
        const d = r?.response_delete_range;
        return {
          type: o.type,
          deleted: Number(d?.deleted ?? 0),
          prevKvs: (d?.prev_kvs ?? []).map((kv) => this.kv(kv)),
        };
      }
      case 'get': {
        const kv = r?.response_range?.kvs[0];
        return kv ? { type: 'get', kv: this.kv(kv) } : { type: 'get' };
      }
      case 'range':
        return {
          type: 'range',
          kvs: (r?.response_range?.kvs ?? []).map((kv) => this.kv(kv)),
          more: r?.response_range?.more ?? false,
        };
    }
  }

  // ---- compaction errors carry the compaction point ----

  private async withCompactRevision(e: unknown): Promise<never> {
    if (
      e instanceof StoreError &&
      e.code === 'STORE_COMPACTED' &&
      e.compactRevision === undefined
    ) {
      let point: number | undefined;
      try {
        point = await this.compactRevision();
      } catch {
        // the error stands without it
      }
      throw new StoreError('STORE_COMPACTED', e.message, {
        cause: e.cause,
        ...(point === undefined ? {} : { compactRevision: point }),
      });
    }
    throw e;
  }

  // ---- reads ----

  async get(key: string): Promise<KeyValue | undefined> {
    this.checkOpen();
    checkKey(key);
    const r = await this.call<PbRangeResponse>(
      'range',
      'KV',
      'Range',
      { key: this.ks.key(key) },
      true,
    );
    const kv = r.kvs[0];
    return kv ? this.kv(kv) : undefined;
  }

  async range(prefix: string, opts: RangeOptions = {}): Promise<RangeResult> {
    this.checkOpen();
    if (typeof prefix !== 'string') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'a prefix must be a string');
    }
    const limit = checkLimit(opts.limit);
    const revision = opts.revision ?? 0;
    checkRevision(revision, 'revision');
    const start = rangeStart(prefix, opts.from);
    try {
      const r = await this.call<PbRangeResponse>(
        'range',
        'KV',
        'Range',
        { ...this.ks.range(prefix), key: this.ks.key(start), limit, revision },
        true,
      );
      return {
        kvs: r.kvs.map((kv) => this.kv(kv)),
        more: r.more,
        revision: Number(r.header.revision),
      };
    } catch (e) {
      return this.withCompactRevision(e);
    }
  }

  /** Whether history at `rev` can still be read. */
  private async readableAt(rev: number, end: number): Promise<'ok' | 'compacted' | 'future'> {
    try {
      await this.call(
        'range',
        'KV',
        'Range',
        { key: this.ks.probeKey(), revision: rev, count_only: true },
        true,
        end,
      );
      return 'ok';
    } catch (e) {
      if (e instanceof StoreError && e.code === 'STORE_COMPACTED') return 'compacted';
      if (e instanceof StoreError && e.code === 'STORE_FUTURE_REVISION') return 'future';
      throw e;
    }
  }

  // ---- transactions ----

  async txn(req: TxnRequest): Promise<TxnResult> {
    this.checkOpen();
    checkTxn(req);
    const failure = req.failure ?? [];
    const body = {
      compare: req.compare.map((c) => this.compare(c)),
      success: req.success.map((o) => this.requestOp(o)),
      failure: failure.map((o) => this.requestOp(o)),
    };
    const r = await this.call<PbTxnResponse>('txn', 'KV', 'Txn', body);
    const ops = r.succeeded ? req.success : failure;
    return {
      succeeded: r.succeeded,
      revision: Number(r.header.revision),
      responses: ops.map((o, i) => this.opResponse(o, r.responses[i])),
    };
  }

  // ---- watch ----

  async watch(prefix: string, opts: WatchOptions): Promise<Watcher> {
    this.checkOpen();
    if (typeof prefix !== 'string') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'a prefix must be a string');
    }
    if (typeof opts?.onEvent !== 'function') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'watch needs an onEvent callback');
    }
    const from = opts.fromRevision ?? 0;
    checkRevision(from, 'fromRevision');
    // Setting a watch up takes a few round trips, all within one deadline.
    const end = this.deadline();
    let start: number;
    if (from === 0) {
      // Our own start rather than etcd's "now", so that the cursor is known from the first moment.
      start = (await this.revisionBy(end)) + 1;
    } else {
      start = from;
      if ((await this.readableAt(from, end)) === 'compacted') {
        const point = await this.compactRevisionBy(end);
        throw new StoreError(
          'STORE_COMPACTED',
          `cannot watch from revision ${from}: compacted (history kept from ${point})`,
          { compactRevision: point },
        );
      }
    }
    const w = new EtcdWatcher(this, this.ks, this.ks.range(prefix), start, opts);
    this.watchers.add(w);
    try {
      await w.start(end);
    } catch (e) {
      this.watchers.delete(w);
      throw e;
    }
    return w;
  }

  /** @internal For EtcdWatcher: a watch stream on the current member. */
  openWatchStream(): { member: Member; call: grpc.ClientDuplexStream<unknown, unknown> } {
    this.checkOpen();
    const member = this.currentMember();
    return { member, call: member.duplex('Watch', 'Watch')(this.metadata()) };
  }

  /** @internal For EtcdWatcher. */
  watcherFailedOver(m: Member): void {
    this.failedOver(m);
  }

  /** @internal For EtcdWatcher. */
  watcherEnded(w: EtcdWatcher): void {
    this.watchers.delete(w);
  }

  /** @internal For EtcdWatcher. */
  isClosed(): boolean {
    return this.closed;
  }

  // ---- leases ----

  async grantLease(ttlSeconds: number): Promise<string> {
    this.checkOpen();
    checkTtl(ttlSeconds);
    const r = await this.call<{ ID: string; TTL: string; error: string }>(
      'lease_grant',
      'Lease',
      'LeaseGrant',
      { TTL: ttlSeconds, ID: 0 },
    );
    if (r.error) throw new StoreError('STORE_UNAVAILABLE', `etcd lease grant: ${r.error}`);
    return r.ID;
  }

  async keepAlive(id: string): Promise<number> {
    this.checkOpen();
    const lease = parseLeaseId(id);
    if (lease === undefined) throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${id} not found`);
    const m = this.currentMember();
    const start = performance.now();
    try {
      const ttl = await this.keepAliveOnce(m, lease);
      if (ttl <= 0) throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${id} not found`);
      return ttl;
    } catch (e) {
      const err = toStoreError(e, `etcd lease keepalive (${m.endpoint.url})`, this.closed);
      if (err.retryable) this.failedOver(m);
      throw err;
    } finally {
      this.onRoundTrip?.('lease_keepalive', (performance.now() - start) / 1000);
    }
  }

  /** One request and one answer on a LeaseKeepAlive stream. */
  private keepAliveOnce(m: Member, lease: string): Promise<number> {
    return new Promise<number>((resolve, reject) => {
      const ms = this.timeoutMs;
      const call = m.duplex('Lease', 'LeaseKeepAlive')(this.metadata(), {
        deadline: Date.now() + ms,
      });
      let done = false;
      const handle = { cancel: () => call.cancel() };
      const finish = (err: unknown, ttl?: number) => {
        if (done) return;
        done = true;
        clearTimeout(timer);
        this.calls.delete(handle);
        call.removeAllListeners('data');
        call.on('error', () => {}); // the cancel below reports CANCELLED: nobody listens any more
        call.cancel();
        if (err) reject(err);
        else resolve(ttl ?? 0);
      };
      this.calls.add(handle);
      const timer = setTimeout(() => finish(new CallDeadline(ms)), ms);
      call.on('data', (res: { TTL: string }) => finish(null, Number(res.TTL)));
      call.on('error', (e) => finish(e));
      call.on('end', () =>
        finish(new StoreError('STORE_UNAVAILABLE', 'etcd ended the keepalive stream')),
      );
      call.write({ ID: lease });
    });
  }

  async revokeLease(id: string): Promise<void> {
    this.checkOpen();
    const lease = parseLeaseId(id);
    if (lease === undefined) throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${id} not found`);
    await this.call('lease_revoke', 'Lease', 'LeaseRevoke', { ID: lease });
  }

  // ---- compaction, revision ----

  async compact(revision: number): Promise<void> {
    this.checkOpen();
    checkRevision(revision, 'revision');
    try {
      await this.call('compact', 'KV', 'Compact', { revision, physical: false });
    } catch (e) {
      return this.withCompactRevision(e);
    }
    this.knownCompact = revision;
  }

  async revision(): Promise<number> {
    return this.revisionBy(this.deadline());
  }

  private async revisionBy(end: number): Promise<number> {
    this.checkOpen();
    const r = await this.call<PbRangeResponse>(
      'range',
      'KV',
      'Range',
      { key: this.ks.probeKey(), count_only: true },
      true,
      end,
    );
    return Number(r.header.revision);
  }

  /** How many keys start with `prefix` (etcd counts them; no values are sent). */
  async count(prefix: string): Promise<number> {
    this.checkOpen();
    const r = await this.call<PbRangeResponse & { count?: string | number }>(
      'range',
      'KV',
      'Range',
      { ...this.ks.range(prefix), count_only: true },
      true,
    );
    return Number(r.count ?? 0);
  }

  /** The whole search has one deadline: timeoutMs. */
  async compactRevision(): Promise<number> {
    return this.compactRevisionBy(this.deadline());
  }

  private async compactRevisionBy(end: number): Promise<number> {
    this.checkOpen();
    // Invariant: the smallest readable revision is in [lo, hi]; the current one is always readable.
    let hi = await this.revisionBy(end);
    let lo = 1;
    // Most often the point has not moved since the last search: look there first.
    const k = Math.min(Math.max(1, this.knownCompact), hi);
    if ((await this.readableAt(k, end)) === 'compacted') {
      lo = k + 1;
    } else {
      hi = k;
      if (k === 1 || (await this.readableAt(k - 1, end)) === 'compacted') lo = k;
    }
    while (lo < hi) {
      const mid = Math.floor((lo + hi) / 2);
      if ((await this.readableAt(mid, end)) === 'compacted') lo = mid + 1;
      else hi = mid;
    }
    this.knownCompact = lo;
    return lo <= 1 ? 0 : lo;
  }

  // ---- cluster information (for the cluster layer) ----

  /** Maintenance.Status of every endpoint; members that do not answer are reported, not thrown. */
  async status(): Promise<EtcdStatus> {
    this.checkOpen();
    const answers = await Promise.all(
      this.members.map(async (m): Promise<[EtcdEndpointStatus, PbStatusResponse | undefined]> => {
        const start = performance.now();
        try {
          const r = await this.callOn<PbStatusResponse>(
            m,
            'Maintenance',
            'Status',
            {},
            this.timeoutMs,
            false, // a member without a leader still says how it is
          );
          const memberId = hexId(r.header.member_id);
          return [
            {
              url: m.endpoint.url,
              ok: true,
              leader: r.leader !== '0' && r.leader === r.header.member_id,
              memberId,
              version: r.version,
              dbSize: Number(r.dbSize),
            },
            r,
          ];
        } catch (e) {
          const err = toStoreError(e, `etcd status (${m.endpoint.url})`, this.closed);
          if (err.code === 'STORE_CLOSED') throw err;
          return [
            { url: m.endpoint.url, ok: false, leader: false, memberId: '', error: err.message },
            undefined,
          ];
        } finally {
          this.onRoundTrip?.('status', (performance.now() - start) / 1000);
        }
      }),
    );
    const ok = answers.map(([, r]) => r).filter((r): r is PbStatusResponse => r !== undefined);
    const leader = ok.find((r) => r.leader !== '0');
    return {
      endpoints: answers.map(([s]) => s),
      leaderId: hexId(leader?.leader),
      revision: Math.max(0, ...ok.map((r) => Number(r.header.revision))),
      raftTerm: Math.max(0, ...ok.map((r) => Number(r.raftTerm))),
      clusterId: hexId(ok[0]?.header.cluster_id),
    };
  }

  /** The cluster's members, as etcd lists them. */
  async memberList(): Promise<EtcdMemberInfo[]> {
    const r = await this.call<{ members: PbMember[] }>(
      'member_list',
      'Cluster',
      'MemberList',
      {},
      true,
    );
    return r.members.map((m) => ({
      id: hexId(m.ID),
      name: m.name,
      peerUrls: m.peerURLs,
      clientUrls: m.clientURLs,
      isLearner: m.isLearner,
    }));
  }

  // ---- close ----

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    const err = new StoreError('STORE_CLOSED', `etcd store ${this.prefix} was closed`);
    for (const w of [...this.watchers]) w.end(err);
    this.watchers.clear();
    for (const c of [...this.calls]) c.cancel();
    this.calls.clear();
    for (const m of this.members) m.close();
  }

  // ---- for tests ----

  /** The URL of the member calls go to now. */
  currentEndpoint(): string {
    return this.currentMember().endpoint.url;
  }
}

/** etcd's KeyValue as ours: the key without the prefix, lease 0 as none. */
function toKv(ks: Keyspace, pb: PbKv): KeyValue {
  const kv: KeyValue = {
    key: ks.strip(pb.key),
    value: pb.value.toString('utf8'),
    createRevision: Number(pb.create_revision),
    modRevision: Number(pb.mod_revision),
    version: Number(pb.version),
  };
  if (pb.lease && pb.lease !== '0') kv.lease = pb.lease;
  return kv;
}

/** etcd's watch event as ours: a delete's kv is the tombstone etcd sends. */
function toEvent(ks: Keyspace, pe: PbEvent & { kv: PbKv }): WatchEvent {
  const revision = Number(pe.kv.mod_revision);
  const del = pe.type === EVENT_DELETE;
  const kv = del ? tombstone(ks.strip(pe.kv.key), revision) : toKv(ks, pe.kv);
  const ev: WatchEvent = { type: del ? 'delete' : 'put', kv, revision };
  if (pe.prev_kv) ev.prevKv = toKv(ks, pe.prev_kv);
  return ev;
}

function sslCredentials(opts: EtcdStoreOptions): grpc.ChannelCredentials {
  const read = (file: string | undefined, what: string): Buffer | null => {
    if (file === undefined) return null;
    try {
      return readFileSync(file);
    } catch (e) {
      throw new StoreError('STORE_IO', `etcd ${what} ${file}: ${(e as Error).message}`, {
        cause: e,
      });
    }
  };
  if ((opts.cert === undefined) !== (opts.key === undefined)) {
    throw new StoreError(
      'STORE_INVALID_ARGUMENT',
      'an etcd client certificate needs its key, and the key its certificate',
    );
  }
  return grpc.credentials.createSsl(
    read(opts.ca, 'CA'),
    read(opts.key, 'key'),
    read(opts.cert, 'certificate'),
  );
}

/**
 * One watch: a gRPC Watch stream, re-created from the cursor after any failure
 * until cancel(), close(), a compaction, or onEvent throwing ends it.
 */
class EtcdWatcher implements Watcher {
  private readonly cursor: WatchCursor;
  private ended = false;
  private call: grpc.ClientDuplexStream<unknown, unknown> | undefined;
  /** Fails the current stream (liveness check). */
  private cut: ((e: unknown) => void) | undefined;
  private failures = 0;
  private lastHeard = 0;
  private liveness: NodeJS.Timeout | undefined;
  private retryTimer: NodeJS.Timeout | undefined;

  constructor(
    private readonly store: EtcdStore,
    private readonly ks: Keyspace,
    private readonly range: { key: Buffer; range_end: Buffer },
    start: number,
    private readonly opts: WatchOptions,
  ) {
    this.cursor = new WatchCursor(start);
  }

  /** The first stream: resolves on etcd's "created", rejects (mapped) if it cannot be had by `end`. */
  async start(end: number): Promise<void> {
    const left = Math.round(end - performance.now());
    if (left <= 0) throw toStoreError(new CallDeadline(this.store.timeoutMs), 'etcd watch');
    await this.open(left);
  }

  /**
   * Opens a stream and creates the watch from the cursor. Resolves once etcd
   * confirms it; rejects with a StoreError if the stream fails first or no
   * confirmation comes within the deadline.
   */
  private open(timeoutMs = this.store.timeoutMs): Promise<void> {
    return new Promise<void>((resolve, reject) => {
      let member: Member;
      let call: grpc.ClientDuplexStream<unknown, unknown>;
      try {
        ({ member, call } = this.store.openWatchStream());
      } catch (e) {
        reject(e);
        return;
      }
      this.call = call;
      let created = false;
      const what = `etcd watch (${member.endpoint.url})`;
      const fail = (e: unknown) => {
        if (this.call !== call) return;
        this.call = undefined;
        clearTimeout(timer);
        call.removeAllListeners('data');
        call.on('error', () => {});
        call.cancel();
        const err = toStoreError(e, what, this.store.isClosed());
        if (!created) {
          if (err.retryable) this.store.watcherFailedOver(member);
          reject(err);
        } else {
          this.streamFailed(member, err);
        }
      };
      this.cut = fail;
      const timer = setTimeout(() => fail(new CallDeadline(timeoutMs)), timeoutMs);
      call.on('data', (res: PbWatchResponse) => {
        if (this.call !== call || this.ended) return;
        this.lastHeard = performance.now();
        if (res.canceled) {
          const compactRev = Number(res.compact_revision);
          if (compactRev > 0) {
            clearTimeout(timer);
            this.finish(
              new StoreError(
                'STORE_COMPACTED',
                `${what}: cannot resume at revision ${this.cursor.next}: compacted (history kept from ${compactRev})`,
                { compactRevision: compactRev },
              ),
            );
            if (!created) resolve();
            return;
          }
          fail(
            new StoreError('STORE_UNAVAILABLE', `${what}: canceled by etcd: ${res.cancel_reason}`),
          );
          return;
        }
        if (res.created && !created) {
          created = true;
          clearTimeout(timer);
          this.failures = 0;
          this.watchLiveness(call);
          resolve();
        }
        if (res.events.length > 0) this.deliver(res.events);
      });
      call.on('error', (e) => fail(e));
      call.on('end', () =>
        fail(new StoreError('STORE_UNAVAILABLE', `${what}: etcd ended the stream`)),
      );
      call.write({
        create_request: {
          ...this.range,
          start_revision: this.cursor.next,
          prev_kv: true,
        },
      });
    });
  }

  private deliver(pbEvents: PbEvent[]): void {
    let events: WatchEvent[];
    try {
      events = pbEvents
        .filter((pe): pe is PbEvent & { kv: PbKv } => pe.kv !== null)
        .map((pe) => toEvent(this.ks, pe));
    } catch (e) {
      this.finish(e);
      return;
    }
    const fresh = this.cursor.fresh(events);
    for (const ev of fresh) {
      if (this.ended) return;
      try {
        this.opts.onEvent(ev);
      } catch (e) {
        this.finish(e);
        return;
      }
    }
    const last = events[events.length - 1];
    if (last) this.cursor.delivered(last.revision);
  }

  /** Asks for progress when the stream is quiet; cuts it when it stays silent. */
  private watchLiveness(call: grpc.ClientDuplexStream<unknown, unknown>): void {
    clearInterval(this.liveness);
    const ms = this.store.timeoutMs;
    this.lastHeard = performance.now();
    this.liveness = setInterval(
      () => {
        if (this.call !== call || this.ended) return;
        const quiet = performance.now() - this.lastHeard;
        if (quiet > 2 * ms) {
          this.cut?.(new CallDeadline(2 * ms));
        } else if (quiet > ms) {
          call.write({ progress_request: {} });
        }
      },
      Math.max(50, Math.floor(ms / 4)),
    );
    this.liveness.unref();
  }

  /** The stream broke after the watch was in place: re-create it from the cursor. */
  private streamFailed(member: Member, err: StoreError): void {
    clearInterval(this.liveness);
    if (this.ended) return;
    if (err.code === 'STORE_CLOSED' || this.store.isClosed()) {
      this.finish(new StoreError('STORE_CLOSED', 'the etcd store was closed'));
      return;
    }
    this.store.watcherFailedOver(member);
    this.scheduleResume();
  }

  private scheduleResume(): void {
    if (this.ended) return;
    const delay = Math.min(1000, 50 * 2 ** Math.min(this.failures, 5));
    this.failures++;
    this.retryTimer = setTimeout(() => {
      if (this.ended) return;
      this.store.watchResumes++;
      this.open().catch((e: unknown) => {
        const err = toStoreError(e, 'etcd watch', this.store.isClosed());
        if (err.code === 'STORE_CLOSED') this.finish(err);
        else if (err.retryable) this.scheduleResume();
        else this.finish(err);
      });
    }, delay);
  }

  /** The store closes: end with `err`. */
  end(err: StoreError): void {
    this.finish(err);
  }

  private stop(): void {
    if (this.ended) return;
    this.ended = true;
    clearInterval(this.liveness);
    clearTimeout(this.retryTimer);
    const call = this.call;
    this.call = undefined;
    if (call) {
      call.removeAllListeners('data');
      call.on('error', () => {});
      call.cancel();
    }
    this.store.watcherEnded(this);
  }

  private finish(err: unknown): void {
    if (this.ended) return;
    this.stop();
    if (this.opts.onError) {
      const onError = this.opts.onError;
      queueMicrotask(() => onError(err));
    } else if (!(err instanceof StoreError && err.code === 'STORE_CLOSED')) {
      queueMicrotask(() => {
        throw err;
      });
    }
  }

  async cancel(): Promise<void> {
    this.stop();
  }
}
