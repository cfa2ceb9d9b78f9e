// Virtual devices: records in the store, extents as sparse files in pools,
// one NBD export each. Every change is a sequence of store transactions and
// file operations ordered so that a crash at any point leaves either the old
// state or the new one, and startup reconciliation finishes or undoes what a
// crash interrupted.

import { randomBytes } from 'node:crypto';
import { closeSync, fsyncSync, openSync, readdirSync, rmSync, statSync } from 'node:fs';
import { basename, join } from 'node:path';
import type { AccessControl, Export } from '../nbd/export.js';
import type { NbdServer } from '../nbd/server.js';
import { ExportStats } from '../nbd/stats.js';
import type { DynamicCatalog } from './catalog.js';
import { ConcatBackend } from './concat-backend.js';
import { BallastError } from './errors.js';
import { failpoint } from './failpoints.js';
import { Mutex } from './mutex.js';
import type { Pool, PoolStatus } from './pools.js';
import { type CacheMode, SparseFileBackend } from './sparse-file.js';
import type { Store } from './store/store.js';

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
}

export interface DeviceView extends Omit<DeviceRecord, 'state'> {
  state: 'ready' | 'missing' | 'creating' | 'deleting';
  allocatedBytes: number;
  connections: number;
  exported: boolean;
  problem?: string;
}

const PREFIX = 'devices/';
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

function fsyncDir(dir: string): void {
  const fd = openSync(dir, 'r');
  try {
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
}

function allocated(file: string): number {
  try {
    return statSync(file).blocks * 512;
  } catch {
    return 0;
  }
}

interface Live {
  record: DeviceRecord;
  modRevision: number;
  files: SparseFileBackend[];
  backend: ConcatBackend;
  stats: ExportStats;
}

export interface Problem {
  kind: 'orphan-file' | 'missing-file' | 'size-mismatch' | 'open-failed' | 'unknown-pool';
  device?: string;
  path?: string;
  message: string;
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
  /** Per-request access control of a device's export (reservations, access lists). */
  exportAccess?: (name: string) => AccessControl;
  /** Told once a device is deleted, to drop what else is kept about it. */
  onRemoved?: (name: string) => Promise<void>;

  constructor(
    private readonly store: Store,
    private readonly pools: Map<string, Pool>,
    private readonly catalog: DynamicCatalog,
    private readonly server: () => NbdServer | null,
    private readonly log: (msg: string) => void,
  ) {}

  // ---- startup ----

  /** Bring the files and the records into agreement after a start or a crash. */
  async reconcile(): Promise<void> {
    const { kvs } = await this.store.range(PREFIX);
    const referenced = new Set<string>();
    for (const kv of kvs) {
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
      for (const f of readdirSync(pool.path)) {
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

  private async open(rec: DeviceRecord, modRevision: number): Promise<Live> {
    const files: SparseFileBackend[] = [];
    try {
      for (const e of rec.extents) {
        if (!this.pools.has(e.pool)) {
          throw new BallastError(
            'BALLAST_POOL_NOT_FOUND',
            `extent ${e.file} is in unknown pool ${e.pool}`,
          );
        }
        const b = await SparseFileBackend.open(e.file, { cache: cacheFor(rec.role) });
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
    const live = this.install(rec, modRevision, files, new ExportStats());
    return live;
  }

  /** (Re)build the backend and export for a device from its open files. */
  private install(
    rec: DeviceRecord,
    modRevision: number,
    files: SparseFileBackend[],
    stats: ExportStats,
  ): Live {
    const backend = new ConcatBackend(
      rec.extents.map((e, i) => ({ backend: files[i]!, length: e.size })),
    );
    const live: Live = { record: rec, modRevision, files, backend, stats };
    this.live.set(rec.name, live);
    this.broken.delete(rec.name);
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
      access: this.exportAccess?.(rec.name),
    };
  }

  // ---- queries ----

  connections(name: string): number {
    return this.server()?.connectionsTo(name).length ?? 0;
  }

  view(name: string): DeviceView {
    const l = this.live.get(name);
    if (l) {
      return {
        ...l.record,
        state: 'ready',
        allocatedBytes: l.record.extents.reduce((a, e) => a + allocated(e.file), 0),
        connections: this.connections(name),
        exported: true,
      };
    }
    const b = this.broken.get(name);
    if (b) {
      return {
        ...b.record,
        state: 'missing',
        allocatedBytes: b.record.extents.reduce((a, e) => a + allocated(e.file), 0),
        connections: 0,
        exported: false,
        problem: b.problem,
      };
    }
    throw new BallastError('BALLAST_DEVICE_NOT_FOUND', `no device named ${JSON.stringify(name)}`);
  }

  list(): DeviceView[] {
    const names = [...this.live.keys(), ...this.broken.keys()].sort();
    return names.map((n) => this.view(n));
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
        x.allocated += allocated(e.file);
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
      if (!p)
        throw new BallastError(
          'BALLAST_POOL_NOT_FOUND',
          `no pool named ${JSON.stringify(poolName)}`,
        );
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

  create(req: {
    name: string;
    size: number;
    pool?: string;
    role?: Role;
    guest?: string | null;
  }): Promise<DeviceView> {
    return this.mutex.run(async () => {
      const name = validateName(req.name);
      const size = req.size;
      if (!Number.isSafeInteger(size) || size <= 0) {
        throw new BallastError(
          'BALLAST_BAD_SIZE',
          `bad size ${size}: must be a positive number of bytes`,
        );
      }
      const role = req.role ?? 'data';
      if (!ROLES.includes(role)) {
        throw new BallastError(
          'BALLAST_BAD_ROLE',
          `bad role ${JSON.stringify(role)}: expected ${ROLES.join(', ')}`,
        );
      }
      const guest = req.guest ? validateName(req.guest, 'guest name') : null;
      if (this.live.has(name) || this.broken.has(name)) {
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
      // 1. The intent, durable before any file exists.
      const created = await this.store.createIfAbsent(PREFIX + name, JSON.stringify(rec));
      if (!created.succeeded)
        throw new BallastError('BALLAST_DEVICE_EXISTS', `device ${name} already exists`);
      failpoint('create-after-intent');
      let files: SparseFileBackend[] = [];
      try {
        // 2. The file, durable too.
        files = [
          await SparseFileBackend.open(rec.extents[0]!.file, { size, cache: cacheFor(rec.role) }),
        ];
        fsyncDir(pool.path);
        failpoint('create-after-file');
        // 3. Done: from here on the device exists.
        rec.state = 'ready';
        const done = await this.store.updateIf(
          PREFIX + name,
          JSON.stringify(rec),
          created.revision,
        );
        if (!done.succeeded)
          throw new BallastError('BALLAST_CONFLICT', `device ${name} changed during create`);
        failpoint('create-after-commit');
        this.install(rec, done.revision, files, new ExportStats());
      } catch (e) {
        for (const f of files) await f.close().catch(() => {});
        await this.removeFiles(rec);
        await this.store.delete(PREFIX + name).catch(() => {});
        throw e;
      }
      this.log(`device ${name}: created, ${size} bytes in pool ${pool.name} (${role})`);
      return this.view(name);
    });
  }

  private need(name: string): Live {
    const l = this.live.get(name);
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
    if (conns.length === 0) return;
    if (!force) {
      throw new BallastError(
        'BALLAST_DEVICE_BUSY',
        `device ${name} has ${conns.length} client connection(s); ${what} refused (use --force to disconnect them)`,
      );
    }
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
    const r = await this.store.updateIf(PREFIX + rec.name, JSON.stringify(rec), l.modRevision);
    if (!r.succeeded)
      throw new BallastError(
        'BALLAST_CONFLICT',
        `device ${rec.name} was changed concurrently; retry`,
      );
    return r.revision;
  }

  remove(nameIn: string, force = false): Promise<void> {
    return this.mutex.run(async () => {
      const name = validateName(nameIn);
      const b = this.broken.get(name);
      if (b) {
        await this.store.delete(PREFIX + name);
        this.broken.delete(name);
        this.log(`device ${name}: record removed (its files were unavailable)`);
        return;
      }
      const l = this.need(name);
      await this.busy(name, force, 'delete');
      const rec: DeviceRecord = { ...l.record, state: 'deleting' };
      // Out of the catalogue first: no new client can open it from here on.
      this.catalog.delete(name);
      try {
        await this.save(l, rec);
      } catch (e) {
        this.catalog.set(this.exportOf(l));
        throw e;
      }
      failpoint('delete-after-intent');
      this.live.delete(name);
      for (const f of l.files) await f.close().catch(() => {});
      await this.removeFiles(rec);
      await this.store.delete(PREFIX + name);
      await this.onRemoved?.(name);
      this.log(`device ${name}: deleted`);
    });
  }

  private async removeFiles(rec: DeviceRecord): Promise<void> {
    const dirs = new Set<string>();
    for (const e of rec.extents) {
      rmSync(e.file, { force: true });
      dirs.add(join(e.file, '..'));
    }
    for (const d of dirs) {
      try {
        fsyncDir(d);
      } catch {}
    }
  }

  resize(nameIn: string, newSize: number, force = false): Promise<DeviceView> {
    return this.mutex.run(async () => {
      const name = validateName(nameIn);
      const l = this.need(name);
      if (!Number.isSafeInteger(newSize) || newSize <= 0) {
        throw new BallastError(
          'BALLAST_BAD_SIZE',
          `bad size ${newSize}: must be a positive number of bytes`,
        );
      }
      const old = l.record;
      if (newSize === old.size) return this.view(name);
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
        await files[files.length - 1]!.resize(last.size);
      } else {
        if (!force) {
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
    return this.mutex.run(async () => {
      const name = validateName(nameIn);
      const l = this.need(name);
      if (!Number.isSafeInteger(grow) || grow <= 0) {
        throw new BallastError(
          'BALLAST_BAD_SIZE',
          `bad size +${grow}: must be a positive number of bytes`,
        );
      }
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
      const f = await SparseFileBackend.open(file, { size: grow, cache: cacheFor(rec.role) });
      try {
        fsyncDir(pool.path);
        const revision = await this.save(l, rec);
        this.install(rec, revision, [...l.files, f], l.stats);
      } catch (e) {
        await f.close().catch(() => {});
        rmSync(file, { force: true });
        throw e;
      }
      this.log(`device ${name}: extended by ${grow} bytes in pool ${pool.name}`);
      return this.view(name);
    });
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
