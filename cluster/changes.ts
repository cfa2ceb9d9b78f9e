// How an agent of a cluster sends a change (a device record, a reservation, an
// access list) to etcd, so that every change ends, within one deadline, with a
// verdict: made, NOT made, or — only when etcd could not be reached at all
// within the deadline — "may have been made", found out as soon as etcd answers.
//
// The difficulty is a change whose answer never came. Its request may still be
// on its way: queued in gRPC, in the kernel's socket buffers, in a proxy or a
// router during a partition, in a frozen etcd member's receive buffer. A gRPC
// deadline does not stop it (etcd computes the deadline from when the request
// arrives), nor does cancelling the call (the cancel travels behind it). So a
// change is made conditional on something the agent can end by itself:
//
// - Every change carries the compare `createRevision(epochs/<host>) = E`, where
//   `epochs/<host>` is a key put under the agent's membership lease (cluster.ts).
// - When a change's answer does not come, the agent ends the epoch: one
//   transaction that deletes `epochs/<host>` if it is still epoch E, and reads
//   the keys the change writes, in the same revision. From that revision on no
//   request sent under E can be made (the key's createRevision is never E
//   again: revisions only grow), so what the read shows is final: the change
//   was made iff a key holds exactly the value it wrote (values carry a time
//   and a sequence: two changes never write the same one). If the epoch had
//   ended already (an earlier abort, the lease expired), the read is as final.
// - The next change first makes a new epoch (one more round trip).
//
// The lease adds the other half: a change delayed past the end of the agent's
// membership (a long partition) fails too, as the key went with the lease.
//
// Deadlines: the whole store part of a change — the call, and finding out
// after a failed one — ends within `deadlineMs` (cluster.changeTimeout). A
// change is refused at once, NOT made, while the agent is cut off from etcd
// (its keepalive fails). Only when etcd cannot be reached at all until the
// deadline does the change end as "may have been made" (STORE_TIMEOUT); the
// agent then keeps asking, logs the outcome and lists the change as in doubt
// (`ballast cluster status`) until it knows. A change it answered NOT made is
// never made later.

import { performance } from 'node:perf_hooks';
import {
  ChangeError,
  cmp,
  isStoreError,
  type KeyValue,
  type Op,
  type OpResponse,
  op,
  type RangeOptions,
  type RangeResult,
  type Store,
  StoreError,
  type TxnRequest,
  type TxnResult,
  TxnStore,
  type Watcher,
  type WatchOptions,
} from '../agent/store/store.js';
import { EPOCHS } from './cluster.js';

/** What the guarded store needs of the agent's membership (Cluster). */
export interface ChangeGate {
  readonly host: string;
  /** Whether the agent is registered (before that, start-up repairs go straight through). */
  joined(): boolean;
  /** Throws STORE_UNAVAILABLE while the agent is cut off from etcd. */
  guard(): void;
  /** The live epoch's createRevision (makes one if the last was ended). */
  epoch(): Promise<number>;
  epochEnded(rev: number): void;
  /** The catalog revision applied once the cache reached `revision`. */
  catalogRevisionAt(revision: number, timeoutMs: number): Promise<number>;
}

export interface InDoubtChange {
  /** The keys the change writes. */
  keys: string[];
  since: string;
  reason: string;
}

const sleep = (ms: number) => new Promise<void>((r) => setTimeout(r, ms));

/** The keys a branch writes, and how to read each back. */
function writes(ops: Op[]): { op: Op; read: Op }[] {
  const out: { op: Op; read: Op }[] = [];
  for (const o of ops) {
    if (o.type === 'put' || o.type === 'delete') out.push({ op: o, read: op.get(o.key) });
    else if (o.type === 'deletePrefix') out.push({ op: o, read: op.range(o.prefix, { limit: 1 }) });
  }
  return out;
}

/** The store the device and reservation managers of a cluster agent change things through. */
export class GuardedStore extends TxnStore {
  private readonly doubts = new Map<number, InDoubtChange>();
  private nextDoubt = 1;
  private closed = false;

  constructor(
    private readonly raw: Store,
    private readonly gate: ChangeGate,
    /** The deadline of a change's store part, in ms (cluster.changeTimeout). */
    readonly deadlineMs: number,
    private readonly log: (msg: string) => void,
  ) {
    super();
  }

  /** Changes whose outcome is not known yet (etcd did not answer within the deadline). */
  inDoubt(): InDoubtChange[] {
    return [...this.doubts.values()];
  }

  // ---- reads and the rest go straight through ----

  get(key: string): Promise<KeyValue | undefined> {
    return this.raw.get(key);
  }
  range(prefix: string, opts?: RangeOptions): Promise<RangeResult> {
    return this.raw.range(prefix, opts);
  }
  watch(prefix: string, opts: WatchOptions): Promise<Watcher> {
    return this.raw.watch(prefix, opts);
  }
  grantLease(ttlSeconds: number): Promise<string> {
    return this.raw.grantLease(ttlSeconds);
  }
  keepAlive(id: string): Promise<number> {
    return this.raw.keepAlive(id);
  }
  revokeLease(id: string): Promise<void> {
    return this.raw.revokeLease(id);
  }
  compact(revision: number): Promise<void> {
    return this.raw.compact(revision);
  }
  revision(): Promise<number> {
    return this.raw.revision();
  }
  compactRevision(): Promise<number> {
    return this.raw.compactRevision();
  }
  async close(): Promise<void> {
    this.closed = true;
  }

  // ---- changes ----

  async txn(req: TxnRequest): Promise<TxnResult> {
    if (!this.gate.joined()) return this.raw.txn(req);
    // Cut off: nothing is sent, so nothing can be made later.
    try {
      this.gate.guard();
    } catch (e) {
      throw new ChangeError('STORE_UNAVAILABLE', (e as Error).message, false, undefined, e);
    }
    const end = performance.now() + this.deadlineMs;
    let epoch: number;
    try {
      epoch = await this.gate.epoch();
    } catch (e) {
      // Nothing of the change was sent.
      throw new ChangeError(
        'STORE_UNAVAILABLE',
        `${(e as Error).message}; the change was NOT made`,
        false,
        undefined,
        e,
      );
    }
    const epochKey = EPOCHS + this.gate.host;
    let r: TxnResult;
    try {
      r = await this.raw.txn({
        compare: [...req.compare, cmp.createRevision(epochKey, '=', epoch)],
        success: req.success,
        failure: [...(req.failure ?? []), op.get(epochKey)],
      });
    } catch (e) {
      // etcd refused it outright (a bad request, no permission): nothing was made.
      if (!isStoreError(e) || !e.retryable) throw e;
      return this.findOut(req, epoch, e, end);
    }
    if (r.succeeded) return r;
    const got = r.responses[r.responses.length - 1];
    if (got?.type !== 'get' || got.kv?.createRevision !== epoch) {
      // Our epoch had ended (an earlier change in doubt, or the lease): this one is not made.
      this.gate.epochEnded(epoch);
      throw new ChangeError(
        'STORE_UNAVAILABLE',
        'the change was NOT made: it was sent under a membership epoch that had ended (the agent lost etcd a moment ago); retry',
        false,
      );
    }
    return { ...r, responses: r.responses.slice(0, -1) };
  }

  /**
   * The change's answer did not come: end its epoch and read back, until the
   * deadline; then, in doubt, go on in the background.
   */
  private async findOut(
    req: TxnRequest,
    epoch: number,
    first: StoreError,
    end: number,
  ): Promise<TxnResult> {
    for (;;) {
      const left = end - performance.now();
      if (left <= 0) break;
      try {
        return await this.endEpoch(req, epoch, first);
      } catch (e) {
        if (e instanceof ChangeError || !isStoreError(e) || !e.retryable) throw e;
        if (this.closed) break;
        await sleep(Math.min(200, Math.max(0, end - performance.now())));
      }
    }
    const id = this.nextDoubt++;
    const keys = writes(req.success).map((w) => ('key' in w.op ? w.op.key : `${w.op.prefix}*`));
    this.doubts.set(id, { keys, since: new Date().toISOString(), reason: first.message });
    const outcome = this.resolveLater(id, req, epoch, first);
    // Nobody may be listening; the outcome is logged in any case.
    outcome.catch(() => {});
    throw new ChangeError(
      'STORE_TIMEOUT',
      `${first.message}; the change may have been made: etcd did not answer within ${this.deadlineMs} ms to tell. ` +
        'The agent finds out as soon as etcd answers (it logs the outcome; `ballast cluster status` lists the change as in doubt until then)',
      null,
      outcome,
      first,
    );
  }

  private async resolveLater(
    id: number,
    req: TxnRequest,
    epoch: number,
    first: StoreError,
  ): Promise<boolean> {
    const keys = this.doubts.get(id)?.keys.join(', ');
    for (let delay = 200; ; delay = Math.min(delay * 2, 2000)) {
      if (this.closed) {
        this.doubts.delete(id);
        this.log(`cluster: the change to ${keys} is still in doubt at shutdown`);
        throw new StoreError('STORE_CLOSED', 'the store was closed');
      }
      try {
        await this.endEpoch(req, epoch, first);
        this.doubts.delete(id);
        this.log(`cluster: the change to ${keys} that was in doubt WAS made`);
        return true;
      } catch (e) {
        if (e instanceof ChangeError) {
          this.doubts.delete(id);
          this.log(`cluster: the change to ${keys} that was in doubt was NOT made`);
          return false;
        }
        if (isStoreError(e) && !e.retryable) {
          this.doubts.delete(id);
          this.log(`cluster: the change to ${keys} stays in doubt: ${(e as Error).message}`);
          throw e;
        }
      }
      await sleep(delay);
    }
  }

  /**
   * Ends epoch `epoch` (if still live) and reads the change's keys in the same
   * revision. Resolves to the change's result if it was made; throws a
   * ChangeError (NOT made) if it was not; other errors: etcd did not answer.
   */
  private async endEpoch(req: TxnRequest, epoch: number, first: StoreError): Promise<TxnResult> {
    const epochKey = EPOCHS + this.gate.host;
    const ws = writes(req.success);
    const reads = ws.map((w) => w.read);
    const a = await this.raw.txn({
      compare: [cmp.createRevision(epochKey, '=', epoch)],
      success: [op.delete(epochKey), ...reads],
      failure: reads,
    });
    this.gate.epochEnded(epoch);
    const got = a.succeeded ? a.responses.slice(1) : a.responses;
    let madeAt = 0;
    let puts = 0;
    let deletesHold = true;
    ws.forEach((w, i) => {
      const g = got[i];
      if (w.op.type === 'put') {
        puts++;
        const kv = g?.type === 'get' ? g.kv : undefined;
        if (kv && kv.value === w.op.value) madeAt = kv.modRevision;
      } else if (w.op.type === 'delete') {
        if (g?.type === 'get' && g.kv) deletesHold = false;
      } else if (g?.type === 'range' && g.kvs.length > 0) {
        deletesHold = false;
      }
    });
    // Any key holding exactly what the change put proves it was made (it was atomic);
    // a change that only deletes was made, as far as anyone can tell, if its keys are gone.
    const made = puts > 0 ? madeAt > 0 : deletesHold;
    if (!made) {
      throw new ChangeError(
        'STORE_UNAVAILABLE',
        `${first.message}; read back afterwards: the change was NOT made, nothing changed (retry)`,
        false,
        undefined,
        first,
      );
    }
    const revision =
      madeAt > 0
        ? madeAt
        : await this.gate.catalogRevisionAt(a.revision, Math.max(1000, this.deadlineMs));
    this.log(`cluster: a change answered late; read back: it was made (revision ${revision})`);
    const responses: OpResponse[] = req.success.map((o) => {
      switch (o.type) {
        case 'put':
          return { type: 'put' };
        case 'delete':
        case 'deletePrefix':
          return { type: o.type, deleted: 0, prevKvs: [] };
        case 'get': {
          // What the change read is lost with its answer; the key as it is now stands in.
          const w = ws.findIndex((x) => 'key' in x.op && x.op.key === o.key);
          const g = w >= 0 ? got[w] : undefined;
          return g?.type === 'get' && g.kv ? { type: 'get', kv: g.kv } : { type: 'get' };
        }
        default:
          return { type: 'range', kvs: [], more: false };
      }
    });
    return { succeeded: true, revision, responses };
  }
}
