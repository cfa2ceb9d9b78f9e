// The agent's YAML configuration: parsed, validated (errors name the key and
// the problem), defaults filled in. Sizes and addresses are checked here so
// the rest of the agent only sees well-formed values.

import { readFileSync } from 'node:fs';
import { isAbsolute, join, resolve } from 'node:path';
import { parse as parseYaml } from 'yaml';
import { defaultWorkers } from '../nbd/workers.js';
import { type ClusterConfig, parseClusterConfig } from './cluster-config.js';
import { BallastError } from './errors.js';
import type { TlsSettings } from './tls-config.js';
import { parseSize } from './units.js';

export type Media = 'ssd' | 'hdd' | 'nvme' | 'unknown';
export const MEDIA: readonly Media[] = ['ssd', 'hdd', 'nvme', 'unknown'];

export interface PoolConfig {
  name: string;
  path: string;
  /** Overrides detection. */
  media?: Media;
  /** Capacity cap in bytes (default: the filesystem's size). */
  quota?: number;
  /** Provisioned bytes may reach capacity × overcommit. */
  overcommit: number;
  /** On storage every host of the cluster mounts at the same path: any of them serves its devices. */
  shared?: boolean;
}

export interface ListenConfig {
  listen: string[];
  socket: string | null;
}

export interface AgentConfig {
  dataDir: string;
  nbd: ListenConfig & {
    maxConnections: number;
    /** 0: no deadline. */
    handshakeTimeoutMs: number;
    /** Connections in handshake at once; past it the oldest is closed. */
    maxHandshakes: number;
    /** Connections per source address or Unix peer uid; 0: no limit. */
    maxPerSource: number;
    /** Threads serving established connections; 1 (the default): one event loop; `auto`: the cores available. */
    workers: number;
    /**
     * Who may open a device without a name (TLS or `identities`): 'unix' (the
     * default: only on the Unix socket, whose mode guards it), 'any', 'none'.
     */
    anonymous: 'unix' | 'any' | 'none';
    /** The group that may connect to the NBD socket (mode 0660); null: root only (0600). */
    socketGroup: string | null;
    /** Whether socketGroup was configured (then it must exist) or is the default. */
    socketGroupConfigured: boolean;
    /** The socket's mode: 0660 with a group, 0600 without, unless configured. */
    socketMode: number;
    /** STARTTLS for the NBD listeners. */
    tls: TlsSettings;
    /** ADDRESS=NAME / uid:N=NAME: names for clients TLS does not name. */
    identities: string[];
  };
  api: ListenConfig & {
    /** A group that may use the API socket (whoever can is trusted like root); null: root only. */
    socketGroup: string | null;
    /** The API socket's mode: 0600, or 0660 with a group, unless configured. */
    socketMode: number;
    token?: string;
    tokenFile: string;
    /** Demand the bearer token on every TCP listener, loopback included (the default). */
    requireToken: boolean;
    /** Open connections per TCP listener; past it the oldest idle one is closed. */
    maxConnections: number;
    /** A request's headers must arrive within this time (ms). */
    headersTimeoutMs: number;
    /** A whole request, body included, must arrive within this time (ms). */
    requestTimeoutMs: number;
  };
  /**
   * The mode of a socket directory the agent creates (/run/ballast): 0755, so that
   * QEMU in the socket's group reaches the socket whatever the umask.
   */
  socketDirMode: number;
  pools: PoolConfig[];
  limits: {
    maxInFlight: number;
    maxBufferedBytes: number;
    /** Data buffers held by all the connections one thread serves (nbd/buffers.ts). */
    threadBufferedBytes: number;
  };
  /** Configuration-change events: pool rescans and delivery to recipients. */
  events: {
    /** Seconds between rescans of the pools' media and capacity (0: only on SIGHUP and `pool rescan`). */
    rescanIntervalS: number;
    /** A pool is full once this share of its filesystem is used (pool.full when crossed). */
    poolFull: number;
    /** Deadline of one delivery POST, ms. */
    deliveryTimeoutMs: number;
    /** Delivery retries back off up to this, ms. */
    retryCapMs: number;
  };
  /** Several hosts, one catalog in etcd; absent: a single host on the embedded store. */
  cluster?: ClusterConfig;
  /** Where the config came from, for messages. */
  source: string;
}

export const DEFAULT_DATA_DIR = '/var/lib/ballast';
export const DEFAULT_RUN_DIR = '/run/ballast';
export const DEFAULT_NBD_LISTEN = '127.0.0.1:10809';
export const DEFAULT_API_LISTEN = '127.0.0.1:10810';
export const DEFAULT_API_SOCKET = join(DEFAULT_RUN_DIR, 'api.sock');

const NAME = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$/;

class Checker {
  constructor(private readonly source: string) {}

  fail(key: string, problem: string): never {
    throw new BallastError('BALLAST_CONFIG_INVALID', `${this.source}: ${key}: ${problem}`);
  }

  object(v: unknown, key: string): Record<string, unknown> {
    if (v === undefined || v === null) return {};
    if (typeof v !== 'object' || Array.isArray(v)) this.fail(key, 'must be a mapping');
    return v as Record<string, unknown>;
  }

  known(o: Record<string, unknown>, key: string, allowed: string[]): void {
    for (const k of Object.keys(o)) {
      if (!allowed.includes(k)) {
        this.fail(key ? `${key}.${k}` : k, `unknown key (expected one of: ${allowed.join(', ')})`);
      }
    }
  }

  string(v: unknown, key: string): string {
    if (typeof v !== 'string' || v === '') this.fail(key, 'must be a non-empty string');
    return v;
  }

  path(v: unknown, key: string): string {
    const s = this.string(v, key);
    if (!isAbsolute(s)) this.fail(key, `must be an absolute path, got ${JSON.stringify(s)}`);
    return resolve(s);
  }

  size(v: unknown, key: string): number {
    if (typeof v === 'number' && Number.isSafeInteger(v) && v > 0) return v;
    if (typeof v !== 'string') this.fail(key, 'must be a size such as 500G or 2T');
    try {
      const n = parseSize(v);
      if (n <= 0) this.fail(key, 'must be greater than zero');
      return n;
    } catch (e) {
      if (e instanceof BallastError && e.code === 'BALLAST_BAD_SIZE') this.fail(key, e.message);
      throw e;
    }
  }

  number(v: unknown, key: string, min: number, max: number): number {
    if (typeof v !== 'number' || !Number.isFinite(v) || v < min || v > max) {
      this.fail(key, `must be a number from ${min} to ${max}`);
    }
    return v;
  }

  int(v: unknown, key: string, min: number, max: number): number {
    const n = this.number(v, key, min, max);
    if (!Number.isInteger(n)) this.fail(key, 'must be a whole number');
    return n;
  }

  listen(v: unknown, key: string): string[] {
    if (v === undefined) return [];
    if (v === null || v === false) return [];
    const list = Array.isArray(v) ? v : [v];
    return list.map((x, i) => {
      const k = Array.isArray(v) ? `${key}[${i}]` : key;
      const s = typeof x === 'number' ? String(x) : this.string(x, k);
      if (
        !/^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]*):\d{1,5}$/.test(s) ||
        Number(s.split(':').pop()) > 65535
      ) {
        this.fail(k, `must be HOST:PORT, got ${JSON.stringify(s)}`);
      }
      return s;
    });
  }
}

export interface LoadOptions {
  /** Config file path; none means defaults only. */
  file?: string;
  /** --data-dir, which wins over the file's dataDir. */
  dataDir?: string;
  /** --api-listen, which wins over the file's api.listen ('none': no TCP listener). */
  apiListen?: string;
}

/**
 * A file mode: a string of octal digits ("0660", "660", "0o660") or a YAML number
 * whose digits are octal (660, as YAML reads 0660). The owner keeps read and write.
 */
function fileMode(c: Checker, v: unknown, key: string): number {
  const text = typeof v === 'number' && Number.isInteger(v) ? String(v) : v;
  const m = typeof text === 'string' ? /^(?:0o?)?([0-7]{3})$/.exec(text) : null;
  if (!m) c.fail(key, 'must be an octal mode such as "0660"');
  const mode = Number.parseInt(m[1] as string, 8);
  if ((mode & 0o600) !== 0o600) c.fail(key, 'must leave the owner (root) read and write');
  if (mode & 0o002) c.fail(key, 'must not let every user write (o+w)');
  return mode;
}

export function loadConfig(opts: LoadOptions): AgentConfig {
  let doc: unknown = {};
  const source = opts.file ?? '(defaults)';
  if (opts.file) {
    let text: string;
    try {
      text = readFileSync(opts.file, 'utf8');
    } catch (e) {
      throw new BallastError(
        'BALLAST_CONFIG_UNREADABLE',
        `cannot read config ${opts.file}: ${(e as Error).message}`,
      );
    }
    try {
      doc = parseYaml(text) ?? {};
    } catch (e) {
      throw new BallastError(
        'BALLAST_CONFIG_INVALID',
        `${opts.file}: not valid YAML: ${(e as Error).message.split('\n')[0]}`,
      );
    }
  }
  if (
    opts.apiListen !== undefined &&
    doc !== null &&
    typeof doc === 'object' &&
    !Array.isArray(doc)
  ) {
    const d = doc as Record<string, unknown>;
    const api =
      d.api !== null && typeof d.api === 'object' ? (d.api as Record<string, unknown>) : {};
    d.api = { ...api, listen: opts.apiListen === 'none' ? null : opts.apiListen };
  }
  return validateConfig(doc, source, opts.dataDir);
}

export function validateConfig(doc: unknown, source: string, dataDirFlag?: string): AgentConfig {
  const c: Checker = new Checker(source);
  const top = c.object(doc, '(top level)');
  c.known(top, '', [
    'dataDir',
    'nbd',
    'api',
    'socketDirMode',
    'pools',
    'limits',
    'cluster',
    'events',
  ]);
  const ev = c.object(top.events, 'events');
  c.known(ev, 'events', ['rescanInterval', 'poolFull', 'deliveryTimeout', 'retryCap']);
  const cluster = parseClusterConfig(top.cluster, (k, problem) => c.fail(k, problem));
  const dataDir = dataDirFlag
    ? resolve(dataDirFlag)
    : top.dataDir !== undefined
      ? c.path(top.dataDir, 'dataDir')
      : DEFAULT_DATA_DIR;
  // The sockets stay in /run/ballast whatever the data directory, so that the
  // CLI finds the agent without being told where its data lives.
  const runDir = DEFAULT_RUN_DIR;

  const nbd = c.object(top.nbd, 'nbd');
  c.known(nbd, 'nbd', [
    'listen',
    'socket',
    'maxConnections',
    'handshakeTimeout',
    'handshakeLimit',
    'maxHandshakes',
    'maxPerSource',
    'workers',
    'anonymous',
    'socketGroup',
    'socketMode',
    'tls',
    'identities',
  ]);
  const tls = c.object(nbd.tls, 'nbd.tls');
  c.known(tls, 'nbd.tls', ['mode', 'cert', 'key', 'ca', 'pskFile']);
  const tlsMode = tls.mode === undefined ? 'off' : c.string(tls.mode, 'nbd.tls.mode');
  if (tlsMode !== 'off' && tlsMode !== 'allow' && tlsMode !== 'require') {
    c.fail('nbd.tls.mode', 'must be off, allow or require');
  }
  const tlsFile = (k: 'cert' | 'key' | 'ca' | 'pskFile') =>
    tls[k] === undefined ? undefined : c.path(tls[k], `nbd.tls.${k}`);
  const identities =
    nbd.identities === undefined
      ? []
      : Array.isArray(nbd.identities)
        ? nbd.identities.map((x: unknown, i: number) => c.string(x, `nbd.identities[${i}]`))
        : c.fail('nbd.identities', 'must be a list of ADDRESS=NAME or uid:N=NAME');
  const api = c.object(top.api, 'api');
  c.known(api, 'api', [
    'listen',
    'socket',
    'socketGroup',
    'socketMode',
    'token',
    'tokenFile',
    'requireToken',
    'maxConnections',
    'headersTimeout',
    'requestTimeout',
  ]);
  const limits = c.object(top.limits, 'limits');
  c.known(limits, 'limits', ['maxInFlight', 'maxBufferedBytes', 'threadBufferedBytes']);

  const socketOf = (v: unknown, key: string, dflt: string): string | null => {
    if (v === undefined) return dflt;
    if (v === null || v === false) return null;
    return c.path(v, key);
  };

  const pools: PoolConfig[] = [];
  if (top.pools === undefined) {
    pools.push({ name: 'default', path: join(dataDir, 'pools', 'default'), overcommit: 1 });
  } else {
    const list = top.pools;
    if (!Array.isArray(list) || list.length === 0) {
      c.fail('pools', 'must be a non-empty list of pools');
    }
    const names = new Set<string>();
    const paths = new Set<string>();
    list.forEach((p: unknown, i: number) => {
      const key = `pools[${i}]`;
      const o = c.object(p, key);
      c.known(o, key, ['name', 'path', 'media', 'quota', 'overcommit', 'shared']);
      const name = c.string(o.name, `${key}.name`);
      if (!NAME.test(name)) {
        c.fail(
          `${key}.name`,
          'letters, digits, ".", "_" and "-" only, at most 63, not starting with a symbol',
        );
      }
      if (names.has(name)) c.fail(`${key}.name`, `pool ${JSON.stringify(name)} is defined twice`);
      names.add(name);
      const path = c.path(o.path, `${key}.path`);
      if (paths.has(path)) c.fail(`${key}.path`, `${path} is used by another pool`);
      paths.add(path);
      const pool: PoolConfig = { name, path, overcommit: 1 };
      if (o.media !== undefined) {
        if (!MEDIA.includes(o.media as Media)) {
          c.fail(`${key}.media`, `must be one of ${MEDIA.join(', ')}`);
        }
        pool.media = o.media as Media;
      }
      if (o.quota !== undefined) pool.quota = c.size(o.quota, `${key}.quota`);
      if (o.overcommit !== undefined)
        pool.overcommit = c.number(o.overcommit, `${key}.overcommit`, 0.01, 1000);
      if (o.shared !== undefined) {
        if (typeof o.shared !== 'boolean') c.fail(`${key}.shared`, 'must be true or false');
        if (o.shared && !cluster) c.fail(`${key}.shared`, 'a shared pool needs a cluster: section');
        pool.shared = o.shared;
      }
      pools.push(pool);
    });
  }

  const token = api.token === undefined ? undefined : c.string(api.token, 'api.token');
  if (token !== undefined && token.length < 16)
    c.fail('api.token', 'must be at least 16 characters');

  if (api.requireToken !== undefined && typeof api.requireToken !== 'boolean') {
    c.fail('api.requireToken', 'must be true or false');
  }
  const apiListen =
    api.listen === undefined ? [DEFAULT_API_LISTEN] : c.listen(api.listen, 'api.listen');
  if (nbd.handshakeLimit !== undefined && nbd.handshakeTimeout !== undefined) {
    c.fail('nbd.handshakeTimeout', 'is the former name of nbd.handshakeLimit: give only one');
  }
  const handshakeLimit =
    nbd.handshakeLimit !== undefined
      ? c.number(nbd.handshakeLimit, 'nbd.handshakeLimit', 0, 3600)
      : nbd.handshakeTimeout !== undefined
        ? c.number(nbd.handshakeTimeout, 'nbd.handshakeTimeout', 0, 3600)
        : 10;
  const anonymous = nbd.anonymous === undefined ? 'unix' : nbd.anonymous;
  if (anonymous !== 'unix' && anonymous !== 'any' && anonymous !== 'none') {
    c.fail('nbd.anonymous', 'must be unix, any or none');
  }
  const socketGroup =
    nbd.socketGroup === undefined
      ? 'kvm'
      : nbd.socketGroup === null || nbd.socketGroup === false
        ? null
        : c.string(nbd.socketGroup, 'nbd.socketGroup');
  const apiGroup =
    api.socketGroup === undefined || api.socketGroup === null || api.socketGroup === false
      ? null
      : c.string(api.socketGroup, 'api.socketGroup');
  const seconds = (v: unknown, key: string, dflt: number, min: number) =>
    (v === undefined ? dflt : c.number(v, key, min, 3600)) * 1000;

  return {
    dataDir,
    nbd: {
      // No TCP listener unless configured: loopback is no trust boundary, and
      // the Unix socket is what this host's QEMU uses.
      listen: nbd.listen === undefined ? [] : c.listen(nbd.listen, 'nbd.listen'),
      socket: socketOf(nbd.socket, 'nbd.socket', join(runDir, 'nbd.sock')),
      maxConnections:
        nbd.maxConnections === undefined
          ? 1024
          : c.int(nbd.maxConnections, 'nbd.maxConnections', 1, 100000),
      handshakeTimeoutMs: handshakeLimit * 1000,
      maxHandshakes:
        nbd.maxHandshakes === undefined
          ? 64
          : c.int(nbd.maxHandshakes, 'nbd.maxHandshakes', 1, 100000),
      maxPerSource:
        nbd.maxPerSource === undefined ? 0 : c.int(nbd.maxPerSource, 'nbd.maxPerSource', 0, 100000),
      workers:
        nbd.workers === undefined || nbd.workers === 'auto'
          ? defaultWorkers()
          : c.int(nbd.workers, 'nbd.workers', 1, 1024),
      anonymous,
      socketGroup,
      socketGroupConfigured: nbd.socketGroup !== undefined && socketGroup !== null,
      socketMode:
        nbd.socketMode === undefined
          ? socketGroup === null
            ? 0o600
            : 0o660
          : fileMode(c, nbd.socketMode, 'nbd.socketMode'),
      tls: {
        mode: tlsMode,
        cert: tlsFile('cert'),
        key: tlsFile('key'),
        ca: tlsFile('ca'),
        pskFile: tlsFile('pskFile'),
      },
      identities,
    },
    api: {
      listen: apiListen,
      socket: socketOf(api.socket, 'api.socket', join(runDir, 'api.sock')),
      socketGroup: apiGroup,
      socketMode:
        api.socketMode === undefined
          ? apiGroup === null
            ? 0o600
            : 0o660
          : fileMode(c, api.socketMode, 'api.socketMode'),
      token,
      // Every TCP listener demands the token unless told otherwise: loopback
      // is shared by every user and container of the host.
      requireToken: api.requireToken !== false || apiListen.some((l) => !isLoopback(l)),
      maxConnections:
        api.maxConnections === undefined
          ? 128
          : c.int(api.maxConnections, 'api.maxConnections', 1, 100000),
      headersTimeoutMs: seconds(api.headersTimeout, 'api.headersTimeout', 10, 0.1),
      requestTimeoutMs: seconds(api.requestTimeout, 'api.requestTimeout', 30, 0.1),
      tokenFile:
        api.tokenFile === undefined
          ? join(dataDir, 'api-token')
          : c.path(api.tokenFile, 'api.tokenFile'),
    },
    socketDirMode:
      top.socketDirMode === undefined ? 0o755 : fileMode(c, top.socketDirMode, 'socketDirMode'),
    pools,
    limits: {
      maxInFlight:
        limits.maxInFlight === undefined
          ? 64
          : c.int(limits.maxInFlight, 'limits.maxInFlight', 1, 4096),
      maxBufferedBytes:
        limits.maxBufferedBytes === undefined
          ? 64 * 1024 * 1024
          : c.size(limits.maxBufferedBytes, 'limits.maxBufferedBytes'),
      threadBufferedBytes:
        limits.threadBufferedBytes === undefined
          ? 16 * 1024 * 1024
          : c.size(limits.threadBufferedBytes, 'limits.threadBufferedBytes'),
    },
    events: {
      rescanIntervalS:
        ev.rescanInterval === undefined
          ? 60
          : c.number(ev.rescanInterval, 'events.rescanInterval', 0, 86400),
      poolFull: ev.poolFull === undefined ? 0.9 : c.number(ev.poolFull, 'events.poolFull', 0.01, 1),
      deliveryTimeoutMs:
        (ev.deliveryTimeout === undefined
          ? 5
          : c.number(ev.deliveryTimeout, 'events.deliveryTimeout', 0.1, 600)) * 1000,
      retryCapMs:
        (ev.retryCap === undefined ? 300 : c.number(ev.retryCap, 'events.retryCap', 0.1, 86400)) *
        1000,
    },
    ...(cluster ? { cluster } : {}),
    source,
  };
}

/** Whether HOST:PORT only takes connections from this host. */
export function isLoopback(listen: string): boolean {
  const host = listen.slice(0, listen.lastIndexOf(':')).replace(/^\[|\]$/g, '');
  // An empty host binds 127.0.0.1, as with `ballast serve --listen :PORT`.
  return host === '' || host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}
