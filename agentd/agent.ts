// The per-host daemon that `ballast agent` runs: it wires agent/'s pools, devices
// and their NBD exports, reservations, the management API and /metrics over the
// durable store, the cluster's membership and fencing (cluster/) when the config
// has a `cluster:` section, and configuration-change events (notify/).

import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  closeSync,
  constants,
  existsSync,
  fsyncSync,
  linkSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  writeSync,
} from 'node:fs';
import type http from 'node:http';
import { hostname } from 'node:os';
import { dirname, join } from 'node:path';
import { createApiServer } from '../agent/api.js';
import { createApiGuard } from '../agent/api-guard.js';
import type { NbdEndpoint } from '../agent/attach.js';
import { DynamicCatalog } from '../agent/catalog.js';
import { type AgentConfig, loadConfig, type Media, type PoolConfig } from '../agent/config.js';
import { DeviceManager } from '../agent/devices.js';
import { BallastError } from '../agent/errors.js';
import { DISK_FILES, HOLLOW_FILES } from '../agent/extent-files.js';
import { failpointPause } from '../agent/failpoints.js';
import { describeTarget, listenError, MOVE_LISTENER, prepareSocketPath } from '../agent/listen.js';
import { createMetrics } from '../agent/metrics.js';
import { loadNative } from '../agent/native.js';
import { Pool } from '../agent/pools.js';
import { ReservationManager, SETTLED_PREFIX } from '../agent/reservations.js';
import { SqliteStore } from '../agent/store/sqlite-store.js';
import type { Store } from '../agent/store/store.js';
import { StreamManager } from '../agent/stream.js';
import { IdentityMap, loadTls, peerUid, sourceKey } from '../agent/tls-config.js';
import { clusterMetrics, clusterRoutes } from '../cluster/api.js';
import { GuardedStore } from '../cluster/changes.js';
import type { Cluster } from '../cluster/cluster.js';
import { EtcdStore } from '../cluster/etcd-store.js';
import { Fence } from '../cluster/fence.js';
import {
  Cluster as ClusterImpl,
  catalogApplier,
  openClusterStore,
  servingHosts,
  waitFor,
} from '../cluster/node.js';
import { etcdSizing, sizingLine } from '../cluster/sizing.js';
import { type ListenTarget, NbdServer } from '../nbd/server.js';
import { notifyMetrics, notifyRoutes } from '../notify/api.js';
import { MEDIA } from '../notify/events.js';
import { Notifier } from '../notify/notifier.js';
import { serveEvents } from '../notify/sse.js';
import { tierChanges, tierOf } from '../notify/tier.js';

/** How long a PR command that lost a race waits for this agent's watch to catch up. */
const CAUGHT_UP_MS = 10_000;
/** How long the failpoint `join-delay` holds the start before the agent joins (tests act meanwhile). */
const JOIN_DELAY_MS = 5000;

export interface AgentOptions {
  configFile?: string;
  dataDir?: string;
  /** --api-listen: HOST:PORT of the TCP API instead of the config's, or 'none'. */
  apiListen?: string;
  version: string;
  log?: (msg: string) => void;
  /** Log every NBD connection and refused request. */
  verbose?: boolean;
  /**
   * --hollow: a cluster member without a data path. It joins, watches, acks, fences
   * and runs the device and reservation managers as any agent does, but makes and
   * opens no files (its pools have no directories) and serves no NBD: what a
   * benchmark runs by the thousand to stand for hosts (bench/hollow.ts).
   */
  hollow?: boolean;
}

/**
 * Reads the API token, or makes one (32 random bytes, hex) in a new 0600
 * file. The file appears complete or not at all: written and fsynced under a
 * temporary name, then linked into place (which fails if another agent won).
 */
export function loadOrCreateToken(file: string): { token: string; created: boolean } {
  let text: string | undefined;
  try {
    text = readFileSync(file, 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
      throw new BallastError(
        'BALLAST_TOKEN_INVALID',
        `cannot read the API token ${file}: ${(e as Error).message}`,
      );
    }
  }
  if (text !== undefined) {
    const token = text.trim();
    if (token.length < 16) {
      throw new BallastError(
        'BALLAST_TOKEN_INVALID',
        `${file}: the API token must be at least 16 characters`,
      );
    }
    chmodSync(file, 0o600);
    return { token, created: false };
  }
  const token = randomBytes(32).toString('hex');
  mkdirSync(dirname(file), { recursive: true, mode: 0o700 });
  const tmp = `${file}.${process.pid}.tmp`;
  const fd = openSync(tmp, constants.O_WRONLY | constants.O_CREAT | constants.O_TRUNC, 0o600);
  try {
    writeSync(fd, `${token}\n`);
    fsyncSync(fd);
  } finally {
    closeSync(fd);
  }
  try {
    linkSync(tmp, file);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'EEXIST') return loadOrCreateToken(file);
    throw new BallastError(
      'BALLAST_TOKEN_INVALID',
      `cannot write the API token ${file}: ${(e as Error).message}`,
    );
  } finally {
    rmSync(tmp, { force: true });
  }
  const d = openSync(dirname(file), 'r');
  try {
    fsyncSync(d);
  } finally {
    closeSync(d);
  }
  return { token, created: true };
}

/** HOST:PORT as validated by the config ([v6]:PORT, an empty host = loopback). */
function hostPort(text: string): { host: string; port: number } {
  const i = text.lastIndexOf(':');
  const host = text.slice(0, i).replace(/^\[|\]$/g, '');
  return { host: host === '' ? '127.0.0.1' : host, port: Number(text.slice(i + 1)) };
}

/**
 * Why a client without a name (no TLS identity, no `identities` entry) may not
 * open a device, or null when it may. On the Unix socket the socket's mode
 * already decided who could connect.
 */
export function anonymousRefusal(
  policy: 'unix' | 'any' | 'none',
  conn: { identityMethod: string; raw: { remoteAddress?: string } },
): string | null {
  if (conn.identityMethod !== 'anonymous' || policy === 'any') return null;
  if (policy === 'unix' && !conn.raw.remoteAddress) return null;
  return policy === 'unix'
    ? 'anonymous clients are served on the Unix socket only: use TLS or an nbd.identities entry'
    : 'anonymous clients are refused: use TLS or an nbd.identities entry';
}

/** Whether members of `gid` (not root) can search every directory from / down to `dir`. */
export function searchable(dir: string, gid: number): boolean {
  for (let d = dir; ; d = dirname(d)) {
    let st: ReturnType<typeof statSync>;
    try {
      st = statSync(d);
    } catch {
      return false;
    }
    // A member of the directory's group gets the group bits, never the others' bits.
    if (!(st.mode & (st.gid === gid ? 0o010 : 0o001))) return false;
    if (d === dirname(d)) return true;
  }
}

/** The gid for the NBD socket: the group if it exists; a configured group must. */
export function socketGroupId(
  name: string | null,
  configured: boolean,
  groupFile = '/etc/group',
  key = 'nbd.socketGroup',
): number | null {
  if (name === null) return null;
  let text = '';
  try {
    text = readFileSync(groupFile, 'utf8');
  } catch {}
  for (const line of text.split('\n')) {
    const [n, , gid] = line.split(':');
    if (n === name && gid !== undefined && /^\d+$/.test(gid)) return Number(gid);
  }
  if (/^\d+$/.test(name)) return Number(name);
  if (configured) {
    throw new BallastError(
      'BALLAST_CONFIG_INVALID',
      `${key}: no group named ${JSON.stringify(name)} in ${groupFile}`,
    );
  }
  return null;
}

export class Agent {
  private config: AgentConfig;
  private token: string;
  private readonly pools = new Map<string, Pool>();
  private readonly catalog = new DynamicCatalog();
  private readonly nbd: NbdServer;
  readonly devices: DeviceManager;
  readonly reservations: ReservationManager;
  /** Suspend streams taken into and given out of devices (agent/stream.ts). */
  readonly streams: StreamManager;
  private readonly apiServers: http.Server[] = [];
  private readonly sockets: string[] = [];
  private readonly nbdTargets: ListenTarget[] = [];
  private readonly apiTargets: ListenTarget[] = [];
  private readonly startedAt = new Date();
  private stopping: Promise<void> | null = null;
  private reloads = 0;
  private lastReloadError: string | null = null;
  /** Set when the config has a cluster: section. */
  cluster: Cluster | undefined;
  /** Aborted when the agent stops: ends every GET /v1/events stream. */
  private readonly stopEvents = new AbortController();
  /** In a cluster: the store changes go through (a deadline and a verdict each). */
  private readonly changes: GuardedStore | undefined;
  /** The self-fence of shared devices (cluster only). */
  private fence: Fence | undefined;
  /** Configuration-change events and their recipients. */
  readonly notifier: Notifier;
  private rescanTimer: NodeJS.Timeout | undefined;
  /** Pools found full at the last rescan (pool.full is sent when one crosses the threshold). */
  private readonly fullPools = new Set<string>();
  private roundTrip: (op: string, seconds: number) => void = () => {};

  private constructor(
    config: AgentConfig,
    token: string,
    private readonly store: Store,
    private readonly opts: AgentOptions,
  ) {
    this.config = config;
    this.token = token;
    const credentials = loadTls(config.nbd.tls);
    const identities = new IdentityMap(config.nbd.identities);
    const hostIdentity = config.cluster?.host;
    // In a cluster, devices and reservations change through the guarded store:
    // one deadline and a verdict for every change (cluster/changes.ts).
    const cc = config.cluster;
    this.changes = cc
      ? new GuardedStore(
          store,
          {
            host: cc.host,
            joined: () => this.cluster?.joined() ?? false,
            guard: () => this.cluster?.guard(),
            epoch: () => this.cluster!.epoch(),
            epochEnded: (rev) => this.cluster?.epochEnded(rev),
            catalogRevisionAt: (rev, ms) => this.cluster!.catalogRevisionAt(rev, ms),
          },
          cc.changeTimeoutMs,
          (m) => this.log(m),
        )
      : undefined;
    const changeStore = this.changes ?? store;
    this.reservations = new ReservationManager(
      changeStore,
      () => this.nbd,
      (name) => this.devices.liveNames().includes(name),
      (m) => this.log(m),
    );
    this.nbd = new NbdServer({
      catalog: this.catalog,
      tls: credentials ? { mode: config.nbd.tls.mode, credentials } : undefined,
      // In a cluster a local (Unix socket) client that TLS and the map do not name is
      // this host: a QEMU here and a QEMU on another host never share an identity.
      identify:
        identities.size > 0 || hostIdentity
          ? (c) =>
              identities.lookup(c.raw, peerUid) ??
              (c.raw.remoteAddress === undefined ? (hostIdentity ?? null) : null)
          : undefined,
      authorize: (exp, conn) =>
        anonymousRefusal(config.nbd.anonymous, conn) ?? this.reservations.authorize(exp.name, conn),
      readOnlyFor: (exp, conn) => this.reservations.readOnlyFor(exp.name, conn),
      maxConnections: config.nbd.maxConnections,
      handshakeTimeoutMs: config.nbd.handshakeTimeoutMs,
      maxHandshakes: config.nbd.maxHandshakes,
      maxPerSource: config.nbd.maxPerSource,
      workers: opts.hollow ? 1 : config.nbd.workers,
      dupFd: (fd) => loadNative().dup(fd),
      // In a cluster a shared device's connections must stay where its fence is.
      tlsOnWorkers: config.cluster === undefined,
      sourceOf: sourceKey,
      maxInFlight: config.limits.maxInFlight,
      maxBufferedBytes: config.limits.maxBufferedBytes,
      threadBufferedBytes: config.limits.threadBufferedBytes,
      log: (level, msg) => {
        if (level !== 'debug' || opts.verbose) this.log(msg);
      },
    });
    this.devices = new DeviceManager(
      changeStore,
      this.pools,
      this.catalog,
      () => this.nbd,
      (m) => this.log(m),
      opts.hollow ? HOLLOW_FILES : DISK_FILES,
    );
    this.notifier = new Notifier({
      store,
      cluster: config.cluster?.name ?? 'default',
      host: this.hostName(),
      log: (m) => this.log(m),
      lease: config.cluster ? () => this.cluster?.leaseId() : undefined,
      leaseValidUntil: config.cluster ? () => this.cluster?.leaseValidUntil() ?? 0 : undefined,
      timeoutMs: config.events.deliveryTimeoutMs,
      retryCapMs: config.events.retryCapMs,
    });
    this.reservations.host = config.cluster?.host;
    this.devices.onExtended = (name, before, after) => {
      const b = this.tierOfDevice(before);
      const a = this.tierOfDevice(after);
      if (b.join() !== a.join()) {
        this.notifier.emit('tier.changed', name, {
          before: b,
          after: a,
          pools: [...new Set(after.map((e) => e.pool))],
          reason: 'extended onto a pool of another medium',
        });
      }
    };
    this.devices.onStats = (name, stats) => {
      stats.onConnections = (n, delta) => {
        if (n === 1 && delta > 0) this.notifier.emit('device.attached', name, { connections: n });
        if (n === 0 && delta < 0) this.notifier.emit('device.detached', name, { connections: n });
      };
    };
    this.devices.exportAccess = (name, shared) => {
      const acc = this.reservations.access(name);
      acc.fence = shared ? this.fence : undefined;
      return acc;
    };
    this.devices.onRemoved = (name) => this.reservations.forget(name);
    this.reservations.notServed = (name) => this.devices.whyNotServed(name);
    this.streams = new StreamManager({
      device: (name) => this.devices.streamTarget(name),
      access: (name) => this.reservations.access(name),
      // As the NBD server names a client on the same kind of socket (see identify above).
      identify: (sock) => {
        const name =
          identities.lookup(sock, peerUid) ??
          (sock.remoteAddress === undefined ? (hostIdentity ?? null) : null);
        if (name !== null) return { identity: name, refusal: null };
        return {
          identity: 'anonymous',
          refusal: anonymousRefusal(config.nbd.anonymous, {
            identityMethod: 'anonymous',
            raw: sock,
          }),
        };
      },
      log: (m) => this.log(m),
    });
    this.devices.streams = this.streams;
    this.reservations.abortStreams = (device, ids) => this.streams.abort(device, ids);
  }

  log(msg: string): void {
    (this.opts.log ?? ((m: string) => process.stderr.write(`ballast: ${m}\n`)))(msg);
  }

  /** Loads the config, opens the store and pools, reconciles, and starts listening. */
  static async start(opts: AgentOptions): Promise<Agent> {
    const config = loadConfig({
      file: opts.configFile,
      dataDir: opts.dataDir,
      apiListen: opts.apiListen,
    });
    if (opts.hollow && !config.cluster) {
      throw new BallastError(
        'BALLAST_CONFIG_INVALID',
        `${config.source}: a hollow agent (--hollow) is a cluster member: add a cluster: section`,
      );
    }
    try {
      mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
    } catch (e) {
      throw new BallastError(
        'BALLAST_DATA_DIR',
        `cannot create the data directory ${config.dataDir}: ${(e as Error).message}`,
      );
    }
    let agent: Agent | undefined;
    const trips: { f: (op: string, s: number) => void } = { f: () => {} };
    const store: Store = config.cluster
      ? await openClusterStore(
          config.cluster,
          (op, s) => trips.f(op, s),
          opts.log ?? ((m: string) => process.stderr.write(`ballast: ${m}\n`)),
        )
      : await SqliteStore.open(join(config.dataDir, 'state.db'));
    if (config.cluster) {
      try {
        await refuseUnjoined(config.dataDir);
      } catch (e) {
        await store.close().catch(() => {});
        throw e;
      }
    }
    try {
      const token = config.api.token ?? loadOrCreateToken(config.api.tokenFile).token;
      agent = new Agent(config, token, store, opts);
      trips.f = (op, s) => agent?.roundTrip(op, s);
      await agent.init();
      return agent;
    } catch (e) {
      if (agent) await agent.teardown().catch(() => {});
      else await store.close().catch(() => {});
      throw e;
    }
  }

  private async init(): Promise<void> {
    const c = this.config;
    for (const pc of c.pools) this.pools.set(pc.name, await this.openPool(pc));
    await this.reservations.load();
    if (c.cluster) {
      const cluster = await ClusterImpl.open({
        store: this.store,
        config: c.cluster,
        log: (m) => this.log(m),
        apply: catalogApplier({
          device: (name, ev) =>
            this.devices.applyRemote(
              name,
              ev.type === 'put' ? ev.kv : undefined,
              ev.kv.modRevision,
            ),
          reservation: (name, kind, ev) =>
            this.reservations.applyRemote(name, kind, ev.type === 'put' ? ev.kv : undefined),
        }),
      });
      this.cluster = cluster;
      cluster.inDoubt = () => this.changes?.inDoubt() ?? [];
      this.fence = new Fence(cluster, {
        marginMs: c.cluster.fenceMarginMs,
        holdMs: c.cluster.holdMs,
        log: (m) => this.log(m),
        watchdog: c.cluster.watchdog,
        onChange: (fenced, heldMs) =>
          this.notifier.emit('member.fenced', cluster.host, {
            fenced,
            ...(heldMs !== undefined ? { fencedForMs: heldMs } : {}),
          }),
      });
      cluster.fence = this.fence;
      this.devices.fence = this.fence;
      // A change waits for the alive members that serve its device: an expired or left
      // host serves nothing (and fences itself before it serves again), and a host that
      // does not serve the device has no connection to it (docs/cluster.md).
      this.reservations.settle = (rev, device) =>
        cluster.settle(rev, () => waitFor(cluster, device));
      this.reservations.appliedBy = (rev, device) =>
        cluster.appliedBy(rev, waitFor(cluster, device));
      this.reservations.cachedTrail = (device) => cluster.snapshot(`pr-audit/${device}/`);
      // A PR command that lost its race waits for the watch to bring the winner here.
      this.reservations.caughtUp = (rev) =>
        cluster.waitUntil(() => cluster.revision >= rev, CAUGHT_UP_MS);
      await this.reservations.joined(
        cluster.snapshot('pr/'),
        cluster.snapshot('acl/'),
        cluster.snapshot(SETTLED_PREFIX),
        (rev, device) =>
          waitFor(cluster, device).some(
            (h) => h !== cluster.host && cluster.alive(h) && cluster.ackOf(h) < rev,
          ),
      );
      this.devices.cluster = {
        host: cluster.host,
        guard: () => cluster.guard(),
        servingHosts: (rec) => servingHosts(cluster, rec),
        settle: async (rev, rec, before) => {
          await cluster.settle(rev, () =>
            waitFor(cluster, rec.name, rec, ...(before ? [before] : [])),
          );
        },
        describeHost: (h) => cluster.member(h)?.api.join(', ') || `host ${h} is not a live member`,
      };
      await this.devices.reconcile(cluster.snapshot('devices/'));
    } else {
      await this.devices.reconcile();
    }
    const cached = this.cluster;
    const registry = createMetrics(this.devices, () => this.nbd, {
      // In a cluster, from the cache: a scrape must answer while etcd does not.
      store: cached ? { revision: async () => cached.revision } : this.store,
      onApi: (f) => {
        this.apiRequest = f;
      },
    });
    if (this.cluster && this.fence) {
      const m = clusterMetrics(registry, this.cluster, this.fence);
      this.roundTrip = m.roundTrip;
      this.reservations.onChange = m.prChange;
    }

    // A hollow agent serves no NBD: it has nothing behind its devices.
    if (!this.opts.hollow) {
      for (const l of c.nbd.listen) this.nbdTargets.push(hostPort(l));
      if (c.nbd.socket) this.nbdTargets.push({ path: c.nbd.socket });
    }
    const nbdGroup = socketGroupId(c.nbd.socketGroup, c.nbd.socketGroupConfigured);
    // QEMU reaches a stream socket as it reaches the NBD socket.
    this.streams.socketGroup = nbdGroup;
    const apiGroup = socketGroupId(c.api.socketGroup, true, undefined, 'api.socketGroup');
    for (const t of this.nbdTargets) {
      if ('path' in t) await this.prepareSocket(t.path, nbdGroup, MOVE_LISTENER.agentNbdSocket);
      try {
        const a = await this.nbd.listen(t);
        if (!('path' in t) && typeof a === 'object') t.port = a.port;
      } catch (e) {
        throw listenError(t, e, MOVE_LISTENER.agentNbd);
      }
      if ('path' in t) {
        this.sockets.push(t.path);
        // Root, and the group QEMU runs in (libvirt's kvm) when there is one.
        if (nbdGroup !== null) chownSync(t.path, process.getuid?.() ?? 0, nbdGroup);
        chmodSync(t.path, nbdGroup === null ? c.nbd.socketMode & 0o707 : c.nbd.socketMode);
      }
    }

    // In a cluster the API answers once the agent has joined (it listens first, so
    // that its member record can carry its addresses).
    let markJoined: (err?: unknown) => void = () => {};
    const joined = {
      promise: new Promise<void>((resolve, reject) => {
        markJoined = (err) => (err === undefined ? resolve() : reject(err));
      }),
    };
    joined.promise.catch(() => {});
    const ctx = {
      devices: this.devices,
      metrics: registry,
      endpoint: () => this.endpoint(),
      tcpClients: () => ({
        anonymous: this.config.nbd.anonymous,
        tls: this.config.nbd.tls.mode,
        x509: this.config.nbd.tls.cert !== undefined,
        psk: this.config.nbd.tls.pskFile !== undefined,
        named: this.config.nbd.identities
          .filter((e) => !e.startsWith('uid:'))
          .map((e) => e.slice(0, e.lastIndexOf('='))),
      }),
      status: () => this.status(),
      version: this.opts.version,
      identity: { host: this.hostName(), dataDir: this.config.dataDir, pid: process.pid },
      reservations: this.reservations,
      extraRoutes: [
        ...(this.cluster ? [clusterRoutes(this.cluster)] : []),
        notifyRoutes(this.notifier),
        this.streams.routes(),
      ],
      rescan: () => this.rescanPools('pool rescan'),
      events: (req: http.IncomingMessage, res: http.ServerResponse, url: URL) =>
        serveEvents(this.store, req, res, url, {
          cluster: this.config.cluster?.name ?? 'default',
          host: this.hostName(),
          signal: this.stopEvents.signal,
        }),
      stale: () => this.cluster?.staleness() ?? null,
      endpointOf: (host: string) => this.cluster?.member(host)?.nbd,
      ready: joined.promise,
    };
    for (const l of c.api.listen) this.apiTargets.push(hostPort(l));
    if (c.api.socket) this.apiTargets.push({ path: c.api.socket });
    for (const t of this.apiTargets) {
      const tcp = !('path' in t);
      const srv = createApiServer(ctx, {
        token: tcp ? () => (this.config.api.requireToken ? this.token : undefined) : undefined,
        log: (m) => this.log(m),
        onRequest: (method, route, status) => this.apiRequest(method, route, status),
      });
      createApiGuard(srv, {
        maxConnections: c.api.maxConnections,
        headersTimeoutMs: c.api.headersTimeoutMs,
        requestTimeoutMs: c.api.requestTimeoutMs,
      });
      if (!tcp) await this.prepareSocket(t.path, apiGroup, MOVE_LISTENER.agentApiSocket);
      await new Promise<void>((resolve, reject) => {
        srv.once('error', (e) => reject(listenError(t, e, MOVE_LISTENER.agentApi)));
        if ('path' in t) srv.listen(t.path, () => resolve());
        else srv.listen(t.port, t.host, () => resolve());
      });
      srv.on('error', (e) => this.log(`api listener: ${e.message}`));
      this.apiServers.push(srv);
      if ('path' in t) {
        // Root's socket: whoever can open it is trusted like root.
        if (apiGroup !== null) chownSync(t.path, process.getuid?.() ?? 0, apiGroup);
        chmodSync(t.path, apiGroup === null ? c.api.socketMode & 0o707 : c.api.socketMode);
        this.sockets.push(t.path);
      } else {
        const a = srv.address();
        if (a && typeof a === 'object') t.port = a.port;
      }
    }

    for (const p of await this.devices.poolStatus()) {
      this.log(
        `pool ${p.name}: ${p.path}, ${p.media}${p.mediaSource === 'configured' ? ' (configured)' : ''}, ` +
          `capacity ${p.capacityBytes} bytes, overcommit ${p.overcommit}`,
      );
    }
    if (this.cluster && c.cluster) {
      try {
        await failpointPause('join-delay', JOIN_DELAY_MS);
        await this.joinCluster(c);
      } catch (e) {
        markJoined(e);
        throw e;
      }
    }
    await this.notifier.start();
    this.notifier.produced = notifyMetrics(registry, this.notifier);
    // Against the media last seen, which may have changed while the agent was stopped.
    await this.rescanPools('since the agent last ran', await this.storedMedia());
    if (c.events.rescanIntervalS > 0) {
      this.rescanTimer = setInterval(
        () => void this.rescanPools('periodic').catch(() => {}),
        c.events.rescanIntervalS * 1000,
      );
      this.rescanTimer.unref();
    }
    markJoined();
    for (const pr of this.devices.problems) this.log(`problem: ${pr.message}`);
    this.log(`${this.devices.list().length} device(s)`);
    if (this.opts.hollow) this.log('hollow: no files are made or opened, no NBD is served');
    this.log(`NBD on ${this.nbdTargets.map(describeTarget).join(', ') || 'nothing'}`);
    if (c.nbd.tls.mode !== 'off') this.log(`NBD TLS ${c.nbd.tls.mode}`);
    if (c.nbd.socket && !this.opts.hollow) {
      this.log(
        `NBD socket for root${nbdGroup !== null ? ` and group ${c.nbd.socketGroup}` : ' only'}` +
          `; anonymous clients: ${
            c.nbd.tls.mode === 'require'
              ? 'none (TLS is required on every connection, the socket too)'
              : c.nbd.anonymous === 'unix'
                ? 'Unix socket only'
                : c.nbd.anonymous
          }`,
      );
    }
    this.log(
      `API on ${this.apiTargets.map(describeTarget).join(', ') || 'nothing'}` +
        (this.config.api.requireToken ? ' (TCP needs the bearer token)' : ''),
    );
  }

  private apiRequest: (method: string, route: string, status: number) => void = () => {};

  /** A pool of the config: its directory, or (hollow) a name and a path with nothing behind. */
  private openPool(pc: PoolConfig): Promise<Pool> {
    return this.opts.hollow ? Promise.resolve(Pool.hollow(pc)) : Pool.open(pc);
  }

  /** This host's name: the cluster's, or the system's. */
  hostName(): string {
    return this.config.cluster?.host ?? hostname().split('.')[0]!.toLowerCase();
  }

  /**
   * Looks at every pool's medium and fullness again; a changed medium is a
   * tier.changed event for each device on the pool, a pool crossing the fullness
   * threshold a pool.full event. Returns what changed.
   */
  async rescanPools(why: string, was?: Map<string, Media>): Promise<Record<string, unknown>> {
    const before = was ?? new Map([...this.pools].map(([n, p]) => [n, p.media]));
    const media: { pool: string; before: string; after: string }[] = [];
    for (const p of this.pools.values()) {
      const ch = await p.rescan();
      const b = before.get(p.name);
      if (ch) media.push({ pool: p.name, ...ch });
      else if (b !== undefined && b !== p.media)
        media.push({ pool: p.name, before: b, after: p.media });
    }
    const served = this.devices.list().filter((d) => d.state === 'ready' || d.state === 'missing');
    const tiers = tierChanges(
      served,
      (pool) => before.get(pool),
      (pool) => this.pools.get(pool)?.media,
    );
    for (const m of media) {
      this.log(`pool ${m.pool}: medium ${m.before} → ${m.after} (${why})`);
    }
    for (const t of tiers) {
      this.notifier.emit('tier.changed', t.device, {
        before: t.before,
        after: t.after,
        pools: t.pools,
        reason: `pool medium changed (${why})`,
      });
    }
    const full: string[] = [];
    for (const st of await this.devices.poolStatus()) {
      const used = st.capacityBytes > 0 ? 1 - st.fsAvailBytes / st.capacityBytes : 0;
      const isFull = used >= this.config.events.poolFull;
      if (isFull && !this.fullPools.has(st.name)) {
        full.push(st.name);
        this.notifier.emit('pool.full', st.name, {
          usedRatio: Number(used.toFixed(4)),
          threshold: this.config.events.poolFull,
          fsAvailBytes: st.fsAvailBytes,
          capacityBytes: st.capacityBytes,
        });
      }
      if (isFull) this.fullPools.add(st.name);
      else this.fullPools.delete(st.name);
    }
    await this.saveMedia().catch((e) =>
      this.log(`pool media not recorded (next rescan tries again): ${(e as Error).message}`),
    );
    return { media, tiers, full };
  }

  /** The pools' media as recorded at the last rescan (undefined: never recorded). */
  private savedMedia: string | undefined;

  private async storedMedia(): Promise<Map<string, Media> | undefined> {
    try {
      const kv = await this.store.get(MEDIA + this.hostName());
      if (!kv) return undefined;
      this.savedMedia = kv.value;
      const m = JSON.parse(kv.value) as Record<string, Media>;
      return new Map([...this.pools].map(([n, p]) => [n, m[n] ?? p.media]));
    } catch (e) {
      this.log(`pool media last seen not read: ${(e as Error).message}`);
      return undefined;
    }
  }

  private async saveMedia(): Promise<void> {
    const v = JSON.stringify(Object.fromEntries([...this.pools].map(([n, p]) => [n, p.media])));
    if (v === this.savedMedia) return;
    await this.store.put(MEDIA + this.hostName(), v);
    this.savedMedia = v;
  }

  /** A device extended onto a pool of another medium changes tier too. */
  tierOfDevice(extents: { pool: string }[]): string[] {
    return tierOf({ name: '', extents }, (p) => this.pools.get(p)?.media);
  }

  private async joinCluster(c: AgentConfig): Promise<void> {
    const cc = c.cluster!;
    const cluster = this.cluster!;
    await cluster.join({
      host: cc.host,
      version: this.opts.version,
      pid: process.pid,
      machine: hostname(),
      dataDir: c.dataDir,
      nbd: this.endpoint(),
      api: this.apiUrls(),
      pools: (await this.devices.poolStatus()).map((p) => ({
        name: p.name,
        path: p.path,
        shared: this.pools.get(p.name)?.config.shared === true,
        media: p.media,
      })),
      startedAt: this.startedAt.toISOString(),
      ...(this.opts.hollow ? { hollow: true } : {}),
    });
    const alive = new Set(
      cluster
        .members()
        .filter((m) => m.state === 'alive')
        .map((m) => m.host),
    );
    alive.add(cc.host);
    this.log(
      `cluster ${cc.name}: host ${cc.host}, etcd ${cc.etcd.join(', ')}, ${alive.size} member(s) alive`,
    );
    // What the agent expects of etcd (quota, compaction): said once, never in the way.
    if (this.store instanceof EtcdStore) {
      etcdSizing(this.store, cc, alive.size).then(
        (s) => {
          this.log(sizingLine(s));
          for (const w of s.warnings) this.log(`cluster: WARNING: ${w}`);
        },
        (e: unknown) => this.log(`cluster: could not read etcd's size: ${(e as Error).message}`),
      );
    }
  }

  /**
   * Makes the socket's directory if need be, with socketDirMode whatever the umask
   * (a umask of 077 would otherwise leave /run/ballast 0700, and QEMU in the kvm
   * group could not reach a socket it may open). An existing directory is left as
   * it is, with a warning when the socket's group cannot reach through it.
   */
  private async prepareSocket(path: string, gid: number | null, move: string): Promise<void> {
    const dir = dirname(path);
    try {
      const made = mkdirSync(dir, { recursive: true, mode: this.config.socketDirMode });
      if (made !== undefined) {
        // Every directory it made, from the first one down.
        for (let d = dir; d.length >= made.length; d = dirname(d)) {
          chmodSync(d, this.config.socketDirMode);
          if (d === made) break;
        }
      }
    } catch (e) {
      throw new BallastError(
        'BALLAST_ADDRESS_DENIED',
        `cannot create ${dir} for ${path}: ${(e as Error).message}`,
      );
    }
    if (gid !== null && !searchable(dir, gid)) {
      this.log(
        `warning: group ${gid} cannot reach ${path}: ${dir} (or a directory above it) is not ` +
          'searchable by that group; QEMU in it will get "Permission denied"',
      );
    }
    await prepareSocketPath(path, move);
  }

  /** Where guests reach the devices: the first TCP listener and the socket. */
  endpoint(): NbdEndpoint {
    const ep: NbdEndpoint = {};
    for (const t of this.nbdTargets) {
      if ('path' in t) ep.socket ??= t.path;
      else if (!ep.tcp) {
        const host = t.host === '0.0.0.0' ? '127.0.0.1' : t.host === '::' ? '::1' : t.host;
        ep.tcp = { host, port: t.port };
      }
    }
    return ep;
  }

  /** The addresses the API listens on, as URLs (for tests and logs). */
  apiUrls(): string[] {
    return this.apiTargets.map((t) =>
      'path' in t
        ? `unix:${t.path}`
        : `http://${t.host.includes(':') ? `[${t.host}]` : t.host}:${t.port}`,
    );
  }

  async status(): Promise<Record<string, unknown>> {
    const devices = this.devices.list();
    return {
      version: this.opts.version,
      pid: process.pid,
      startedAt: this.startedAt.toISOString(),
      uptimeSeconds: Math.round((Date.now() - this.startedAt.getTime()) / 1000),
      config: this.config.source,
      dataDir: this.config.dataDir,
      ...(this.opts.hollow ? { hollow: true } : {}),
      storeRevision: this.cluster ? this.cluster.revision : await this.store.revision(),
      cluster: this.cluster?.summary(),
      nbd: this.nbdTargets.map(describeTarget),
      api: this.apiTargets.map(describeTarget),
      tokenRequired: this.config.api.requireToken,
      pools: this.pools.size,
      devices: devices.length,
      devicesUnavailable: devices.filter((d) => d.state !== 'ready').length,
      connections: this.nbd.connections.size,
      // Connections each NBD worker thread serves (the rest are on the main thread).
      nbdWorkers: this.nbd.pool?.load() ?? [],
      problems: this.devices.problems,
      recovered: this.devices.recovered,
      reloads: this.reloads,
      lastReloadError: this.lastReloadError,
    };
  }

  /**
   * SIGHUP: re-read the config. Pools and their quota, overcommit and media
   * change at once, as do the token and the token requirement; listener
   * changes need a restart. A config that does not load changes nothing.
   */
  async reload(): Promise<void> {
    let next: AgentConfig;
    try {
      next = loadConfig({
        file: this.opts.configFile,
        dataDir: this.opts.dataDir,
        apiListen: this.opts.apiListen,
      });
    } catch (e) {
      this.lastReloadError = `${(e as BallastError).code ?? 'BALLAST_INTERNAL'}: ${(e as Error).message}`;
      this.log(`reload failed, keeping the running config: ${this.lastReloadError}`);
      return;
    }
    const used = this.devices.usage();
    const keep: PoolConfig[] = [];
    for (const old of this.pools.values()) {
      if (
        !next.pools.some((p) => p.name === old.name) &&
        (used.get(old.name)?.provisioned ?? 0) > 0
      ) {
        this.log(`reload: pool ${old.name} still holds devices; kept until they are gone`);
        keep.push(old.config);
      }
    }
    const opened = new Map<string, Pool>();
    try {
      for (const pc of [...next.pools, ...keep]) opened.set(pc.name, await this.openPool(pc));
    } catch (e) {
      this.lastReloadError = `${(e as BallastError).code ?? 'BALLAST_INTERNAL'}: ${(e as Error).message}`;
      this.log(`reload failed, keeping the running config: ${this.lastReloadError}`);
      return;
    }
    const mediaBefore = new Map([...this.pools].map(([n, p]) => [n, p.media]));
    this.pools.clear();
    for (const [n, p] of opened) this.pools.set(n, p);
    const same = (a: unknown, b: unknown) => JSON.stringify(a) === JSON.stringify(b);
    if (
      !same(next.nbd.listen, this.config.nbd.listen) ||
      next.nbd.socket !== this.config.nbd.socket ||
      !same(next.api.listen, this.config.api.listen) ||
      next.api.socket !== this.config.api.socket
    ) {
      this.log('reload: listener changes take effect at the next start');
    }
    if (next.api.token !== undefined) this.token = next.api.token;
    this.config = {
      ...next,
      nbd: this.config.nbd,
      api: { ...this.config.api, token: next.api.token, requireToken: next.api.requireToken },
    };
    this.reloads++;
    this.lastReloadError = null;
    for (const n of opened.keys()) {
      if (!mediaBefore.has(n)) this.notifier.emit('pool.added', n, { path: opened.get(n)!.path });
    }
    for (const n of mediaBefore.keys()) {
      if (!opened.has(n)) this.notifier.emit('pool.removed', n, {});
    }
    await this.rescanPools('SIGHUP', mediaBefore).catch(() => {});
    this.log(`reloaded ${next.source}: ${this.pools.size} pool(s)`);
  }

  /**
   * SIGTERM: stop taking API calls and NBD connections, let the requests in
   * flight finish, flush every device, close the store.
   */
  stop(): Promise<void> {
    this.stopping ??= this.teardown();
    return this.stopping;
  }

  private async teardown(): Promise<void> {
    // Event streams last as long as their client wants: they end now (a following
    // client resumes from its last id), or the API would wait for them.
    this.stopEvents.abort();
    // Calls in flight are answered; idle keep-alive connections go now.
    for (const s of this.apiServers) s.closeIdleConnections();
    const apiClosed = Promise.all(
      this.apiServers.map((s) => new Promise<void>((resolve) => s.close(() => resolve()))),
    );
    const late = setTimeout(() => {
      for (const s of this.apiServers) s.closeAllConnections();
    }, 10_000);
    await apiClosed;
    clearTimeout(late);
    await this.streams.close();
    await this.nbd.close();
    const failed = await this.devices.flushAll();
    await this.devices.close();
    clearInterval(this.rescanTimer);
    await this.notifier.stop();
    this.fence?.close();
    await this.cluster?.leave();
    await this.changes?.close();
    await this.store.close();
    for (const p of this.sockets) rmSync(p, { force: true });
    if (failed.length > 0) {
      throw new BallastError('BALLAST_FLUSH_FAILED', `flush failed for ${failed.join(', ')}`);
    }
  }
}

/**
 * A data dir whose local store still holds devices cannot silently switch to a
 * cluster: `ballast cluster join` imports them first (docs/errors.md).
 */
async function refuseUnjoined(dataDir: string): Promise<void> {
  const file = join(dataDir, 'state.db');
  if (!existsSync(file)) return;
  const local = await SqliteStore.open(file);
  try {
    const { kvs } = await local.range('devices/', { limit: 1 });
    if (kvs.length > 0) {
      throw new BallastError(
        'BALLAST_CLUSTER_JOIN_NEEDED',
        `${file} holds this host's devices: import them into the cluster with ` +
          '`ballast cluster join --config FILE` (the agent stopped) before starting it with a cluster: section',
      );
    }
  } finally {
    await local.close();
  }
}
