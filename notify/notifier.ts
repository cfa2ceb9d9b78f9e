// Recipients of configuration-change events and their delivery.
//
// A recipient (`notify/recipients/<name>`) gets every event it asked for, by HTTP
// POST as a CloudEvent, signed, at least once and in id order. Its cursor
// (`notify/cursor/<name>`, the id of the last event it acknowledged) is durable in
// the store, so an agent restart, a kill -9 or (in a cluster) the delivering
// agent's death resumes from it on the same or another agent. In a cluster one
// agent delivers to a recipient at a time: the one holding `notify/leader/<name>`
// under its membership lease. A recipient whose cursor fell behind the store's
// history gets one `resync` event with the state at the oldest revision kept, then
// every event after it: never a silent gap.
//
// Only the leader delivers and moves the cursor: each POST goes out only while the
// lease it took the leadership under is certain to be alive (its deadline cut to the
// lease's end), and the cursor is written only while the leadership key it created
// is still there. A deliverer cut off from etcd or frozen stops before another agent
// can take over: its next leader starts from the last event acknowledged, so what
// the old one had sent is a repeat, never a gap filled late.

import http from 'node:http';
import https from 'node:https';
import { performance } from 'node:perf_hooks';
import { BallastError } from '../agent/errors.js';
import {
  cmp,
  isStoreError,
  op,
  type Store,
  StoreError,
  type Watcher,
} from '../agent/store/store.js';
import {
  afterId,
  type BallastEvent,
  cloudEvent,
  EVENTS_PREFIX,
  type EventKind,
  type ExplicitEvent,
  parseEventId,
  parseTypes,
  previousLost,
  resyncAfterCompaction,
  sign,
  stampTimes,
  TIMES,
  Translator,
  timePrunable,
} from './events.js';

export const RECIPIENTS = 'notify/recipients/';
export const CURSORS = 'notify/cursor/';
export const LEADERS = 'notify/leader/';

export interface Recipient {
  name: string;
  url: string;
  /** The --types filter as given ('' = every kind). */
  types: string;
  /** HMAC-SHA256 key for the signature header; absent: unsigned. */
  secret?: string;
  createdAt: string;
  /** Set when the recipient answered 410 Gone: nothing more is sent. */
  disabled?: { reason: string; at: string };
}

export interface RecipientView extends Omit<Recipient, 'secret'> {
  signed: boolean;
  cursor: string | null;
  /** The agent delivering to it now (cluster), or this one. */
  deliveredBy: string | null;
  lastError: string | null;
  lastDelivered: string | null;
  attempts: number;
}

export interface NotifierOptions {
  store: Store;
  cluster: string;
  host: string;
  log: (msg: string) => void;
  /** The membership lease (cluster): delivery leadership lives and dies with it. */
  lease?: () => string | undefined;
  /** Monotonic time (performance.now()) before which etcd cannot have expired that lease. */
  leaseValidUntil?: () => number;
  /** Per-POST deadline (a receiver that hangs). */
  timeoutMs?: number;
  /** Backoff between attempts: base, doubled per attempt up to cap, with jitter. */
  retryBaseMs?: number;
  retryCapMs?: number;
  /** How often leadership and recipients are looked at again besides the watch (ms, default 2000). */
  reconcileMs?: number;
}

const NAME = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

export function validateRecipient(input: {
  name?: unknown;
  url?: unknown;
  types?: unknown;
  secret?: unknown;
}): { name: string; url: string; types: string; secret?: string } {
  if (typeof input.name !== 'string' || !NAME.test(input.name)) {
    throw new BallastError(
      'NOTIFY_BAD_RECIPIENT',
      `bad recipient name ${JSON.stringify(input.name)}: 1 to 63 of a-z 0-9 . _ -`,
    );
  }
  let u: URL;
  try {
    u = new URL(String(input.url));
  } catch {
    throw new BallastError('NOTIFY_BAD_URL', `not a URL: ${JSON.stringify(input.url)}`);
  }
  if (u.protocol !== 'http:' && u.protocol !== 'https:') {
    throw new BallastError(
      'NOTIFY_BAD_URL',
      `a recipient URL must be http:// or https://, not ${u.protocol}`,
    );
  }
  const types = input.types === undefined || input.types === null ? '' : String(input.types);
  try {
    parseTypes(types);
  } catch (e) {
    throw new BallastError('NOTIFY_BAD_TYPES', (e as Error).message);
  }
  if (
    input.secret !== undefined &&
    (typeof input.secret !== 'string' || input.secret.length < 16)
  ) {
    throw new BallastError('NOTIFY_BAD_SECRET', 'a secret must be at least 16 characters');
  }
  return {
    name: input.name,
    url: u.toString(),
    types,
    ...(typeof input.secret === 'string' ? { secret: input.secret } : {}),
  };
}

function parseJson<T>(text: string | undefined): T | undefined {
  if (text === undefined) return undefined;
  try {
    return JSON.parse(text) as T;
  } catch {
    return undefined;
  }
}

/** Retry-After: seconds or an HTTP date; ms, or undefined. */
export function retryAfterMs(h: string | null): number | undefined {
  if (!h) return undefined;
  if (/^\d+$/.test(h.trim())) return Number(h.trim()) * 1000;
  const t = Date.parse(h);
  return Number.isNaN(t) ? undefined : Math.max(0, t - Date.now());
}

interface Stats {
  attempts: number;
  lastError: string | null;
  lastDelivered: string | null;
  /** performance.now() when the event being retried was first tried. */
  pendingSince: number | null;
  behind: number;
}

/** The leadership of one recipient: under which lease, and which incarnation of its key. */
interface Held {
  lease: string;
  /** createRevision of `notify/leader/<name>` as this agent created it. */
  since: number;
}

/** This agent no longer leads the recipient (its lease or its leadership key is gone). */
class LeadershipLost extends Error {}

/** Below this much lease left, a POST waits for the next keepalive rather than go out. */
const MIN_LEASE_LEFT_MS = 100;

/** Delivery to one recipient: a loop over the store's history from its cursor. */
class Delivery {
  private running = true;
  private watcher: Watcher | undefined;
  private wake: (() => void) | undefined;
  private savedAt = 0;
  readonly stats: Stats = {
    attempts: 0,
    lastError: null,
    lastDelivered: null,
    pendingSince: null,
    behind: 0,
  };
  readonly done: Promise<void>;
  /** The loop has ended by itself (the recipient disabled): the next sync may start it again. */
  finished = false;

  constructor(
    private readonly n: Notifier,
    readonly recipient: Recipient,
    /** Cluster: the leadership it delivers under (none on a single host). */
    private readonly held?: Held,
  ) {
    this.done = this.run().finally(() => {
      this.finished = true;
    });
  }

  /**
   * The loop, again after any failure (etcd cut off or frozen, a lease gone): it
   * starts over from the cursor in the store, so an event is delivered again
   * rather than skipped, and delivery never stops while this agent leads.
   */
  private async run(): Promise<void> {
    let failures = 0;
    while (this.running) {
      try {
        await this.loop();
        return;
      } catch (e) {
        if (!this.running) return;
        if (e instanceof LeadershipLost) {
          // The next sync sees it finished and takes the recipient up again if this
          // agent can lead it once more (from the cursor the new leadership finds).
          this.stats.lastError = e.message;
          this.n.log(`notify ${this.recipient.name}: delivery stopped: ${e.message}`);
          return;
        }
        this.stats.lastError = `store: ${(e as Error).message}`;
        this.n.logOnce(`notify ${this.recipient.name}: delivery paused: ${(e as Error).message}`);
        await this.pause(Math.min(5000, 250 * 2 ** Math.min(failures++, 5)));
      }
    }
  }

  private pause(ms: number): Promise<void> {
    return new Promise<void>((res) => {
      const t = setTimeout(res, ms);
      this.wake = () => {
        if (!this.running) {
          clearTimeout(t);
          res();
        }
      };
    }).finally(() => {
      this.wake = undefined;
    });
  }

  stop(): void {
    this.running = false;
    this.wake?.();
    void this.watcher?.cancel();
  }

  private async loop(): Promise<void> {
    const store = this.n.store;
    const filter = parseTypes(this.recipient.types);
    while (this.running) {
      const cur = parseEventId((await store.get(CURSORS + this.recipient.name))?.value ?? '') ?? {
        revision: await store.revision(),
        n: 0,
      };
      let cursor = cur;
      const left = await this.hostsLeft(cursor.revision);
      const tr = new Translator({ hostsLeft: left });
      // This pass's own queue, fed by this pass's watch only, and only while the pass
      // runs: a watch left over from a pass that failed (a store call timed out
      // mid-stream) is live and ahead of this one's replay from the cursor; its events
      // in this queue moved the cursor past the replayed ones, which were then
      // skipped as already delivered.
      const queue: BallastEvent[] = [];
      let watchError: unknown;
      let current = true;
      let watcher: Watcher;
      try {
        watcher = await store.watch('', {
          fromRevision: Math.max(1, cursor.revision),
          onEvent: (ev) => {
            if (!current) return;
            if (previousLost(ev, cur)) {
              // Compacted under the watch: what it would translate from here is wrong.
              current = false;
              watchError = new StoreError(
                'STORE_COMPACTED',
                `the value before revision ${ev.revision} was compacted under the watch`,
              );
              this.wake?.();
              return;
            }
            for (const e of tr.translate(ev)) queue.push(e);
            this.wake?.();
          },
          onError: (err) => {
            if (!current) return;
            watchError = err;
            this.wake?.();
          },
        });
      } catch (e) {
        current = false;
        if (isStoreError(e, 'STORE_COMPACTED')) {
          cursor = await this.resync(e.compactRevision ?? 0);
          continue;
        }
        throw e;
      }
      this.watcher = watcher;
      try {
        while (this.running && watchError === undefined) {
          const e = queue.shift();
          if (!e) {
            this.stats.behind = 0;
            await new Promise<void>((r) => {
              this.wake = r;
            });
            this.wake = undefined;
            continue;
          }
          this.stats.behind = queue.length + 1;
          if (!afterId(e, cursor)) continue;
          if (filter(e.kind)) {
            await stampTimes(store, [e]);
            const ok = await this.deliver(e);
            if (!ok) break; // stopped, or disabled
          }
          cursor = { revision: e.revision, n: e.n };
          // The cursor is written when caught up, else at most every 100 ms: a crash
          // re-delivers what came after it (same ids), never skips.
          const now = performance.now();
          if (queue.length === 0 || now - this.savedAt >= 100) {
            await this.saveCursor(e.id);
            this.savedAt = now;
          }
        }
      } finally {
        // Whether the pass ended or threw: its watch feeds nothing any more.
        current = false;
        await watcher.cancel().catch(() => {});
      }
      if (isStoreError(watchError, 'STORE_COMPACTED')) {
        await this.resync((watchError as { compactRevision?: number }).compactRevision ?? 0);
      } else if (watchError !== undefined && this.running) {
        await this.pause(500);
      }
    }
  }

  private async hostsLeft(revision: number): Promise<string[]> {
    try {
      const r = await this.n.store.range('hosts/', revision > 0 ? { revision } : {});
      return r.kvs
        .filter((kv) => parseJson<{ state?: string }>(kv.value)?.state === 'left')
        .map((kv) => kv.key.slice('hosts/'.length));
    } catch {
      return [];
    }
  }

  /**
   * History is gone past the cursor: one `resync` event with the state at the oldest
   * revision kept, then every event after it (the loop resumes from its id).
   */
  private async resync(compactRevision: number): Promise<{ revision: number; n: number }> {
    const e = await resyncAfterCompaction(this.n.store, compactRevision, this.n.host);
    this.n.log(
      `notify ${this.recipient.name}: history compacted past its cursor; resync at ${e.revision}, then the events after it`,
    );
    if (await this.deliver(e)) await this.saveCursor(e.id);
    return { revision: e.revision, n: e.n };
  }

  /**
   * Moves the cursor, only while this agent still leads: a deliverer that lost the
   * leadership (cut off past its lease) would move it back under the new leader's feet.
   */
  private async saveCursor(id: string): Promise<void> {
    const key = CURSORS + this.recipient.name;
    for (let i = 0; this.running; i++) {
      try {
        if (!this.held) {
          await this.n.store.put(key, id);
          return;
        }
        const r = await this.n.store.txn({
          compare: [cmp.createRevision(LEADERS + this.recipient.name, '=', this.held.since)],
          success: [op.put(key, id)],
        });
        if (!r.succeeded) throw new LeadershipLost(`its leadership key is gone (at event ${id})`);
        return;
      } catch (e) {
        if (e instanceof LeadershipLost || i > 50) throw e;
        this.leaseLeft(); // lost meanwhile: no point trying again
        await sleep(200);
      }
    }
  }

  /**
   * How long this agent surely leads yet (ms): its lease cannot have expired in etcd
   * before then, so nobody else can hold the leadership. Throws once the lease it took
   * the leadership under was replaced (lost and registered again).
   */
  private leaseLeft(): number {
    if (!this.held) return Number.POSITIVE_INFINITY;
    if (this.n.opts.lease?.() !== this.held.lease) {
      throw new LeadershipLost('the lease it led under is gone');
    }
    const until = this.n.opts.leaseValidUntil?.();
    return until === undefined ? Number.POSITIVE_INFINITY : until - performance.now();
  }

  /** POSTs until acknowledged (2xx); false if stopped or the recipient is gone (410). */
  async deliver(e: BallastEvent): Promise<boolean> {
    const body = JSON.stringify(cloudEvent(e, this.n.opts.cluster, this.n.host));
    this.stats.pendingSince = performance.now();
    for (let attempt = 0; this.running; attempt++) {
      // Only while the lease is surely ours, and not past its end: once it may have
      // expired another agent may lead and deliver, and ours would land among its POSTs.
      const left = this.leaseLeft();
      if (left < MIN_LEASE_LEFT_MS) {
        attempt--;
        await this.pause(MIN_LEASE_LEFT_MS);
        continue;
      }
      this.stats.attempts++;
      const r = await this.n.post(this.recipient, body, left);
      this.n.count(this.recipient.name, r.outcome);
      if (r.outcome === 'delivered') {
        this.stats.lastDelivered = e.id;
        this.stats.lastError = null;
        this.stats.pendingSince = null;
        this.n.delivered?.(this.recipient.name, e);
        return true;
      }
      this.stats.lastError = r.error ?? r.outcome;
      if (r.outcome === 'gone') {
        await this.n.disable(this.recipient.name, `${r.error ?? 'HTTP 410 Gone'} at event ${e.id}`);
        return false;
      }
      const wait = retryDelay(
        attempt,
        this.n.opts.retryBaseMs ?? 200,
        this.n.opts.retryCapMs ?? 30_000,
        r.retryAfterMs,
      );
      await new Promise<void>((res) => {
        const t = setTimeout(res, wait);
        this.wake = () => {
          if (!this.running) {
            clearTimeout(t);
            res();
          }
        };
      });
      this.wake = undefined;
    }
    return false;
  }
}

/**
 * How long to wait before retry `attempt` (0 for the first retry): exponential from `baseMs`
 * up to `capMs`, with jitter over its upper half; a receiver's Retry-After (429/503) is
 * honoured when longer, up to an hour.
 */
export function retryDelay(
  attempt: number,
  baseMs: number,
  capMs: number,
  retryAfterMs?: number,
  random: () => number = Math.random,
): number {
  const full = Math.min(capMs, baseMs * 2 ** Math.min(attempt, 20));
  const wait = full / 2 + random() * (full / 2);
  return retryAfterMs === undefined ? wait : Math.min(Math.max(retryAfterMs, wait), 3_600_000);
}

export class Notifier {
  private readonly deliveries = new Map<string, Delivery>();
  private watcher: Watcher | undefined;
  private stopped = false;
  private reconcile: NodeJS.Timeout | undefined;
  private lastLog = '';
  private readonly pendingEmits: ExplicitEvent[] = [];
  private emitting = false;
  /** Counters for metrics: outcome by recipient, events by kind. */
  readonly outcomes = new Map<string, number>();
  /** Told of each delivered event (metrics). */
  delivered?: (recipient: string, e: BallastEvent) => void;
  /** Told of every event the store's history makes (metrics: events produced by kind). */
  produced?: (kind: string) => void;
  readonly store: Store;
  readonly host: string;
  /** Connections to receivers are kept open between deliveries. */
  private readonly httpAgent = new http.Agent({ keepAlive: true, maxSockets: 4 });
  private readonly httpsAgent = new https.Agent({ keepAlive: true, maxSockets: 4 });

  constructor(readonly opts: NotifierOptions) {
    this.store = opts.store;
    this.host = opts.host;
  }

  log(msg: string): void {
    this.lastLog = msg;
    this.opts.log(msg);
  }

  /** Logs a failure once while it repeats (a cut-off agent retries every few seconds). */
  logOnce(msg: string): void {
    if (msg !== this.lastLog) this.log(msg);
  }

  count(recipient: string, outcome: string): void {
    const k = `${recipient}\u0000${outcome}`;
    this.outcomes.set(k, (this.outcomes.get(k) ?? 0) + 1);
  }

  /** Starts delivering to every recipient this agent leads, and follows changes to them. */
  async start(): Promise<void> {
    await this.follow();
    await this.sync();
    // Leadership lives under the membership lease. Whatever the watch says, look again
    // now and then: a lease lost and granted anew (an etcd blip), a sync that failed
    // while etcd was away, a deliverer whose lease ran out are all taken up here.
    let ticks = 0;
    this.reconcile = setInterval(() => {
      if (this.stopped) return;
      void this.sync();
      if (ticks++ % 30 === 0) void this.pruneTimes().catch(() => {});
    }, this.opts.reconcileMs ?? 2000);
    this.reconcile.unref();
  }

  /** Follows recipients and leadership (and counts events); again from now if the watch ends. */
  private async follow(): Promise<void> {
    const rev = await this.store.revision();
    const tr = new Translator();
    this.watcher = await this.store.watch('', {
      fromRevision: rev + 1,
      onEvent: (ev) => {
        if (ev.kv.key.startsWith(RECIPIENTS) || ev.kv.key.startsWith(LEADERS)) {
          void this.sync();
          return;
        }
        for (const e of tr.translate(ev)) {
          this.produced?.(e.kind);
          // Its time as it happens, for every reader to come (stampTimes).
          if (e.time === '') this.stamp(e);
        }
      },
      onError: (err) => {
        if (this.stopped) return;
        this.log(`notify: watch ended: ${(err as Error).message}; watching again`);
        void (async () => {
          for (let i = 0; !this.stopped; i++) {
            try {
              await this.follow();
              void this.sync();
              return;
            } catch {
              await sleep(Math.min(5000, 250 * 2 ** Math.min(i, 5)));
            }
          }
        })();
      },
    });
  }

  private syncing: Promise<void> | null = null;
  private again = false;

  private stamping: Promise<void> = Promise.resolve();

  private stamp(e: BallastEvent): void {
    this.stamping = this.stamping.then(() =>
      stampTimes(this.store, [e]).catch(() => {
        // The first reader to come stamps it instead.
      }),
    );
  }

  /**
   * Forgets the stored times of events whose history is compacted and that are
   * older than TIME_GRACE_MS: a reader that took an event off its watch before
   * the compaction (a frozen agent's stream, a deliverer with a backlog) still
   * finds its time, rather than stamping it anew with a different one.
   */
  private async pruneTimes(): Promise<void> {
    const point = await this.store.compactRevision();
    const now = Date.now();
    for (const kv of (await this.store.range(TIMES)).kvs) {
      if (timePrunable(kv, point, now)) await this.store.deleteIf(kv.key, kv.modRevision);
    }
  }

  /** Brings the running deliveries in line with the recipients and the leadership. */
  private sync(): Promise<void> {
    if (this.syncing) {
      this.again = true;
      return this.syncing;
    }
    this.syncing = (async () => {
      do {
        this.again = false;
        try {
          await this.syncOnce();
        } catch (e) {
          // Tried again by the next event or the periodic look (start()).
          if (!this.stopped) this.logOnce(`notify: ${(e as Error).message}`);
        }
      } while (this.again && !this.stopped);
    })().finally(() => {
      this.syncing = null;
    });
    return this.syncing;
  }

  private async syncOnce(): Promise<void> {
    const { kvs } = await this.store.range(RECIPIENTS);
    const want = new Map<string, Recipient>();
    for (const kv of kvs) {
      const r = parseJson<Recipient>(kv.value);
      if (r && !r.disabled) want.set(r.name, r);
    }
    for (const [name, d] of this.deliveries) {
      const r = want.get(name);
      if (
        d.finished ||
        !r ||
        JSON.stringify(r) !== JSON.stringify(d.recipient) ||
        !(await this.leads(name))
      ) {
        d.stop();
        this.deliveries.delete(name);
        await d.done;
      }
    }
    if (this.stopped) return;
    for (const [name, r] of want) {
      if (this.deliveries.has(name)) continue;
      const held = await this.lead(name);
      if (held === null) continue;
      this.deliveries.set(name, new Delivery(this, r, held === true ? undefined : held));
    }
  }

  /**
   * Takes the delivery of a recipient if nobody holds it (cluster: the leadership it
   * holds, or null), or always (single host: true).
   */
  private async lead(name: string): Promise<Held | true | null> {
    const lease = this.opts.lease?.();
    if (!this.opts.lease) return true;
    if (!lease) return null;
    const r = await this.store.createIfAbsent(LEADERS + name, this.host, { lease });
    // Ours under an older lease (lost in a blip, not yet expired in etcd): it goes with
    // that lease; the periodic look takes the recipient up again once it has.
    const ours = r.succeeded || (r.kv?.value === this.host && r.kv.lease === lease);
    return ours && r.kv ? { lease, since: r.kv.createRevision } : null;
  }

  private async leads(name: string): Promise<boolean> {
    if (!this.opts.lease) return true;
    return (await this.store.get(LEADERS + name))?.value === this.host;
  }

  /** Records an event the catalog does not (tier change, first connection...). Never throws. */
  emit(kind: EventKind, subject: string | undefined, data: Record<string, unknown>): void {
    this.pendingEmits.push({
      kind,
      ...(subject !== undefined ? { subject } : {}),
      host: this.host,
      time: new Date().toISOString(),
      data,
    });
    void this.flushEmits();
  }

  private async flushEmits(): Promise<void> {
    if (this.emitting) return;
    this.emitting = true;
    try {
      while (this.pendingEmits.length > 0 && !this.stopped) {
        const e = this.pendingEmits[0]!;
        try {
          await this.store.put(EVENTS_PREFIX + this.host, JSON.stringify(e));
          this.pendingEmits.shift();
        } catch (err) {
          // Kept in order until the store takes it (etcd unreachable for a while).
          if (!isStoreError(err) || !err.retryable) {
            this.log(`notify: event ${e.kind} not recorded: ${(err as Error).message}`);
            this.pendingEmits.shift();
          } else {
            await sleep(500);
          }
        }
      }
    } finally {
      this.emitting = false;
    }
  }

  /** One signed POST, abandoned after `limitMs` if shorter than the timeout; what came of it. */
  async post(
    r: Recipient,
    body: string,
    limitMs = Number.POSITIVE_INFINITY,
  ): Promise<{
    outcome: 'delivered' | 'gone' | 'throttled' | 'failed' | 'timeout' | 'unreachable';
    error?: string;
    retryAfterMs?: number;
  }> {
    const headers: Record<string, string> = {
      'content-type': 'application/cloudevents+json; charset=utf-8',
      'user-agent': 'ballast-notify',
    };
    if (r.secret) headers['x-ballast-signature'] = sign(body, r.secret);
    headers['content-length'] = String(Buffer.byteLength(body));
    const u = new URL(r.url);
    const timeoutMs = Math.max(1, Math.floor(Math.min(this.opts.timeoutMs ?? 5000, limitMs)));
    // node:http rather than fetch: fetch refuses some ports outright ("bad port").
    const res = await new Promise<
      { status: number; retryAfter: string | null } | { error: string; timeout: boolean }
    >((resolve) => {
      const tls = u.protocol === 'https:';
      const req = (tls ? https : http).request(
        u,
        {
          method: 'POST',
          headers,
          timeout: timeoutMs,
          agent: tls ? this.httpsAgent : this.httpAgent,
        },
        (resp) => {
          resp.resume();
          resp.on('end', () =>
            resolve({
              status: resp.statusCode ?? 0,
              retryAfter: (resp.headers['retry-after'] as string | undefined) ?? null,
            }),
          );
          resp.on('error', (e) => resolve({ error: e.message, timeout: false }));
        },
      );
      const deadline = setTimeout(() => {
        req.destroy();
        resolve({ error: 'no answer in time', timeout: true });
      }, timeoutMs);
      req.on('timeout', () => {
        req.destroy();
        resolve({ error: 'no answer in time', timeout: true });
      });
      req.on('error', (e: NodeJS.ErrnoException) =>
        resolve({ error: e.code ?? e.message, timeout: false }),
      );
      req.on('close', () => clearTimeout(deadline));
      req.end(body);
    });
    if ('error' in res) {
      return res.timeout
        ? { outcome: 'timeout', error: res.error }
        : { outcome: 'unreachable', error: res.error };
    }
    if (res.status >= 200 && res.status < 300) return { outcome: 'delivered' };
    if (res.status === 410) return { outcome: 'gone', error: 'HTTP 410 Gone' };
    const retryAfter = retryAfterMs(res.retryAfter);
    if (res.status === 429) {
      return {
        outcome: 'throttled',
        error: 'HTTP 429',
        ...(retryAfter !== undefined ? { retryAfterMs: retryAfter } : {}),
      };
    }
    return {
      outcome: 'failed',
      error: `HTTP ${res.status}`,
      ...(retryAfter !== undefined ? { retryAfterMs: retryAfter } : {}),
    };
  }

  async disable(name: string, reason: string): Promise<void> {
    const kv = await this.store.get(RECIPIENTS + name);
    const r = parseJson<Recipient>(kv?.value);
    if (!kv || !r) return;
    r.disabled = { reason, at: new Date().toISOString() };
    await this.store.updateIf(RECIPIENTS + name, JSON.stringify(r), kv.modRevision);
    this.log(`notify ${name}: disabled: ${reason}`);
  }

  // ---- management ----

  async add(input: {
    name?: unknown;
    url?: unknown;
    types?: unknown;
    secret?: unknown;
  }): Promise<RecipientView> {
    const v = validateRecipient(input);
    const rec: Recipient = { ...v, createdAt: new Date().toISOString() };
    const rev = await this.store.revision();
    // It hears of what happens from now on: its cursor starts at the current revision.
    const r = await this.store.txn({
      compare: [{ key: RECIPIENTS + v.name, target: 'version', op: '=', value: 0 }],
      success: [
        op.put(RECIPIENTS + v.name, JSON.stringify(rec)),
        op.put(CURSORS + v.name, String(rev)),
      ],
    });
    if (!r.succeeded) {
      throw new BallastError('NOTIFY_EXISTS', `a recipient named ${v.name} exists already`);
    }
    this.log(`notify: recipient ${v.name} added (${v.url})`);
    await this.sync();
    return (await this.list()).find((x) => x.name === v.name)!;
  }

  async remove(name: string): Promise<void> {
    const r = await this.store.txn({
      compare: [{ key: RECIPIENTS + name, target: 'version', op: '>', value: 0 }],
      success: [op.delete(RECIPIENTS + name), op.delete(CURSORS + name), op.delete(LEADERS + name)],
    });
    if (!r.succeeded) throw new BallastError('NOTIFY_NOT_FOUND', `no recipient named ${name}`);
    await this.sync();
  }

  async list(): Promise<RecipientView[]> {
    const [recs, cursors, leaders] = await Promise.all([
      this.store.range(RECIPIENTS),
      this.store.range(CURSORS),
      this.store.range(LEADERS),
    ]);
    const cur = new Map(cursors.kvs.map((kv) => [kv.key.slice(CURSORS.length), kv.value]));
    const lead = new Map(leaders.kvs.map((kv) => [kv.key.slice(LEADERS.length), kv.value]));
    const out: RecipientView[] = [];
    for (const kv of recs.kvs) {
      const r = parseJson<Recipient>(kv.value);
      if (!r) continue;
      const { secret, ...rest } = r;
      const d = this.deliveries.get(r.name);
      out.push({
        ...rest,
        signed: secret !== undefined,
        cursor: cur.get(r.name) ?? null,
        deliveredBy: r.disabled ? null : (lead.get(r.name) ?? (this.opts.lease ? null : this.host)),
        lastError: d?.stats.lastError ?? null,
        lastDelivered: d?.stats.lastDelivered ?? null,
        attempts: d?.stats.attempts ?? 0,
      });
    }
    return out;
  }

  /** Sends one `test` event to a recipient now (not recorded in the log). */
  async test(name: string): Promise<{ outcome: string; error?: string; id: string }> {
    const r = parseJson<Recipient>((await this.store.get(RECIPIENTS + name))?.value);
    if (!r) throw new BallastError('NOTIFY_NOT_FOUND', `no recipient named ${name}`);
    const id = `test-${Date.now()}`;
    const e: BallastEvent = {
      id,
      revision: 0,
      n: 0,
      kind: 'test',
      host: this.host,
      time: new Date().toISOString(),
      data: { message: `a test event for recipient ${name}` },
    };
    const res = await this.post(r, JSON.stringify(cloudEvent(e, this.opts.cluster, this.host)));
    return { ...res, id };
  }

  /** For metrics: per recipient delivered here, events behind and the oldest undelivered age. */
  progress(): { name: string; behind: number; oldestUndeliveredSeconds: number }[] {
    const now = performance.now();
    return [...this.deliveries.values()].map((d) => ({
      name: d.recipient.name,
      behind: d.stats.behind,
      oldestUndeliveredSeconds:
        d.stats.pendingSince === null ? 0 : (now - d.stats.pendingSince) / 1000,
    }));
  }

  async stop(): Promise<void> {
    this.stopped = true;
    clearInterval(this.reconcile);
    await this.watcher?.cancel().catch(() => {});
    const all = [...this.deliveries.values()];
    for (const d of all) d.stop();
    await Promise.all(all.map((d) => d.done));
    this.deliveries.clear();
    this.httpAgent.destroy();
    this.httpsAgent.destroy();
  }
}
