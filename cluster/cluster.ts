// One agent's membership of the cluster and its view of the shared catalog.
//
// - Membership is a lease: `members/<host>` lives while this agent keeps its
//   lease alive. A clean stop marks `hosts/<host>` left and revokes the lease; a
//   crash lets it expire. The keepalive loop is also the agent's health: while a
//   keepalive fails, mutations are refused at once (STORE_UNAVAILABLE) and reads
//   are answered from the local cache, marked stale.
// - The cache is the whole cluster prefix: listed once, then watched from that
//   revision; a compacted history means list again and diff, never guess.
//   Events are applied in revision order by one worker; catalog events (devices,
//   reservations, access lists) go to the agent's handler.
// - Acks: after applying catalog events up to revision R, the agent writes
//   `acks/<host>` = R under its lease. A change returns once every other host
//   serving the device has acked its revision, or its lease is gone.

import { hostname } from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import type { ClusterConfig } from '../agent/cluster-config.js';
import { BallastError } from '../agent/errors.js';
import { failpointArmed, failpointHold } from '../agent/failpoints.js';
import { readAll, readPage, WHOLE_PAGE } from '../agent/store/pages.js';
import {
  cmp,
  isStoreError,
  type KeyValue,
  op,
  type Store,
  StoreError,
  type WatchEvent,
  type Watcher,
} from '../agent/store/store.js';
import type { Fence } from './fence.js';

export const MEMBERS = 'members/';
export const HOSTS = 'hosts/';
export const ACKS = 'acks/';
/**
 * `epochs/<host>`: put under the membership lease at registration. Every change
 * this agent sends is conditional on the key's createRevision (agent/store/
 * guarded-store.ts): deleting the key, or the lease ending, makes every change
 * sent before it fail, wherever its bytes still are.
 */
export const EPOCHS = 'epochs/';
/** Key prefixes whose changes every serving agent must apply before a change returns. */
export const CATALOG = ['devices/', 'pr/', 'acl/', 'pr-settled/'];

export interface PoolInfo {
  name: string;
  path: string;
  shared: boolean;
  media: string;
}

export interface MemberInfo {
  host: string;
  version: string;
  pid: number;
  /** The machine's own hostname (several agents may run on one machine). */
  machine: string;
  dataDir: string;
  nbd: { socket?: string; tcp?: { host: string; port: number } };
  api: string[];
  pools: PoolInfo[];
  startedAt: string;
  lease: string;
  /**
   * `serving`: this agent acks only changes of devices it serves, and a change it makes
   * waits only for the agents serving the device. Absent in the records of agents that
   * wait for every member: while one is alive, every agent acks every change.
   */
  acks?: 'serving';
  /** A hollow agent (`ballast agent --hollow`): a member with no data path, for benchmarks. */
  hollow?: boolean;
}

export type MemberState = 'alive' | 'expired' | 'left';

/** Why a change's wait for a member ended. */
export type SettledHow = 'self' | 'acked' | 'expired' | 'left';

export interface MemberView extends Partial<MemberInfo> {
  host: string;
  state: MemberState;
  /** The last catalog revision the member applied (alive members). */
  applied?: number;
  /** Since when it is in its state: joined (alive), stopped (left), lease seen gone (expired). */
  since?: string;
  /** When it last joined. */
  joined?: string;
}

interface HostRecord {
  host: string;
  /** `expired`: a member saw the lease go without a clean stop (since: when it saw it). */
  state: 'up' | 'left' | 'expired';
  since: string;
  /** When the host last joined (kept when the record says left or expired). */
  joined?: string;
  info?: MemberInfo;
}

export interface ClusterOptions {
  store: Store;
  config: ClusterConfig;
  log: (msg: string) => void;
  /** Catalog events, in revision order. */
  apply: (ev: WatchEvent) => Promise<void>;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

function parse<T>(text: string): T | undefined {
  try {
    const v = JSON.parse(text) as unknown;
    return typeof v === 'object' && v !== null ? (v as T) : undefined;
  } catch {
    return undefined;
  }
}

function pidAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (e) {
    return (e as NodeJS.ErrnoException).code === 'EPERM';
  }
}

export class Cluster {
  readonly host: string;
  private lease = '';
  private readonly kvs = new Map<string, KeyValue>();
  /** The revision the cache reflects. */
  revision = 0;
  /** The last catalog revision applied (what this host acks). */
  private appliedCatalog = 0;
  private ackedCatalog = 0;
  private acking = false;
  private watcher: Watcher | undefined;
  private queue: WatchEvent[] = [];
  private draining = false;
  private waiters = new Set<() => void>();
  private stopped = false;
  private keepTimer: NodeJS.Timeout | undefined;
  /** performance.now() at the send of the last keepalive (or grant) etcd acknowledged. */
  private lastAckSent = 0;
  private healthy = false;
  private unhealthySince: number | null = null;
  private unhealthyReason = '';
  /** Counters for metrics and status. */
  readonly stats = { keepaliveFailures: 0, relists: 0, reRegistrations: 0, skippedKeys: 0 };
  /** Keys under the prefix that are not Ballast's (reported, never fatal). */
  readonly garbage = new Set<string>();
  /** The newest revision seen from the store (for the watch lag). */
  storeRevision = 0;
  /** After the lease was lost: the revision the cache must reach before serving again. */
  private catchUpTo = 0;
  /** Changes whose outcome is not known yet (cluster/changes.ts), for status. */
  inDoubt: (() => { keys: string[]; since: string; reason: string }[]) | undefined;
  /** The data path's fence, told when the agent may serve again. */
  fence: Fence | undefined;

  private constructor(private readonly opts: ClusterOptions) {
    this.host = opts.config.host;
  }

  get store(): Store {
    return this.opts.store;
  }

  get config(): ClusterConfig {
    return this.opts.config;
  }

  /** Lists the cluster's keys (the agent reconciles its devices from them before it serves). */
  static async open(opts: ClusterOptions): Promise<Cluster> {
    const c = new Cluster(opts);
    await c.list();
    return c;
  }

  // ---- membership ----

  private baseInfo: Omit<MemberInfo, 'lease'> | undefined;
  /** Whether this agent ever held its member key (a refused agent leaves nothing behind). */
  private registered = false;
  /** Failpoint register-lost: the one re-registration whose answer is lost has been. */
  private lostOnce = false;
  /** When this agent last registered (its hosts/<host> record's since), kept for leave(). */
  private upSince: string | undefined;

  /** The createRevision of `epochs/<host>` changes are conditional on (0: none live). */
  private epochRev = 0;
  private newEpoch: Promise<number> | undefined;

  /**
   * The epoch the next change is sent under: the one made at registration, or
   * a new one after an in-doubt change killed it (one round trip).
   */
  async epoch(): Promise<number> {
    if (this.epochRev > 0) return this.epochRev;
    if (!this.registered) {
      throw new StoreError('STORE_UNAVAILABLE', 'this agent is not registered in the cluster');
    }
    this.newEpoch ??= (async () => {
      const key = EPOCHS + this.host;
      const lease = this.lease;
      try {
        const r = await this.store.txn({
          compare: [cmp.version(key, '=', 0)],
          success: [op.put(key, lease, { lease })],
          failure: [op.get(key)],
        });
        const got = r.responses[0];
        if (r.succeeded) this.epochRev = r.revision;
        // An earlier try that answered late: the key is ours if it is under our lease.
        else if (got?.type === 'get' && got.kv?.lease === lease && lease === this.lease) {
          this.epochRev = got.kv.createRevision;
        }
        if (this.epochRev === 0) {
          throw new StoreError('STORE_UNAVAILABLE', `${key} is held under another lease`);
        }
        return this.epochRev;
      } finally {
        this.newEpoch = undefined;
      }
    })();
    return this.newEpoch;
  }

  /** Changes sent under epoch `rev` can no longer be made: the next one needs a new epoch. */
  epochEnded(rev: number): void {
    if (this.epochRev === rev) this.epochRev = 0;
  }

  /** Whether changes go through the epoch (after join; before it, start-up repairs do not). */
  joined(): boolean {
    return this.registered && !this.stopped;
  }

  /**
   * The newest catalog revision this agent applied once its cache has reached
   * `revision`: what to wait for when a change was found made by reading it back
   * (a delete's own revision is not in what a read returns).
   */
  async catalogRevisionAt(revision: number, timeoutMs: number): Promise<number> {
    await this.waitUntil(() => this.revision >= revision, timeoutMs);
    return this.appliedCatalog;
  }

  private info(): MemberInfo {
    return { ...this.baseInfo!, lease: this.lease };
  }

  /**
   * Registers this host under a new lease, refusing a name that another live agent
   * holds; then watches the cluster and keeps the lease alive.
   */
  async join(info: Omit<MemberInfo, 'lease'>): Promise<void> {
    this.baseInfo = { ...info, acks: 'serving' };
    await this.register();
    await this.startWatch();
    this.startKeepalive();
  }

  private async register(): Promise<void> {
    const { store, config } = this.opts;
    const me = this.baseInfo!;
    this.epochRev = 0;
    for (let attempt = 0; ; attempt++) {
      const t0 = performance.now();
      const lease = await store.grantLease(config.leaseTtl);
      const key = MEMBERS + this.host;
      // The new lease becomes this agent's only with its member key: kept alive
      // without one, it would make the agent healthy (and unfenced) while the other
      // agents, seeing no member, wait for nothing it has not applied.
      const info: MemberInfo = { ...me, lease };
      const hostRec: HostRecord = {
        host: this.host,
        state: 'up',
        since: new Date().toISOString(),
        info,
      };
      let r: Awaited<ReturnType<Store['txn']>>;
      try {
        if (failpointArmed('register-lost') && this.registered && !this.lostOnce) {
          this.lostOnce = true;
          throw new StoreError('STORE_UNAVAILABLE', 'failpoint register-lost: the answer was lost');
        }
        r = await store.txn({
          compare: [cmp.version(key, '=', 0)],
          success: [
            op.put(key, JSON.stringify(info), { lease }),
            op.put(HOSTS + this.host, JSON.stringify(hostRec)),
            op.put(ACKS + this.host, String(this.appliedCatalog), { lease }),
            op.put(EPOCHS + this.host, lease, { lease }),
          ],
          failure: [op.get(key)],
        });
      } catch (e) {
        // Made or not, the registration under this lease goes with it (the next one
        // starts afresh); should the revoke be lost too, the lease runs out.
        await store.revokeLease(lease).catch(() => {});
        throw e;
      }
      if (r.succeeded) {
        this.lease = lease;
        this.registered = true;
        this.upSince = hostRec.since;
        this.epochRev = r.revision;
        // Before the lease counts as renewed: whatever other hosts did up to this
        // registration must be applied before the fence may open (no await in between,
        // or a request admitted meanwhile would be judged on the state before the cut).
        this.catchUpTo = Math.max(this.catchUpTo, r.revision);
        this.lastAckSent = t0;
        this.setHealthy();
        return;
      }
      await store.revokeLease(lease).catch(() => {});
      const got = r.responses[0];
      const other = got?.type === 'get' && got.kv ? parse<MemberInfo>(got.kv.value) : undefined;
      // Our own predecessor on this machine and data dir, killed before its lease
      // ran out: its lease goes now rather than making the restart wait.
      if (
        attempt === 0 &&
        other &&
        other.machine === me.machine &&
        other.dataDir === me.dataDir &&
        other.pid !== process.pid &&
        !pidAlive(other.pid)
      ) {
        this.opts.log(
          `cluster: host ${this.host}: taking over from a dead agent (pid ${other.pid})`,
        );
        await store.revokeLease(other.lease).catch(() => {});
        continue;
      }
      // This agent's own registration under an older lease (a re-registration whose
      // answer was lost, and whose revoke was too): it goes.
      if (
        attempt < 2 &&
        other &&
        other.machine === me.machine &&
        other.dataDir === me.dataDir &&
        other.pid === process.pid &&
        other.lease !== this.lease
      ) {
        await store.revokeLease(other.lease).catch(() => {});
        continue;
      }
      throw new BallastError(
        'BALLAST_CLUSTER_HOST_TAKEN',
        `host name ${this.host} is held by another live agent` +
          (other ? ` (pid ${other.pid} on ${other.machine}, data dir ${other.dataDir})` : '') +
          `; give this agent another cluster.host, or stop that one`,
      );
    }
  }

  /** Keepalives every TTL/3; the agent is healthy while they are acknowledged. */
  private startKeepalive(): void {
    const period = Math.max(250, (this.opts.config.leaseTtl * 1000) / 3);
    const tick = async (): Promise<void> => {
      if (this.stopped) return;
      const t0 = performance.now();
      try {
        await this.store.keepAlive(this.lease);
        this.lastAckSent = t0;
        this.setHealthy();
        this.fence?.check();
        this.storeRevision = Math.max(this.storeRevision, await this.store.revision());
      } catch (e) {
        if (this.stopped) return;
        this.stats.keepaliveFailures++;
        if (isStoreError(e, 'STORE_LEASE_NOT_FOUND')) {
          this.setUnhealthy('the membership lease expired');
          await this.rejoin();
        } else {
          this.setUnhealthy(`keepalive failed: ${(e as Error).message}`);
        }
      }
      if (!this.stopped) this.keepTimer = setTimeout(() => void tick(), period);
    };
    this.keepTimer = setTimeout(() => void tick(), period);
  }

  private async rejoin(): Promise<void> {
    try {
      await this.register();
      // Whatever other hosts did while the lease was gone must be applied before serving
      // (register() already asks for everything up to its own revision).
      this.catchUpTo = Math.max(this.catchUpTo, await this.store.revision());
      this.stats.reRegistrations++;
      this.opts.log(`cluster: host ${this.host}: lease lost, registered again`);
      // Whatever happened while we were away comes through the watch (or a relist).
      this.ackedCatalog = 0;
      this.scheduleAck();
    } catch (e) {
      this.opts.log(`cluster: re-registering failed: ${(e as Error).message}`);
    }
  }

  private setHealthy(): void {
    if (!this.healthy && this.unhealthySince !== null) {
      this.opts.log('cluster: etcd reachable again');
    }
    this.healthy = true;
    this.unhealthySince = null;
    this.unhealthyReason = '';
  }

  private setUnhealthy(reason: string): void {
    if (this.healthy || this.unhealthySince === null) {
      this.unhealthySince = Date.now();
      this.opts.log(`cluster: cut off from etcd: ${reason}`);
    }
    this.healthy = false;
    this.unhealthyReason = reason;
  }

  /** The membership lease while registered (notification leadership lives under it). */
  leaseId(): string | undefined {
    return this.registered && !this.stopped ? this.lease : undefined;
  }

  /** Whether the last keepalive was acknowledged (reads are fresh, mutations may go ahead). */
  isHealthy(): boolean {
    return this.healthy;
  }

  /** Whether the agent may serve shared devices again: lease renewed, cache caught up. */
  canServe(): boolean {
    return this.healthy && this.revision >= this.catchUpTo;
  }

  /** Monotonic deadline (performance.now()) before which etcd cannot have expired our lease. */
  leaseValidUntil(): number {
    return this.lastAckSent + this.opts.config.leaseTtl * 1000;
  }

  /** Why reads are stale, or null when they are fresh. */
  staleness(): { since: string; reason: string } | null {
    if (this.healthy) return null;
    return {
      since: new Date(this.unhealthySince ?? Date.now()).toISOString(),
      reason: this.unhealthyReason || 'not connected',
    };
  }

  /** Mutations fail fast while the agent is cut off, rather than hang. */
  guard(): void {
    if (this.healthy && !this.stopped) return;
    throw new StoreError(
      'STORE_UNAVAILABLE',
      `this agent is cut off from etcd (${this.unhealthyReason || 'stopping'}): the change was NOT made; changes are refused until it is back, reads come from its cache`,
    );
  }

  // ---- the cache ----

  private async list(): Promise<void> {
    const r = await this.store.range('');
    this.membersChanged++;
    this.kvs.clear();
    this.garbage.clear();
    for (const kv of r.kvs) this.remember(kv);
    this.revision = r.revision;
    this.storeRevision = Math.max(this.storeRevision, r.revision);
    this.appliedCatalog = r.revision;
  }

  private remember(kv: KeyValue): void {
    const known = [MEMBERS, HOSTS, ACKS, EPOCHS, ...CATALOG, 'pr-audit/', 'notify/', 'events/'];
    if (!known.some((p) => kv.key.startsWith(p))) {
      if (!this.garbage.has(kv.key)) this.opts.log(`cluster: skipping foreign key ${kv.key}`);
      this.garbage.add(kv.key);
      this.stats.skippedKeys = this.garbage.size;
      return;
    }
    this.kvs.set(kv.key, kv);
  }

  /** One cached key. */
  cached(key: string): KeyValue | undefined {
    return this.kvs.get(key);
  }

  /** The cached keys under a prefix, in key order. */
  snapshot(prefix: string): KeyValue[] {
    return [...this.kvs.values()]
      .filter((kv) => kv.key.startsWith(prefix))
      .sort((a, b) => (a.key < b.key ? -1 : a.key > b.key ? 1 : 0));
  }

  /** Starts the watch from where the listing left off. */
  private async startWatch(): Promise<void> {
    this.scheduleAck();
    try {
      await failpointHold(
        'watch-start-hold',
        path.join(this.baseInfo!.dataDir, 'watch-start.hold'),
      );
      await this.watchFrom(this.revision + 1);
    } catch (e) {
      // Compacted between the first listing and the watch: list again, as after a
      // watch that ends on a compaction, rather than fail the start.
      if (!isStoreError(e, 'STORE_COMPACTED')) throw e;
      this.opts.log(`cluster: ${(e as Error).message}; listing again`);
      await this.relist();
    }
  }

  private async watchFrom(rev: number): Promise<void> {
    this.watcher = await this.store.watch('', {
      fromRevision: rev,
      onEvent: (ev) => {
        this.queue.push(ev);
        void this.drain();
      },
      onError: (err) => {
        this.watcher = undefined;
        if (this.stopped || isStoreError(err, 'STORE_CLOSED')) return;
        this.opts.log(`cluster: watch ended (${(err as Error).message}); listing again`);
        void this.relist();
      },
    });
  }

  /** History is gone (or the watch broke): list again, apply the difference as events. */
  private async relist(): Promise<void> {
    this.stats.relists++;
    for (let delay = 200; !this.stopped; delay = Math.min(delay * 2, 5000)) {
      try {
        const r = await this.store.range('');
        const seen = new Set<string>();
        const events: WatchEvent[] = [];
        for (const kv of r.kvs) {
          seen.add(kv.key);
          const old = this.kvs.get(kv.key);
          if (!old || old.modRevision !== kv.modRevision) {
            events.push({
              type: 'put',
              kv,
              ...(old ? { prevKv: old } : {}),
              revision: kv.modRevision,
            });
          }
        }
        for (const [key, old] of this.kvs) {
          if (!seen.has(key)) {
            events.push({
              type: 'delete',
              kv: { key, value: '', createRevision: 0, modRevision: r.revision, version: 0 },
              prevKv: old,
              revision: r.revision,
            });
          }
        }
        events.sort((a, b) => a.revision - b.revision);
        this.queue.push(...events);
        await this.drain();
        this.revision = Math.max(this.revision, r.revision);
        this.appliedCatalog = Math.max(this.appliedCatalog, r.revision);
        this.scheduleAck();
        this.fence?.check(); // caught up to the listing: a fence waiting for that opens now
        await this.watchFrom(r.revision + 1);
        return;
      } catch (e) {
        this.opts.log(`cluster: listing failed (${(e as Error).message}); retrying`);
        await sleep(delay);
      }
    }
  }

  private async drain(): Promise<void> {
    if (this.draining) return;
    this.draining = true;
    try {
      let catalogTouched = false;
      while (this.queue.length > 0) {
        const ev = this.queue.shift()!;
        const before = this.kvs.get(ev.kv.key);
        if (ev.kv.key.startsWith(MEMBERS)) this.membersChanged++;
        if (ev.type === 'put') this.remember(ev.kv);
        else {
          this.kvs.delete(ev.kv.key);
          if (ev.kv.key.startsWith(MEMBERS)) this.recordExpiry(ev.kv.key.slice(MEMBERS.length));
        }
        if (CATALOG.some((p) => ev.kv.key.startsWith(p))) {
          try {
            await this.opts.apply(ev);
          } catch (e) {
            this.opts.log(
              `cluster: applying ${ev.kv.key}@${ev.revision} failed: ${(e as Error).message}`,
            );
          }
          this.appliedCatalog = Math.max(this.appliedCatalog, ev.revision);
          if (this.concerns(ev.kv.key, before, ev.type === 'put' ? ev.kv : undefined)) {
            catalogTouched = true;
          }
        }
        this.revision = Math.max(this.revision, ev.revision);
        this.storeRevision = Math.max(this.storeRevision, ev.revision);
        if (this.queue.length === 0 || this.waiters.size > 0) this.wake();
      }
      if (catalogTouched) this.scheduleAck();
    } finally {
      this.draining = false;
    }
    this.fence?.check();
  }

  private wake(): void {
    const w = [...this.waiters];
    this.waiters.clear();
    for (const f of w) f();
  }

  /** Writes `acks/<host>` once at a time, always the newest applied catalog revision. */
  private scheduleAck(): void {
    if (this.acking || this.stopped || this.appliedCatalog <= this.ackedCatalog) return;
    this.acking = true;
    const rev = this.appliedCatalog;
    failpointHold('ack-hold', path.join(this.baseInfo?.dataDir ?? '.', 'ack.hold'))
      .then(() => this.store.put(ACKS + this.host, String(rev), { lease: this.lease }))
      .then(
        () => {
          this.ackedCatalog = Math.max(this.ackedCatalog, rev);
        },
        (e) => {
          if (!this.stopped) this.opts.log(`cluster: ack ${rev} failed: ${(e as Error).message}`);
        },
      )
      .finally(() => {
        this.acking = false;
        if (this.appliedCatalog > this.ackedCatalog && !this.stopped) {
          setTimeout(() => this.scheduleAck(), this.healthy ? 0 : 200);
        }
      });
  }

  /** Resolves when `pred` holds, re-checked after each applied event; false on timeout. */
  async waitUntil(pred: () => boolean, timeoutMs: number): Promise<boolean> {
    const deadline = performance.now() + timeoutMs;
    while (!pred()) {
      const left = deadline - performance.now();
      if (left <= 0 || this.stopped) return false;
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, Math.min(left, 250));
        this.waiters.add(() => {
          clearTimeout(t);
          resolve();
        });
      });
    }
    return true;
  }

  // ---- queries ----

  member(host: string): MemberInfo | undefined {
    const kv = this.kvs.get(MEMBERS + host);
    return kv ? parse<MemberInfo>(kv.value) : undefined;
  }

  alive(host: string): boolean {
    return this.kvs.has(MEMBERS + host);
  }

  /** Whether the host's last word was a clean stop (hosts/<host> says left). */
  leftCleanly(host: string): boolean {
    const kv = this.kvs.get(HOSTS + host);
    return (kv ? parse<HostRecord>(kv.value)?.state : undefined) === 'left';
  }

  ackOf(host: string): number {
    const kv = this.kvs.get(ACKS + host);
    return kv ? Number(kv.value) || 0 : 0;
  }

  members(): MemberView[] {
    return memberViews(this.snapshot(HOSTS), this.snapshot(MEMBERS), (h) => this.ackOf(h));
  }

  /**
   * The members as etcd has them, read in pages of `hosts/` at one revision
   * (agent/store/pages.ts), with the member and ack keys of the same hosts read at
   * that revision: a listing that does not grow with this agent's cache. Every member
   * has a `hosts/` record (its registration writes both).
   */
  async membersPage(
    limit?: number,
    token?: string,
  ): Promise<{ members: MemberView[]; revision: number; continue?: string }> {
    const store = this.opts.store;
    const page =
      limit === undefined && token === undefined
        ? await readAll(store, HOSTS)
        : await readPage(store, HOSTS, limit ?? WHOLE_PAGE, token);
    const first = page.kvs[0]?.key.slice(HOSTS.length);
    const last = page.kvs.at(-1)?.key.slice(HOSTS.length);
    if (first === undefined || last === undefined) return { members: [], revision: page.revision };
    // The same hosts' keys under another prefix: at most as many as the page has.
    const alongside = async (prefix: string) =>
      (
        await store.range(prefix, {
          revision: page.revision,
          from: prefix + first,
          limit: page.kvs.length,
        })
      ).kvs.filter((kv) => kv.key <= prefix + last);
    const members = await alongside(MEMBERS);
    const acks = new Map((await alongside(ACKS)).map((kv) => [kv.key.slice(ACKS.length), kv]));
    return {
      members: memberViews(page.kvs, members, (h) => {
        const kv = acks.get(h);
        return kv ? Number(kv.value) || 0 : 0;
      }),
      revision: page.revision,
      ...(page.continue !== undefined ? { continue: page.continue } : {}),
    };
  }

  /** Alive hosts that declare every pool (shared, same path) in `pools`. */
  hostsWithSharedPools(extents: { pool: string; file: string }[]): string[] {
    const out: string[] = [];
    for (const m of this.memberRecords()) {
      if (Array.isArray(m.pools) && declaresAll(m.pools, extents)) out.push(m.host);
    }
    return out;
  }

  /** Whether an alive member waits for every member's ack (an agent from before acks were scoped). */
  private waitsForAll(): boolean {
    return this.memberRecords().some((m) => m.acks !== 'serving');
  }

  /**
   * The alive members' records, parsed once per change of membership (asked for every
   * device a listing shows and every catalog event: never a scan of the whole cache).
   */
  private memberRecords(): MemberInfo[] {
    if (this.membersAt !== this.membersChanged) {
      this.membersAt = this.membersChanged;
      this.memberCache = this.snapshot(MEMBERS)
        .map((kv) => parse<MemberInfo>(kv.value))
        .filter((m): m is MemberInfo => m !== undefined && typeof m.host === 'string');
    }
    return this.memberCache;
  }
  private memberCache: MemberInfo[] = [];
  private membersAt = -1;
  /** Bumped whenever a member key changes (memberRecords reads them again then). */
  private membersChanged = 0;

  /**
   * Whether a catalog event is about a device this agent serves, before or after it
   * (or may: a record it cannot read, or before it has joined). Only those are acked:
   * a change waits for the agents that serve its device, so the others need not write.
   */
  private concerns(
    key: string,
    before: KeyValue | undefined,
    after: KeyValue | undefined,
  ): boolean {
    const me = this.baseInfo;
    if (!me || this.waitsForAll()) return true;
    const slash = key.indexOf('/');
    const device = key.slice(slash + 1);
    const records = key.startsWith('devices/')
      ? [before, after]
      : [this.kvs.get(`devices/${device}`)];
    let known = false;
    for (const kv of records) {
      if (!kv || kv.value === '') continue;
      const rec = parse<Placed>(kv.value);
      if (!rec || !Array.isArray(rec.extents)) return true;
      known = true;
      if (servedBy(me, rec)) return true;
    }
    // A reservation of a device this agent has no record of: it cannot judge; it acks.
    return !known;
  }

  /**
   * Waits until every host in `hosts` but this one has applied `revision`, or
   * is no longer a member (its lease ended: it has fenced itself and serves
   * nothing). Says whom it waited for and how each was settled.
   */
  async settle(
    revision: number,
    who: () => string[],
  ): Promise<{ waitedMs: number; hosts: { host: string; how: SettledHow }[] }> {
    const t0 = performance.now();
    const how = new Map<string, SettledHow>();
    // A member that registered before `revision` must be among those waited for: the
    // membership is read once this agent's cache holds `revision` (a host registering
    // later catches up past it before it serves: Fence).
    let hosts: string[] = [];
    const pending = () => {
      const left: string[] = [];
      for (const h of hosts) {
        if (how.has(h)) continue;
        if (h === this.host) how.set(h, 'self');
        // Gone either way: a clean stop marks hosts/<h> left before it revokes the lease.
        else if (!this.alive(h)) how.set(h, this.leftCleanly(h) ? 'left' : 'expired');
        else if (this.ackOf(h) >= revision) how.set(h, 'acked');
        else left.push(h);
      }
      return left;
    };
    // A member that cannot apply loses its lease within the TTL; one that keeps its
    // lease but is slow (a loaded host) is waited for, up to a bound.
    const boundMs = Math.max(15_000, this.opts.config.leaseTtl * 3000);
    if (!(await this.waitUntil(() => this.revision >= revision, boundMs))) {
      throw new BallastError(
        'BALLAST_CLUSTER_NOT_APPLIED',
        `the change (revision ${revision}) is committed, but this agent has not seen it come back from etcd yet (at revision ${this.revision})`,
      );
    }
    hosts = who();
    if (!(await this.waitUntil(() => pending().length === 0, boundMs))) {
      throw new BallastError(
        'BALLAST_CLUSTER_NOT_APPLIED',
        `the change (revision ${revision}) is committed, but host(s) ${pending().join(', ')} have not applied it yet`,
      );
    }
    return {
      waitedMs: Math.round(performance.now() - t0),
      hosts: [...how].map(([host, h]) => ({ host, how: h })),
    };
  }

  /** Which hosts (of `hosts`; all alive ones without it) have applied `revision` (for `ballast pr show`). */
  appliedBy(
    revision: number,
    hosts?: readonly string[],
  ): { host: string; applied: boolean; revision: number }[] {
    return this.members()
      .filter((m) => m.state === 'alive' && (!hosts || hosts.includes(m.host)))
      .map((m) => ({
        host: m.host,
        applied:
          m.host === this.host ? this.appliedCatalog >= revision : this.ackOf(m.host) >= revision,
        revision: m.host === this.host ? this.appliedCatalog : this.ackOf(m.host),
      }));
  }

  /**
   * A member's key went without the clean stop that marks hosts/<host> left
   * first: its lease expired. Records when (as seen here), so `cluster members`
   * shows when it went rather than when it joined. Every agent tries; the
   * compares let one win and never overwrite a host that has registered again.
   */
  private recordExpiry(host: string): void {
    const kv = this.kvs.get(HOSTS + host);
    const rec = kv ? parse<HostRecord>(kv.value) : undefined;
    if (!kv || !rec || rec.state !== 'up' || host === this.host || this.stopped) return;
    const next: HostRecord = {
      ...rec,
      state: 'expired',
      since: new Date().toISOString(),
      joined: rec.since,
    };
    this.store
      .txn({
        compare: [
          cmp.version(MEMBERS + host, '=', 0),
          cmp.modRevision(HOSTS + host, '=', kv.modRevision),
        ],
        success: [op.put(HOSTS + host, JSON.stringify(next))],
        failure: [],
      })
      .catch((e: unknown) => {
        // Not recorded: the member is listed expired all the same, without a time.
        if (!this.stopped) {
          this.opts.log(`cluster: recording ${host}'s expiry failed: ${(e as Error).message}`);
        }
      });
  }

  /** Leaves the cluster: marks the host left and revokes the lease (its keys go with it). */
  async leave(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    clearTimeout(this.keepTimer);
    this.wake();
    await this.watcher?.cancel().catch(() => {});
    if (!this.baseInfo || !this.registered) return;
    const mine = this.kvs.get(HOSTS + this.host);
    const rec: HostRecord = {
      host: this.host,
      state: 'left',
      since: new Date().toISOString(),
      info: this.info(),
    };
    // When it joined: what its own registration wrote (the cache may not have
    // applied that write yet when an agent stops right after it started).
    const was = mine ? parse<HostRecord>(mine.value) : undefined;
    const joined = this.upSince ?? (was?.state === 'up' ? was.since : undefined);
    if (joined) rec.joined = joined;
    try {
      await this.store.put(HOSTS + this.host, JSON.stringify(rec));
      await this.store.revokeLease(this.lease);
    } catch (e) {
      this.opts.log(
        `cluster: leaving cleanly failed (${(e as Error).message}); the lease will expire`,
      );
    }
  }

  /** For `ballast cluster status`. */
  summary(): Record<string, unknown> {
    const members = this.members();
    const count = (s: MemberState) => members.filter((m) => m.state === s).length;
    return {
      name: this.opts.config.name,
      host: this.host,
      prefix: this.opts.config.prefix,
      endpoints: this.opts.config.etcd,
      leaseTtl: this.opts.config.leaseTtl,
      lease: this.lease,
      healthy: this.healthy,
      stale: this.staleness(),
      revision: this.revision,
      storeRevision: this.storeRevision,
      watchLag: Math.max(0, this.storeRevision - this.revision),
      applied: this.appliedCatalog,
      members: { alive: count('alive'), expired: count('expired'), left: count('left') },
      keepaliveFailures: this.stats.keepaliveFailures,
      reRegistrations: this.stats.reRegistrations,
      relists: this.stats.relists,
      inDoubt: this.inDoubt?.() ?? [],
      foreignKeys: [...this.garbage].slice(0, 20),
      foreignKeyCount: this.garbage.size,
    };
  }
}

/** A device's placement: its owner (a host-local device) or the pools of its extents. */
export interface Placed {
  host?: string | null;
  extents: { pool: string; file: string }[];
}

/** Whether a host with these pools declares every pool of `extents`, shared, at the same path. */
function declaresAll(pools: PoolInfo[], extents: Placed['extents']): boolean {
  return extents.every((e) =>
    pools.some(
      (p) => p.name === e.pool && p.shared && e.file.startsWith(`${p.path.replace(/\/$/, '')}/`),
    ),
  );
}

/** Whether the agent of `member` serves the device: its owner, or a host with all its shared pools. */
export function servedBy(member: { host: string; pools: PoolInfo[] }, rec: Placed): boolean {
  if (rec.host) return rec.host === member.host;
  return Array.isArray(member.pools) && declaresAll(member.pools, rec.extents);
}

/**
 * The member list from `hosts/` and `members/` records and each member's ack: every
 * host that ever joined, alive (a member key), left (a clean stop) or expired.
 */
export function memberViews(
  hostKvs: KeyValue[],
  memberKvs: KeyValue[],
  ackOf: (host: string) => number,
): MemberView[] {
  const out = new Map<string, MemberView>();
  for (const kv of hostKvs) {
    const h = parse<HostRecord>(kv.value);
    if (!h || typeof h.host !== 'string') continue;
    const joined = h.state === 'up' ? h.since : h.joined;
    out.set(h.host, {
      ...(h.info ?? {}),
      host: h.host,
      state: h.state === 'left' ? 'left' : 'expired',
      // Still `up` with no member key: expired, but nobody has recorded when yet.
      ...(h.state === 'up' ? {} : { since: h.since }),
      ...(joined ? { joined } : {}),
    });
  }
  for (const kv of memberKvs) {
    const m = parse<MemberInfo>(kv.value);
    if (!m || typeof m.host !== 'string') continue;
    const joined = out.get(m.host)?.joined ?? m.startedAt;
    out.set(m.host, { ...m, state: 'alive', applied: ackOf(m.host), since: joined, joined });
  }
  return [...out.values()].sort((a, b) => (a.host < b.host ? -1 : 1));
}

/** This machine's name, recorded in the member record (several hosts may share a machine in tests). */
export function machineName(): string {
  return hostname();
}
