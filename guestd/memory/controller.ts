// The memory controller: every interval it samples each guest (over the guest's QMP
// monitor and its paging device's agent) and the host, runs the policy (policy.ts) and
// sends the balloon targets it decides. It keeps per-guest metrics and the last decision
// for `ballast memory status`, and hands each `memory.rebalanced` event to `onEvent`.
//
// Safety on start: a new controller knows nothing, so every guest is observed first and
// keeps its size (policy.md, "observing"); nothing is inflated or deflated before then.

import { Counter, Gauge, Registry } from 'prom-client';
import { QmpMonitor } from '../../dumpd/qmp.js';
import {
  checkPool,
  checkShare,
  type GuestShare,
  type MemoryConfig,
  MemoryError,
  type MemoryGuestConfig,
} from './config.js';
import { type PagingSample, probePaging } from './paging.js';
import {
  type Decision,
  decide,
  EMPTY_STATE,
  type GuestSample,
  type HostSample,
  type PolicyState,
  type RebalanceEvent,
} from './policy.js';
import { QemuMemory } from './qemu.js';
import { readHost } from './sources.js';

export interface ControllerDeps {
  /**
   * The guest's QMP monitor when someone else holds it (the guest daemon's one monitor
   * connection per guest); otherwise the controller connects to the guest's `qmp` itself.
   */
  monitor?(guest: string): QmpMonitor | undefined;
  host?(): HostSample;
  paging?(g: MemoryGuestConfig, step: number): Promise<PagingSample>;
  onEvent?(e: RebalanceEvent): void;
  log?(line: string): void;
  /** Milliseconds on a monotonic clock. */
  now?(): number;
  registry?: Registry;
}

export interface MemoryStatus {
  pool: number;
  budget: number;
  charged: number;
  exceeded: boolean;
  intervalMs: number;
  /** Intervals run since the controller started: a clock in the controller's own units. */
  intervals: number;
  at: string | null;
  guests: (ReturnType<typeof guestRow> & {
    pagingDevice: string | null;
    pagingWhy: string | null;
  })[];
}

function guestRow(d: Decision['guests'][number]) {
  return {
    name: d.name,
    mode: d.mode,
    klass: d.klass,
    protect: d.protect,
    target: d.holds,
    actual: d.actual,
    resident: d.resident,
    used: d.used,
    entitlement: d.entitlement,
    weight: d.weight,
    max: d.max,
    swapInBps: d.swapInBps,
    majorFaultsPs: d.majorFaultsPs,
    paging: d.paging,
    reason: d.reason,
  };
}

interface Link {
  cfg: MemoryGuestConfig;
  monitor: QmpMonitor | null;
  own: boolean;
  qemu: QemuMemory | null;
  paging: PagingSample | null;
}

export class MemoryController {
  readonly registry: Registry;
  private state: PolicyState = EMPTY_STATE;
  private last: Decision | null = null;
  private lastAt: Date | null = null;
  private intervals = 0;
  private readonly links = new Map<string, Link>();
  private timer: NodeJS.Timeout | null = null;
  private running: Promise<Decision> | null = null;
  private stopped = true;
  private readonly m;

  constructor(
    private cfg: MemoryConfig,
    private readonly deps: ControllerDeps = {},
  ) {
    this.registry = deps.registry ?? new Registry();
    const r = [this.registry];
    const g = (name: string, help: string, labelNames: string[] = ['guest']) =>
      new Gauge({ name, help, labelNames, registers: r });
    this.m = {
      pool: g('ballast_memory_pool_bytes', 'The memory pool the guests share', []),
      budget: g(
        'ballast_memory_budget_bytes',
        'What the managed guests may hold: the pool less the others and the host shortfall',
        [],
      ),
      charged: g('ballast_memory_charged_bytes', 'What the guests hold of the pool', []),
      target: g('ballast_memory_guest_target_bytes', 'Balloon target in force'),
      actual: g('ballast_memory_guest_actual_bytes', "The balloon's actual size"),
      resident: g(
        'ballast_memory_guest_resident_bytes',
        "Resident size of the guest's RAM mapping in QEMU",
      ),
      entitlement: g('ballast_memory_guest_entitlement_bytes', 'Never ballooned below this'),
      max: g('ballast_memory_guest_max_bytes', 'Never given more than this'),
      weight: g('ballast_memory_guest_weight', 'Share of contended memory (1-255)'),
      swapIn: g(
        'ballast_memory_guest_swap_in_bytes_per_second',
        'Swap-ins: the larger of what the guest reports and its paging device reads',
      ),
      majflt: g('ballast_memory_guest_major_faults_per_second', 'Major faults the guest reports'),
      paging: g(
        'ballast_memory_guest_paging_bytes',
        "Bytes read (swap-in) and written (swap-out) on the guest's paging device",
        ['guest', 'op'],
      ),
      state: g('ballast_memory_guest_state', 'The guest in the policy: 1 for its mode and class', [
        'guest',
        'mode',
        'class',
      ]),
      protect: g(
        'ballast_memory_guest_protected',
        '1 while its paging device is full or unreachable (no memory taken from it)',
      ),
      rebalances: new Counter({
        name: 'ballast_memory_rebalances_total',
        help: 'Intervals in which balloon targets moved',
        registers: r,
      }),
      errors: new Counter({
        name: 'ballast_memory_balloon_errors_total',
        help: 'Balloon targets QEMU refused or did not answer',
        labelNames: ['guest'],
        registers: r,
      }),
    };
    for (const gc of cfg.guests) this.addLink(gc);
  }

  private log(s: string): void {
    this.deps.log?.(s);
  }

  private addLink(gc: MemoryGuestConfig): void {
    let monitor = this.deps.monitor?.(gc.name) ?? null;
    let own = false;
    if (!monitor && gc.qmp) {
      monitor = new QmpMonitor(gc.qmp, { retryMs: 200, maxRetryMs: 2000 });
      own = true;
    }
    this.links.set(gc.name, { cfg: gc, monitor, own, qemu: null, paging: null });
  }

  get config(): MemoryConfig {
    return this.cfg;
  }

  start(): void {
    if (!this.stopped) return;
    this.stopped = false;
    for (const l of this.links.values()) if (l.own) l.monitor?.start();
    this.schedule(0);
  }

  private schedule(ms: number): void {
    if (this.stopped) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.tick().then(
        () => this.schedule(this.cfg.tuning.intervalMs),
        (e) => {
          this.log(`memory: interval failed: ${(e as Error).message}`);
          this.schedule(this.cfg.tuning.intervalMs);
        },
      );
    }, ms);
  }

  async stop(): Promise<void> {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    await this.running?.catch(() => {});
    for (const l of this.links.values()) if (l.own) l.monitor?.stop();
  }

  private qemuOf(l: Link): QemuMemory | null {
    const c = l.monitor?.client ?? null;
    if (!c) {
      l.qemu = null;
      return null;
    }
    if (l.qemu?.client !== c)
      l.qemu = new QemuMemory(c, {
        ...(l.cfg.qmp && !l.cfg.qmp.startsWith('tcp:')
          ? { qmpPath: l.cfg.qmp.replace(/^unix:/, '') }
          : {}),
        pollSeconds: this.cfg.tuning.intervalMs / 1000,
      });
    return l.qemu;
  }

  private async sampleGuest(l: Link): Promise<GuestSample> {
    const name = l.cfg.name;
    const q = this.qemuOf(l);
    const paging = l.cfg.pagingDevice
      ? (this.deps.paging ?? defaultPaging)(l.cfg, this.cfg.tuning.maxStep)
      : Promise.resolve(null);
    let s: Awaited<ReturnType<QemuMemory['sample']>> | null = null;
    if (q) {
      try {
        s = await q.sample();
      } catch (e) {
        this.log(`memory: guest ${name}: no sample: ${(e as Error).message}`);
      }
    }
    const p = await paging;
    if (p && p.state !== 'ok' && l.paging?.state !== p.state)
      this.log(
        `memory: guest ${name}: paging device ${l.cfg.pagingDevice} ${p.state} (${p.why}): not taking memory from it`,
      );
    l.paging = p;
    if (!s) return { name, reached: false, actual: null };
    return {
      name,
      reached: true,
      actual: s.actual,
      ...(s.ramSize !== undefined ? { ramSize: s.ramSize } : {}),
      ...(s.stats ? { stats: s.stats } : {}),
      ...(s.resident !== undefined ? { resident: s.resident } : {}),
      ...(p
        ? {
            paging: {
              state: p.state,
              ...(p.readBytes !== undefined ? { readBytes: p.readBytes } : {}),
              ...(p.writtenBytes !== undefined ? { writtenBytes: p.writtenBytes } : {}),
            },
          }
        : {}),
    };
  }

  /** One interval: sample, decide, send. Intervals never overlap. */
  tick(): Promise<Decision> {
    if (this.running) return this.running;
    this.running = this.runTick().finally(() => {
      this.running = null;
    });
    return this.running;
  }

  private async runTick(): Promise<Decision> {
    const links = [...this.links.values()];
    const guests = await Promise.all(links.map((l) => this.sampleGuest(l)));
    const host = (this.deps.host ?? readHost)();
    const now = (this.deps.now ?? (() => performance.now()))();
    const d = decide(
      { poolBytes: this.cfg.poolBytes, tuning: this.cfg.tuning, guests: this.cfg.guests },
      this.state,
      { at: now, host, guests },
    );
    this.state = d.state;
    for (const gd of d.guests) {
      if (gd.target === null) continue;
      const l = this.links.get(gd.name);
      const q = l ? this.qemuOf(l) : null;
      try {
        if (!q) throw new Error('monitor not connected');
        await q.setTarget(gd.target);
      } catch (e) {
        // The target did not go out: forget it, so that nothing counts on it.
        this.m.errors.inc({ guest: gd.name });
        this.log(`memory: guest ${gd.name}: balloon ${gd.target}: ${(e as Error).message}`);
        const memo = this.state.guests[gd.name];
        if (memo) {
          memo.prev = gd.actual;
          memo.pending = null;
        }
      }
    }
    if (d.event) {
      this.m.rebalances.inc();
      this.log(
        `memory: rebalanced: ${d.event.data.moves.map((m) => `${m.guest} ${mib(m.from)}→${mib(m.to)}`).join(', ')}`,
      );
      try {
        this.deps.onEvent?.(d.event);
      } catch {}
    }
    this.last = d;
    this.lastAt = new Date();
    this.intervals++;
    this.updateMetrics(d);
    return d;
  }

  private updateMetrics(d: Decision): void {
    const m = this.m;
    m.pool.set(d.pool);
    m.budget.set(d.budget);
    m.charged.set(d.charged);
    m.state.reset();
    for (const x of d.guests) {
      const lab = { guest: x.name };
      if (x.holds !== null) m.target.set(lab, x.holds);
      if (x.actual !== null) m.actual.set(lab, x.actual);
      if (x.resident !== null) m.resident.set(lab, x.resident);
      m.entitlement.set(lab, x.entitlement);
      if (x.max !== null) m.max.set(lab, x.max);
      m.weight.set(lab, x.weight);
      m.swapIn.set(lab, x.swapInBps);
      m.majflt.set(lab, x.majorFaultsPs);
      m.protect.set(lab, x.protect ? 1 : 0);
      m.state.set({ guest: x.name, mode: x.mode, class: x.klass }, 1);
      const p = this.links.get(x.name)?.paging;
      if (p?.readBytes !== undefined) m.paging.set({ guest: x.name, op: 'read' }, p.readBytes);
      if (p?.writtenBytes !== undefined)
        m.paging.set({ guest: x.name, op: 'write' }, p.writtenBytes);
    }
  }

  /** What `ballast memory status` shows. */
  status(): MemoryStatus {
    const d = this.last;
    return {
      pool: this.cfg.poolBytes,
      budget: d?.budget ?? this.cfg.poolBytes,
      charged: d?.charged ?? 0,
      exceeded: d?.exceeded ?? false,
      intervalMs: this.cfg.tuning.intervalMs,
      intervals: this.intervals,
      at: this.lastAt?.toISOString() ?? null,
      guests: (d?.guests ?? []).map((x) => {
        const l = this.links.get(x.name);
        return {
          ...guestRow(x),
          pagingDevice: l?.cfg.pagingDevice ?? null,
          pagingWhy: l?.paging && l.paging.state !== 'ok' ? (l.paging.why ?? null) : null,
        };
      }),
    };
  }

  /**
   * Changes a guest's entitlement, weight or max (`ballast memory set`). Refused, with
   * nothing changed, when the guest's numbers disagree or the entitlements would no
   * longer fit the pool. Takes effect from the next interval.
   */
  set(
    name: string,
    change: Partial<Pick<GuestShare, 'entitlement' | 'weight' | 'max'>>,
  ): GuestShare {
    const i = this.cfg.guests.findIndex((g) => g.name === name);
    if (i < 0)
      throw new MemoryError('MEMORY_UNKNOWN_GUEST', `no guest named ${JSON.stringify(name)}`);
    const old = this.cfg.guests[i] as MemoryGuestConfig;
    if (
      change.weight !== undefined &&
      (!Number.isInteger(change.weight) || change.weight < 1 || change.weight > 255)
    )
      throw new MemoryError('MEMORY_BAD_CONFIG', 'weight must be a whole number from 1 to 255');
    for (const k of ['entitlement', 'max'] as const) {
      const v = change[k];
      if (v !== undefined && (!Number.isSafeInteger(v) || v < 0))
        throw new MemoryError('MEMORY_BAD_CONFIG', `${k} must be a whole number of bytes`);
    }
    const next: MemoryGuestConfig = { ...old, ...change };
    checkShare(next);
    const guests = this.cfg.guests.map((g, j) => (j === i ? next : g));
    checkPool(this.cfg.poolBytes, guests);
    this.cfg = { ...this.cfg, guests };
    const l = this.links.get(name);
    if (l) l.cfg = next;
    this.log(
      `memory: guest ${name}: entitlement ${mib(next.entitlement)}, weight ${next.weight}, max ${next.max !== undefined ? mib(next.max) : 'its RAM'}`,
    );
    return {
      name,
      entitlement: next.entitlement,
      weight: next.weight,
      ...(next.max !== undefined ? { max: next.max } : {}),
    };
  }
}

function mib(n: number | null): string {
  return n === null ? '?' : `${Math.round(n / (1024 * 1024))}M`;
}

function defaultPaging(g: MemoryGuestConfig, step: number): Promise<PagingSample> {
  return probePaging(g.pagingDevice as string, {
    ...(g.agent !== undefined ? { agent: g.agent } : {}),
    ...(g.tokenFile !== undefined ? { tokenFile: g.tokenFile } : {}),
    step,
  });
}
