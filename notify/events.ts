// Configuration-change events. The store is the event log: every change the
// agents make is a store revision, and an event's id is the revision that made
// it (with `.N` for the N-th event of one revision). Most events are read off the
// catalog's own history (a device record put for the first time is
// device.created, its size changing is device.resized, ...); what the catalog
// does not record (a tier change, a first connection, a fence) an agent writes
// as an explicit event under `events/<host>`. So events are ordered, resumable
// from any id still in the store's history, and de-duplicable by id.

import { createHmac } from 'node:crypto';
import { isStoreError, type KeyValue, type Store, type WatchEvent } from '../agent/store/store.js';

export const EVENT_KINDS = [
  'device.created',
  'device.deleted',
  'device.resized',
  'device.extended',
  'device.attached',
  'device.detached',
  'tier.changed',
  'reservation.changed',
  'acl.changed',
  'member.joined',
  'member.left',
  'member.expired',
  'member.fenced',
  'pool.added',
  'pool.removed',
  'pool.full',
  'dump.completed',
  'dump.failed',
  'memory.rebalanced',
  'resync',
  'test',
] as const;
export type EventKind = (typeof EVENT_KINDS)[number];

/** Keys of explicit events: one per host, each put an event. */
export const EVENTS_PREFIX = 'events/';
/** The time of each event whose change stores none (`notify/time/<revision>`, or a resync's id). */
export const TIMES = 'notify/time/';
/** The media of each host's pools as last seen (`notify/media/<host>`: {pool: medium}). */
export const MEDIA = 'notify/media/';
/**
 * A resync stands for the state after every event of its revision: its id is
 * `<revision>.999999`, after that revision's events and before the next one's.
 */
export const END_OF_REVISION = 999_999;

export interface BallastEvent {
  /** The store revision that made it, `.N` for the N-th event of that revision (N ≥ 1). */
  id: string;
  revision: number;
  /** The index within the revision (0 for the first). */
  n: number;
  kind: EventKind;
  /** What it is about (a device, a pool, a host). */
  subject?: string;
  /** The host whose agent made the change, when known. */
  host?: string;
  /** ISO 8601; '' from the Translator when the change stores no time (see stampTimes). */
  time: string;
  data: Record<string, unknown>;
}

/** What an agent writes under events/<host> for a change the catalog does not record. */
export interface ExplicitEvent {
  kind: EventKind;
  subject?: string;
  host: string;
  time: string;
  data: Record<string, unknown>;
}

/** Orders ids: revision, then the index within it. */
export function parseEventId(id: string): { revision: number; n: number } | null {
  const m = /^(\d{1,15})(?:\.(\d{1,6}))?$/.exec(id);
  if (!m) return null;
  return { revision: Number(m[1]), n: m[2] === undefined ? 0 : Number(m[2]) };
}

export function afterId(
  a: { revision: number; n: number },
  cursor: { revision: number; n: number },
): boolean {
  return a.revision > cursor.revision || (a.revision === cursor.revision && a.n > cursor.n);
}

/**
 * A `--types` filter: comma-separated kinds, `*` wildcards at a dot boundary
 * (`device.*`, `*`). Throws on anything else, naming the bad item.
 */
export function parseTypes(spec: string | undefined): (kind: string) => boolean {
  if (spec === undefined || spec.trim() === '' || spec.trim() === '*') return () => true;
  const pats = spec.split(',').map((s) => s.trim());
  const res: RegExp[] = [];
  for (const p of pats) {
    const bare = p.startsWith('io.ballast.') ? p.slice('io.ballast.'.length) : p;
    if (!/^([a-z]+|\*)(\.([a-z]+|\*))?$/.test(bare)) {
      throw new Error(
        `bad event type ${JSON.stringify(p)}: expected e.g. device.created, device.*, *`,
      );
    }
    if (!bare.includes('*') && !(EVENT_KINDS as readonly string[]).includes(bare)) {
      throw new Error(`unknown event type ${JSON.stringify(p)}: one of ${EVENT_KINDS.join(', ')}`);
    }
    res.push(new RegExp(`^${bare.replace('.', '\\.').replace(/\*/g, '[a-z]+')}$`));
  }
  // resync always passes: it is what a recipient gets instead of a gap.
  return (kind) => kind === 'resync' || res.some((r) => r.test(kind));
}

function parse(kv: KeyValue | undefined): Record<string, unknown> | undefined {
  if (!kv || kv.value === '') return undefined;
  try {
    const v = JSON.parse(kv.value) as unknown;
    return typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : undefined;
  } catch {
    return undefined;
  }
}

interface DeviceLike {
  name?: string;
  size?: number;
  state?: string;
  extents?: { pool: string; size: number }[];
  role?: string;
  guest?: string | null;
  host?: string | null;
  by?: string;
  updatedAt?: string;
}

function deviceSummary(d: DeviceLike): Record<string, unknown> {
  return {
    name: d.name,
    size: d.size,
    role: d.role,
    guest: d.guest ?? null,
    pools: (d.extents ?? []).map((e) => e.pool),
    ...(d.host !== undefined ? { host: d.host } : {}),
  };
}

/**
 * Turns the store's history into events. Keeps what it must remember between
 * events: which hosts left cleanly (a member key that goes away is `left` after
 * a clean stop, else `expired`). `seed` is the state at the starting revision.
 */
export class Translator {
  private readonly left = new Set<string>();
  private lastRevision = 0;
  private nInRevision = 0;

  constructor(seed?: { hostsLeft?: Iterable<string> }) {
    for (const h of seed?.hostsLeft ?? []) this.left.add(h);
  }

  private id(revision: number): { id: string; revision: number; n: number } {
    if (revision !== this.lastRevision) {
      this.lastRevision = revision;
      this.nInRevision = 0;
    }
    this.nInRevision++;
    const n = this.nInRevision - 1;
    return { id: n === 0 ? String(revision) : `${revision}.${n}`, revision, n };
  }

  /** The events one store event makes (often none). */
  translate(ev: WatchEvent): BallastEvent[] {
    const key = ev.kv.key;
    const rev = ev.revision;
    // A time is the change's own only when this change wrote it; else '' and the
    // consumer stamps it once for every reader (stampTimes).
    const now = '';
    const out: BallastEvent[] = [];
    const push = (e: Omit<BallastEvent, 'id' | 'revision' | 'n'>) =>
      out.push({ ...this.id(rev), ...e });

    if (key.startsWith('devices/')) {
      const name = key.slice('devices/'.length);
      const after = ev.type === 'put' ? (parse(ev.kv) as DeviceLike | undefined) : undefined;
      const before = parse(ev.prevKv) as DeviceLike | undefined;
      const wasReady = before?.state === 'ready';
      const isReady = after?.state === 'ready';
      const host = after?.by ?? before?.by;
      const time =
        after?.updatedAt !== undefined && after.updatedAt !== before?.updatedAt
          ? after.updatedAt
          : now;
      if (isReady && !wasReady) {
        push({
          kind: 'device.created',
          subject: name,
          host,
          time,
          data: { after: deviceSummary(after!) },
        });
      } else if (wasReady && !isReady) {
        if (ev.type === 'delete' || after?.state === 'deleting') {
          push({
            kind: 'device.deleted',
            subject: name,
            host,
            time,
            data: { before: deviceSummary(before!) },
          });
        }
      } else if (wasReady && isReady) {
        const b = before!;
        const a = after!;
        if ((a.extents?.length ?? 0) > (b.extents?.length ?? 0)) {
          push({
            kind: 'device.extended',
            subject: name,
            host,
            time,
            data: { before: deviceSummary(b), after: deviceSummary(a) },
          });
        } else if (a.size !== b.size) {
          push({
            kind: 'device.resized',
            subject: name,
            host,
            time,
            data: { before: deviceSummary(b), after: deviceSummary(a) },
          });
        }
      }
    } else if (key.startsWith('pr/')) {
      const device = key.slice('pr/'.length);
      const a = parse(ev.type === 'put' ? ev.kv : undefined);
      const b = parse(ev.prevKv);
      const last = (a?.last ?? {}) as Record<string, unknown>;
      const lastBefore = (b?.last ?? {}) as Record<string, unknown>;
      if (ev.type === 'put' && JSON.stringify(a?.state) === JSON.stringify(b?.state)) return out;
      if (ev.type === 'delete' && !b) return out;
      push({
        kind: 'reservation.changed',
        subject: device,
        host: typeof last.host === 'string' ? last.host : undefined,
        time: typeof last.time === 'string' && last.time !== lastBefore.time ? last.time : now,
        data: {
          before: b?.state ?? null,
          after: a?.state ?? null,
          ...(last.action
            ? { action: last.action, initiator: last.initiator, actor: last.actor }
            : {}),
          ...(a?.abort ? { preempted: a.abort } : {}),
        },
      });
    } else if (key.startsWith('acl/')) {
      const device = key.slice('acl/'.length);
      const a = parse(ev.type === 'put' ? ev.kv : undefined);
      const b = parse(ev.prevKv);
      push({
        kind: 'acl.changed',
        subject: device,
        time: typeof a?.at === 'string' && a.at !== b?.at ? a.at : now,
        data: { before: b?.entries ?? null, after: a?.entries ?? null },
      });
    } else if (key.startsWith('hosts/')) {
      const h = parse(ev.type === 'put' ? ev.kv : undefined);
      const host = key.slice('hosts/'.length);
      if (h?.state === 'left') {
        this.left.add(host);
        push({
          kind: 'member.left',
          subject: host,
          host,
          time: typeof h.since === 'string' ? h.since : now,
          data: {},
        });
      } else if (h?.state === 'up') {
        this.left.delete(host);
      }
    } else if (key.startsWith('members/')) {
      const host = key.slice('members/'.length);
      if (ev.type === 'put' && !ev.prevKv) {
        const m = parse(ev.kv);
        this.left.delete(host);
        push({
          kind: 'member.joined',
          subject: host,
          host,
          // Not startedAt: an agent that lost its lease joins again long after it started.
          time: now,
          data: { version: m?.version, pools: m?.pools, nbd: m?.nbd },
        });
      } else if (ev.type === 'delete' && !this.left.has(host)) {
        push({ kind: 'member.expired', subject: host, host, time: now, data: {} });
      }
    } else if (key.startsWith(EVENTS_PREFIX) && ev.type === 'put') {
      const e = parse(ev.kv) as ExplicitEvent | undefined;
      if (e && (EVENT_KINDS as readonly string[]).includes(e.kind)) {
        push({ kind: e.kind, subject: e.subject, host: e.host, time: e.time, data: e.data ?? {} });
      }
    }
    return out;
  }
}

/**
 * A change whose previous value the watch should carry and does not: etcd leaves
 * prev_kv out, without a word, when the revision before the change was compacted
 * while the watch was behind (cut off, catching up). The Translator would take a
 * device's deletion for nothing and make no event, a silent gap: the reader must
 * resync as behind any compaction.
 */
export function previousLost(ev: WatchEvent, cursor: { revision: number; n: number }): boolean {
  if (ev.prevKv) return false;
  // At or before the reader's cursor it is not read. A resync's revision is the
  // compaction point, whose own changes never have one (folded into the resync).
  if (
    ev.revision < cursor.revision ||
    (ev.revision === cursor.revision && cursor.n >= END_OF_REVISION)
  ) {
    return false;
  }
  const k = ev.kv.key;
  if (!['devices/', 'pr/', 'acl/', 'members/'].some((p) => k.startsWith(p))) return false;
  // A delete always has a value before it; a put had one unless it made the key.
  return ev.type === 'delete' || ev.kv.version > 1;
}

/** The CloudEvents 1.0 structured form of an event. */
export function cloudEvent(
  e: BallastEvent,
  cluster: string,
  host: string,
): Record<string, unknown> {
  return {
    specversion: '1.0',
    id: e.id,
    source: `/ballast/${cluster}/${e.host ?? host}`,
    type: `io.ballast.${e.kind}`,
    time: e.time,
    datacontenttype: 'application/json',
    ...(e.subject ? { subject: e.subject } : {}),
    data: e.data,
  };
}

/** `sha256=<hex>`: HMAC-SHA256 of the body under the recipient's secret. */
export function sign(body: string, secret: string): string {
  return `sha256=${createHmac('sha256', secret).update(body).digest('hex')}`;
}

/**
 * Gives each event without a stored time one that every reader sees: the first to
 * read it (in practice the agents' live watches, as it happens) records its clock
 * under `notify/time/<revision>`, the others read that. Kept until the history of
 * its revision is compacted (Notifier prunes).
 */
export async function stampTimes(store: Store, events: BallastEvent[]): Promise<void> {
  for (const e of events) {
    if (e.time !== '') continue;
    e.time = await stableTime(store, String(e.revision));
  }
}

/** How long a stored time is kept at least, after its revision is compacted too. */
export const TIME_GRACE_MS = 15 * 60_000;

/**
 * Whether the stored time `kv` (`notify/time/<revision>[.n]`) may go: its
 * revision is below the compaction point (no reader can read the event from the
 * history again) and it was recorded more than `graceMs` ago (a reader that took
 * the event off its watch before the compaction, and was frozen or behind since,
 * still finds the same time).
 */
export function timePrunable(
  kv: KeyValue,
  compactRevision: number,
  nowMs: number,
  graceMs = TIME_GRACE_MS,
): boolean {
  const rev = Number.parseInt(kv.key.slice(kv.key.lastIndexOf('/') + 1), 10);
  if (!(rev < compactRevision)) return false;
  const at = Date.parse(kv.value);
  // A value that is not a time is not ours to keep.
  return Number.isNaN(at) || at < nowMs - graceMs;
}

/** The time recorded under `notify/time/<key>`, recorded now if none is. */
export async function stableTime(store: Store, key: string): Promise<string> {
  const kv = await store.get(TIMES + key);
  if (kv) return kv.value;
  const now = new Date().toISOString();
  const r = await store.createIfAbsent(TIMES + key, now);
  return r.succeeded ? now : (r.kv?.value ?? now);
}

/** Reads with the compaction point moving meanwhile: again at the new point. */
async function readAt(store: Store, prefix: string, revision: number) {
  return (await store.range(prefix, { revision })).kvs;
}

/**
 * The state a recipient behind a compaction recovers with, as the store held it
 * at revision `at` (the oldest one kept): devices, reservations, access lists,
 * members (and hosts that left), each host's pool media and the devices' tiers.
 * The same for a webhook and a stream: its id is `<at>.999999`, its time stored.
 */
export async function resyncAt(store: Store, at: number, host: string): Promise<BallastEvent> {
  const [devs, prs, acls, members, hosts, media] = await Promise.all(
    ['devices/', 'pr/', 'acl/', 'members/', 'hosts/', MEDIA].map((p) => readAt(store, p, at)),
  );
  const mediaOf = new Map<string, Record<string, string>>();
  for (const kv of media!) {
    const m = parse(kv);
    if (m) mediaOf.set(kv.key.slice(MEDIA.length), m as Record<string, string>);
  }
  const devices: Record<string, unknown>[] = [];
  const tiers: Record<string, string[]> = {};
  for (const kv of devs!) {
    const d = parse(kv) as DeviceLike | undefined;
    if (!d) continue;
    const name = kv.key.slice('devices/'.length);
    devices.push({ ...deviceSummary({ ...d, name }), state: d.state });
    // A shared pool's medium as each host that has it sees it; a local one as its host does.
    const seen = d.host ? [mediaOf.get(d.host) ?? {}] : [...mediaOf.values()];
    const t = new Set<string>();
    for (const e of d.extents ?? []) {
      const found = seen.map((m) => m[e.pool]).filter((x): x is string => x !== undefined);
      for (const x of found.length > 0 ? found : ['unknown']) t.add(x);
    }
    tiers[name] = [...t].sort();
  }
  const byDevice = (kvs: KeyValue[], prefix: string, field: string) =>
    Object.fromEntries(
      kvs.map((kv) => [kv.key.slice(prefix.length), parse(kv)?.[field] ?? null] as const),
    );
  const id = `${at}.${END_OF_REVISION}`;
  return {
    id,
    revision: at,
    n: END_OF_REVISION,
    kind: 'resync',
    host,
    time: await stableTime(store, id),
    data: {
      reason: `the history before revision ${at} was compacted: the state at ${at}, then every event after it`,
      revision: at,
      devices,
      reservations: byDevice(prs!, 'pr/', 'state'),
      acls: byDevice(acls!, 'acl/', 'entries'),
      members: members!.map((kv) => {
        const m = parse(kv) ?? {};
        return { host: kv.key.slice('members/'.length), version: m.version, nbd: m.nbd };
      }),
      hostsLeft: hosts!
        .filter((kv) => parse(kv)?.state === 'left')
        .map((kv) => kv.key.slice('hosts/'.length)),
      media: Object.fromEntries(mediaOf),
      tiers,
    },
  };
}

/**
 * The resync for a reader whose history was compacted: at the compaction point
 * `point` (the store's when 0), read again at the new point if it moves meanwhile.
 */
export async function resyncAfterCompaction(
  store: Store,
  point: number,
  host: string,
): Promise<BallastEvent> {
  let at = point > 0 ? point : await store.compactRevision();
  for (;;) {
    try {
      return await resyncAt(store, Math.max(1, at), host);
    } catch (e) {
      if (!isStoreError(e, 'STORE_COMPACTED')) throw e;
      at = e.compactRevision ?? (await store.compactRevision());
    }
  }
}
