// Virtual devices: records in the store, extents as sparse files in pools,
// one NBD export each. Every change is a sequence of store transactions and
// file operations ordered so that a crash at any point leaves either the old
// state or the new one, and startup reconciliation finishes or undoes what a
// crash interrupted.

import { randomBytes } from 'node:crypto';
import { basename, dirname, join } from 'node:path';
import type { AccessControl, Export } from '../nbd/export.js';
import type { NbdServer } from '../nbd/server.js';
import { ExportStats } from '../nbd/stats.js';
import type { DynamicCatalog } from './catalog.js';
import { ConcatBackend } from './concat-backend.js';
import { BallastError } from './errors.js';
import { DISK_FILES, type ExtentFile, type ExtentFiles } from './extent-files.js';
import { failpoint, failpointArmed, failpointHold, failpointPause } from './failpoints.js';
import { Mutex } from './mutex.js';
import type { Pool, PoolStatus } from './pools.js';
import type { CacheMode, FenceToken } from './sparse-file.js';
import { readAll, readPage, WHOLE_PAGE } from './store/pages.js';
import {
  ChangeError,
  isChangeError,
  type KeyValue,
  type Store,
  untilAnswered,
} from './store/store.js';

export type Role = 'paging' | 'dump' | 'data';
export const ROLES: readonly Role[] = ['paging', 'dump', 'data'];

/**
 * Dump devices bypass the host's page cache for their (aligned) writes: a dump is
 * written once and read rarely, and through the cache it would evict what the host's
 * guests use and leave gigabytes dirty behind it (SparseFileOptions.cache).
 */
export function cacheFor(role: Role): CacheMode {
  return role === 'dump' ? 'none' : 'writeback';
}

export interface ExtentRecord {
  pool: string;
  file: string;
  size: number;
}

export interface DeviceRecord {
  name: string;
  size: number;
  role: Role;
  guest: string | null;
  extents: ExtentRecord[];
  /** creating → ready → deleting; crash recovery keys off this. */
  state: 'creating' | 'ready' | 'deleting';
  createdAt: string;
  updatedAt: string;
  /** In a cluster: the host a device in a host-local pool belongs to; null when its pools are shared. */
  host?: string | null;
  /** In a cluster: the host whose agent made the last change (it finishes or undoes it after a crash). */
  by?: string;
}

/** What the device manager needs from the cluster layer (absent on a single host). */
export interface DeviceCluster {
  /** This host's name. */
  readonly host: string;
  /** Throws STORE_UNAVAILABLE while this agent is cut off from the cluster: mutations fail fast. */
  guard(): void;
  /** The hosts whose agents serve the device (alive members only). */
  servingHosts(rec: DeviceRecord): string[];
  /**
   * Resolves once every other host serving `rec` — and `before`, the record the change
   * replaced, when it moved the device off some hosts — has applied `revision` (or its
   * lease ended).
   */
  settle(revision: number, rec: DeviceRecord, before?: DeviceRecord): Promise<void>;
  /** How to reach a host's agent, for messages. */
  describeHost(host: string): string;
}

export interface DeviceView extends Omit<DeviceRecord, 'state'> {
  /** `remote`: a device of the cluster that another host serves, not this one. */
  state: 'ready' | 'missing' | 'creating' | 'deleting' | 'remote';
  allocatedBytes: number;
  connections: number;
  exported: boolean;
  problem?: string;
  /** In a cluster: the hosts that serve it. */
  hosts?: string[];
}

const PREFIX = 'devices/';
/** How long the failpoint `device-delete-apply-delay` holds another agent's delete (tests ask meanwhile). */
const DELETE_APPLY_DELAY_MS = 20_000;
const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;

export function validateName(name: unknown, what = 'device name'): string {
  if (typeof name !== 'string' || !NAME.test(name) || name.includes('..')) {
    throw new BallastError(
      'BALLAST_BAD_NAME',
      `bad ${what} ${JSON.stringify(name)}: 1 to 63 of a-z 0-9 . _ -, starting with a letter or digit, no ".."`,
    );
  }
  return name;
}

/** A device record from its JSON, or undefined if it is not one. */
export function parseRecord(text: string): DeviceRecord | undefined {
  try {
    const r = JSON.parse(text) as DeviceRecord;
    if (
      typeof r !== 'object' ||
      r === null ||
      typeof r.name !== 'string' ||
      !Number.isSafeInteger(r.size) ||
      !Array.isArray(r.extents) ||
      !r.extents.every((e) => typeof e?.file === 'string' && typeof e.pool === 'string')
    ) {
      return undefined;
    }
    return r;
  } catch {
    return undefined;
  }
}

interface Live {
  record: DeviceRecord;
  modRevision: number;
  files: ExtentFile[];
  backend: ConcatBackend;
  stats: ExportStats;
}

export interface Problem {
  kind: 'orphan-file' | 'missing-file' | 'size-mismatch' | 'open-failed' | 'unknown-pool';
  device?: string;
  path?: string;
  message: string;
}

/** Devices are whole 512-byte sectors: QEMU and the kernel see a disk in sectors, so any
 * other size would show them a disk of another size than the catalog's. */
export const SECTOR = 512;

function checkSize(n: number, what: 'size' | 'growth'): void {
  const shown = what === 'growth' ? `+${n}` : `${n}`;
  if (!Number.isSafeInteger(n) || n <= 0) {
    throw new BallastError(
      'BALLAST_BAD_SIZE',
      `bad ${what} ${shown}: must be a positive number of bytes`,
    );
  }
  if (n % SECTOR !== 0) {
    const up = Math.ceil(n / SECTOR) * SECTOR;
    throw new BallastError(
      'BALLAST_BAD_SIZE',
      `bad ${what} ${shown}: a device is a whole number of ${SECTOR}-byte sectors (QEMU would see another size); ` +
        `use ${what === 'growth' ? '+' : ''}${up}, or a unit such as ${what === 'growth' ? '+' : ''}1M`,
    );
  }
}

/** The message for a pool name the agent does not have: which it has, and where they come from. */
export function noPool(name: string, known: Iterable<string>): string {
  const names = [...known];
  return (
    `no pool named ${JSON.stringify(name)}; this agent has ${names.length ? names.join(', ') : 'none'} ` +
    "(pools are declared in the agent's config file, `pools:`, and reloaded on SIGHUP)"
  );
}

export class DeviceManager {
  private readonly live = new Map<string, Live>();
  /** Records whose files could not be opened: listed, not exported. */
  private readonly broken = new Map<string, { record: DeviceRecord; problem: string }>();
  readonly problems: Problem[] = [];
  /** What reconciliation did at start (interrupted creates rolled back, deletes finished). */
  readonly recovered: string[] = [];
  /** One device change at a time; reads never wait. */
  private readonly mutex = new Mutex();
  /** Set by close(): background repairs stop. */
  private closed = false;
  /** Per-request access control of a device's export (reservations, access lists). */
  exportAccess?: (name: string, shared: boolean) => AccessControl;
  /** Told once a device is deleted, to drop what else is kept about it. */
  onRemoved?: (name: string) => Promise<void>;
  /** Told of each device's export counters when they are made (to hook first/last client). */
  onStats?: (name: string, stats: ExportStats) => void;
  /** Told after a device got a new extent (its tier may have changed). */
  onExtended?: (name: string, before: ExtentRecord[], after: ExtentRecord[]) => void;
  /** Streams into and out of devices (agent/stream.ts): they keep a device busy as clients do. */
  streams?: { activeOn(name: string): number; stopOn(name: string): Promise<void> };
  /** Set when the agent is part of a cluster. */
  cluster?: DeviceCluster;
  /** The agent's self-fence (cluster only): guards every write to a shared device's files. */
  fence?: FenceToken;
  /** Cluster devices this host does not serve (another host's, or not ready yet). */
  private readonly remote = new Map<string, { record: DeviceRecord; modRevision: number }>();

  constructor(
    private readonly store: Store,
    private readonly pools: Map<string, Pool>,
    private readonly catalog: DynamicCatalog,
    private readonly server: () => NbdServer | null,
    private readonly log: (msg: string) => void,
    /** Where the extents live: sparse files, or none (a hollow agent). */
    private readonly files: ExtentFiles = DISK_FILES,
  ) {}

  // ---- startup ----

  /** Bring the files and the records into agreement after a start or a crash. */
  async reconcile(fromKvs?: KeyValue[]): Promise<void> {
    const kvs = fromKvs ?? (await this.store.range(PREFIX)).kvs;
    const referenced = new Set<string>();
    for (const kv of kvs) {
      if (!kv.key.startsWith(PREFIX)) continue;
      let rec: DeviceRecord;
      try {
        rec = JSON.parse(kv.value) as DeviceRecord;
        if (typeof rec.name !== 'string' || !Array.isArray(rec.extents))
          throw new Error('bad shape');
      } catch (e) {
        this.problems.push({
          kind: 'open-failed',
          device: kv.key.slice(PREFIX.length),
          message: `the record of ${kv.key} is unreadable (${(e as Error).message}); left in place`,
        });
        continue;
      }
      for (const e of rec.extents) referenced.add(e.file);
      if (this.cluster && (!this.ours(rec) || !this.servesHere(rec))) {
        // Another host's change in progress, or a device this host does not serve.
        this.remote.set(rec.name, { record: rec, modRevision: kv.modRevision });
        continue;
      }
      if (rec.state === 'creating' || rec.state === 'deleting') {
        // Interrupted: a create is undone, a delete finished. The files are
        // ours: their names were recorded before they were made.
        const what =
          rec.state === 'creating'
            ? `device ${rec.name}: interrupted create rolled back`
            : `device ${rec.name}: interrupted delete finished`;
        this.log(what);
        this.recovered.push(what);
        await this.removeFiles(rec);
        await this.store.delete(kv.key);
        for (const e of rec.extents) referenced.delete(e.file);
        continue;
      }
      try {
        await this.open(rec, kv.modRevision);
      } catch (e) {
        const problem = (e as Error).message;
        this.broken.set(rec.name, { record: rec, problem });
        this.problems.push({
          kind:
            (e as BallastError).code === 'BALLAST_FILE_NOT_FOUND' ? 'missing-file' : 'open-failed',
          device: rec.name,
          message: problem,
        });
        this.log(`device ${rec.name}: not exported: ${problem}`);
      }
    }
    for (const pool of this.pools.values()) {
      for (const f of this.files.list(pool.path)) {
        const path = join(pool.path, f);
        if (f.endsWith('.img') && !referenced.has(path)) {
          this.problems.push({
            kind: 'orphan-file',
            path,
            message: `${path} belongs to no device (left in place; remove it by hand if unneeded)`,
          });
        }
      }
    }
  }

  private newStats(name: string): ExportStats {
    const st = new ExportStats();
    this.onStats?.(name, st);
    return st;
  }

  /** How a device's files are opened: shared pools of a cluster share the file lock and are fenced. */
  private fileOptions(rec: DeviceRecord): {
    cache: CacheMode;
    sharedLock: boolean;
    fence: FenceToken | undefined;
  } {
    const shared = this.cluster !== undefined && !rec.host;
    return {
      cache: cacheFor(rec.role),
      sharedLock: shared,
      fence: shared ? this.fence : undefined,
    };
  }

  /** Whether this host's agent made the record's last change (always, on a single host). */
  private ours(rec: DeviceRecord): boolean {
    if (!this.cluster || rec.state === 'ready') return true;
    return (rec.by ?? rec.host) === this.cluster.host;
  }

  /** Whether this agent serves the device: always on a single host; in a cluster its own or a shared one. */
  servesHere(rec: DeviceRecord): boolean {
    const c = this.cluster;
    if (!c) return true;
    if (rec.host) return rec.host === c.host;
    return rec.extents.every((e) => {
      const p = this.pools.get(e.pool);
      return p?.config.shared === true && dirname(e.file) === p.path;
    });
  }

  private async open(rec: DeviceRecord, modRevision: number): Promise<Live> {
    const files: ExtentFile[] = [];
    try {
      for (const e of rec.extents) {
        if (!this.pools.has(e.pool)) {
          throw new BallastError(
            'BALLAST_POOL_NOT_FOUND',
            `extent ${e.file} is in unknown pool ${e.pool}`,
          );
        }
        const b = await this.files.open(e.file, this.fileOptions(rec));
        if (b.size < e.size) {
          await b.close();
          throw new BallastError(
            'BALLAST_SIZE_MISMATCH',
            `${e.file} is ${b.size} bytes, expected ${e.size}`,
          );
        }
        files.push(b);
      }
    } catch (e) {
      for (const f of files) await f.close().catch(() => {});
      throw e;
    }
    const live = this.install(rec, modRevision, files, this.newStats(rec.name));
    return live;
  }

  /** (Re)build the backend and export for a device from its open files. */
  private install(
    rec: DeviceRecord,
    modRevision: number,
    files: ExtentFile[],
    stats: ExportStats,
  ): Live {
    const backend = new ConcatBackend(
      rec.extents.map((e, i) => ({ backend: files[i]!, length: e.size })),
    );
    const live: Live = { record: rec, modRevision, files, backend, stats };
    this.live.set(rec.name, live);
    this.broken.delete(rec.name);
    this.remote.delete(rec.name);
    this.catalog.set(this.exportOf(live));
    return live;
  }

  private exportOf(l: Live): Export {
    const rec = l.record;
    return {
      name: rec.name,
      description: `${rec.role} device${rec.guest ? ` of guest ${rec.guest}` : ''}`,
      backend: l.backend,
      readOnly: false,
      stats: l.stats,
      access: this.exportAccess?.(rec.name, this.cluster !== undefined && !rec.host),
    };
  }

  // ---- queries ----

  connections(name: string): number {
    return this.server()?.connectionsTo(name).length ?? 0;
  }

  view(name: string): DeviceView {
    const v = this.viewOf(name);
    if (this.cluster) v.hosts = this.cluster.servingHosts(v as DeviceRecord & DeviceView);
    return v;
  }

  private viewOf(name: string): DeviceView {
    const l = this.live.get(name);
    if (l) {
      return {
        ...l.record,
        state: 'ready',
        allocatedBytes: l.record.extents.reduce((a, e) => a + this.files.allocated(e.file), 0),
        connections: this.connections(name),
        exported: true,
      };
    }
    const b = this.broken.get(name);
    if (b) {
      return {
        ...b.record,
        state: 'missing',
        allocatedBytes: b.record.extents.reduce((a, e) => a + this.files.allocated(e.file), 0),
        connections: 0,
        exported: false,
        problem: b.problem,
      };
    }
    const r = this.remote.get(name);
    if (r) {
      return {
        ...r.record,
        state: r.record.state === 'ready' ? 'remote' : r.record.state,
        allocatedBytes: this.servesHere(r.record)
          ? r.record.extents.reduce((a, e) => a + this.files.allocated(e.file), 0)
          : 0,
        connections: 0,
        exported: false,
      };
    }
    throw new BallastError('BALLAST_DEVICE_NOT_FOUND', `no device named ${JSON.stringify(name)}`);
  }

  /** The devices this agent knows of, from its memory (in a cluster: its cache). */
  list(): DeviceView[] {
    const names = [...this.live.keys(), ...this.broken.keys(), ...this.remote.keys()].sort();
    return names.map((n) => this.view(n));
  }

  /**
   * The devices as the store has them, read in pages at one revision (agent/store/
   * pages.ts): the page `token` asks for, at most `limit` of them; every device when
   * `limit` is absent. In a cluster the store is etcd, so this lists the whole cluster
   * whatever this agent keeps in memory.
   */
  async listPage(
    limit?: number,
    token?: string,
  ): Promise<{ devices: DeviceView[]; revision: number; continue?: string }> {
    const page =
      limit === undefined && token === undefined
        ? await readAll(this.store, PREFIX)
        : await readPage(this.store, PREFIX, limit ?? WHOLE_PAGE, token);
    const devices: DeviceView[] = [];
    for (const kv of page.kvs) {
      const v = this.viewOfStored(kv);
      if (v) devices.push(v);
    }
    return {
      devices,
      revision: page.revision,
      ...(page.continue !== undefined ? { continue: page.continue } : {}),
    };
  }

  /**
   * One device: as this agent has it when it serves it here; in a cluster otherwise
   * as etcd has it (this agent need not have applied another host's latest change).
   */
  async viewFresh(name: string): Promise<DeviceView> {
    if (this.live.has(name) || this.broken.has(name) || !this.cluster) return this.view(name);
    const kv = await this.store.get(PREFIX + name);
    const v = kv ? this.viewOfStored(kv) : undefined;
    if (v) return v;
    throw new BallastError('BALLAST_DEVICE_NOT_FOUND', `no device named ${JSON.stringify(name)}`);
  }

  /**
   * A device's view from its stored record, with what this agent knows of it when it
   * serves it (connections, allocation). Undefined for a record that does not parse
   * (the agent lists those among its problems).
   */
  private viewOfStored(kv: KeyValue): DeviceView | undefined {
    const rec = parseRecord(kv.value);
    if (!rec || rec.name !== kv.key.slice(PREFIX.length)) return undefined;
    const here = this.live.get(rec.name) ?? this.broken.get(rec.name);
    let v: DeviceView;
    if (here && rec.state === 'ready') {
      // Served here: the record as stored (it may be newer than the one applied), the
      // rest as this agent has it.
      const { state, ...fields } = rec;
      v = { ...this.viewOf(rec.name), ...fields };
    } else {
      const remote = this.cluster !== undefined && rec.state === 'ready';
      v = {
        ...rec,
        state: remote ? 'remote' : rec.state,
        allocatedBytes: 0,
        connections: 0,
        exported: false,
      };
    }
    if (this.cluster) v.hosts = this.cluster.servingHosts(rec);
    return v;
  }

  /**
   * A device this agent serves, for a stream into or out of it (agent/stream.ts): its size
   * and extent files. Throws as the device commands do (not found, another host's, unavailable).
   */
  streamTarget(name: string): {
    name: string;
    size: number;
    extents: { path: string; length: number }[];
  } {
    const l = this.need(name);
    if (!this.files.dataPath) {
      throw new BallastError(
        'BALLAST_DEVICE_UNAVAILABLE',
        `device ${name}: this agent is hollow (--hollow): it has no data path to stream`,
      );
    }
    return {
      name,
      size: l.record.size,
      extents: l.record.extents.map((e) => ({ path: e.file, length: e.size })),
    };
  }

  statsOf(name: string): ExportStats | undefined {
    return this.live.get(name)?.stats;
  }

  liveNames(): string[] {
    return [...this.live.keys()];
  }

  /** Provisioned and allocated bytes per pool, from the records. */
  usage(): Map<string, { provisioned: number; allocated: number }> {
    const u = new Map<string, { provisioned: number; allocated: number }>();
    for (const p of this.pools.keys()) u.set(p, { provisioned: 0, allocated: 0 });
    const all = [...this.live.values()]
      .map((l) => l.record)
      .concat([...this.broken.values()].map((b) => b.record));
    for (const r of all) {
      for (const e of r.extents) {
        const x = u.get(e.pool);
        if (!x) continue;
        x.provisioned += e.size;
        x.allocated += this.files.allocated(e.file);
      }
    }
    return u;
  }

  async poolStatus(): Promise<PoolStatus[]> {
    const u = this.usage();
    const out: PoolStatus[] = [];
    for (const p of this.pools.values()) {
      const x = u.get(p.name)!;
      out.push(await p.status(x.provisioned, x.allocated));
    }
    return out;
  }

  // ---- changes ----

  /** Choose a pool with room for `size` more bytes (the named one, or the one with most headroom). */
  private async placement(size: number, poolName?: string): Promise<Pool> {
    const u = this.usage();
    const check = async (p: Pool): Promise<number> => {
      const c = await p.capacity();
      return c.limitBytes - u.get(p.name)!.provisioned;
    };
    if (poolName !== undefined) {
      const p = this.pools.get(poolName);
      if (!p) throw new BallastError('BALLAST_POOL_NOT_FOUND', noPool(poolName, this.pools.keys()));
      const room = await check(p);
      if (room < size) {
        throw new BallastError(
          'BALLAST_POOL_FULL',
          `pool ${p.name} cannot take ${size} more bytes: ${Math.max(room, 0)} left under its overcommit limit`,
        );
      }
      return p;
    }
    let best: Pool | null = null;
    let bestRoom = -1;
    for (const p of this.pools.values()) {
      const room = await check(p);
      if (room >= size && room > bestRoom) {
        best = p;
        bestRoom = room;
      }
    }
    if (!best) {
      throw new BallastError(
        'BALLAST_POOL_FULL',
        `no pool has room for ${size} more bytes under its overcommit limit`,
      );
    }
    return best;
  }

  private extentPath(pool: Pool, name: string): string {
    return join(pool.path, `${name}.${randomBytes(4).toString('hex')}.img`);
  }

  async create(req: {
    name: string;
    size: number;
    pool?: string;
    role?: Role;
    guest?: string | null;
  }): Promise<DeviceView> {
    this.cluster?.guard();
    const { view, revision, record } = await this.mutex.run(() => this.createLocked(req));
    await this.cluster?.settle(revision, record);
    return view;
  }

  private async createLocked(req: {
    name: string;
    size: number;
    pool?: string;
    role?: Role;
    guest?: string | null;
  }): Promise<{ view: DeviceView; revision: number; record: DeviceRecord }> {
    const name = validateName(req.name);
    const size = req.size;
    checkSize(size, 'size');
    const role = req.role ?? 'data';
    if (!ROLES.includes(role)) {
      throw new BallastError(
        'BALLAST_BAD_ROLE',
        `bad role ${JSON.stringify(role)}: expected ${ROLES.join(', ')}`,
      );
    }
    const guest = req.guest ? validateName(req.guest, 'guest name') : null;
    if (this.live.has(name) || this.broken.has(name) || this.remote.has(name)) {
      throw new BallastError('BALLAST_DEVICE_EXISTS', `device ${name} already exists`);
    }
    const pool = await this.placement(size, req.pool);
    const now = new Date().toISOString();
    const rec: DeviceRecord = {
      name,
      size,
      role,
      guest,
      extents: [{ pool: pool.name, file: this.extentPath(pool, name), size }],
      state: 'creating',
      createdAt: now,
      updatedAt: now,
    };
    if (this.cluster) {
      rec.host = pool.config.shared ? null : this.cluster.host;
      rec.by = this.cluster.host;
    }
    let files: ExtentFile[] = [];
    // 1. The intent, durable before any file exists. A failure here leaves nothing of ours
    // (in a cluster the store says NOT made, or undoes an intent that reached etcd late).
    let intentRev: number;
    try {
      const created = await this.store.createIfAbsent(PREFIX + name, JSON.stringify(rec));
      if (!created.succeeded)
        throw new BallastError('BALLAST_DEVICE_EXISTS', `device ${name} already exists`);
      intentRev = created.revision;
    } catch (e) {
      throw this.createFailed(name, rec, e, false);
    }
    try {
      failpoint('create-after-intent');
      // 2. The file, durable too.
      files = [await this.files.open(rec.extents[0]!.file, { size, ...this.fileOptions(rec) })];
      this.files.syncDir(pool.path);
      failpoint('create-after-file');
      // 3. Done: from here on the device exists.
      const ready: DeviceRecord = { ...rec, state: 'ready' };
      const done = await this.store.updateIf(PREFIX + name, JSON.stringify(ready), intentRev);
      if (!done.succeeded)
        throw new BallastError('BALLAST_CONFLICT', `device ${name} changed during create`);
      if (this.cluster && failpointArmed('create-ready-lost')) {
        // the nemesis's case, made at will: the ready record is in etcd, its answer lost
        throw new ChangeError(
          'STORE_TIMEOUT',
          'failpoint create-ready-lost: the answer was lost',
          null,
          Promise.resolve(true),
        );
      }
      failpoint('create-after-commit');
      this.install(ready, done.revision, files, this.newStats(name));
      this.log(`device ${name}: created, ${size} bytes in pool ${pool.name} (${role})`);
      return { view: this.view(name), revision: done.revision, record: ready };
    } catch (e) {
      for (const f of files) await f.close().catch(() => {});
      if (isChangeError(e) && e.made === null) throw this.createInDoubt(name, rec, e);
      await this.removeFiles(rec);
      if (isChangeError(e) && e.made === false) {
        // The ready record was NOT made: the intent is ours to remove.
        this.undoCreate(name, rec);
      } else if (!isChangeError(e)) {
        // A file or a store failure on a single host (SQLite answers or fails for good).
        try {
          await this.store.deleteIf(PREFIX + name, intentRev);
        } catch {
          this.undoCreate(name, rec);
        }
      }
      throw this.createFailed(name, rec, e, true);
    }
  }

  /**
   * A create that failed: nothing is left of it. A store call whose outcome was
   * in doubt is undone as soon as etcd tells that it was made.
   */
  private createFailed(name: string, rec: DeviceRecord, e: unknown, intentMade: boolean): unknown {
    if (!isChangeError(e)) return e;
    if (e.made === false) {
      if (!intentMade) return e;
      return new ChangeError(
        'STORE_UNAVAILABLE',
        `${e.message}: the create of ${name} was NOT made (its record goes once the store takes it)`,
        false,
        undefined,
        e,
      );
    }
    void e.outcome?.then(
      (made) => {
        if (made || intentMade) this.undoCreate(name, rec);
      },
      () => {},
    );
    return new ChangeError(
      'STORE_UNAVAILABLE',
      `${(e.cause as Error | undefined)?.message ?? e.message}; the create of ${name} was NOT made: etcd did not answer within the deadline, and a record of it that reaches etcd late is removed by this agent as soon as etcd answers (until then it may be listed as creating)`,
      false,
      undefined,
      e,
    );
  }

  /**
   * A create whose ready record may be in etcd, its answer lost. Once there it is a
   * device: the other agents serve it at once, and it is never taken back. So the
   * answer is in doubt, and the files stay until etcd tells: made, the device is
   * kept (this agent's watch serves it as the others do); NOT made, what the
   * create made goes.
   */
  private createInDoubt(name: string, rec: DeviceRecord, e: ChangeError): ChangeError {
    void e.outcome?.then(
      async (made) => {
        if (made) {
          this.log(`device ${name}: the create in doubt was made: the device is kept`);
          return;
        }
        await this.removeFiles(rec);
        this.undoCreate(name, rec);
      },
      () => {},
    );
    return new ChangeError(
      'STORE_TIMEOUT',
      `${(e.cause as Error | undefined)?.message ?? e.message}; the create of ${name} may have been made: etcd did not answer within the deadline to tell. Once it does, the device is kept if it was made, and what the create made is removed if not (the agent logs which; \`ballast cluster status\` lists the change as in doubt until then)`,
      null,
      e.outcome,
      e,
    );
  }

  /** Removes the record of a create that failed, once the store takes it (retried in the background). */
  private undoCreate(name: string, rec: DeviceRecord, delay = 250): void {
    const file = rec.extents[0]!.file;
    const retry = () => {
      if (this.closed) {
        this.log(`device ${name}: the record of a failed create is left for the next start`);
        return;
      }
      setTimeout(() => this.undoCreate(name, rec, Math.min(delay * 2, 5000)), delay).unref();
    };
    this.store.get(PREFIX + name).then(async (kv) => {
      const mine = kv ? parseRecord(kv.value) : undefined;
      if (!kv || mine?.extents[0]?.file !== file) return;
      try {
        const r = await this.store.deleteIf(PREFIX + name, kv.modRevision);
        if (r.succeeded) this.log(`device ${name}: the record of a failed create removed`);
        else retry();
      } catch {
        retry();
      }
    }, retry);
  }

  /** Why a command on `name` is refused here (BALLAST_DEVICE_REMOTE, ..._NOT_FOUND), or undefined. */
  whyNotServed(name: string): Error | undefined {
    try {
      this.need(name);
      return undefined;
    } catch (e) {
      return e as Error;
    }
  }

  private need(name: string): Live {
    const l = this.live.get(name);
    const r = this.remote.get(name);
    if (!l && r && this.cluster) {
      const owner = r.record.host;
      throw new BallastError(
        'BALLAST_DEVICE_REMOTE',
        owner
          ? `device ${name} belongs to host ${owner}: run the command against its agent (${this.cluster.describeHost(owner)})`
          : `device ${name} is ${r.record.state === 'ready' ? 'in a shared pool this host does not have' : `being changed by host ${r.record.by ?? '?'} (${r.record.state})`}`,
      );
    }
    if (!l) {
      if (this.broken.has(name)) {
        throw new BallastError(
          'BALLAST_DEVICE_UNAVAILABLE',
          `device ${name} is not available: ${this.broken.get(name)!.problem}`,
        );
      }
      throw new BallastError('BALLAST_DEVICE_NOT_FOUND', `no device named ${JSON.stringify(name)}`);
    }
    return l;
  }

  /**
   * Refuses unless nobody is connected or `force`; forced, lets each client's
   * requests in flight finish and closes it (dropping it after 5 s).
   */
  private async busy(name: string, force: boolean, what: string): Promise<void> {
    const conns = this.server()?.connectionsTo(name) ?? [];
    const streams = this.streams?.activeOn(name) ?? 0;
    if (conns.length === 0 && streams === 0) return;
    if (!force) {
      throw new BallastError(
        'BALLAST_DEVICE_BUSY',
        `device ${name} has ${conns.length} client connection(s)${streams ? ` and ${streams} stream(s)` : ''}; ${what} refused (use --force to disconnect them)`,
      );
    }
    if (streams > 0) await this.streams?.stopOn(name);
    this.log(`device ${name}: disconnecting ${conns.length} client(s) for ${what}`);
    for (const c of conns) c.shutdown();
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      Promise.all(conns.map((c) => c.closed())),
      new Promise<void>((resolve) => {
        timer = setTimeout(() => {
          for (const c of conns) c.kill();
          resolve();
        }, 5000);
      }),
    ]);
    clearTimeout(timer);
  }

  private async save(l: Live, rec: DeviceRecord): Promise<number> {
    rec.updatedAt = new Date().toISOString();
    if (this.cluster) rec.by = this.cluster.host;
    const r = await this.store.updateIf(PREFIX + rec.name, JSON.stringify(rec), l.modRevision);
    if (!r.succeeded)
      throw new BallastError(
        'BALLAST_CONFLICT',
        `device ${rec.name} was changed concurrently; retry`,
      );
    return r.revision;
  }

  /**
   * Runs a change to device `name`. In a cluster this agent's cache may lag the
   * store for a moment (catching up after a cut, or a change made through
   * another agent an instant ago): an answer that the device exists or does not
   * is checked against etcd before it is given, and one the cache got wrong
   * says so, NOT made, rather than refuse for a reason that no longer holds.
   */
  async confirmed<T>(name: string, change: () => Promise<T>): Promise<T> {
    try {
      return await change();
    } catch (e) {
      const code = (e as { code?: string }).code;
      if (
        !this.cluster ||
        (code !== 'BALLAST_DEVICE_EXISTS' && code !== 'BALLAST_DEVICE_NOT_FOUND')
      )
        throw e;
      const there = await this.stored(name);
      // A deleted device whose record the store has not yet taken away (its delete was
      // answered; the agent that made it retries the removal) holds its name, but it does
      // not exist: a create is refused NOT made, never BALLAST_DEVICE_EXISTS.
      if (
        code === 'BALLAST_DEVICE_EXISTS' &&
        there &&
        parseRecord(there.value)?.state === 'deleting'
      )
        throw new BallastError(
          'BALLAST_CONFLICT',
          `device ${name} is deleted, and its record is not yet removed from etcd (the agent that deleted it retries until etcd takes it): the change was NOT made (retry)`,
        );
      if ((code === 'BALLAST_DEVICE_EXISTS') === (there !== undefined)) throw e;
      throw new BallastError(
        'BALLAST_CONFLICT',
        `device ${name} was ${there ? 'created' : 'deleted'} through another agent a moment ago and this agent has not applied it yet: the change was NOT made (retry)`,
      );
    }
  }

  /**
   * In a cluster, an answer this agent gives from its cache without writing (a
   * refusal to shrink, a resize to the size the device has) holds only if the
   * cache has the device's current record: etcd is asked (a linearizable read,
   * made after the request came), and a record changed or gone there answers
   * BALLAST_CONFLICT, NOT made (a frozen agent woken with a backlog of events
   * answered from the record of a device deleted seconds before).
   */
  private async current(name: string, l: Live): Promise<void> {
    if (!this.cluster) return;
    const kv = await this.stored(name);
    if (kv?.modRevision === l.modRevision) return;
    throw new BallastError(
      'BALLAST_CONFLICT',
      `device ${name} was ${kv ? 'changed' : 'deleted'} through another agent a moment ago and this agent has not applied it yet: the change was NOT made (retry)`,
    );
  }

  /** The device's record as etcd has it now; a read that fails answers NOT made. */
  private async stored(name: string): Promise<KeyValue | undefined> {
    try {
      return await this.store.get(PREFIX + name);
    } catch (e) {
      throw new ChangeError(
        'STORE_UNAVAILABLE',
        `${(e as Error).message}: the agent could not check device ${name} against etcd: the change was NOT made`,
        false,
        undefined,
        e,
      );
    }
  }

  async remove(nameIn: string, force = false): Promise<void> {
    this.cluster?.guard();
    const done = await this.mutex.run(() => this.removeLocked(nameIn, force));
    if (done) await this.cluster?.settle(done.revision, done.record);
  }

  private removeLocked(
    nameIn: string,
    force: boolean,
  ): Promise<{ revision: number; record: DeviceRecord } | undefined> {
    return (async () => {
      const name = validateName(nameIn);
      const b = this.broken.get(name);
      if (b) {
        // Only the record this agent found broken: in a cluster the name may have been
        // deleted and made again through another agent a moment ago.
        const kv = await this.stored(name);
        const now = kv ? parseRecord(kv.value) : undefined;
        const same =
          now?.createdAt === b.record.createdAt &&
          now.extents[0]?.file === b.record.extents[0]?.file;
        // Gone already: nothing to remove. Otherwise removed only if still that record.
        if (kv && !(same && (await this.store.deleteIf(PREFIX + name, kv.modRevision)).succeeded)) {
          throw new BallastError(
            'BALLAST_CONFLICT',
            `device ${name} was changed through another agent a moment ago and this agent has not applied it yet: the change was NOT made (retry)`,
          );
        }
        this.broken.delete(name);
        this.log(`device ${name}: record removed (its files were unavailable)`);
        return undefined;
      }
      const l = this.need(name);
      await this.busy(name, force, 'delete');
      const rec: DeviceRecord = { ...l.record, state: 'deleting' };
      // Out of the catalogue first: no new client can open it from here on.
      this.catalog.delete(name);
      let intentRev: number;
      try {
        intentRev = await this.save(l, rec);
      } catch (e) {
        this.catalog.set(this.exportOf(l));
        if (isChangeError(e) && e.made === null) {
          // If it was made, the watch stops the export here as on every host; the files and
          // the record go then.
          void e.outcome?.then(
            async (made) => {
              if (!made) return;
              await this.removeFiles(rec);
              this.finishDelete(name);
            },
            () => {},
          );
          throw new ChangeError(
            'STORE_TIMEOUT',
            `${e.message}. If the delete of ${name} was made, the agent finishes it then`,
            null,
            e.outcome,
            e,
          );
        }
        throw e;
      }
      failpoint('delete-after-intent');
      this.live.delete(name);
      for (const f of l.files) await f.close().catch(() => {});
      await this.removeFiles(rec);
      let revision: number;
      try {
        if (failpointArmed('delete-record-lost'))
          throw new Error(
            'failpoint delete-record-lost: the record stays until DEVICEFILE.hold goes',
          );
        revision = (await untilAnswered(() => this.store.delete(PREFIX + name))).revision;
        await this.onRemoved?.(name);
      } catch (e) {
        // The device is gone everywhere (its record says deleting, its files are removed);
        // the record and its reservations go as soon as the store takes them.
        this.log(`device ${name}: removing its record failed (${(e as Error).message}); retrying`);
        revision = intentRev;
        void failpointHold('delete-record-lost', `${rec.extents[0]!.file}.hold`).then(() =>
          this.finishDelete(name),
        );
      }
      this.log(`device ${name}: deleted`);
      return { revision, record: rec };
    })();
  }

  /** Removes the record of a device this host deleted, once the store takes it (retried). */
  private finishDelete(name: string, delay = 250): void {
    const retry = () => {
      if (this.closed) return;
      setTimeout(() => this.finishDelete(name, Math.min(delay * 2, 5000)), delay).unref();
    };
    this.store.get(PREFIX + name).then(async (kv) => {
      const rec = kv ? parseRecord(kv.value) : undefined;
      if (!kv || rec?.state !== 'deleting' || !this.ours(rec)) return;
      try {
        const r = await this.store.deleteIf(PREFIX + name, kv.modRevision);
        if (r.succeeded) {
          await this.onRemoved?.(name);
          this.log(`device ${name}: record removed`);
        } else retry();
      } catch {
        retry();
      }
    }, retry);
  }

  private async removeFiles(rec: DeviceRecord): Promise<void> {
    const dirs = new Set<string>();
    for (const e of rec.extents) {
      this.files.remove(e.file);
      dirs.add(join(e.file, '..'));
    }
    for (const d of dirs) {
      try {
        this.files.syncDir(d);
      } catch {}
    }
  }

  /** Runs a change of an existing device, then waits until every host serving it has it. */
  private async change(name: string, fn: () => Promise<DeviceView>): Promise<DeviceView> {
    this.cluster?.guard();
    const before = this.live.get(name)?.record;
    const view = await this.mutex.run(fn);
    const l = this.live.get(name);
    if (this.cluster && l) await this.cluster.settle(l.modRevision, l.record, before);
    return view;
  }

  resize(nameIn: string, newSize: number, force = false): Promise<DeviceView> {
    return this.change(nameIn, async () => {
      const name = validateName(nameIn);
      const l = this.need(name);
      checkSize(newSize, 'size');
      const old = l.record;
      if (newSize === old.size) {
        await this.current(name, l);
        return this.view(name);
      }
      const rec: DeviceRecord = {
        ...old,
        extents: old.extents.map((e) => ({ ...e })),
        size: newSize,
      };
      const files = [...l.files];
      if (newSize > old.size) {
        const last = rec.extents[rec.extents.length - 1]!;
        const grow = newSize - old.size;
        const pool = this.pools.get(last.pool)!;
        await this.placement(grow, pool.name);
        last.size += grow;
        await files[files.length - 1]!.growTo(last.size);
      } else {
        if (!force) {
          await this.current(name, l);
          throw new BallastError(
            'BALLAST_SHRINK_REFUSED',
            `shrinking ${name} from ${old.size} to ${newSize} bytes discards data; use --force`,
          );
        }
        await this.busy(name, force, 'shrink');
        let left = newSize;
        const keep: ExtentRecord[] = [];
        for (const e of rec.extents) {
          if (left <= 0) break;
          keep.push({ ...e, size: Math.min(e.size, left) });
          left -= e.size;
        }
        const dropped = rec.extents.slice(keep.length);
        rec.extents = keep;
        const revision = await this.save(l, rec);
        for (let i = 0; i < keep.length; i++) await files[i]!.resize(keep[i]!.size);
        for (let i = keep.length; i < files.length; i++) await files[i]!.close();
        await this.removeFiles({ ...rec, extents: dropped });
        this.install(rec, revision, files.slice(0, keep.length), l.stats);
        this.log(`device ${name}: shrunk to ${newSize} bytes`);
        return this.view(name);
      }
      const revision = await this.save(l, rec);
      this.install(rec, revision, files, l.stats);
      this.log(`device ${name}: grown to ${newSize} bytes`);
      return this.view(name);
    });
  }

  extend(nameIn: string, poolName: string, grow: number): Promise<DeviceView> {
    return this.change(nameIn, async () => {
      const name = validateName(nameIn);
      const l = this.need(name);
      checkSize(grow, 'growth');
      const pool = await this.placement(grow, poolName);
      const file = this.extentPath(pool, name);
      const rec: DeviceRecord = {
        ...l.record,
        size: l.record.size + grow,
        extents: [
          ...l.record.extents.map((e) => ({ ...e })),
          { pool: pool.name, file, size: grow },
        ],
      };
      // The file first, then the record: a crash in between leaves an orphan
      // file (reported), never a record pointing at nothing.
      const f = await this.files.open(file, { size: grow, ...this.fileOptions(rec) });
      try {
        this.files.syncDir(pool.path);
        const revision = await this.save(l, rec);
        this.install(rec, revision, [...l.files, f], l.stats);
      } catch (e) {
        await f.close().catch(() => {});
        if (isChangeError(e) && e.made === null) {
          // Made after all, the record names the file (the watch opens it): keep it until known.
          void e.outcome?.then(
            (made) => {
              if (!made) this.files.remove(file);
            },
            () => {},
          );
        } else {
          this.files.remove(file);
        }
        throw e;
      }
      this.log(`device ${name}: extended by ${grow} bytes in pool ${pool.name}`);
      this.onExtended?.(name, l.record.extents, rec.extents);
      return this.view(name);
    });
  }

  // ---- changes made by other hosts (cluster) ----

  /**
   * Applies a device record as another host's agent wrote it (from the cluster
   * watch, in revision order): this host's export follows it. `kv` undefined: deleted.
   * Files are never created or removed here; the host that made the change does that.
   */
  async applyRemote(name: string, kv: KeyValue | undefined, modRevision: number): Promise<void> {
    if (this.live.has(name) && (!kv || parseRecord(kv.value)?.state === 'deleting')) {
      await failpointPause('device-delete-apply-delay', DELETE_APPLY_DELAY_MS);
    }
    return this.mutex.run(async () => {
      const known = this.live.get(name)?.modRevision ?? this.remote.get(name)?.modRevision ?? 0;
      if (modRevision <= known) return; // our own change, already applied
      const rec = kv ? parseRecord(kv.value) : undefined;
      if (kv && !rec) {
        this.log(`cluster: the record of device ${name} is unreadable; ignored`);
        return;
      }
      if (rec?.state !== 'ready' || !this.servesHere(rec)) {
        await this.unexport(name, rec ? `${rec.state} by ${rec.by ?? 'another host'}` : 'deleted');
        this.broken.delete(name);
        if (rec) this.remote.set(name, { record: rec, modRevision });
        else {
          this.remote.delete(name);
          this.catalog.delete(name);
        }
        return;
      }
      const l = this.live.get(name);
      if (!l) {
        try {
          await this.open(rec, modRevision);
          this.log(`device ${name}: now served here (made by ${rec.by ?? 'another host'})`);
        } catch (e) {
          this.remote.delete(name);
          this.broken.set(name, { record: rec, problem: (e as Error).message });
          this.log(`device ${name}: cannot serve it: ${(e as Error).message}`);
        }
        return;
      }
      // Same device, changed: keep the open files that are still extents, open new ones.
      if (rec.size < l.record.size) await this.busy(name, true, 'shrink on another host');
      const files: ExtentFile[] = [];
      try {
        for (const [i, e] of rec.extents.entries()) {
          const old = l.record.extents[i];
          const f = old?.file === e.file ? l.files[i] : undefined;
          if (f) {
            // Judged on the records, not on the file: a grow never shortens the file
            // on disk (growTo), since a later grow by another agent may be there
            // already, with data its clients wrote; only a shrink (forced) does.
            if (old && e.size < old.size) await f.resize(e.size);
            else if (f.size !== e.size) await f.growTo(e.size);
            files.push(f);
          } else {
            files.push(await this.files.open(e.file, this.fileOptions(rec)));
          }
        }
      } catch (e) {
        for (const f of files) if (!l.files.includes(f)) await f.close().catch(() => {});
        this.log(`device ${name}: cannot follow the change: ${(e as Error).message}`);
        return;
      }
      for (const f of l.files) if (!files.includes(f)) await f.close().catch(() => {});
      this.install(rec, modRevision, files, l.stats);
    });
  }

  /** Stops serving a device here: no new clients, current ones disconnected, files closed. */
  private async unexport(name: string, why: string): Promise<void> {
    const l = this.live.get(name);
    if (!l) return;
    this.catalog.delete(name);
    await this.busy(name, true, why);
    this.live.delete(name);
    for (const f of l.files) await f.close().catch(() => {});
  }

  /** FLUSH every device; returns the names of those whose flush failed. */
  async flushAll(): Promise<string[]> {
    const failed: string[] = [];
    for (const [name, l] of this.live) {
      if (!l.backend.caps.flush) continue;
      const errno = await new Promise<number>((resolve) =>
        l.backend.flush({
          offset: 0,
          length: 0,
          buf: Buffer.alloc(0),
          bufOffset: 0,
          done: resolve,
        }),
      );
      if (errno !== 0) {
        this.log(`device ${name}: flush failed: errno ${errno}`);
        failed.push(name);
      }
    }
    return failed;
  }

  async close(): Promise<void> {
    this.closed = true;
    for (const l of this.live.values()) {
      for (const f of l.files) await f.close().catch(() => {});
    }
    this.live.clear();
  }

  /** For `ballast status`: the file name stem, to spot a device's files by eye. */
  static stem(file: string): string {
    return basename(file);
  }
}
