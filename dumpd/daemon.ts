// The dump daemon: one QMP monitor per guest (configured, or found in a watched
// directory), a dump on GUEST_PANICKED or on request, and an HTTP listener for
// /metrics and the control API:
//
//   GET  /metrics                     Prometheus text
//   GET  /v1/guests                   guests, connection state, last dump
//   POST /v1/guests/NAME/dump[?after=reboot|pause|poweroff|none]
//                                     dump now; answers when done (after defaults to the
//                                     guest's policy if it sits panicked, else none)
//
// One dump per guest at a time; a panic while a dump runs is logged and ignored.

import { EventEmitter } from 'node:events';
import { existsSync, type FSWatcher, readdirSync, statSync, watch } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { Counter, Gauge, Histogram, Registry } from 'prom-client';
import { DumpError } from './catalog.js';
import {
  AFTER,
  type After,
  type DeviceRef,
  type DumpdConfig,
  type GuestConfig,
  watchedGuest,
} from './config.js';
import { applyAfter, type DumpResult, runDump } from './job.js';
import { domainState, LibvirtEvents, libvirtAfter } from './libvirt.js';
import type { QmpClient } from './qmp.js';
import { type QmpEvent, QmpMonitor } from './qmp.js';

export interface DumpdDeps {
  /** Turns a device reference into an NBD URI (agent devices need the agent's API). */
  resolveDevice(ref: DeviceRef, guest: string): Promise<string>;
  log?(line: string): void;
}

interface GuestState {
  cfg: GuestConfig;
  /** QEMU's monitor; null for a libvirt guest. */
  monitor: QmpMonitor | null;
  watched: boolean;
  running: Promise<DumpResult> | null;
  last: DumpResult | null;
  panics: number;
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
        help: 'Time from the last panic to the guest running again (after: reboot)',
        labelNames: ['guest'],
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
      scan();
      try {
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
    const st: GuestState = {
      cfg,
      monitor,
      watched,
      running: null,
      last: null,
      panics: 0,
      recentPanics: [],
    };
    this.guests.set(cfg.name, st);
    monitor.on('connected', (c: QmpClient) => {
      this.log(`guest ${cfg.name}: QMP connected (${cfg.qmp})`);
      this.emit('connected', cfg.name);
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

  /** Whether dumpd reaches the guest: its QMP monitor, or its libvirt connection. */
  private online(g: GuestState): boolean {
    if (g.monitor) return g.monitor.client !== null;
    return g.cfg.libvirt !== undefined && this.libvirt.get(g.cfg.libvirt)?.connected === true;
  }

  /** A libvirt domain: its panics come from the connection's lifecycle events. */
  private addLibvirtGuest(cfg: GuestConfig): void {
    const uri = cfg.libvirt as string;
    const st: GuestState = {
      cfg,
      monitor: null,
      watched: false,
      running: null,
      last: null,
      panics: 0,
      recentPanics: [],
    };
    this.guests.set(cfg.name, st);
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

  private onPanic(st: GuestState, ev: QmpEvent): void {
    const at = Date.now();
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
      this.log(`guest ${st.cfg.name}: a dump is already running; this panic is not dumped`);
      return;
    }
    const after = loopGuard(st, this.log.bind(this));
    void this.dump(st.cfg.name, { reason: 'panic', after })
      .then((r) => {
        if (r.ok && st.cfg.after === 'reboot' && !r.afterError)
          this.m.recovery.set({ guest: st.cfg.name }, (Date.now() - at) / 1000);
      })
      .catch((e: unknown) => this.log(`guest ${st.cfg.name}: ${(e as Error).message}`));
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
  async dump(name: string, o: { reason?: string; after?: After } = {}): Promise<DumpResult> {
    const st = this.guests.get(name);
    if (!st) throw new DumpError('DUMP_UNKNOWN_GUEST', `dumpd does not know a guest named ${name}`);
    if (st.running) throw new DumpError('DUMP_BUSY', `a dump of ${name} is already running`);
    const lv = st.cfg.libvirt;
    const qmp = st.monitor?.client ?? undefined;
    if (!qmp && !(lv && this.libvirt.get(lv)?.connected))
      throw new DumpError(
        'DUMP_GUEST_OFFLINE',
        `guest ${name}: ${lv ? `libvirt (${lv}) is not connected` : 'QMP is not connected'}`,
      );
    const reason = o.reason ?? 'request';
    const after = o.after ?? 'none';
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
          error: { code, message: (e as Error).message },
        };
        await this.applyAfter(st.cfg, qmp, after).catch((x: unknown) => {
          r.afterError = {
            code: (x as { code?: string }).code ?? 'DUMP_FAILED',
            message: (x as Error).message,
          };
        });
        return r;
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
        ...fifoOwner(st.cfg.qmp),
        applyAfter: (a) => this.applyAfter(st.cfg, qmp, a),
        onProgress: (b) => {
          this.m.bytes.inc({ guest: name }, b - counted);
          counted = b;
        },
        onQemuProgress: (done, total) => {
          if (total > 0) this.m.progress.set({ guest: name }, done / total);
        },
      });
      end();
      return r;
    })();
    st.running = job;
    try {
      const r = await job;
      st.last = r;
      const now = Date.now() / 1000;
      if (r.ok) {
        this.m.progress.set({ guest: name }, 1);
        this.m.completed.inc({ guest: name });
        this.m.last.set({ guest: name, result: 'complete' }, now);
      } else {
        this.m.failed.inc({ guest: name, code: r.error?.code ?? 'DUMP_FAILED' });
        this.m.last.set({ guest: name, result: 'failed' }, now);
      }
      this.log(
        `guest ${name}: dump ${r.ok ? `${r.entry?.id} complete` : `failed: ${r.error?.code} ${r.error?.message}`}, ${r.bytes} bytes in ${r.durationMs} ms; after: ${r.after}${r.afterError ? ` (failed: ${r.afterError.message})` : ''}`,
      );
      this.emit('dump', r);
      return r;
    } finally {
      st.running = null;
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
    this.server = srv;
    const l = this.cfg.listen;
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
      if (l.startsWith('/') || l.startsWith('unix:')) srv.listen(l.replace(/^unix:/, ''), done);
      else {
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
    try {
      const url = new URL(req.url ?? '/', 'http://dumpd');
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
            keep: g.cfg.keep,
            panics: g.panics,
            last: g.last,
          })),
        });
        return;
      }
      const m = /^\/v1\/guests\/([^/]+)\/dump$/.exec(url.pathname);
      if (m && req.method === 'POST') {
        const name = decodeURIComponent(m[1] as string);
        const after = url.searchParams.get('after') ?? (await this.defaultAfter(name));
        if (!(AFTER as readonly string[]).includes(after)) {
          send(400, {
            code: 'DUMP_BAD_REQUEST',
            message: `after must be one of ${AFTER.join(', ')}`,
          });
          return;
        }
        const r = await this.dump(name, { after: after as After });
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
