// Reservations and access lists of the agent's devices: the pure model of
// pr.ts, kept durable in the store with an audit trail, and enforced on the
// NBD data path through each export's access control.
//
// Order of a change: the new state and its audit entry are written in one
// store transaction; then the device's access generation is bumped (from the
// next request on, every connection is judged by the new state); then, for
// PREEMPT AND ABORT, the preempted identities' connections are closed and
// their requests in flight drained; only then is the change acknowledged.

import { randomUUID } from 'node:crypto';
import type { AccessControl } from '../nbd/export.js';
import { CMD } from '../nbd/protocol.js';
import type { Connection, NbdServer } from '../nbd/server.js';
import { BallastError } from './errors.js';
import { failpointArmed, failpointPause } from './failpoints.js';
import { Mutex } from './mutex.js';
import {
  applyPr,
  EMPTY_PR,
  formatKey,
  fullStatus,
  type PrAction,
  type PrRequest,
  type PrState,
  type PrStateJson,
  type PrType,
  prAccess,
  prFromJson,
  prToJson,
  readKeys,
  readReservation,
} from './pr.js';
import {
  cmp,
  isStoreError,
  type KeyValue,
  op,
  type Store,
  StoreError,
  untilAnswered,
} from './store/store.js';

const PR_PREFIX = 'pr/';
const AUDIT_PREFIX = 'pr-audit/';
/** A device's audit entry `seq`: zero-padded, so the keys sort in order. */
const auditKeyOf = (device: string, seq: number) =>
  `${AUDIT_PREFIX}${device}/${String(seq).padStart(12, '0')}`;
/**
 * The entry of a command that changed nothing (a refusal or a no-op): under its
 * own key, so that recording it never rewrites `pr/<device>` and never makes a
 * change lose its compare-and-swap. Its `after` orders it on the trail.
 */
const sideKeyOf = (device: string, after: number) =>
  `${AUDIT_PREFIX}${device}/side/${String(after).padStart(12, '0')}/${randomUUID()}`;
/**
 * In a cluster: `pr-settled/<device>` = R says every agent has applied the
 * reservation change at revision R, so what the states before it withheld may
 * be granted; every agent applies it (lifting that) and acks it like any
 * catalog change.
 */
export const SETTLED_PREFIX = 'pr-settled/';
const ACL_PREFIX = 'acl/';
/** Changes a PR command is judged again after, when other agents keep changing the device first. */
const MAX_RETRIES = 5;
/** Writes of a refusal's audit entry that may lose to changes before it gives up. */
const REFUSAL_TRIES = 100;

/** Commands that read, and commands that change the medium (FLUSH counts: see pr.md). */
export const READ_COMMANDS = (1 << CMD.READ) | (1 << CMD.CACHE) | (1 << CMD.BLOCK_STATUS);
export const WRITE_COMMANDS =
  (1 << CMD.WRITE) | (1 << CMD.FLUSH) | (1 << CMD.TRIM) | (1 << CMD.WRITE_ZEROES);

export type AclAccess = 'ro' | 'rw';

export interface AclEntry {
  identity: string;
  access: AclAccess;
}

interface PrRecord {
  state: PrStateJson;
  /** Audit entries written so far (the next one's number). */
  seq: number;
  /** In a cluster: identities whose connections every agent aborts on applying this change. */
  abort?: string[];
  /** The command that made this state (for the reservation.changed event). */
  last?: { action: PrAction; initiator: string; actor: string; time: string; host?: string };
  /**
   * In a cluster: the state this change replaced, which the agents that have not
   * applied it still enforce. An agent that starts before it has settled holds the
   * device to what both allow, without reading an older revision etcd may have
   * compacted or may not answer for a while.
   */
  before?: PrStateJson;
  /**
   * In a cluster: the earlier changes of the device that the writer knew not every
   * agent had applied yet, each with its revision and the state it replaced. An
   * agent that never saw them one by one (it re-lists after a compaction, or starts)
   * holds the device to these states too until their markers say every agent has
   * them: the state it last knew itself may be older than any of them.
   */
  held?: { revision: number; state: PrStateJson }[];
}

/** What a change waited for in a cluster before it returned (see DeviceCluster.settle). */
export interface SettleReport {
  waitedMs: number;
  hosts: { host: string; how: 'self' | 'acked' | 'expired' | 'left' }[];
}

/** Open or fenced: the gate a shared device's data path asks (cluster/fence.ts). */
export interface Gate {
  gate(): 'open' | 'hold' | 'fail';
  onOpen(wake: () => void): void;
  /** What a write admitted now carries to its syscall (agent/native.ts, `fence`). */
  readonly token?: number;
}

export interface AuditEntry {
  seq: number;
  time: string;
  /** Who asked the agent: `uid:N` over the Unix socket, `tcp:ADDRESS` over TCP. */
  actor: string;
  /** The identity the request was made for (--as). */
  initiator: string;
  action: PrAction;
  key: string;
  saKey?: string;
  type?: PrType;
  target?: string;
  outcome: 'changed' | 'unchanged' | 'refused';
  code?: string;
  reason?: string;
  generation: number;
  preempted?: string[];
}

/** A refusal as stored: `after` is the number of changes (entries with a seq) recorded before it. */
type StoredAuditEntry = Omit<AuditEntry, 'seq'> & { seq?: number; after?: number };

/** How long the failpoint `pr-settle-delay` holds a grant's second round (tests cut etcd meanwhile). */
const SETTLE_DELAY_MS = 8000;

/**
 * An error's cause without the verdict its text may give: a failed marker write
 * says "the change was NOT made" of the marker, which is not the command's change.
 */
function causeOf(e: unknown): string {
  const code = (e as { code?: unknown }).code;
  const text = String((e as Error)?.message ?? e)
    .replace(
      /(?:[:;,]\s*)?(?:read back afterwards: )?the change (?:was NOT made|may have been made)[\s\S]*$/,
      '',
    )
    .trim();
  if (typeof code !== 'string') return text || 'unknown error';
  return text === '' || text.startsWith(code) ? text || code : `${code}: ${text}`;
}

/** The store moved on under a change or a refusal: its revision then (judge again once caught up). */
class LostRace extends BallastError {
  constructor(
    device: string,
    readonly revision: number,
  ) {
    super('BALLAST_CONFLICT', `the reservations of ${device} changed underneath`);
  }
}

/** A state under which nobody may read or write: EA held by an identity no client can have. */
const NOBODY: PrState = {
  generation: 0,
  registrations: new Map([['\u0000', 1n]]),
  reservation: { type: 3, holder: '\u0000' },
};

/** One device's access control object, handed to its NBD export. */
class DeviceAccess implements AccessControl {
  private gen = 0;
  private readonly watchers = new Set<() => void>();

  /** Bumped (`generation++`) by every change; the NBD server's watchers hear of it at once. */
  get generation(): number {
    return this.gen;
  }

  set generation(v: number) {
    this.gen = v;
    for (const w of this.watchers) w();
  }

  subscribe(onChange: () => void): () => void {
    const w = (): void => onChange();
    this.watchers.add(w);
    return () => this.watchers.delete(w);
  }

  get gated(): boolean {
    return this.fence !== undefined;
  }

  state: PrState = EMPTY_PR;
  acl: Map<string, AclAccess> | null = null;
  /** Set for shared devices of a cluster: the agent's self-fence. */
  fence: Gate | undefined;
  /**
   * In a cluster: states replaced by changes that not every agent has applied
   * yet, with the revision that replaced each. Until then a connection may do
   * only what the old and the new state both allow: a revocation holds at
   * once, a grant (a preempting new holder) only once the old holder can
   * write nowhere.
   */
  unsettled: { revision: number; state: PrState }[] = [];

  /** Holds the device to these replaced states too (one entry per revision). */
  hold(entries: { revision: number; state: PrState }[]): void {
    let added = false;
    for (const e of entries) {
      if (this.unsettled.some((u) => u.revision === e.revision)) continue;
      this.unsettled.push(e);
      added = true;
    }
    if (added) this.generation++;
  }

  /** Every agent has applied `revision`: what older states withheld is lifted. */
  settled(revision: number): void {
    const before = this.unsettled.length;
    this.unsettled = this.unsettled.filter((u) => u.revision > revision);
    if (this.unsettled.length !== before) this.generation++;
  }

  gate(): 'open' | 'hold' | 'fail' {
    return this.fence === undefined ? 'open' : this.fence.gate();
  }

  /** The fence token of a write admitted now (-1: not fenced). */
  get fenceToken(): number {
    return this.fence?.token ?? -1;
  }

  onOpen(wake: () => void): void {
    if (this.fence) this.fence.onOpen(wake);
    else wake();
  }

  mask(identity: string): number {
    let m = 0xffff & ~(READ_COMMANDS | WRITE_COMMANDS);
    const a = prAccess(this.state, identity);
    let { read, write } = a;
    for (const u of this.unsettled) {
      const old = prAccess(u.state, identity);
      read &&= old.read;
      write &&= old.write;
    }
    if (read) m |= READ_COMMANDS;
    if (write) m |= WRITE_COMMANDS;
    if (this.acl) {
      const entry = this.acl.get(identity);
      if (entry === undefined) return 0;
      if (entry === 'ro') m &= ~WRITE_COMMANDS;
    }
    return m;
  }
}

export interface PrOutRequest {
  action: PrAction;
  /** The identity to act for. */
  as: string;
  key: bigint;
  saKey?: bigint;
  type?: PrType;
  target?: string;
  unregister?: boolean;
  /**
   * Apply only if the device's PRgeneration is still this (what the caller last
   * read); otherwise PR_CONFLICT [stale-generation] and nothing changes.
   */
  ifGeneration?: number;
}

export interface PrOutResult {
  device: string;
  action: PrAction;
  initiator: string;
  changed: boolean;
  generation: number;
  preempted: string[];
  /** Connections closed by PREEMPT AND ABORT (on this agent). */
  aborted: number;
  /** In a cluster: whom the change waited for before it returned. */
  settled?: SettleReport;
}

function identityOk(s: unknown): s is string {
  return typeof s === 'string' && s.length > 0 && s.length <= 256 && /^[\x21-\x7e]+$/.test(s);
}

export class ReservationManager {
  private readonly devices = new Map<string, DeviceAccess>();
  private readonly revisions = new Map<string, { pr: number; seq: number }>();
  private readonly aclRevisions = new Map<string, number>();
  /** In a cluster: the newest `pr-settled/<device>` value seen (written or applied). */
  private readonly markers = new Map<string, number>();
  /** Second rounds being written in the background (markLater): the change's revision. */
  private readonly marking = new Map<string, number>();
  /** One reservation change at a time; reads never wait. */
  private readonly mutex = new Mutex();
  /**
   * In a cluster: resolves once every other agent serving `device` has applied the
   * change at `revision` (aborting preempted connections first), or its lease has
   * expired. Agents that do not serve the device have no connection to it.
   */
  settle?: (revision: number, device: string) => Promise<SettleReport>;
  /** This host's name, recorded with each change. */
  host?: string;
  /** PR OUT latency, for metrics. */
  onChange?: (seconds: number) => void;
  /**
   * PREEMPT AND ABORT also stops the preempted identities' streams into or out of the
   * device (agent/stream.ts), and waits for their I/O in flight: the number stopped.
   */
  abortStreams?: (device: string, identities: ReadonlySet<string>) => Promise<number>;
  /** Why a device this agent does not serve is refused (BALLAST_DEVICE_REMOTE), if it is known. */
  notServed?: (device: string) => Error | undefined;
  /** In a cluster: which agents have applied the device's current reservation state. */
  appliedBy?: (
    revision: number,
    device: string,
  ) => { host: string; applied: boolean; revision: number }[];
  /**
   * In a cluster: resolves true once this agent's watch has applied every change
   * up to `revision` (false if it has not within a bound).
   */
  caughtUp?: (revision: number) => Promise<boolean>;
  /**
   * In a cluster: the device's audit entries as this agent's cache holds them
   * (`pr-audit/<device>/`), read when a re-listing skipped changes.
   */
  cachedTrail?: (device: string) => KeyValue[];

  constructor(
    private readonly store: Store,
    private readonly server: () => NbdServer | null,
    private readonly exists: (device: string) => boolean,
    private readonly log: (msg: string) => void,
  ) {}

  /** Reads every device's reservation state and access list from the store. */
  async load(): Promise<void> {
    const prs = await this.store.range(PR_PREFIX);
    for (const kv of prs.kvs) {
      const name = kv.key.slice(PR_PREFIX.length);
      try {
        const rec = JSON.parse(kv.value) as PrRecord;
        this.access(name).state = prFromJson(rec.state);
        this.revisions.set(name, { pr: kv.modRevision, seq: rec.seq });
      } catch (e) {
        // A record we cannot read must not silently become "no reservation".
        throw new BallastError(
          'BALLAST_STORE_RECORD',
          `the reservation record of ${name} is unreadable: ${(e as Error).message}`,
        );
      }
    }
    const acls = await this.store.range(ACL_PREFIX);
    for (const kv of acls.kvs) {
      const name = kv.key.slice(ACL_PREFIX.length);
      const entries = (JSON.parse(kv.value) as { entries: AclEntry[] }).entries;
      this.access(name).acl = new Map(entries.map((e) => [e.identity, e.access]));
      this.aclRevisions.set(name, kv.modRevision);
    }
  }

  /**
   * In a cluster, once its cache is listed and before the agent serves: applies
   * what changed since load() (the watch only brings what follows the listing).
   * A device whose last change some member has not applied yet, and whose
   * marker (`pr-settled/<device>`) does not say every agent has, is held to what
   * both that change and the state it replaced allow, as on the agents that
   * applied it, until every member has. A change whose marker is written is in
   * force everywhere, whatever a member's ack (the agent that made a change acks
   * it after the fact, and may die first).
   */
  async joined(
    prs: KeyValue[],
    acls: KeyValue[],
    markers: KeyValue[],
    behind: (revision: number, device: string) => boolean,
  ): Promise<void> {
    for (const kv of markers) {
      const revision = Number(kv.value);
      if (revision > 0) this.noteMarker(kv.key.slice(SETTLED_PREFIX.length), revision);
    }
    for (const kv of acls) await this.applyRemote(kv.key.slice(ACL_PREFIX.length), 'acl', kv);
    for (const kv of prs) {
      const device = kv.key.slice(PR_PREFIX.length);
      await this.applyRemote(device, 'pr', kv);
      const acc = this.access(device);
      if ((this.markers.get(device) ?? 0) >= kv.modRevision) {
        acc.settled(kv.modRevision);
        continue;
      }
      if (!behind(kv.modRevision, device)) continue;
      // What the agents that have not applied it still enforce: the record before it,
      // and the changes before that which it says not every agent had yet.
      let rec: PrRecord | undefined;
      try {
        rec = JSON.parse(kv.value) as PrRecord;
      } catch {
        // unreadable: applyRecord has already refused everyone
      }
      acc.hold(
        rec?.before !== undefined
          ? this.heldBy(device, rec, kv.modRevision)
          : [{ revision: kv.modRevision, state: await this.stateBefore(device, kv) }],
      );
      this.log(`device ${device}: change ${kv.modRevision} not applied everywhere yet; held`);
      this.settleLater(device, kv.modRevision);
    }
  }

  /**
   * The states a record says the agents that have not applied it still enforce,
   * for the changes past the device's marker: its own (the state it replaced)
   * and the earlier ones its writer knew were not everywhere yet.
   */
  private heldBy(
    device: string,
    rec: PrRecord,
    revision: number,
  ): { revision: number; state: PrState }[] {
    const marker = this.markers.get(device) ?? 0;
    const all = [
      ...(rec.held ?? []).map((h) => ({ revision: h.revision, state: prFromJson(h.state) })),
      ...(rec.before !== undefined ? [{ revision, state: prFromJson(rec.before) }] : []),
    ];
    return all.filter((h) => h.revision > marker);
  }

  /**
   * The reservation state a change replaced: carried by its record (written by
   * this version), else its record one revision earlier (none: no reservation
   * yet), asked again while etcd does not answer. Only if etcd has compacted
   * that revision away is it unknown, and nobody may do anything until every
   * agent has the change.
   */
  private async stateBefore(device: string, kv: KeyValue): Promise<PrState> {
    try {
      const before = (JSON.parse(kv.value) as PrRecord).before;
      if (before !== undefined) return prFromJson(before);
    } catch {
      // unreadable: applyRecord has already refused everyone
    }
    for (let attempt = 1, delay = 200; ; attempt++, delay = Math.min(delay * 2, 2000)) {
      try {
        const r = await this.store.range(kv.key, { revision: kv.modRevision - 1 });
        const prev = r.kvs.find((k) => k.key === kv.key);
        return prev ? prFromJson((JSON.parse(prev.value) as PrRecord).state) : EMPTY_PR;
      } catch (e) {
        if (attempt < 10 && !isStoreError(e, 'STORE_COMPACTED')) {
          await new Promise((r) => setTimeout(r, delay));
          continue;
        }
        this.log(
          `device ${device}: the state before change ${kv.modRevision} is unknown (${(e as Error).message}); nobody is served until every agent has it`,
        );
        return NOBODY;
      }
    }
  }

  /** The device's access control (the same object for the device's life). */
  access(device: string): DeviceAccess {
    let a = this.devices.get(device);
    if (!a) {
      a = new DeviceAccess();
      this.devices.set(device, a);
    }
    return a;
  }

  // ---- connect-time policy (GO) ----

  /** A message refusing `conn` the device, or null. */
  authorize(device: string, conn: Connection): string | null {
    const acl = this.devices.get(device)?.acl;
    if (!acl || acl.has(conn.identity)) return null;
    return `identity ${conn.identity} may not open this device`;
  }

  readOnlyFor(device: string, conn: Connection): boolean {
    return this.devices.get(device)?.acl?.get(conn.identity) === 'ro';
  }

  // ---- PERSISTENT RESERVE IN ----

  private need(device: string): DeviceAccess {
    if (!this.exists(device)) {
      const why = this.notServed?.(device);
      if (why) throw why;
      throw new BallastError(
        'BALLAST_DEVICE_NOT_FOUND',
        `no device named ${JSON.stringify(device)}`,
      );
    }
    return this.access(device);
  }

  show(device: string): Record<string, unknown> {
    const s = this.need(device).state;
    const res = readReservation(s);
    return {
      device,
      generation: s.generation,
      reservation:
        res.type === null
          ? null
          : {
              type: res.type,
              key: formatKey(res.key ?? 0n),
              holder: s.reservation?.holder ?? null,
            },
      registrations: fullStatus(s).registrations.map((r) => ({
        identity: r.identity,
        key: formatKey(r.key),
        holder: r.holder,
      })),
      ...(this.appliedBy
        ? { agents: this.appliedBy(this.revisions.get(device)?.pr ?? 0, device) }
        : {}),
    };
  }

  keys(device: string): { device: string; generation: number; keys: string[] } {
    const k = readKeys(this.need(device).state);
    return { device, generation: k.generation, keys: k.keys.map(formatKey) };
  }

  /**
   * The trail in the order the commands took effect: changes by their number,
   * each refusal or no-op after the changes it was judged on (its `after`),
   * those among themselves in commit order. `seq` is the position.
   */
  async audit(device: string): Promise<AuditEntry[]> {
    this.need(device);
    const r = await this.store.range(`${AUDIT_PREFIX}${device}/`);
    const rows = r.kvs.map((kv) => {
      const e = JSON.parse(kv.value) as StoredAuditEntry;
      return e.after !== undefined
        ? { e, at: e.after, side: 0, rev: kv.modRevision }
        : { e, at: e.seq ?? 0, side: 1, rev: kv.modRevision };
    });
    rows.sort((x, y) => x.at - y.at || x.side - y.side || x.rev - y.rev);
    return rows.map(({ e }, seq) => {
      const { after: _after, ...rest } = e;
      return { ...rest, seq };
    });
  }

  // ---- PERSISTENT RESERVE OUT ----

  async apply(device: string, req: PrOutRequest, actor = 'admin'): Promise<PrOutResult> {
    const t0 = performance.now();
    let out: { result: PrOutResult; revision: number; grants: boolean } | undefined;
    for (let attempt = 0; ; attempt++) {
      try {
        out = await this.applyOnce(device, req, actor);
        break;
      } catch (e) {
        if (!(e instanceof LostRace)) throw e;
        // Another agent changed the reservation first. Once this agent's watch has
        // applied that change (in order, aborting what it aborts), judge the request
        // again on the new state. Only changes make this happen, never refusals.
        if (this.caughtUp && attempt < MAX_RETRIES && (await this.caughtUp(e.revision))) continue;
        throw new BallastError(
          'BALLAST_CONFLICT',
          `the reservations of ${device} were changed through other agents ${attempt + 1} time(s) while this command was judged; it was NOT made (retry)`,
        );
      }
    }
    if (this.settle && out.revision > 0) {
      let report: SettleReport;
      try {
        report = await this.settle(out.revision, device);
        this.devices.get(device)?.settled(out.revision);
      } catch (e) {
        this.settleLater(device, out.revision);
        throw e;
      }
      out.result.settled = out.grants
        ? await this.grantEverywhere(device, out.revision, report)
        : report;
    }
    this.onChange?.((performance.now() - t0) / 1000);
    return out.result;
  }

  /**
   * The second round of a change that grants something. Every agent has applied
   * it, holding only what the old and the new state both allow; now each is told
   * to lift that (`pr-settled/<device>`), and the command waits until each has,
   * so that the grant is in force through every agent when it returns.
   */
  private async grantEverywhere(
    device: string,
    revision: number,
    first: SettleReport,
  ): Promise<SettleReport> {
    const settle = this.settle!;
    let second: SettleReport;
    try {
      await failpointPause('pr-settle-delay', SETTLE_DELAY_MS);
      const marker = await this.store.put(SETTLED_PREFIX + device, String(revision));
      this.noteMarker(device, revision);
      second = await settle(marker.revision, device);
    } catch (e) {
      this.markLater(device, revision);
      // The cause's own verdict ("NOT made") is about the marker, not the change: left out.
      throw new BallastError(
        'BALLAST_CLUSTER_NOT_APPLIED',
        `the change (revision ${revision}) is made and every agent enforces what it takes away, but not every agent has confirmed what it grants (${causeOf(e)}); it completes by itself once etcd is reachable: this agent writes ${SETTLED_PREFIX}${device} again until it is taken, and each agent grants the change on applying it`,
        { cause: e },
      );
    }
    const hosts = new Map(first.hosts.map((h) => [h.host, h.how]));
    for (const h of second.hosts) {
      if (h.how === 'expired' || h.how === 'left' || !hosts.has(h.host)) hosts.set(h.host, h.how);
    }
    return {
      waitedMs: first.waitedMs + second.waitedMs,
      hosts: [...hosts].map(([host, how]) => ({ host, how })),
    };
  }

  /** The device's marker (`pr-settled/<device>`) is known to be at least `revision`. */
  private noteMarker(device: string, revision: number): void {
    if ((this.markers.get(device) ?? 0) < revision) this.markers.set(device, revision);
  }

  /**
   * The second round of change `revision` could not be written: writes the marker
   * in the background, backing off, until etcd takes it or a marker at least as
   * recent is there (a later grant's). One loop per device, on the newest change.
   */
  private markLater(device: string, revision: number): void {
    const pending = this.marking.get(device);
    if (pending !== undefined) {
      if (pending < revision) this.marking.set(device, revision);
      return;
    }
    this.marking.set(device, revision);
    void (async () => {
      for (let attempt = 1, delay = 200; ; attempt++, delay = Math.min(delay * 2, 2000)) {
        await new Promise((r) => setTimeout(r, delay).unref());
        const want = this.marking.get(device) ?? revision;
        if (!this.devices.has(device) || (this.markers.get(device) ?? 0) >= want) break;
        try {
          const kv = await this.store.get(SETTLED_PREFIX + device);
          if (kv && Number(kv.value) >= want) {
            this.noteMarker(device, Number(kv.value));
            break;
          }
          await this.store.put(SETTLED_PREFIX + device, String(want));
          this.noteMarker(device, want);
          this.log(
            `device ${device}: the grant of change ${want} written for every agent (${SETTLED_PREFIX}${device}, attempt ${attempt})`,
          );
          break;
        } catch (e) {
          // A closed store is the agent stopping; anything else is etcd not reachable yet.
          if (isStoreError(e) && e.code === 'STORE_CLOSED') break;
        }
      }
      this.marking.delete(device);
    })();
  }

  /** Lifts what the states older than `revision` withhold once every agent has applied it. */
  private settleLater(device: string, revision: number, attempt = 0): void {
    const settle = this.settle;
    if (!settle) return;
    settle(revision, device).then(
      () => this.devices.get(device)?.settled(revision),
      (e: unknown) => {
        // Until then the device keeps the stricter access: safe, and lifted by any later settled change.
        if (attempt >= 10 || !this.devices.has(device)) {
          this.log(
            `device ${device}: change ${revision} not applied everywhere: ${(e as Error).message}`,
          );
          return;
        }
        this.settleLater(device, revision, attempt + 1);
      },
    );
  }

  /**
   * A reservation or access list record as another agent wrote it (the cluster
   * watch, in revision order): the data path follows it, and connections the
   * change preempted with abort are closed here before the change is acked.
   */
  applyRemote(
    device: string,
    kind: 'pr' | 'acl' | 'settled',
    kv: KeyValue | undefined,
  ): Promise<void> {
    if (kind === 'settled') {
      // Every agent has applied the change at this revision: grant what it grants.
      const revision = kv ? Number(kv.value) : 0;
      if (revision > 0) {
        this.noteMarker(device, revision);
        this.devices.get(device)?.settled(revision);
      }
      return Promise.resolve();
    }
    return this.mutex.run(async () => {
      if (kind === 'acl') {
        const acc = this.access(device);
        const known = this.aclRevisions.get(device) ?? 0;
        if (kv && kv.modRevision <= known) return; // already applied
        if (kv) this.aclRevisions.set(device, kv.modRevision);
        else this.aclRevisions.delete(device);
        let entries: AclEntry[] | null = null;
        if (kv) {
          try {
            entries = (JSON.parse(kv.value) as { entries: AclEntry[] }).entries;
          } catch {
            this.log(`device ${device}: unreadable access list from the cluster; everyone refused`);
            entries = [];
          }
        }
        acc.acl = entries === null ? null : new Map(entries.map((e) => [e.identity, e.access]));
        acc.generation++;
        return;
      }
      await this.applyRecord(device, kv, kv?.modRevision ?? 0);
    });
  }

  /**
   * Applies a record from the watch. Only the watch and this agent's own changes
   * advance the known revision, so every change reaches here once, in order, and
   * its aborts are carried out before the agent acks it.
   */
  private async applyRecord(
    device: string,
    kv: KeyValue | undefined,
    modRevision: number,
  ): Promise<void> {
    const known = this.revisions.get(device);
    if (kv && known && modRevision <= known.pr) return; // already applied (our own change)
    const acc = this.access(device);
    if (!kv) {
      acc.state = EMPTY_PR;
      acc.unsettled = [];
      acc.generation++;
      this.revisions.delete(device);
      return;
    }
    let rec: PrRecord;
    try {
      rec = JSON.parse(kv.value) as PrRecord;
      const next = prFromJson(rec.state);
      // pr-grant-early: the nemesis's injected bug, a grant in force before it settles
      if (this.settle && !failpointArmed('pr-grant-early')) {
        // What the agents that have not applied it still enforce: the state it
        // replaced, as its record says (the state this agent knew is that state
        // only if it saw every change before it; a re-listing skips some), and
        // the earlier changes not yet everywhere that this agent never saw.
        const skippedFrom = known?.pr ?? 0;
        const held =
          rec.before === undefined
            ? [{ revision: modRevision, state: acc.state }]
            : this.heldBy(device, rec, modRevision).filter((h) => h.revision > skippedFrom);
        acc.hold(held);
        this.settleLater(device, modRevision);
      }
      acc.state = next;
    } catch (e) {
      // Never "no reservation" for a record we cannot read: nobody may write.
      this.log(`device ${device}: unreadable reservation record: ${(e as Error).message}`);
      acc.acl = new Map();
      acc.generation++;
      return;
    }
    acc.generation++;
    this.revisions.set(device, { pr: modRevision, seq: rec.seq });
    const gone = new Set(rec.abort ?? []);
    // A watch that fell behind a compaction re-lists and sees only the last
    // record: the changes between the one applied here and it are on the trail,
    // and what they aborted is aborted here too, before this change is acked.
    if (known && rec.seq > known.seq + 1) {
      for (const who of await this.skippedAborts(device, known.seq, rec.seq - 1)) gone.add(who);
    }
    if (gone.size > 0 && !failpointArmed('pr-abort-skip')) {
      const conns = (this.server()?.connectionsTo(device) ?? []).filter((c) =>
        gone.has(c.identity),
      );
      if (conns.length > 0) {
        this.log(
          `device ${device}: aborting ${conns.length} connection(s) of ${[...gone].join(', ')}`,
        );
        await Promise.all(conns.map((c) => c.abort()));
      }
      await this.abortStreams?.(device, gone);
    }
  }

  /**
   * The identities preempted with abort by the changes numbered `from` to
   * `to - 1` (audit `seq`), which this agent never saw one by one. Every
   * connection of theirs here was opened before this agent knew of the abort,
   * so all are closed, re-registered since or not (the other agents closed
   * theirs when it happened; a client opens a new one).
   */
  private async skippedAborts(device: string, from: number, to: number): Promise<Set<string>> {
    const want = (kvs: KeyValue[]) => {
      const found = new Map<number, StoredAuditEntry>();
      for (const kv of kvs) {
        const m = /\/(\d{12})$/.exec(kv.key);
        const seq = m ? Number(m[1]) : -1;
        if (seq < from || seq >= to) continue;
        try {
          found.set(seq, JSON.parse(kv.value) as StoredAuditEntry);
        } catch {
          // unreadable: counted missing below
        }
      }
      return found;
    };
    let found = want(this.cachedTrail?.(device) ?? []);
    if (found.size < to - from) {
      try {
        found = want((await this.store.range(`${AUDIT_PREFIX}${device}/`)).kvs);
      } catch (e) {
        this.log(`device ${device}: reading the audit trail failed: ${(e as Error).message}`);
      }
    }
    if (found.size < to - from) {
      this.log(
        `device ${device}: ${to - from - found.size} skipped change(s) missing from the audit trail; their aborts are unknown here`,
      );
    }
    const gone = new Set<string>();
    for (const e of found.values()) {
      if (e.action === 'preempt-abort') for (const who of e.preempted ?? []) gone.add(who);
    }
    if (gone.size > 0) {
      this.log(
        `device ${device}: trail entries ${from}-${to - 1} skipped (history compacted); they aborted ${[...gone].join(', ')}`,
      );
    }
    return gone;
  }

  private applyOnce(
    device: string,
    req: PrOutRequest,
    actor: string,
  ): Promise<{ result: PrOutResult; revision: number; grants: boolean }> {
    return this.mutex.run(async () => {
      const acc = this.need(device);
      if (req.ifGeneration !== undefined && acc.state.generation !== req.ifGeneration) {
        throw new BallastError(
          'PR_CONFLICT',
          `reservation conflict [stale-generation]: the PRgeneration of ${device} is ${acc.state.generation}, not ${req.ifGeneration}; read it again`,
        );
      }
      if (!identityOk(req.as)) {
        throw new BallastError(
          'BALLAST_BAD_REQUEST',
          'the identity to act as (--as) must be 1 to 256 printable characters without spaces',
        );
      }
      if (req.target !== undefined && !identityOk(req.target)) {
        throw new BallastError('BALLAST_BAD_REQUEST', 'the target identity is not valid');
      }
      const pr: PrRequest = {
        action: req.action,
        initiator: req.as,
        key: req.key,
        saKey: req.saKey,
        type: req.type,
        target: req.target,
        unregister: req.unregister,
      };
      const result = applyPr(acc.state, pr);
      const rev = this.revisions.get(device) ?? { pr: 0, seq: 0 };
      const next = result.ok ? result.state : acc.state;
      const entry: AuditEntry = {
        seq: rev.seq,
        time: new Date().toISOString(),
        actor,
        initiator: req.as,
        action: req.action,
        key: formatKey(req.key),
        ...(req.saKey !== undefined ? { saKey: formatKey(req.saKey) } : {}),
        ...(req.type !== undefined ? { type: req.type } : {}),
        ...(req.target !== undefined ? { target: req.target } : {}),
        outcome: !result.ok ? 'refused' : result.changed ? 'changed' : 'unchanged',
        ...(!result.ok ? { code: result.code, reason: result.reason } : {}),
        generation: next.generation,
        ...(result.ok && result.preempted.length > 0 ? { preempted: result.preempted } : {}),
      };
      if (!result.ok || !result.changed) {
        // A refusal or a no-op changes nothing: `pr/<device>` is left alone (it
        // never makes a change lose its compare-and-swap) and only its entry is
        // written, on condition that the state it was judged on is still the last.
        await this.recordSide(device, rev, entry);
        if (!result.ok) {
          const what =
            result.code === 'PR_CONFLICT'
              ? `reservation conflict [${result.reason}]`
              : result.reason;
          throw new BallastError(result.code, `${what}: ${result.message}`);
        }
        return {
          result: {
            device,
            action: req.action,
            initiator: req.as,
            changed: false,
            generation: acc.state.generation,
            preempted: [],
            aborted: 0,
          },
          revision: 0,
          grants: false,
        };
      }
      const record: PrRecord = { state: prToJson(next), seq: rev.seq + 1 };
      if (this.settle) {
        record.before = prToJson(acc.state);
        if (acc.unsettled.length > 0) {
          record.held = acc.unsettled.map((u) => ({
            revision: u.revision,
            state: prToJson(u.state),
          }));
        }
      }
      if (result.ok && req.action === 'preempt-abort' && result.preempted.length > 0) {
        record.abort = result.preempted;
      }
      record.last = {
        action: req.action,
        initiator: req.as,
        actor,
        time: entry.time,
        ...(this.host ? { host: this.host } : {}),
      };
      const key = PR_PREFIX + device;
      const value = JSON.stringify(record);
      const auditKey = auditKeyOf(device, rev.seq);
      // In a cluster the store ends the call with a verdict within its deadline: made
      // (an answer, or read back after a lost one), NOT made, or in doubt (cluster/changes.ts).
      const t = await this.store.txn({
        compare: [cmp.modRevision(key, '=', rev.pr)],
        success: [op.put(key, value), op.put(auditKey, JSON.stringify(entry))],
      });
      if (!t.succeeded) throw new LostRace(device, t.revision);
      this.revisions.set(device, { pr: t.revision, seq: rev.seq + 1 });
      let aborted = 0;
      // Every change takes the second round, not only one that grants by itself: an
      // earlier grant may still be withheld on an agent that has not yet seen every ack
      // of it, and this change, once returned, must find it in force there too.
      const granted = true;
      if (this.settle) acc.unsettled.push({ revision: t.revision, state: acc.state });
      acc.state = result.state;
      acc.generation++;
      this.log(
        `device ${device}: ${req.action} as ${req.as} → generation ${result.state.generation}` +
          (result.preempted.length ? `, preempted ${result.preempted.join(', ')}` : ''),
      );
      if (req.action === 'preempt-abort' && result.preempted.length > 0) {
        const gone = new Set(result.preempted);
        const conns = (this.server()?.connectionsTo(device) ?? []).filter((c) =>
          gone.has(c.identity),
        );
        aborted = conns.length;
        await Promise.all(conns.map((c) => c.abort()));
        aborted += (await this.abortStreams?.(device, gone)) ?? 0;
      }
      return {
        result: {
          device,
          action: req.action,
          initiator: req.as,
          changed: result.changed,
          generation: result.state.generation,
          preempted: result.preempted,
          aborted,
        },
        revision: t.revision,
        grants: granted,
      };
    });
  }

  /**
   * Writes the entry of a command that changed nothing under its own key, if the
   * state it was judged on (`rev`) is still the last; else LostRace.
   */
  private async recordSide(
    device: string,
    rev: { pr: number; seq: number },
    entry: AuditEntry,
  ): Promise<void> {
    const { seq: _seq, ...rest } = entry;
    const key = sideKeyOf(device, rev.seq);
    const value = JSON.stringify({ ...rest, after: rev.seq } satisfies StoredAuditEntry);
    let t: { succeeded: boolean; revision: number };
    try {
      t = await this.store.txn({
        compare: [cmp.modRevision(PR_PREFIX + device, '=', rev.pr)],
        success: [op.put(key, value)],
      });
    } catch (e) {
      if (!isStoreError(e) || !e.retryable) throw e;
      const kv = await untilAnswered(() => this.store.get(key));
      if (kv?.value !== value) {
        throw Object.assign(
          new StoreError(
            e.code,
            `${e.message}; read back afterwards: the command on ${device} was NOT recorded, and changed nothing (retry)`,
            { cause: e },
          ),
          { made: false as const },
        );
      }
      return;
    }
    if (!t.succeeded) throw new LostRace(device, t.revision);
  }

  /**
   * Records in the audit trail a request refused before it reached the
   * reservation logic (a bad type, key or action): whoever probes a device's
   * reservations with garbage leaves a trace too. The state is unchanged, and
   * so is `pr/<device>`: refusals never contend with changes.
   *
   * Such a refusal does not depend on the state, so a lost race does not wait
   * for this agent's watch: `pr/<device>` is read from the store and the
   * conditional write tried again at once. Resolves to null once recorded, or
   * to what the answer must add: "; this refusal is NOT on the audit trail
   * (why)" when it surely was not written, "may not be" when that is unknown.
   */
  async recordRefusal(
    device: string,
    raw: { action: unknown; as: unknown; key: unknown; saKey: unknown; type: unknown },
    code: string,
    reason: string,
    actor: string,
  ): Promise<string | null> {
    if (!this.exists(device)) return null;
    // What the caller sent, as text, kept short: it is not trusted input.
    const text = (v: unknown) => String(v).slice(0, 80);
    const base = {
      time: new Date().toISOString(),
      actor,
      initiator: typeof raw.as === 'string' ? raw.as.slice(0, 256) : '',
      action: text(raw.action) as PrAction,
      key: raw.key === undefined ? formatKey(0n) : text(raw.key),
      ...(raw.saKey !== undefined && raw.saKey !== null ? { saKey: text(raw.saKey) } : {}),
      ...(raw.type !== undefined && raw.type !== null
        ? { type: text(raw.type) as unknown as PrType }
        : {}),
      outcome: 'refused',
      code,
      reason,
    } satisfies Omit<AuditEntry, 'seq' | 'generation'>;
    // First on what this agent knows; both are updated together, in one tick.
    let rev = this.revisions.get(device) ?? { pr: 0, seq: 0 };
    let generation = this.access(device).state.generation;
    let lost = 0;
    let failed = 0;
    const missing = (sure: boolean, why: string) => {
      this.log(`device ${device}: a refused request (${code}) is not on the audit trail: ${why}`);
      return `; this refusal ${sure ? 'is NOT' : 'may not be'} on the audit trail (${why})`;
    };
    for (;;) {
      try {
        await this.recordSide(device, rev, { ...base, seq: rev.seq, generation });
        return null;
      } catch (e) {
        if (e instanceof LostRace) {
          if (++lost >= REFUSAL_TRIES) {
            return missing(
              true,
              `the reservations of ${device} changed ${lost} times while it was recorded`,
            );
          }
        } else {
          const made = (e as { made?: unknown }).made;
          // Not written for sure: a store that refused it, or read back absent.
          const sure = made === false || (isStoreError(e) && !e.retryable && made !== null);
          // Tried again only when surely not written (never twice on the trail), a few times.
          if (!sure || ++failed > 2) return missing(sure, causeOf(e));
          await new Promise((r) => setTimeout(r, 100 * failed));
          continue;
        }
      }
      // Lost the race: where the record is now, from the store (the refusal does not depend on it).
      try {
        const kv = await this.store.get(PR_PREFIX + device);
        if (kv === undefined) {
          rev = { pr: 0, seq: 0 };
          generation = 0;
        } else {
          const rec = JSON.parse(kv.value) as PrRecord;
          rev = { pr: kv.modRevision, seq: rec.seq };
          generation = rec.state.generation;
        }
      } catch (e) {
        return missing(true, causeOf(e));
      }
    }
  }

  // ---- access lists ----

  acl(device: string): { device: string; entries: AclEntry[] | null } {
    const acl = this.need(device).acl;
    return {
      device,
      entries: acl ? [...acl].map(([identity, access]) => ({ identity, access })) : null,
    };
  }

  /** Replaces the access list (null: everyone may connect, read-write). */
  async setAcl(
    device: string,
    entries: AclEntry[] | null,
  ): Promise<{ device: string; entries: AclEntry[] | null }> {
    const r = await this.setAclLocked(device, entries);
    if (this.settle && r.revision > 0) await this.settle(r.revision, device);
    return r.view;
  }

  private setAclLocked(
    device: string,
    entries: AclEntry[] | null,
  ): Promise<{ view: { device: string; entries: AclEntry[] | null }; revision: number }> {
    return this.mutex.run(async () => {
      const acc = this.need(device);
      const seen = new Set<string>();
      for (const e of entries ?? []) {
        // Entries come from a JSON body: anything, null included (found by fuzzing).
        if (
          typeof e !== 'object' ||
          e === null ||
          !identityOk(e.identity) ||
          (e.access !== 'ro' && e.access !== 'rw')
        ) {
          throw new BallastError(
            'BALLAST_BAD_ACL',
            `bad access list entry ${JSON.stringify(e)}: expected IDENTITY:ro or IDENTITY:rw`,
          );
        }
        if (seen.has(e.identity)) {
          throw new BallastError('BALLAST_BAD_ACL', `identity ${e.identity} listed twice`);
        }
        seen.add(e.identity);
      }
      const key = ACL_PREFIX + device;
      // Only what an entry means is kept, not whatever else the body carried.
      const clean = entries?.map((e) => ({ identity: e.identity, access: e.access })) ?? null;
      const revision =
        clean === null
          ? (await this.store.delete(key)).revision
          : (
              await this.store.put(
                key,
                JSON.stringify({ entries: clean, at: new Date().toISOString() }),
              )
            ).revision;
      acc.acl = clean === null ? null : new Map(clean.map((e) => [e.identity, e.access]));
      acc.generation++;
      if (clean === null) this.aclRevisions.delete(device);
      else this.aclRevisions.set(device, revision);
      this.log(`device ${device}: access list ${entries === null ? 'removed' : 'set'}`);
      return { view: this.acl(device), revision };
    });
  }

  /** The device is gone: its reservations, audit trail and access list go too. */
  async forget(device: string): Promise<void> {
    await this.mutex.run(async () => {
      await this.store.txn({
        compare: [],
        success: [
          op.delete(PR_PREFIX + device),
          op.delete(ACL_PREFIX + device),
          op.delete(SETTLED_PREFIX + device),
          op.deletePrefix(`${AUDIT_PREFIX}${device}/`),
        ],
      });
      this.devices.delete(device);
      this.revisions.delete(device);
      this.aclRevisions.delete(device);
    });
  }
}
