// The per-host daemon: pools, devices and their NBD exports, the management
// API and /metrics, over the durable local store. `ballast agent` runs one.

import { randomBytes } from 'node:crypto';
import {
  chmodSync,
  chownSync,
  closeSync,
  constants,
  fsyncSync,
  linkSync,
  mkdirSync,
  openSync,
  readFileSync,
  rmSync,
  writeSync,
} from 'node:fs';
import type http from 'node:http';
import { dirname, join } from 'node:path';
import { type ListenTarget, NbdServer } from '../nbd/server.js';
import { createApiServer } from './api.js';
import { createApiGuard } from './api-guard.js';
import type { NbdEndpoint } from './attach.js';
import { DynamicCatalog } from './catalog.js';
import { type AgentConfig, loadConfig, type PoolConfig } from './config.js';
import { DeviceManager } from './devices.js';
import { BallastError } from './errors.js';
import { describeTarget, listenError, prepareSocketPath } from './listen.js';
import { createMetrics } from './metrics.js';
import { Pool } from './pools.js';
import { ReservationManager } from './reservations.js';
import { SqliteStore } from './store/sqlite-store.js';
import { IdentityMap, loadTls, peerUid, sourceKey } from './tls-config.js';

export interface AgentOptions {
  configFile?: string;
  dataDir?: string;
  version: string;
  log?: (msg: string) => void;
  /** Log every NBD connection and refused request. */
  verbose?: boolean;
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

/** The gid for the NBD socket: the group if it exists; a configured group must. */
export function socketGroupId(
  name: string | null,
  configured: boolean,
  groupFile = '/etc/group',
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
      `nbd.socketGroup: no group named ${JSON.stringify(name)} in ${groupFile}`,
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
  private readonly apiServers: http.Server[] = [];
  private readonly sockets: string[] = [];
  private readonly nbdTargets: ListenTarget[] = [];
  private readonly apiTargets: ListenTarget[] = [];
  private readonly startedAt = new Date();
  private stopping: Promise<void> | null = null;
  private reloads = 0;
  private lastReloadError: string | null = null;

  private constructor(
    config: AgentConfig,
    token: string,
    private readonly store: SqliteStore,
    private readonly opts: AgentOptions,
  ) {
    this.config = config;
    this.token = token;
    const credentials = loadTls(config.nbd.tls);
    const identities = new IdentityMap(config.nbd.identities);
    this.reservations = new ReservationManager(
      store,
      () => this.nbd,
      (name) => this.devices.liveNames().includes(name),
      (m) => this.log(m),
    );
    this.nbd = new NbdServer({
      catalog: this.catalog,
      tls: credentials ? { mode: config.nbd.tls.mode, credentials } : undefined,
      identify: identities.size > 0 ? (c) => identities.lookup(c.raw, peerUid) : undefined,
      authorize: (exp, conn) =>
        anonymousRefusal(config.nbd.anonymous, conn) ?? this.reservations.authorize(exp.name, conn),
      readOnlyFor: (exp, conn) => this.reservations.readOnlyFor(exp.name, conn),
      maxConnections: config.nbd.maxConnections,
      handshakeTimeoutMs: config.nbd.handshakeTimeoutMs,
      maxHandshakes: config.nbd.maxHandshakes,
      maxPerSource: config.nbd.maxPerSource,
      sourceOf: sourceKey,
      maxInFlight: config.limits.maxInFlight,
      maxBufferedBytes: config.limits.maxBufferedBytes,
      log: (level, msg) => {
        if (level !== 'debug' || opts.verbose) this.log(msg);
      },
    });
    this.devices = new DeviceManager(
      store,
      this.pools,
      this.catalog,
      () => this.nbd,
      (m) => this.log(m),
    );
    this.devices.exportAccess = (name) => this.reservations.access(name);
    this.devices.onRemoved = (name) => this.reservations.forget(name);
  }

  log(msg: string): void {
    (this.opts.log ?? ((m: string) => process.stderr.write(`ballast: ${m}\n`)))(msg);
  }

  /** Loads the config, opens the store and pools, reconciles, and starts listening. */
  static async start(opts: AgentOptions): Promise<Agent> {
    const config = loadConfig({ file: opts.configFile, dataDir: opts.dataDir });
    try {
      mkdirSync(config.dataDir, { recursive: true, mode: 0o700 });
    } catch (e) {
      throw new BallastError(
        'BALLAST_DATA_DIR',
        `cannot create the data directory ${config.dataDir}: ${(e as Error).message}`,
      );
    }
    const store = await SqliteStore.open(join(config.dataDir, 'state.db'));
    let agent: Agent | undefined;
    try {
      const token = config.api.token ?? loadOrCreateToken(config.api.tokenFile).token;
      agent = new Agent(config, token, store, opts);
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
    for (const pc of c.pools) this.pools.set(pc.name, await Pool.open(pc));
    await this.reservations.load();
    await this.devices.reconcile();
    const registry = createMetrics(this.devices, () => this.nbd, {
      store: this.store,
      onApi: (f) => {
        this.apiRequest = f;
      },
    });

    for (const l of c.nbd.listen) this.nbdTargets.push(hostPort(l));
    if (c.nbd.socket) this.nbdTargets.push({ path: c.nbd.socket });
    const nbdGroup = socketGroupId(c.nbd.socketGroup, c.nbd.socketGroupConfigured);
    for (const t of this.nbdTargets) {
      if ('path' in t) await this.prepareSocket(t.path);
      try {
        const a = await this.nbd.listen(t);
        if (!('path' in t) && typeof a === 'object') t.port = a.port;
      } catch (e) {
        throw listenError(t, e);
      }
      if ('path' in t) {
        this.sockets.push(t.path);
        // Root, and the group QEMU runs in (libvirt's kvm) when there is one.
        if (nbdGroup !== null) {
          chownSync(t.path, process.getuid?.() ?? 0, nbdGroup);
          chmodSync(t.path, 0o660);
        } else {
          chmodSync(t.path, 0o600);
        }
      }
    }

    const ctx = {
      devices: this.devices,
      metrics: registry,
      endpoint: () => this.endpoint(),
      status: () => this.status(),
      version: this.opts.version,
      reservations: this.reservations,
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
      if (!tcp) await this.prepareSocket(t.path);
      await new Promise<void>((resolve, reject) => {
        srv.once('error', (e) => reject(listenError(t, e)));
        if ('path' in t) srv.listen(t.path, () => resolve());
        else srv.listen(t.port, t.host, () => resolve());
      });
      srv.on('error', (e) => this.log(`api listener: ${e.message}`));
      this.apiServers.push(srv);
      if ('path' in t) {
        // Root's socket: whoever can open it is trusted like root.
        chmodSync(t.path, 0o600);
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
    for (const pr of this.devices.problems) this.log(`problem: ${pr.message}`);
    this.log(`${this.devices.list().length} device(s)`);
    this.log(`NBD on ${this.nbdTargets.map(describeTarget).join(', ') || 'nothing'}`);
    if (c.nbd.tls.mode !== 'off') this.log(`NBD TLS ${c.nbd.tls.mode}`);
    if (c.nbd.socket) {
      this.log(
        `NBD socket for root${nbdGroup !== null ? ` and group ${c.nbd.socketGroup}` : ' only'}` +
          `; anonymous clients: ${c.nbd.anonymous === 'unix' ? 'Unix socket only' : c.nbd.anonymous}`,
      );
    }
    this.log(
      `API on ${this.apiTargets.map(describeTarget).join(', ') || 'nothing'}` +
        (this.config.api.requireToken ? ' (TCP needs the bearer token)' : ''),
    );
  }

  private apiRequest: (method: string, route: string, status: number) => void = () => {};

  private async prepareSocket(path: string): Promise<void> {
    try {
      mkdirSync(dirname(path), { recursive: true, mode: 0o755 });
    } catch (e) {
      throw new BallastError(
        'BALLAST_ADDRESS_DENIED',
        `cannot create ${dirname(path)} for ${path}: ${(e as Error).message}`,
      );
    }
    await prepareSocketPath(path);
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
      storeRevision: await this.store.revision(),
      nbd: this.nbdTargets.map(describeTarget),
      api: this.apiTargets.map(describeTarget),
      tokenRequired: this.config.api.requireToken,
      pools: this.pools.size,
      devices: devices.length,
      devicesUnavailable: devices.filter((d) => d.state !== 'ready').length,
      connections: this.nbd.connections.size,
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
      next = loadConfig({ file: this.opts.configFile, dataDir: this.opts.dataDir });
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
      for (const pc of [...next.pools, ...keep]) opened.set(pc.name, await Pool.open(pc));
    } catch (e) {
      this.lastReloadError = `${(e as BallastError).code ?? 'BALLAST_INTERNAL'}: ${(e as Error).message}`;
      this.log(`reload failed, keeping the running config: ${this.lastReloadError}`);
      return;
    }
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
    await this.nbd.close();
    const failed = await this.devices.flushAll();
    await this.devices.close();
    await this.store.close();
    for (const p of this.sockets) rmSync(p, { force: true });
    if (failed.length > 0) {
      throw new BallastError('BALLAST_FLUSH_FAILED', `flush failed for ${failed.join(', ')}`);
    }
  }
}
