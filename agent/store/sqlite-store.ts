// The Store (store.ts) on an SQLite file through better-sqlite3: the agent's
// durable state on a single host.
//
// Durability: WAL journal with synchronous=FULL, so a transaction whose promise
// has resolved was fsynced to the WAL and survives kill -9 and power loss.
// Exclusivity: locking_mode=EXCLUSIVE, taken at open and held until close, so a
// second open of the same file (from another agent process, or this one) fails
// with STORE_LOCKED. As a side effect SQLite keeps the WAL index in memory and
// makes no -shm file. The database and its WAL are mode 0600.
//
// better-sqlite3 is synchronous: every call does its work before it returns
// its promise, so calls made in a row are applied in that order and nothing
// interleaves with a transaction. The API is async so that an etcd
// implementation fits the same interface.
//
// Layout (schema version 1):
//   meta     (name, value): schema_version, revision, compact_revision
//   kv       the live keys, with their revisions, version and lease
//   history  one row per event (put or delete) per key per revision, with the
//            key after and before it: watch replay and reads at a past revision.
//            Bounded: only the last `historyRevisions` revisions (at least) are kept.
//   leases   (id, ttl)

import { randomBytes } from 'node:crypto';
import { closeSync, constants, fchmodSync, fsyncSync, openSync } from 'node:fs';
import { dirname, resolve } from 'node:path';
import { performance } from 'node:perf_hooks';
import Database from 'better-sqlite3';
import {
  checkKey,
  checkLimit,
  checkRevision,
  checkTtl,
  checkTxn,
  compareBytes,
  evalCompare,
  type KeyValue,
  type Op,
  type OpResponse,
  prefixEnd,
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
} from './store.js';

export const SCHEMA_VERSION = 1;
/** PRAGMA application_id of a Ballast store: 'BLST'. */
const APPLICATION_ID = 0x424c5354;

export interface SqliteStoreOptions {
  /** Keep at least this many of the latest revisions in history (default 10000). */
  historyRevisions?: number;
  /** How often expired leases are looked for, in ms (default 500). */
  leaseCheckIntervalMs?: number;
  /** Check the database at open: 'quick' (default: PRAGMA quick_check), 'full' (integrity_check) or 'none'. */
  integrityCheck?: 'quick' | 'full' | 'none';
}

interface KvRow {
  key: string;
  value: string;
  create_rev: number;
  mod_rev: number;
  version: number;
  lease: string | null;
}

interface HistoryRow {
  revision: number;
  sub: number;
  key: string;
  type: 'put' | 'delete';
  value: string | null;
  create_rev: number | null;
  version: number | null;
  lease: string | null;
  prev_value: string | null;
  prev_create_rev: number | null;
  prev_mod_rev: number | null;
  prev_version: number | null;
  prev_lease: string | null;
}

const SCHEMA = `
CREATE TABLE meta (
  name  TEXT PRIMARY KEY,
  value INTEGER NOT NULL
) WITHOUT ROWID;
CREATE TABLE kv (
  key        TEXT PRIMARY KEY,
  value      TEXT NOT NULL,
  create_rev INTEGER NOT NULL,
  mod_rev    INTEGER NOT NULL,
  version    INTEGER NOT NULL,
  lease      TEXT
) WITHOUT ROWID;
CREATE INDEX kv_lease ON kv (lease) WHERE lease IS NOT NULL;
CREATE TABLE history (
  revision        INTEGER NOT NULL,
  sub             INTEGER NOT NULL,
  key             TEXT NOT NULL,
  type            TEXT NOT NULL CHECK (type IN ('put', 'delete')),
  value           TEXT,
  create_rev      INTEGER,
  version         INTEGER,
  lease           TEXT,
  prev_value      TEXT,
  prev_create_rev INTEGER,
  prev_mod_rev    INTEGER,
  prev_version    INTEGER,
  prev_lease      TEXT,
  PRIMARY KEY (revision, sub)
) WITHOUT ROWID;
CREATE INDEX history_key ON history (key, revision);
CREATE TABLE leases (
  id  TEXT PRIMARY KEY,
  ttl INTEGER NOT NULL
) WITHOUT ROWID;
`;

const KV_COLS = 'key, value, create_rev, mod_rev, version, lease';
const HISTORY_COLS =
  'revision, sub, key, type, value, create_rev, version, lease, ' +
  'prev_value, prev_create_rev, prev_mod_rev, prev_version, prev_lease';

function toKv(r: KvRow): KeyValue {
  const kv: KeyValue = {
    key: r.key,
    value: r.value,
    createRevision: r.create_rev,
    modRevision: r.mod_rev,
    version: r.version,
  };
  if (r.lease !== null) kv.lease = r.lease;
  return kv;
}

function toEvent(r: HistoryRow): WatchEvent {
  let kv: KeyValue;
  if (r.type === 'put') {
    kv = {
      key: r.key,
      value: r.value ?? '',
      createRevision: r.create_rev ?? 0,
      modRevision: r.revision,
      version: r.version ?? 0,
    };
    if (r.lease !== null) kv.lease = r.lease;
  } else {
    kv = tombstone(r.key, r.revision);
  }
  const ev: WatchEvent = { type: r.type, kv, revision: r.revision };
  const prev = prevOf(r);
  if (prev) ev.prevKv = prev;
  return ev;
}

function prevOf(r: HistoryRow): KeyValue | undefined {
  if (r.prev_version === null) return undefined;
  const kv: KeyValue = {
    key: r.key,
    value: r.prev_value ?? '',
    createRevision: r.prev_create_rev ?? 0,
    modRevision: r.prev_mod_rev ?? 0,
    version: r.prev_version,
  };
  if (r.prev_lease !== null) kv.lease = r.prev_lease;
  return kv;
}

/** better-sqlite3's SqliteError carries the SQLite result code name in `.code`. */
function sqliteCode(e: unknown): string | undefined {
  if (e instanceof Error && e.name === 'SqliteError') {
    const code = (e as { code?: unknown }).code;
    return typeof code === 'string' ? code : undefined;
  }
  return undefined;
}

/** Turns an SQLite failure into a StoreError; passes StoreErrors and other errors through. */
function mapError(e: unknown, path: string): unknown {
  if (e instanceof StoreError) return e;
  const code = sqliteCode(e);
  if (code === undefined) return e;
  const msg = e instanceof Error ? e.message : String(e);
  if (code.startsWith('SQLITE_CORRUPT') || code === 'SQLITE_NOTADB') {
    return new StoreError('STORE_CORRUPT', `store ${path} is damaged: ${msg}`, { cause: e });
  }
  if (code.startsWith('SQLITE_BUSY') || code.startsWith('SQLITE_LOCKED')) {
    return new StoreError(
      'STORE_LOCKED',
      `store ${path} is in use by another Ballast agent (it holds the database lock)`,
      { cause: e },
    );
  }
  if (
    code.startsWith('SQLITE_IOERR') ||
    code === 'SQLITE_FULL' ||
    code.startsWith('SQLITE_READONLY') ||
    code.startsWith('SQLITE_CANTOPEN') ||
    code === 'SQLITE_PERM'
  ) {
    return new StoreError('STORE_IO', `store ${path}: ${msg}`, { cause: e });
  }
  return e;
}

class SqliteWatcher implements Watcher {
  private queue: WatchEvent[] = [];
  private head = 0;
  private scheduled = false;
  private ended = false;
  private closing: StoreError | undefined;

  constructor(
    readonly prefix: string,
    /** The first revision to deliver. */
    readonly startRevision: number,
    private readonly opts: WatchOptions,
    private readonly detach: (w: SqliteWatcher) => void,
  ) {}

  matches(ev: WatchEvent): boolean {
    return ev.revision >= this.startRevision && ev.kv.key.startsWith(this.prefix);
  }

  push(ev: WatchEvent): void {
    if (this.ended) return;
    this.queue.push(ev);
    this.schedule();
  }

  /** The store is closing: deliver what is queued, then end with `err`. */
  end(err: StoreError): void {
    if (this.ended) return;
    this.closing = err;
    this.schedule();
  }

  cancel(): Promise<void> {
    this.stop();
    return Promise.resolve();
  }

  private stop(): void {
    if (this.ended) return;
    this.ended = true;
    this.queue = [];
    this.head = 0;
    this.detach(this);
  }

  private schedule(): void {
    if (this.scheduled) return;
    this.scheduled = true;
    queueMicrotask(() => this.drain());
  }

  private drain(): void {
    this.scheduled = false;
    while (!this.ended && this.head < this.queue.length) {
      const ev = this.queue[this.head++]!;
      try {
        this.opts.onEvent(ev);
      } catch (e) {
        this.stop();
        this.fail(e);
        return;
      }
    }
    if (this.ended) return;
    this.queue = [];
    this.head = 0;
    if (this.closing) {
      const err = this.closing;
      this.stop();
      this.fail(err);
    }
  }

  private fail(err: unknown): void {
    if (this.opts.onError) {
      this.opts.onError(err);
    } else if (!(err instanceof StoreError && err.code === 'STORE_CLOSED')) {
      // No one to tell: let it surface as an uncaught exception rather than vanish.
      queueMicrotask(() => {
        throw err;
      });
    }
  }
}

/** What one write transaction did, collected while it runs. */
interface TxnWork {
  /** The revision the transaction writes at: this.rev + 1 once it changed something. */
  rev: number;
  changed: boolean;
  sub: number;
  events: WatchEvent[];
  /** The new compaction point, if the transaction compacted history. */
  compactTo?: number;
}

export class SqliteStore extends TxnStore {
  private closed = false;
  private rev: number;
  private compactRev: number;
  private readonly watchers = new Set<SqliteWatcher>();
  /** Lease id -> TTL (s) and deadline (performance.now() ms). */
  private readonly leases = new Map<string, { ttl: number; deadline: number }>();
  private readonly leaseTimer: NodeJS.Timeout;
  private readonly historyRevisions: number;
  private readonly compactBatch: number;

  private readonly stmt: ReturnType<typeof SqliteStore.prepare>;
  private readonly txnFn: (req: TxnRequest) => { result: TxnResult; work: TxnWork };
  private readonly revokeFn: (id: string) => TxnWork;
  private readonly compactFn: (rev: number) => void;

  private constructor(
    private readonly db: Database.Database,
    /** The database file (':memory:' for an in-memory store). */
    readonly path: string,
    opts: SqliteStoreOptions,
  ) {
    super();
    this.historyRevisions = opts.historyRevisions ?? 10_000;
    if (!Number.isSafeInteger(this.historyRevisions) || this.historyRevisions < 1) {
      throw new StoreError(
        'STORE_INVALID_ARGUMENT',
        'historyRevisions must be a whole number >= 1',
      );
    }
    // Compact in batches: history holds between N and N + batch revisions.
    this.compactBatch = Math.max(1, Math.ceil(this.historyRevisions / 16));
    this.stmt = SqliteStore.prepare(db);
    this.rev = this.meta('revision');
    this.compactRev = this.meta('compact_revision');
    this.checkBookkeeping();

    this.txnFn = db.transaction((req: TxnRequest) => this.txnInner(req));
    this.revokeFn = db.transaction((id: string) => this.revokeInner(id));
    this.compactFn = db.transaction((rev: number) => this.compactInner(rev));

    // As etcd does when a leader takes over: every lease gets its full TTL
    // again from now, since how long this agent was down says nothing.
    const now = performance.now();
    for (const row of this.stmt.allLeases.all() as { id: string; ttl: number }[]) {
      this.leases.set(row.id, { ttl: row.ttl, deadline: now + row.ttl * 1000 });
    }
    this.leaseTimer = setInterval(() => this.expireLeases(), opts.leaseCheckIntervalMs ?? 500);
    this.leaseTimer.unref();
  }

  private static prepare(db: Database.Database) {
    return {
      getMeta: db.prepare('SELECT value FROM meta WHERE name = ?').pluck(),
      setMeta: db.prepare(
        'INSERT INTO meta (name, value) VALUES (?, ?) ON CONFLICT (name) DO UPDATE SET value = excluded.value',
      ),
      get: db.prepare(`SELECT ${KV_COLS} FROM kv WHERE key = ?`),
      rangeAll: db.prepare(`SELECT ${KV_COLS} FROM kv ORDER BY key LIMIT ?`),
      rangeFrom: db.prepare(`SELECT ${KV_COLS} FROM kv WHERE key >= ? ORDER BY key LIMIT ?`),
      range: db.prepare(
        `SELECT ${KV_COLS} FROM kv WHERE key >= ? AND key < CAST(? AS TEXT) ORDER BY key LIMIT ?`,
      ),
      byLease: db.prepare(`SELECT ${KV_COLS} FROM kv WHERE lease = ? ORDER BY key`),
      upsert: db.prepare(
        'INSERT INTO kv (key, value, create_rev, mod_rev, version, lease) VALUES (?, ?, ?, ?, ?, ?) ' +
          'ON CONFLICT (key) DO UPDATE SET value = excluded.value, create_rev = excluded.create_rev, ' +
          'mod_rev = excluded.mod_rev, version = excluded.version, lease = excluded.lease',
      ),
      del: db.prepare('DELETE FROM kv WHERE key = ?'),
      addHistory: db.prepare(
        `INSERT INTO history (${HISTORY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)`,
      ),
      historyAll: db.prepare(
        `SELECT ${HISTORY_COLS} FROM history WHERE revision >= ? ORDER BY revision, sub`,
      ),
      history: db.prepare(
        `SELECT ${HISTORY_COLS} FROM history WHERE revision >= ? AND key >= ? AND key < CAST(? AS TEXT) ORDER BY revision, sub`,
      ),
      compact: db.prepare('DELETE FROM history WHERE revision < ?'),
      maxModRev: db.prepare('SELECT max(mod_rev) FROM kv').pluck(),
      maxHistoryRev: db.prepare('SELECT max(revision) FROM history').pluck(),
      minHistoryRev: db.prepare('SELECT min(revision) FROM history').pluck(),
      allLeases: db.prepare('SELECT id, ttl FROM leases'),
      addLease: db.prepare('INSERT INTO leases (id, ttl) VALUES (?, ?)'),
      delLease: db.prepare('DELETE FROM leases WHERE id = ?'),
    };
  }

  /**
   * Opens (creating if missing) the store at `path` and takes its lock.
   * Fails with STORE_LOCKED if another open holds it, STORE_CORRUPT if the
   * file is damaged, STORE_SCHEMA if it is not a store this code can read.
   * `path` ':memory:' makes a private in-memory store (nothing is durable).
   */
  static async open(path: string, opts: SqliteStoreOptions = {}): Promise<SqliteStore> {
    const memory = path === ':memory:';
    const file = memory ? path : resolve(path);
    if (!memory) createPrivate(file);
    let db: Database.Database | undefined;
    try {
      db = new Database(file, { timeout: 0, fileMustExist: !memory });
      if (!memory) {
        // EXCLUSIVE before WAL, so that the WAL index lives in memory (no -shm)
        // and the lock taken by the first write below is held until close.
        db.pragma('locking_mode = EXCLUSIVE');
        const mode = db.pragma('journal_mode = WAL', { simple: true });
        if (mode !== 'wal') {
          throw new StoreError('STORE_IO', `store ${file}: cannot use a WAL journal (got ${mode})`);
        }
        db.exec('BEGIN IMMEDIATE; COMMIT');
      }
      db.pragma('synchronous = FULL');
      db.pragma('foreign_keys = OFF');
      db.pragma('trusted_schema = OFF');
      checkIntegrity(db, file, opts.integrityCheck ?? 'quick');
      initSchema(db, file);
      return new SqliteStore(db, file, opts);
    } catch (e) {
      try {
        db?.close();
      } catch {
        // already failing
      }
      throw mapError(e, file);
    }
  }

  // ---- reads ----

  async get(key: string): Promise<KeyValue | undefined> {
    this.checkOpen();
    checkKey(key);
    return this.guard(() => this.getSync(key));
  }

  async range(prefix: string, opts: RangeOptions = {}): Promise<RangeResult> {
    this.checkOpen();
    if (typeof prefix !== 'string') {
      throw new StoreError('STORE_INVALID_ARGUMENT', 'a prefix must be a string');
    }
    const limit = checkLimit(opts.limit);
    const start = rangeStart(prefix, opts.from);
    return this.guard(() => {
      if (opts.revision !== undefined && opts.revision !== 0 && opts.revision !== this.rev) {
        return this.rangeAt(prefix, limit, opts.revision, start);
      }
      const { kvs, more } = this.rangeSync(prefix, limit, start);
      return { kvs, more, revision: this.rev };
    });
  }

  private getSync(key: string): KeyValue | undefined {
    const row = this.stmt.get.get(key) as KvRow | undefined;
    return row ? toKv(row) : undefined;
  }

  private rangeSync(
    prefix: string,
    limit: number,
    start = prefix,
  ): { kvs: KeyValue[]; more: boolean } {
    const n = limit === 0 ? -1 : limit + 1;
    const end = prefixEnd(prefix);
    const rows = (
      end === undefined
        ? start === ''
          ? this.stmt.rangeAll.all(n)
          : this.stmt.rangeFrom.all(start, n)
        : this.stmt.range.all(start, end, n)
    ) as KvRow[];
    const more = limit !== 0 && rows.length > limit;
    if (more) rows.length = limit;
    return { kvs: rows.map(toKv), more };
  }

  /**
   * The keys as they were at `rev`: the live keys not changed since, plus, for
   * each key changed since, the state before its first change after `rev`.
   */
  private rangeAt(prefix: string, limit: number, rev: number, start = prefix): RangeResult {
    checkRevision(rev, 'revision');
    if (rev > this.rev) {
      throw new StoreError(
        'STORE_FUTURE_REVISION',
        `revision ${rev} is beyond the current revision ${this.rev}`,
      );
    }
    if (rev < this.compactRev) {
      throw new StoreError(
        'STORE_COMPACTED',
        `revision ${rev} has been compacted (history kept from ${this.compactRev})`,
        { compactRevision: this.compactRev },
      );
    }
    const state = new Map<string, KeyValue>();
    for (const kv of this.rangeSync(prefix, 0).kvs) state.set(kv.key, kv);
    const seen = new Set<string>();
    for (const row of this.historyRows(prefix, rev + 1)) {
      if (seen.has(row.key)) continue;
      seen.add(row.key);
      const prev = prevOf(row);
      if (prev) state.set(row.key, prev);
      else state.delete(row.key);
    }
    const kvs = [...state.values()]
      .filter((kv) => compareBytes(kv.key, start) >= 0)
      .sort((a, b) => compareBytes(a.key, b.key));
    const more = limit !== 0 && kvs.length > limit;
    if (more) kvs.length = limit;
    return { kvs, more, revision: this.rev };
  }

  private historyRows(prefix: string, fromRev: number): HistoryRow[] {
    const end = prefixEnd(prefix);
    return (
      end === undefined
        ? this.stmt.historyAll.all(fromRev)
        : this.stmt.history.all(fromRev, prefix, end)
    ) as HistoryRow[];
  }

  // ---- transactions ----

  async txn(req: TxnRequest): Promise<TxnResult> {
    this.checkOpen();
    checkTxn(req);
    const { result, work } = this.guard(() => this.txnFn(req));
    this.committed(work);
    return result;
  }

  private newWork(): TxnWork {
    return { rev: this.rev + 1, changed: false, sub: 0, events: [] };
  }

  /** Runs inside db.transaction: a throw rolls everything back. */
  private txnInner(req: TxnRequest): { result: TxnResult; work: TxnWork } {
    const succeeded = req.compare.every((c) => evalCompare(c, this.getSync(c.key)));
    const ops = succeeded ? req.success : (req.failure ?? []);
    const work = this.newWork();
    const responses = ops.map((o) => this.apply(o, work));
    this.finish(work);
    return {
      result: { succeeded, revision: work.changed ? work.rev : this.rev, responses },
      work,
    };
  }

  private apply(o: Op, work: TxnWork): OpResponse {
    switch (o.type) {
      case 'put': {
        if (o.lease !== undefined && !this.leaseAlive(o.lease)) {
          throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${o.lease} not found`);
        }
        const prev = this.getSync(o.key);
        const kv: KeyValue = {
          key: o.key,
          value: o.value,
          createRevision: prev ? prev.createRevision : work.rev,
          modRevision: work.rev,
          version: prev ? prev.version + 1 : 1,
        };
        if (o.lease !== undefined) kv.lease = o.lease;
        this.stmt.upsert.run(
          kv.key,
          kv.value,
          kv.createRevision,
          kv.modRevision,
          kv.version,
          kv.lease ?? null,
        );
        this.record(work, 'put', kv, prev);
        return prev ? { type: 'put', prevKv: prev } : { type: 'put' };
      }
      case 'delete': {
        const prev = this.getSync(o.key);
        if (prev) this.deleteKv(work, prev);
        return { type: 'delete', deleted: prev ? 1 : 0, prevKvs: prev ? [prev] : [] };
      }
      case 'deletePrefix': {
        const { kvs } = this.rangeSync(o.prefix, 0);
        for (const kv of kvs) this.deleteKv(work, kv);
        return { type: 'deletePrefix', deleted: kvs.length, prevKvs: kvs };
      }
      case 'get': {
        const kv = this.getSync(o.key);
        return kv ? { type: 'get', kv } : { type: 'get' };
      }
      case 'range': {
        const { kvs, more } = this.rangeSync(o.prefix, o.limit ?? 0);
        return { type: 'range', kvs, more };
      }
    }
  }

  private deleteKv(work: TxnWork, prev: KeyValue): void {
    this.stmt.del.run(prev.key);
    this.record(work, 'delete', tombstone(prev.key, work.rev), prev);
  }

  private record(
    work: TxnWork,
    type: 'put' | 'delete',
    kv: KeyValue,
    prev: KeyValue | undefined,
  ): void {
    work.changed = true;
    const put = type === 'put';
    this.stmt.addHistory.run(
      work.rev,
      work.sub++,
      kv.key,
      type,
      put ? kv.value : null,
      put ? kv.createRevision : null,
      put ? kv.version : null,
      put ? (kv.lease ?? null) : null,
      prev ? prev.value : null,
      prev ? prev.createRevision : null,
      prev ? prev.modRevision : null,
      prev ? prev.version : null,
      prev ? (prev.lease ?? null) : null,
    );
    const ev: WatchEvent = { type, kv, revision: work.rev };
    if (prev) ev.prevKv = prev;
    work.events.push(ev);
  }

  /** Still inside the transaction: the revision, and the history bound. */
  private finish(work: TxnWork): void {
    if (!work.changed) return;
    this.stmt.setMeta.run('revision', work.rev);
    // Keep revisions (work.rev - N, work.rev]: compact to work.rev - N + 1.
    const target = work.rev - this.historyRevisions + 1;
    if (target - this.compactRev >= this.compactBatch) {
      this.stmt.compact.run(target);
      this.stmt.setMeta.run('compact_revision', target);
      work.compactTo = target;
    }
  }

  /** After commit: move the in-memory revision and tell the watchers. */
  private committed(work: TxnWork): void {
    if (!work.changed) return;
    this.rev = work.rev;
    if (work.compactTo !== undefined) this.compactRev = work.compactTo;
    for (const ev of work.events) {
      for (const w of this.watchers) if (w.matches(ev)) w.push(ev);
    }
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
    if (from !== 0 && from < this.compactRev) {
      throw new StoreError(
        'STORE_COMPACTED',
        `cannot watch from revision ${from}: compacted (history kept from ${this.compactRev})`,
        { compactRevision: this.compactRev },
      );
    }
    const start = from === 0 ? this.rev + 1 : from;
    const w = new SqliteWatcher(prefix, start, opts, (x) => this.watchers.delete(x));
    // No await between reading history and registering: no write can slip in between.
    if (start <= this.rev) {
      const rows = this.guard(() => this.historyRows(prefix, start));
      for (const row of rows) w.push(toEvent(row));
    }
    this.watchers.add(w);
    return w;
  }

  // ---- leases ----

  async grantLease(ttlSeconds: number): Promise<string> {
    this.checkOpen();
    checkTtl(ttlSeconds);
    let id: string;
    do id = randomBytes(8).toString('hex');
    while (this.leases.has(id));
    this.guard(() => this.stmt.addLease.run(id, ttlSeconds));
    this.leases.set(id, { ttl: ttlSeconds, deadline: performance.now() + ttlSeconds * 1000 });
    return id;
  }

  async keepAlive(id: string): Promise<number> {
    this.checkOpen();
    const lease = this.leases.get(id);
    if (!lease) throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${id} not found`);
    if (lease.deadline <= performance.now()) {
      this.revokeSync(id);
      throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${id} has expired`);
    }
    lease.deadline = performance.now() + lease.ttl * 1000;
    return lease.ttl;
  }

  async revokeLease(id: string): Promise<void> {
    this.checkOpen();
    if (!this.leases.has(id))
      throw new StoreError('STORE_LEASE_NOT_FOUND', `lease ${id} not found`);
    this.revokeSync(id);
  }

  private leaseAlive(id: string): boolean {
    const lease = this.leases.get(id);
    return lease !== undefined && lease.deadline > performance.now();
  }

  private revokeSync(id: string): void {
    const work = this.guard(() => this.revokeFn(id));
    this.leases.delete(id);
    this.committed(work);
  }

  /** Inside a transaction: delete the lease's keys (one revision) and the lease. */
  private revokeInner(id: string): TxnWork {
    const work = this.newWork();
    for (const row of this.stmt.byLease.all(id) as KvRow[]) this.deleteKv(work, toKv(row));
    this.stmt.delLease.run(id);
    this.finish(work);
    return work;
  }

  private expireLeases(): void {
    if (this.closed) return;
    const now = performance.now();
    for (const [id, lease] of this.leases) {
      if (lease.deadline > now) continue;
      try {
        this.revokeSync(id);
      } catch {
        // The disk failed: try again on the next tick; writes will report it.
      }
    }
  }

  // ---- compaction, revision, close ----

  async compact(revision: number): Promise<void> {
    this.checkOpen();
    checkRevision(revision, 'revision');
    if (revision <= this.compactRev) {
      throw new StoreError(
        'STORE_COMPACTED',
        `revision ${revision} has already been compacted (history kept from ${this.compactRev})`,
        { compactRevision: this.compactRev },
      );
    }
    if (revision > this.rev) {
      throw new StoreError(
        'STORE_FUTURE_REVISION',
        `revision ${revision} is beyond the current revision ${this.rev}`,
      );
    }
    this.guard(() => this.compactFn(revision));
    this.compactRev = revision;
  }

  private compactInner(revision: number): void {
    this.stmt.compact.run(revision);
    this.stmt.setMeta.run('compact_revision', revision);
  }

  async revision(): Promise<number> {
    this.checkOpen();
    return this.rev;
  }

  async compactRevision(): Promise<number> {
    this.checkOpen();
    return this.compactRev;
  }

  /** PRAGMA integrity_check: [] if the database is sound, else SQLite's complaints. */
  async integrityCheck(): Promise<string[]> {
    this.checkOpen();
    const rows = this.guard(() => this.db.pragma('integrity_check', { simple: false })) as {
      integrity_check: string;
    }[];
    return rows.map((r) => r.integrity_check).filter((s) => s !== 'ok');
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.leaseTimer);
    const err = new StoreError('STORE_CLOSED', `store ${this.path} was closed`);
    for (const w of [...this.watchers]) w.end(err);
    this.watchers.clear();
    this.guard(() => this.db.close());
  }

  // ---- internals ----

  private checkOpen(): void {
    if (this.closed) throw new StoreError('STORE_CLOSED', `store ${this.path} is closed`);
  }

  private guard<T>(fn: () => T): T {
    try {
      return fn();
    } catch (e) {
      throw mapError(e, this.path);
    }
  }

  private meta(name: string): number {
    const v = this.stmt.getMeta.get(name);
    if (typeof v !== 'number' || !Number.isSafeInteger(v) || v < 0) {
      throw new StoreError('STORE_CORRUPT', `store ${this.path}: meta ${name} is missing or bad`);
    }
    return v;
  }

  /** The revision bookkeeping must agree with the data, or revisions would repeat. */
  private checkBookkeeping(): void {
    const bad = (what: string) =>
      new StoreError('STORE_CORRUPT', `store ${this.path}: ${what} (revision ${this.rev})`);
    if (this.rev < 1) throw bad('the revision is below 1');
    if (this.compactRev > this.rev) throw bad(`compact revision ${this.compactRev} is ahead`);
    const maxMod = this.stmt.maxModRev.get() as number | null;
    if (maxMod !== null && maxMod > this.rev) throw bad(`a key has mod revision ${maxMod}`);
    const maxHist = this.stmt.maxHistoryRev.get() as number | null;
    if (maxHist !== null && maxHist > this.rev) throw bad(`history reaches revision ${maxHist}`);
    const minHist = this.stmt.minHistoryRev.get() as number | null;
    if (minHist !== null && minHist < this.compactRev) {
      throw bad(`history below the compact revision ${this.compactRev}`);
    }
  }
}

/** Creates the file with mode 0600 if missing (and makes the new entry durable); forces 0600. */
function createPrivate(file: string): void {
  let fd: number;
  let created = false;
  try {
    fd = openSync(file, constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
    created = true;
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'EEXIST') throw ioError(file, e);
    try {
      fd = openSync(file, constants.O_RDWR);
    } catch (e2) {
      throw ioError(file, e2);
    }
  }
  try {
    fchmodSync(fd, 0o600);
  } finally {
    closeSync(fd);
  }
  if (created) {
    const dir = openSync(dirname(file), constants.O_RDONLY);
    try {
      fsyncSync(dir);
    } finally {
      closeSync(dir);
    }
  }
}

function ioError(file: string, e: unknown): StoreError {
  const msg = e instanceof Error ? e.message : String(e);
  return new StoreError('STORE_IO', `store ${file}: ${msg}`, { cause: e });
}

function checkIntegrity(db: Database.Database, file: string, how: 'quick' | 'full' | 'none'): void {
  if (how === 'none') return;
  const rows = db.pragma(how === 'quick' ? 'quick_check' : 'integrity_check', {
    simple: false,
  }) as Record<string, string>[];
  const problems = rows.map((r) => Object.values(r)[0]).filter((s) => s !== 'ok');
  if (problems.length > 0) {
    throw new StoreError(
      'STORE_CORRUPT',
      `store ${file} fails its integrity check: ${problems.slice(0, 5).join('; ')}`,
    );
  }
}

/** Creates the schema in a new database, or checks that an existing one is ours and current. */
function initSchema(db: Database.Database, file: string): void {
  const appId = db.pragma('application_id', { simple: true }) as number;
  const tables = db
    .prepare("SELECT count(*) FROM sqlite_schema WHERE type = 'table'")
    .pluck()
    .get();
  if (appId === 0 && tables === 0) {
    db.transaction(() => {
      db.exec(SCHEMA);
      const set = db.prepare('INSERT INTO meta (name, value) VALUES (?, ?)');
      set.run('schema_version', SCHEMA_VERSION);
      set.run('revision', 1);
      set.run('compact_revision', 0);
      db.pragma(`application_id = ${APPLICATION_ID}`);
      db.pragma(`user_version = ${SCHEMA_VERSION}`);
    })();
    return;
  }
  if (appId !== APPLICATION_ID) {
    throw new StoreError('STORE_SCHEMA', `${file} is an SQLite database but not a Ballast store`);
  }
  let version: unknown;
  try {
    version = db.prepare("SELECT value FROM meta WHERE name = 'schema_version'").pluck().get();
  } catch (e) {
    throw new StoreError('STORE_CORRUPT', `store ${file} has no meta table`, { cause: e });
  }
  if (typeof version !== 'number') {
    throw new StoreError('STORE_CORRUPT', `store ${file} has no schema version`);
  }
  if (version !== SCHEMA_VERSION) {
    // There is only version 1 so far: a later one needs a newer Ballast.
    throw new StoreError(
      'STORE_SCHEMA',
      `store ${file} has schema version ${version}; this Ballast reads version ${SCHEMA_VERSION}`,
    );
  }
}
