// The dump daemon: one QMP monitor per guest (configured, or found in a watched
// directory), a dump on GUEST_PANICKED or on request, and an HTTP listener for
// /metrics and the control API:
//
//   GET  /metrics                     Prometheus text
//   GET  /v1/guests                   guests, connection state, last dump
//   POST /v1/guests/NAME/dump[?after=reboot|pause|poweroff|none][&mode=early-reboot]
//                                     dump now; answers when done (after defaults to the
//                                     guest's policy if it sits panicked, else none;
//                                     early-reboot reboots the guest while the dump streams)
//
// On a TCP listener the POST needs `Authorization: Bearer TOKEN`, the token dumpd
// writes to RUNDIR/token (mode 0600) at start: a dump reads a guest's memory and
// may reboot or power it off, so no other local user may ask for one. On a Unix
// socket the socket's mode (0600) guards it. Slow or idle HTTP clients are cut
// off as on the agent's API (api-guard.ts).
//
// One dump per guest at a time. A panic while a dump of the guest runs (an early-reboot
// dump streams while the rebooted guest runs, and may panic again) waits: QEMU keeps the
// guest stopped in guest-panicked, and once the running dump is settled the new panic is
// dumped (and the guest rebooted) by the guest's policy. The running dump is never
// touched by it; a third panic cannot happen while the guest is stopped.

import { randomBytes, timingSafeEqual } from 'node:crypto';
import { EventEmitter } from 'node:events';
import {
  chmodSync,
  existsSync,
  type FSWatcher,
  mkdirSync,
  readdirSync,
  statSync,
  watch,
  writeFileSync,
} from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { createApiGuard } from '../agent/api-guard.js';
import { prepareSocketPath } from '../agent/listen.js';
import { DumpError } from './catalog.js';
import {
  AFTER,
  type After,
  type DeviceRef,
  type DumpdConfig,
  type GuestConfig,
  MODES,
  type Mode,
  watchedGuest,
} from './config.js';
import { DumpDevice } from './device.js';
import {
  QEMU_DEFAULT_BANDWIDTH,
  runEarlyReboot,
  SNAPSHOT_BANDWIDTH,
  setMaxBandwidth,
} from './early.js';
import { applyAfter, type DumpResult, runDump } from './job.js';
import { domainPanicProblems, domainState, LibvirtEvents, libvirtAfter } from './libvirt.js';
import type { QmpClient } from './qmp.js';
import { type QmpEvent, QmpMonitor } from './qmp.js';

export interface DumpdDeps {
  /** Turns a device reference into an NBD URI (agent devices need the agent's API). */
  resolveDevice(ref: DeviceRef, guest: string): Promise<string>;
  /**
   * Posts a dump.completed or dump.failed event to the agent that holds an agent
   * device (POST /v1/events), so that its notification recipients learn of the dump.
   * Best effort: a rejection is logged, the dump is unaffected.
   */
  postEvent?(ref: AgentDeviceRef, event: DumpEvent): Promise<void>;
  log?(line: string): void;
  /**
   * More routes on dumpd's listener (the memory part's /v1/memory): an answer, or null
   * when the request is not theirs. Like dumpd's own, they read no body.
   */
  routes?(method: string, url: URL): Promise<{ status: number; body: unknown } | null>;
}

/** A dump device named on an agent (rather than by an NBD URI). */
export type AgentDeviceRef = Exclude<DeviceRef, { uri: string }>;

/** What dumpd tells an agent about a dump on one of its devices. */
export interface DumpEvent {
  kind: 'dump.completed' | 'dump.failed';
  /** The agent's device. */
  subject: string;
  data: Record<string, unknown>;
}

/** The event for a settled dump. */
export function dumpEvent(device: string, r: DumpResult): DumpEvent {
  const e = r.entry;
  return {
    kind: r.ok ? 'dump.completed' : 'dump.failed',
    subject: device,
    data: {
      guest: r.guest,
      device,
      ...(e ? { id: e.id, format: e.format, state: e.state } : {}),
      ...(e?.checksum ? { checksum: e.checksum } : {}),
      bytes: r.bytes,
      durationMs: r.durationMs,
      mode: r.mode ?? 'dump-then-reboot',
      after: r.after,
      ...(r.fallback ? { fallback: r.fallback } : {}),
      ...(r.panicAt ? { panicAt: new Date(r.panicAt).toISOString() } : {}),
      ...(r.foundAt ? { foundAt: new Date(r.foundAt).toISOString() } : {}),
      ...(r.runningAt ? { runningAt: new Date(r.runningAt).toISOString() } : {}),
      ...(r.error ? { error: r.error } : {}),
    },
  };
}

interface GuestState {
  cfg: GuestConfig;
  /** QEMU's monitor; null for a libvirt guest. */
  monitor: QmpMonitor | null;
  watched: boolean;
  running: Promise<DumpResult> | null;
  last: DumpResult | null;
  panics: number;
  /** A panic that came while a dump ran: dumped once that one is settled. */
  pending: QmpEvent | null;
  /** performance.now() of the recent panics, for the loop limit. */
  recentPanics: number[];
}

/**
 * The after-dump action for this panic: the guest's policy, or 'pause' when
 * it reboots into a panic again and again (loopLimit: N dumps in M minutes).
 */
export function loopGuard(
  st: Pick<GuestState, 'cfg' | 'recentPanics'>,
  log: (m: string) => void,
  now = performance.now(),
): After {
  const { dumps, minutes } = st.cfg.loopLimit;
  const window = minutes * 60_000;
  st.recentPanics = st.recentPanics.filter((t) => now - t < window);
  const before = st.recentPanics.length;
  st.recentPanics.push(now);
  if (st.cfg.after !== 'reboot' || dumps === 0 || before < dumps) return st.cfg.after;
  log(
    `guest ${st.cfg.name}: warning: ${before + 1} panics within ${minutes} min (loopLimit ${dumps}): ` +
      'dumping and pausing it instead of rebooting it; resume it with QMP "cont" or virsh resume',
  );
  return 'pause';
}

/** Whether QEMU has a pvpanic device (ISA or PCI); null when QMP cannot tell. */
export async function hasPvpanic(c: QmpClient): Promise<boolean | null> {
  let answered = false;
  for (const path of ['/machine/peripheral-anon', '/machine/peripheral']) {
    try {
      const props = await c.execute<{ name: string; type: string }[]>(
        'qom-list',
        { path },
        { timeoutMs: 10_000 },
      );
      answered = true;
      if (props.some((p) => /^child<pvpanic/.test(p.type))) return true;
    } catch {}
  }
  return answered ? false : null;
}

/** What QEMU's -qmp takes for a guest's `qmp:` (unix:PATH, PATH or tcp:HOST:PORT). */
export function qmpArg(qmp: string): string {
  return qmp.startsWith('tcp:') ? qmp : `unix:${qmp.replace(/^unix:/, '')}`;
}

/**
 * The FIFO's owner: whoever owns the guest's QMP socket, which QEMU created (libvirt's
 * QEMU runs as libvirt-qemu:kvm); nothing when that is dumpd itself or QMP is on TCP.
 */
export function fifoOwner(qmp: string | undefined): {
  fifoOwner?: { uid: number; gid: number };
} {
  if (!qmp || qmp.startsWith('tcp:')) return {};
  try {
    const st = statSync(qmp.replace(/^unix:/, ''));
    if (st.uid === process.getuid?.()) return {};
    return { fifoOwner: { uid: st.uid, gid: st.gid } };
  } catch {
    return {};
  }
}

export class Dumpd extends EventEmitter {
  readonly registry = new Registry();
  private readonly guests = new Map<string, GuestState>();
  /** One lifecycle-event stream per libvirt connection. */
  private readonly libvirt = new Map<string, LibvirtEvents>();
  private server: http.Server | null = null;
  /** The bearer token a POST on a TCP listener needs (null on a Unix socket). */
  private token: string | null = null;
  private watchers: FSWatcher[] = [];
  private stopped = false;
  private readonly m;

  constructor(
    readonly cfg: DumpdConfig,
    private readonly deps: DumpdDeps,
  ) {
    super();
    const r = [this.registry];
    const guests = this.guests;
    const online = (g: GuestState) => this.online(g);
    this.m = {
      started: new Counter({
        name: 'ballast_dumpd_dumps_started_total',
        help: 'Dumps started',
        labelNames: ['guest', 'reason'],
        registers: r,
      }),
      completed: new Counter({
        name: 'ballast_dumpd_dumps_completed_total',
        help: 'Dumps completed and verified on their device',
        labelNames: ['guest'],
        registers: r,
      }),
      failed: new Counter({
        name: 'ballast_dumpd_dumps_failed_total',
        help: 'Dumps that failed, by error code',
        labelNames: ['guest', 'code'],
        registers: r,
      }),
      bytes: new Counter({
        name: 'ballast_dumpd_dump_bytes_total',
        help: 'Dump bytes written to dump devices',
        labelNames: ['guest'],
        registers: r,
      }),
      duration: new Histogram({
        name: 'ballast_dumpd_dump_duration_seconds',
        help: 'Time from dump start to the dump settled on its device',
        labelNames: ['guest'],
        buckets: [0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 1800],
        registers: r,
      }),
      last: new Gauge({
        name: 'ballast_dumpd_last_dump_timestamp_seconds',
        help: 'When the last dump of the guest settled (Unix time)',
        labelNames: ['guest', 'result'],
        registers: r,
      }),
      progress: new Gauge({
        name: 'ballast_dumpd_dump_progress_ratio',
        help: "The running (or last) dump's progress as QEMU reports it (query-dump), 0 to 1",
        labelNames: ['guest'],
        registers: r,
      }),
      panics: new Counter({
        name: 'ballast_dumpd_panics_total',
        help: 'GUEST_PANICKED events seen',
        labelNames: ['guest'],
        registers: r,
      }),
      recovery: new Gauge({
        name: 'ballast_dumpd_panic_to_running_seconds',
        help: 'Service downtime: time from the last panic to the guest running again (after: reboot)',
        labelNames: ['guest'],
        registers: r,
      }),
      toComplete: new Gauge({
        name: 'ballast_dumpd_panic_to_dump_complete_seconds',
        help: 'Time from the last panic to its dump complete on the device',
        labelNames: ['guest', 'mode'],
        registers: r,
      }),
      throughput: new Gauge({
        name: 'ballast_dumpd_dump_throughput_bytes_per_second',
        help: 'Bytes of the last complete dump over the time from its start to complete',
        labelNames: ['guest', 'mode'],
        registers: r,
      }),
      fallbacks: new Counter({
        name: 'ballast_dumpd_early_reboot_fallbacks_total',
        help: 'Early-reboot dumps taken as dump-then-reboot instead (no background snapshot possible)',
        labelNames: ['guest'],
        registers: r,
      }),
      streaming: new Gauge({
        name: 'ballast_dumpd_dumps_streaming',
        help: 'Early-reboot dumps streaming while their guest runs again',
        registers: r,
      }),
      connected: new Gauge({
        name: 'ballast_dumpd_guests_connected',
        help: 'Guests whose QMP monitor is connected',
        registers: r,
        collect(this: Gauge) {
          let n = 0;
          for (const g of guests.values()) if (online(g)) n++;
          this.set(n);
        },
      }),
      known: new Gauge({
        name: 'ballast_dumpd_guests',
        help: 'Guests dumpd watches',
        registers: r,
        collect(this: Gauge) {
          this.set(guests.size);
        },
      }),
    };
  }

  private log(s: string): void {
    this.deps.log?.(s);
  }

  /** Starts the listener, the monitors and the directory watches; resolves with the address. */
  async start(): Promise<string> {
    for (const g of this.cfg.guests) this.addGuest(g, false);
    for (const w of this.cfg.watch) {
      const scan = () => this.scan(w.dir);
      try {
        // A watched directory under /run is gone after a reboot: make it, as QEMU needs it.
        if (!existsSync(w.dir)) {
          mkdirSync(w.dir, { recursive: true });
          chmodSync(w.dir, 0o755);
          this.log(`created ${w.dir} (watched for QMP sockets)`);
        }
        scan();
        const fw = watch(w.dir, () => scan());
        fw.on('error', () => {});
        this.watchers.push(fw);
      } catch (e) {
        throw new DumpError('DUMP_BAD_CONFIG', `cannot watch ${w.dir}: ${(e as Error).message}`);
      }
    }
    return this.listen();
  }

  /** Adds and removes watched guests to match the sockets in `dir`. */
  scan(dir: string): void {
    if (this.stopped) return;
    let files: string[] = [];
    try {
      files = readdirSync(dir);
    } catch {
      files = [];
    }
    const seen = new Set<string>();
    for (const w of this.cfg.watch.filter((x) => x.dir === dir)) {
      for (const f of files) {
        const g = watchedGuest(w, f, this.cfg.defaults);
        if (!g) continue;
        try {
          if (!g.qmp || !statSync(g.qmp).isSocket()) continue;
        } catch {
          continue;
        }
        seen.add(g.name);
        if (!this.guests.has(g.name)) this.addGuest(g, true);
      }
    }
    for (const [name, st] of this.guests) {
      const q = st.cfg.qmp;
      if (st.watched && q?.startsWith(`${dir.replace(/\/$/, '')}/`) && !seen.has(name)) {
        if (!existsSync(q)) this.removeGuest(name);
      }
    }
  }

  addGuest(cfg: GuestConfig, watched: boolean): void {
    if (this.guests.has(cfg.name)) return;
    if (cfg.libvirt || !cfg.qmp) {
      this.addLibvirtGuest(cfg);
      return;
    }
    const monitor = new QmpMonitor(cfg.qmp, { retryMs: 200, maxRetryMs: 2000 });
    const st = this.track(cfg, monitor, watched);
    monitor.on('connected', (c: QmpClient) => {
      this.log(`guest ${cfg.name}: QMP connected (${cfg.qmp})`);
      this.emit('connected', cfg.name);
      void this.cleanupStream(st, c);
      // A guest that panicked while nobody watched (dumpd restarting) is still paused in
      // guest-panicked: handle it as if the event had just come.
      c.execute<{ status: string }>('query-status', undefined, { timeoutMs: 10_000 }).then(
        (q) => {
          if (q.status === 'guest-panicked' && !st.running) {
            this.log(`guest ${cfg.name}: found in guest-panicked state`);
            this.onPanic(st, { event: 'GUEST_PANICKED', data: { action: 'pause', found: true } });
          }
        },
        () => {},
      );
      // Without a pvpanic device a panic is never reported: say so now.
      void hasPvpanic(c).then((has) => {
        if (has === false)
          this.log(
            `guest ${cfg.name}: warning: no pvpanic device, so its panics will not be seen; ` +
              'start QEMU with -device pvpanic -action panic=pause (the guest needs its pvpanic driver)',
          );
      });
      // Say now, not at the first panic, when this QEMU cannot write the configured format.
      c.execute<{ formats: string[] }>('query-dump-guest-memory-capability', undefined, {
        timeoutMs: 10_000,
      }).then(
        (caps) => {
          if (!caps.formats.includes(cfg.format))
            this.log(
              `guest ${cfg.name}: warning: QEMU offers ${caps.formats.join(', ')}, not ${cfg.format}; its dumps will fail (DUMP_FORMAT_UNSUPPORTED)`,
            );
        },
        () => {},
      );
    });
    monitor.on('disconnected', () => {
      this.log(`guest ${cfg.name}: QMP disconnected`);
      this.emit('disconnected', cfg.name);
    });
    monitor.on('event', (ev: QmpEvent) => {
      if (ev.event === 'GUEST_PANICKED') this.onPanic(st, ev);
    });
    monitor.start();
    this.log(
      `guest ${cfg.name}: watching ${cfg.qmp}${watched ? ' (found in a watched directory)' : ''}`,
    );
  }

  /** The guest's QMP monitor, for the daemon's other parts (one connection per guest). */
  monitorOf(name: string): QmpMonitor | undefined {
    return this.guests.get(name)?.monitor ?? undefined;
  }

  /** Whether dumpd reaches the guest: its QMP monitor, or its libvirt connection. */
  private online(g: GuestState): boolean {
    if (g.monitor) return g.monitor.client !== null;
    return g.cfg.libvirt !== undefined && this.libvirt.get(g.cfg.libvirt)?.connected === true;
  }

  /** A guest dumpd knows from now on, with nothing dumped yet. */
  private track(cfg: GuestConfig, monitor: QmpMonitor | null, watched: boolean): GuestState {
    const st: GuestState = {
      cfg,
      monitor,
      watched,
      running: null,
      last: null,
      panics: 0,
      pending: null,
      recentPanics: [],
    };
    this.guests.set(cfg.name, st);
    return st;
  }

  /** A libvirt domain: its panics come from the connection's lifecycle events. */
  private addLibvirtGuest(cfg: GuestConfig): void {
    const uri = cfg.libvirt as string;
    const st = this.track(cfg, null, false);
    let events = this.libvirt.get(uri);
    const fresh = !events;
    if (!events) {
      events = new LibvirtEvents(uri);
      this.libvirt.set(uri, events);
      events.on('down', (why: string) =>
        this.log(`libvirt ${uri}: disconnected${why ? ` (${why})` : ''}; retrying`),
      );
    }
    const ev = events;
    ev.on('up', () => {
      if (!this.guests.has(cfg.name)) return;
      this.log(`guest ${cfg.name}: libvirt connected (${uri})`);
      this.emit('connected', cfg.name);
      // A domain that panicked while nobody watched is still there, crashed.
      domainState(uri, cfg.name).then(
        (state) => {
          if (state === 'crashed' && !st.running) {
            this.log(`guest ${cfg.name}: found crashed`);
            this.onPanic(st, { event: 'GUEST_PANICKED', data: { action: 'pause', found: true } });
          }
        },
        (e: unknown) => this.log(`guest ${cfg.name}: ${(e as Error).message}`),
      );
      // As for a QEMU without pvpanic: say now what keeps its panics from being dumped.
      void domainPanicProblems(uri, cfg.name).then((problems) => {
        for (const p of problems) this.log(`guest ${cfg.name}: warning: ${p}`);
      });
    });
    ev.on('lifecycle', (domain: string, event: string, detail: string) => {
      if (domain !== cfg.name || !this.guests.has(cfg.name)) return;
      if (event === 'Crashed')
        this.onPanic(st, { event: 'GUEST_PANICKED', data: { action: 'pause', detail } });
    });
    if (fresh) ev.start();
    else if (ev.connected) ev.emit('up');
    this.log(`guest ${cfg.name}: watching libvirt domain ${cfg.name} (${uri})`);
  }

  removeGuest(name: string): void {
    const st = this.guests.get(name);
    if (!st) return;
    st.monitor?.stop();
    this.guests.delete(name);
    this.log(`guest ${name}: gone`);
  }

  guestNames(): string[] {
    return [...this.guests.keys()];
  }

  /** Guests whose QMP connection is up. */
  connectedGuests(): string[] {
    return [...this.guests.values()].filter((g) => this.online(g)).map((g) => g.cfg.name);
  }

  /**
   * A dumpd that died while an early-reboot dump streamed leaves background-snapshot on
   * (the guest's next live migration would be a snapshot) and the dump `streaming`:
   * turn it off, and mark the dump failed (interrupted). The guest ran on meanwhile.
   */
  private async cleanupStream(st: GuestState, c: QmpClient): Promise<void> {
    const t = { timeoutMs: 10_000 };
    try {
      const caps = await c.execute<{ capability: string; state: boolean }[]>(
        'query-migrate-capabilities',
        undefined,
        t,
      );
      if (!caps.some((x) => x.capability === 'background-snapshot' && x.state)) return;
      if (st.running) return;
      // The snapshot drains into /dev/null once nobody reads it (early.ts,
      // snapshotTarget): wait for its end rather than cancel it, which can deadlock QEMU
      // while the rebooted guest waits for a page.
      const deadline = Date.now() + this.cfg.dumpTimeoutMs;
      for (let logged = false; ; ) {
        const q = await c.execute<{ status?: string }>('query-migrate', undefined, t);
        if (q.status !== 'active' && q.status !== 'setup' && q.status !== 'cancelling') break;
        if (Date.now() > deadline) {
          this.log(
            `guest ${st.cfg.name}: the interrupted snapshot is still ${q.status}; background-snapshot stays on`,
          );
          return;
        }
        if (!logged) {
          this.log(`guest ${st.cfg.name}: waiting for an interrupted snapshot to drain`);
          logged = true;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
      await c.execute(
        'migrate-set-capabilities',
        { capabilities: [{ capability: 'background-snapshot', state: false }] },
        t,
      );
      // The stream's lifted bandwidth cap: QEMU's default again (the old one is not known).
      const p = await c.execute<{ 'max-bandwidth'?: number }>(
        'query-migrate-parameters',
        undefined,
        t,
      );
      if (p['max-bandwidth'] === SNAPSHOT_BANDWIDTH)
        await setMaxBandwidth(c, QEMU_DEFAULT_BANDWIDTH);
      this.log(`guest ${st.cfg.name}: an early-reboot stream was interrupted (dumpd restarted)`);
      const dev = await DumpDevice.open(
        await this.deps.resolveDevice(st.cfg.device, st.cfg.name),
        st.cfg.tlsCerts ? { tls: { dir: st.cfg.tlsCerts } } : {},
      );
      try {
        const n = await dev.recover(Date.now(), st.cfg.name);
        if (n) {
          this.log(`guest ${st.cfg.name}: ${n} interrupted dump(s) marked failed`);
          if ('device' in st.cfg.device)
            this.post(st, {
              kind: 'dump.failed',
              subject: st.cfg.device.device,
              data: {
                guest: st.cfg.name,
                device: st.cfg.device.device,
                mode: 'early-reboot',
                interrupted: n,
                error: {
                  code: 'DUMP_INTERRUPTED',
                  message: 'dumpd stopped while the dump streamed',
                },
              },
            });
        }
      } finally {
        await dev.close();
      }
      // Died before the snapshot started: the guest is still stopped at its panic.
      const q = await c.execute<{ status: string }>('query-status', undefined, t);
      if (q.status === 'paused' && !st.running) {
        this.log(`guest ${st.cfg.name}: still stopped at its panic; dumping it again`);
        this.onPanic(st, { event: 'GUEST_PANICKED', data: { action: 'pause', found: true } });
      }
    } catch (e) {
      this.log(
        `guest ${st.cfg.name}: cleanup after an interrupted stream: ${(e as Error).message}`,
      );
    }
  }

  /** Tells the agent of an agent device about a dump; best effort (logged, never thrown). */
  private post(st: GuestState, ev: DumpEvent): void {
    const ref = st.cfg.device;
    if ('uri' in ref || !this.deps.postEvent) return;
    void this.deps.postEvent(ref, ev).then(
      () => this.log(`guest ${st.cfg.name}: ${ev.kind} posted to the agent of ${ref.device}`),
      (e: unknown) =>
        this.log(
          `guest ${st.cfg.name}: warning: ${ev.kind} not posted to the agent of ${ref.device}: ${(e as Error).message}`,
        ),
    );
  }

  private onPanic(st: GuestState, ev: QmpEvent): void {
    // QEMU's timestamp of the event: when the guest stopped, not when we heard of it.
    // A guest found crashed (dumpd was not watching) crashed at a moment nobody can
    // tell (neither QMP nor libvirt keeps it): unknown (0), and when it was found.
    const ts = ev.timestamp;
    const found = ev.data.found === true;
    const at = found
      ? 0
      : ts && ts.seconds > 0
        ? ts.seconds * 1000 + Math.floor(ts.microseconds / 1000)
        : Date.now();
    if (found) {
      this.log(
        `guest ${st.cfg.name}: found crashed at ${new Date().toISOString()}; when it crashed is not known (dumpd was not watching), so no panic time is recorded`,
      );
    }
    st.panics++;
    this.m.panics.inc({ guest: st.cfg.name });
    const action = String(ev.data.action ?? '');
    this.log(`guest ${st.cfg.name}: GUEST_PANICKED (action ${action})`);
    this.emit('panic', st.cfg.name, ev);
    if (action === 'poweroff') {
      this.log(`guest ${st.cfg.name}: QEMU powers off on panic; start it with -action panic=pause`);
      return;
    }
    if (st.running) {
      if (st.pending) return; // the guest is stopped: it cannot panic twice meanwhile
      st.pending = { ...ev, data: { ...ev.data, panicAt: at, foundAt: found ? Date.now() : 0 } };
      this.log(
        `guest ${st.cfg.name}: a dump is running; this panic waits for it (the guest stays stopped in guest-panicked)`,
      );
      return;
    }
    this.dumpPanic(st, at, found ? Date.now() : 0);
  }

  /**
   * Dumps a panic that happened at `at` (0: not known, found crashed at `foundAt`),
   * then applies the guest's policy (loop limit permitting).
   */
  private dumpPanic(st: GuestState, at: number, foundAt = 0): void {
    const after = loopGuard(st, this.log.bind(this));
    void this.dump(st.cfg.name, {
      reason: 'panic',
      after,
      // A guest paused by the loop limit is not rebooted early either.
      mode: after === 'reboot' ? st.cfg.mode : 'dump-then-reboot',
      panicAt: at,
      ...(foundAt ? { foundAt } : {}),
    }).catch((e: unknown) => this.log(`guest ${st.cfg.name}: ${(e as Error).message}`));
  }

  /** After a dump is settled: the panic that waited for it, if the guest is still stopped there. */
  private async takePending(st: GuestState): Promise<void> {
    const ev = st.pending;
    st.pending = null;
    const qmp = st.monitor?.client;
    if (!ev || !qmp || this.stopped) return;
    const q = await qmp
      .execute<{ status: string }>('query-status', undefined, { timeoutMs: 10_000 })
      .catch(() => null);
    if (q?.status !== 'guest-panicked') return;
    this.log(`guest ${st.cfg.name}: dumping the panic that waited`);
    this.dumpPanic(st, Number(ev.data.panicAt) || 0, Number(ev.data.foundAt) || 0);
  }

  /**
   * A guest whose QEMU has just started (its socket is there, the monitor not connected
   * yet, or not even found in its watched directory): connects now, waiting up to 3 s.
   */
  private async reachSoon(name: string): Promise<void> {
    if (!this.guests.has(name)) for (const w of this.cfg.watch) this.scan(w.dir);
    const st = this.guests.get(name);
    const m = st?.monitor;
    const q = st?.cfg.qmp ?? '';
    if (!m || m.client) return;
    if (!q.startsWith('tcp:') && !existsSync(q.replace(/^unix:/, ''))) return;
    await m.connectNow(3000);
  }

  /**
   * What an on-demand dump does after, when the request does not say: the
   * guest's policy if it sits panicked, else nothing (a running guest stays up).
   */
  private async defaultAfter(name: string): Promise<After> {
    const st = this.guests.get(name);
    if (st?.cfg.libvirt) {
      const state = await domainState(st.cfg.libvirt, st.cfg.name).catch(() => '');
      return state === 'crashed' ? st.cfg.after : 'none';
    }
    const qmp = st?.monitor?.client;
    if (!st || !qmp) return 'none';
    try {
      const q = await qmp.execute<{ status: string }>('query-status', undefined, {
        timeoutMs: 10_000,
      });
      return q.status === 'guest-panicked' ? st.cfg.after : 'none';
    } catch {
      return 'none';
    }
  }

  /** Dumps a guest now. Rejects with DUMP_UNKNOWN_GUEST, DUMP_GUEST_OFFLINE or DUMP_BUSY. */
  async dump(
    name: string,
    o: { reason?: string; after?: After; mode?: Mode; panicAt?: number; foundAt?: number } = {},
  ): Promise<DumpResult> {
    const st = this.guests.get(name);
    if (!st) throw new DumpError('DUMP_UNKNOWN_GUEST', `dumpd does not know a guest named ${name}`);
    if (st.running) throw new DumpError('DUMP_BUSY', `a dump of ${name} is already running`);
    const lv = st.cfg.libvirt;
    const qmp = st.monitor?.client ?? undefined;
    if (!qmp && !(lv && this.libvirt.get(lv)?.connected))
      throw new DumpError(
        'DUMP_GUEST_OFFLINE',
        `guest ${name}: ${
          lv
            ? `libvirt (${lv}) is not connected`
            : `QMP is not connected to ${st.cfg.qmp} (its QEMU needs -qmp ${qmpArg(st.cfg.qmp ?? '')},server=on,wait=off; dumpd connects once it listens)`
        }`,
      );
    const reason = o.reason ?? 'request';
    const mode = o.mode ?? 'dump-then-reboot';
    // An early reboot is a reboot.
    const after = mode === 'early-reboot' ? 'reboot' : (o.after ?? 'none');
    const panicAt = o.panicAt ?? Date.now();
    const job = (async (): Promise<DumpResult> => {
      this.m.started.inc({ guest: name, reason });
      const end = this.m.duration.startTimer({ guest: name });
      let counted = 0;
      let uri: string;
      try {
        uri = await this.deps.resolveDevice(st.cfg.device, name);
      } catch (e) {
        // No device: nothing is dumped, but the guest is still handled per policy.
        const code = (e as { code?: string }).code ?? 'DUMP_DEVICE_UNRESOLVED';
        const r: DumpResult = {
          guest: name,
          ok: false,
          entry: null,
          bytes: 0,
          durationMs: 0,
          after,
          mode,
          panicAt,
          error: { code, message: (e as Error).message },
        };
        await this.applyAfter(st.cfg, qmp, after).then(
          () => {
            if (after === 'reboot') r.runningAt = Date.now();
          },
          (x: unknown) => {
            r.afterError = {
              code: (x as { code?: string }).code ?? 'DUMP_FAILED',
              message: (x as Error).message,
            };
          },
        );
        return r;
      }
      const progress = (b: number) => {
        this.m.bytes.inc({ guest: name }, b - counted);
        counted = b;
      };
      // libvirt holds the domain's monitor: the early reboot falls back, recorded as every
      // fallback is (the result's fallback, the catalog entry's reason, the metric).
      const noMonitor =
        mode === 'early-reboot' && !qmp
          ? "early reboot needs QEMU's monitor, which libvirt holds"
          : undefined;
      if (noMonitor) {
        this.log(
          `guest ${name}: early reboot not possible (${noMonitor}); dump-then-reboot instead`,
        );
      }
      if (mode === 'early-reboot' && qmp) {
        this.m.streaming.inc();
        try {
          const r = await runEarlyReboot({
            guest: name,
            qmp,
            uri,
            ...(st.cfg.tlsCerts ? { nbd: { tls: { dir: st.cfg.tlsCerts } } } : {}),
            format: st.cfg.format,
            keep: st.cfg.keep,
            runDir: this.cfg.runDir,
            timeoutMs: this.cfg.dumpTimeoutMs,
            panicAt,
            streamMiBps: st.cfg.streamMiBps,
            reason,
            onProgress: progress,
            onRunning: (t) => {
              this.log(
                `guest ${name}: running again ${panicAt ? `${t - panicAt} ms after the panic` : `${t - (o.foundAt ?? t)} ms after it was found crashed`}`,
              );
              this.emit('running', name, t);
            },
            log: (s) => this.log(s),
          });
          if (r.fallback) this.m.fallbacks.inc({ guest: name });
          end();
          return r;
        } finally {
          this.m.streaming.dec();
        }
      }
      this.log(`guest ${name}: dumping (${reason}, ${st.cfg.format}) to ${uri}`);
      const r = await runDump({
        guest: name,
        ...(qmp ? { qmp } : {}),
        ...(lv ? { libvirt: { uri: lv, domain: name } } : {}),
        uri,
        nbd: st.cfg.tlsCerts ? { tls: { dir: st.cfg.tlsCerts } } : {},
        format: st.cfg.format,
        keep: st.cfg.keep,
        after,
        runDir: this.cfg.runDir,
        timeoutMs: this.cfg.dumpTimeoutMs,
        panicAt,
        ...(noMonitor ? { note: `dump-then-reboot: ${noMonitor}` } : {}),
        ...fifoOwner(st.cfg.qmp),
        applyAfter: (a) => this.applyAfter(st.cfg, qmp, a),
        onProgress: progress,
        onQemuProgress: (done, total) => {
          if (total > 0) this.m.progress.set({ guest: name }, done / total);
        },
      });
      if (noMonitor) {
        r.fallback = noMonitor;
        this.m.fallbacks.inc({ guest: name });
      }
      end();
      return r;
    })();
    st.running = job;
    try {
      const r = await job;
      if (o.foundAt) r.foundAt = o.foundAt;
      st.last = r;
      const now = Date.now() / 1000;
      const how = r.mode ?? mode;
      if (r.runningAt && r.panicAt)
        this.m.recovery.set({ guest: name }, (r.runningAt - r.panicAt) / 1000);
      if (r.ok) {
        if (r.settledAt && r.panicAt)
          this.m.toComplete.set({ guest: name, mode: how }, (r.settledAt - r.panicAt) / 1000);
        if (r.durationMs > 0)
          this.m.throughput.set({ guest: name, mode: how }, r.bytes / (r.durationMs / 1000));
        this.m.progress.set({ guest: name }, 1);
        this.m.completed.inc({ guest: name });
        this.m.last.set({ guest: name, result: 'complete' }, now);
      } else {
        this.m.failed.inc({ guest: name, code: r.error?.code ?? 'DUMP_FAILED' });
        this.m.last.set({ guest: name, result: 'failed' }, now);
      }
      const timeline =
        r.panicAt && r.runningAt
          ? `; panic -> running ${r.runningAt - r.panicAt} ms, panic -> settled ${(r.settledAt ?? 0) - r.panicAt} ms`
          : r.foundAt && r.runningAt
            ? `; found crashed -> running ${r.runningAt - r.foundAt} ms (it crashed before it was found: how long before is not known)`
            : '';
      this.log(
        `guest ${name}: dump ${r.ok ? `${r.entry?.id} complete` : `failed: ${r.error?.code} ${r.error?.message}`}, ${r.bytes} bytes in ${r.durationMs} ms (${how}${r.fallback ? `, fell back: ${r.fallback}` : ''}); after: ${r.after}${r.afterError ? ` (failed: ${r.afterError.message})` : ''}${timeline}`,
      );
      this.emit('dump', r);
      this.post(st, dumpEvent('device' in st.cfg.device ? st.cfg.device.device : '', r));
      return r;
    } finally {
      st.running = null;
      if (st.pending) void this.takePending(st);
    }
  }

  /** The after-dump policy: through libvirt for a libvirt guest, else over QMP. */
  private async applyAfter(
    cfg: GuestConfig,
    qmp: QmpClient | undefined,
    after: After,
  ): Promise<void> {
    if (!cfg.libvirt) {
      if (qmp) await applyAfter(qmp, after);
      return;
    }
    await libvirtAfter(cfg.libvirt, cfg.name, after);
    if (after !== 'none') this.log(`guest ${cfg.name}: ${after} through libvirt (${cfg.libvirt})`);
  }

  private listen(): Promise<string> {
    const srv = http.createServer((req, res) => void this.handle(req, res));
    createApiGuard(srv, {
      maxConnections: 128,
      headersTimeoutMs: 10_000,
      requestTimeoutMs: 30_000,
    });
    this.server = srv;
    const l = this.cfg.listen;
    const unix = l.startsWith('/') || l.startsWith('unix:');
    if (!unix) {
      try {
        mkdirSync(this.cfg.runDir, { recursive: true, mode: 0o700 });
        const token = randomBytes(32).toString('hex');
        const file = tokenPath(this.cfg.runDir);
        writeFileSync(file, `${token}\n`, { mode: 0o600 });
        chmodSync(file, 0o600);
        this.token = token;
      } catch (e) {
        return Promise.reject(
          new DumpError(
            'DUMP_LISTEN_FAILED',
            `cannot write the API token in ${this.cfg.runDir}: ${(e as Error).message}`,
          ),
        );
      }
    }
    return new Promise((resolve, reject) => {
      srv.once('error', (e: NodeJS.ErrnoException) =>
        reject(
          new DumpError('DUMP_LISTEN_FAILED', `cannot listen on ${l}: ${e.code ?? e.message}`),
        ),
      );
      const done = () => {
        const a = srv.address();
        resolve(
          typeof a === 'string' ? a : `${(a as AddressInfo).address}:${(a as AddressInfo).port}`,
        );
      };
      if (unix) {
        const p = l.replace(/^unix:/, '');
        // A socket left by a daemon that was killed would refuse the restart (EADDRINUSE).
        prepareSocketPath(p).then(
          () =>
            srv.listen(p, () => {
              chmodSync(p, 0o600);
              done();
            }),
          (e: Error) =>
            reject(new DumpError('DUMP_LISTEN_FAILED', `cannot listen on ${l}: ${e.message}`)),
        );
      } else {
        const m = /^(\[[^\]]+\]|[^:]*):(\d+)$/.exec(l);
        if (!m) {
          reject(
            new DumpError('DUMP_BAD_CONFIG', `listen must be HOST:PORT or a socket path, not ${l}`),
          );
          return;
        }
        const host = (m[1] as string).replace(/^\[|\]$/g, '') || '127.0.0.1';
        srv.listen(Number(m[2]), host, done);
      }
    });
  }

  private async handle(req: http.IncomingMessage, res: http.ServerResponse): Promise<void> {
    const send = (status: number, body: unknown, type = 'application/json') => {
      const text = type === 'application/json' ? `${JSON.stringify(body)}\n` : String(body);
      res.writeHead(status, { 'content-type': type });
      res.end(text);
    };
    req.resume(); // no route reads a body; its end settles the request deadline
    try {
      const url = new URL(req.url ?? '/', 'http://dumpd');
      if (req.method === 'POST' && this.token !== null) {
        const want = Buffer.from(`Bearer ${this.token}`);
        const got = Buffer.from(req.headers.authorization ?? '');
        if (got.length !== want.length || !timingSafeEqual(got, want)) {
          send(401, {
            code: 'DUMP_UNAUTHORIZED',
            message: `a valid bearer token is required (Authorization: Bearer TOKEN, the token in ${tokenPath(this.cfg.runDir)})`,
          });
          return;
        }
      }
      if (req.method === 'GET' && url.pathname === '/metrics') {
        send(200, await this.registry.metrics(), this.registry.contentType);
        return;
      }
      if (req.method === 'GET' && url.pathname === '/v1/guests') {
        send(200, {
          guests: [...this.guests.values()].map((g) => ({
            name: g.cfg.name,
            ...(g.cfg.qmp ? { qmp: g.cfg.qmp } : { libvirt: g.cfg.libvirt }),
            connected: this.online(g),
            dumping: g.running !== null,
            format: g.cfg.format,
            after: g.cfg.after,
            mode: g.cfg.mode,
            keep: g.cfg.keep,
            panics: g.panics,
            last: g.last,
          })),
        });
        return;
      }
      const extra = await this.deps.routes?.(req.method ?? '', url);
      if (extra) {
        send(extra.status, extra.body);
        return;
      }
      const m = /^\/v1\/guests\/([^/]+)\/dump$/.exec(url.pathname);
      if (m && req.method === 'POST') {
        let name: string;
        try {
          name = decodeURIComponent(m[1] as string);
        } catch {
          send(400, { code: 'DUMP_BAD_REQUEST', message: 'malformed %-escape in the guest name' });
          return;
        }
        await this.reachSoon(name);
        const after = url.searchParams.get('after') ?? (await this.defaultAfter(name));
        if (!(AFTER as readonly string[]).includes(after)) {
          send(400, {
            code: 'DUMP_BAD_REQUEST',
            message: `after must be one of ${AFTER.join(', ')}`,
          });
          return;
        }
        const mode = url.searchParams.get('mode') ?? 'dump-then-reboot';
        if (!(MODES as readonly string[]).includes(mode)) {
          send(400, {
            code: 'DUMP_BAD_REQUEST',
            message: `mode must be one of ${MODES.join(', ')}`,
          });
          return;
        }
        const r = await this.dump(name, {
          after: after as After,
          mode: mode as Mode,
        });
        send(200, r);
        return;
      }
      send(404, {
        code: 'DUMP_BAD_REQUEST',
        message: `no such endpoint: ${req.method} ${url.pathname}`,
      });
    } catch (e) {
      const code = (e as { code?: string }).code ?? 'DUMP_FAILED';
      const status =
        code === 'DUMP_UNKNOWN_GUEST'
          ? 404
          : code === 'DUMP_BUSY' || code === 'DUMP_GUEST_OFFLINE'
            ? 409
            : 500;
      send(status, { code, message: (e as Error).message });
    }
  }

  async stop(): Promise<void> {
    this.stopped = true;
    for (const w of this.watchers) w.close();
    this.watchers = [];
    const running = [...this.guests.values()].map((g) => g.running).filter((p) => p !== null);
    await Promise.allSettled(running);
    for (const name of [...this.guests.keys()]) this.removeGuest(name);
    for (const ev of this.libvirt.values()) ev.stop();
    this.libvirt.clear();
    await new Promise<void>((resolve) => {
      if (!this.server) resolve();
      else this.server.close(() => resolve());
      this.server?.closeAllConnections();
    });
    this.server = null;
  }
}

/** Where dumpd keeps the bearer token of its TCP listener. */
export function tokenPath(runDir: string): string {
  return path.join(runDir, 'token');
}
