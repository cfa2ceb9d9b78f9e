// Configuration-change events. The store is the event log: every change the
// agents make is a store revision, and an event's id is the revision that made
// it (with `.N` for the N-th event of one revision). Most events are read off the
// catalog's own history (a device record put for the first time is
// device.created, its size changing is device.resized, ...); what the catalog
// does not record (a tier change, a first connection, a fence) an agent writes
// as an explicit event under `events/<host>`. So events are ordered, resumable
// from any id still in the store's history, and de-duplicable by id.

import { createHmac } from 'node:crypto';
import type { KeyValue, WatchEvent } from '../agent/store/store.js';

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
    const now = new Date().toISOString();
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
      const time = after?.updatedAt ?? now;
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
      if (ev.type === 'put' && JSON.stringify(a?.state) === JSON.stringify(b?.state)) return out;
      if (ev.type === 'delete' && !b) return out;
      push({
        kind: 'reservation.changed',
        subject: device,
        host: typeof last.host === 'string' ? last.host : undefined,
        time: typeof last.time === 'string' ? last.time : now,
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
        time: typeof a?.at === 'string' ? a.at : now,
        data: { before: b?.entries ?? null, after: a?.entries ?? null },
      });
    } else if (key.startsWith('hosts/')) {
      const h = parse(ev.type === 'put' ? ev.kv : undefined);
      const host = key.slice('hosts/'.length);
      if (h?.state === 'left') {
        this.left.add(host);
        push({ kind: 'member.left', subject: host, host, time: String(h.since ?? now), data: {} });
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
          time: String(m?.startedAt ?? now),
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
