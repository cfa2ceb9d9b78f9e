// The agent's `cluster:` section. Absent: a single host on its embedded store,
// exactly as before. Present: the agent's state lives in etcd under
// /ballast/<name>/, shared by every agent of the cluster.

import { hostname } from 'node:os';
import { isAbsolute, resolve } from 'node:path';

export interface ClusterConfig {
  /** The cluster's name: its keys live under /ballast/<name>/ so one etcd can hold several. */
  name: string;
  /** etcd client URLs (http:// or https://). */
  etcd: string[];
  /** This host's name in the cluster (default: the hostname). */
  host: string;
  /** Seconds the membership lease lives without a keepalive. */
  leaseTtl: number;
  /** Per-call deadline for etcd requests, in milliseconds. */
  timeoutMs: number;
  /**
   * The deadline of a change's store part, in milliseconds: the call and, if its
   * answer does not come, finding out whether it was made (cluster/changes.ts).
   */
  changeTimeoutMs: number;
  /** Fenced I/O to shared devices is held this long, then fails with EIO (milliseconds). */
  holdMs: number;
  /** Taken off the lease deadline: time for a checked write to reach the file (milliseconds). */
  fenceMarginMs: number;
  /** How long an agent starting waits for etcd to answer before it gives up (milliseconds). */
  startTimeoutMs: number;
  /** A Linux watchdog device to pet while the lease is valid. */
  watchdog?: string;
  /** PEM files for etcd client TLS (https:// endpoints). */
  ca?: string;
  cert?: string;
  key?: string;
  /** The key prefix: /ballast/<name>/. */
  prefix: string;
}

const HOST = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const CLUSTER = /^[a-z0-9][a-z0-9._-]{0,62}$/;
const KEYS = [
  'name',
  'etcd',
  'host',
  'leaseTtl',
  'timeout',
  'changeTimeout',
  'holdTimeout',
  'fenceMargin',
  'startTimeout',
  'watchdog',
  'ca',
  'cert',
  'key',
];

/** The host name Ballast uses by default: the system's, lower-cased, up to its first dot. */
export function defaultHostName(): string {
  return hostname().toLowerCase().split('.')[0] || 'localhost';
}

/**
 * Validates the `cluster:` mapping. `fail(key, problem)` throws the config's
 * own error (BALLAST_CONFIG_INVALID naming the file and the key).
 */
export function parseClusterConfig(
  v: unknown,
  fail: (key: string, problem: string) => never,
): ClusterConfig | undefined {
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'object' || Array.isArray(v)) fail('cluster', 'must be a mapping');
  const o = v as Record<string, unknown>;
  for (const k of Object.keys(o)) {
    if (!KEYS.includes(k))
      fail(`cluster.${k}`, `unknown key (expected one of: ${KEYS.join(', ')})`);
  }
  const name = o.name === undefined ? 'default' : o.name;
  if (typeof name !== 'string' || !CLUSTER.test(name)) {
    fail('cluster.name', '1 to 63 of a-z 0-9 . _ -, starting with a letter or digit');
  }
  const list = typeof o.etcd === 'string' ? [o.etcd] : o.etcd;
  if (!Array.isArray(list) || list.length === 0) {
    fail('cluster.etcd', 'must list the etcd endpoints, e.g. [http://127.0.0.1:2379]');
  }
  const etcd = list.map((e: unknown, i: number) => {
    const key = `cluster.etcd[${i}]`;
    if (typeof e !== 'string') fail(key, 'must be a URL such as http://127.0.0.1:2379');
    let u: URL;
    try {
      u = new URL(e);
    } catch {
      fail(key, `not a URL: ${JSON.stringify(e)}`);
    }
    if ((u.protocol !== 'http:' && u.protocol !== 'https:') || !u.port || u.pathname !== '/') {
      fail(key, `must be http://HOST:PORT or https://HOST:PORT, got ${JSON.stringify(e)}`);
    }
    return `${u.protocol}//${u.host}`;
  });
  const schemes = new Set(etcd.map((e) => e.split(':')[0]));
  if (schemes.size > 1) fail('cluster.etcd', 'mixes http:// and https:// endpoints');
  const host = o.host === undefined ? defaultHostName() : o.host;
  if (typeof host !== 'string' || !HOST.test(host)) {
    fail('cluster.host', '1 to 63 of a-z 0-9 . _ -, starting with a letter or digit');
  }
  const num = (key: string, val: unknown, dflt: number, min: number, max: number): number => {
    if (val === undefined) return dflt;
    if (typeof val !== 'number' || !Number.isInteger(val) || val < min || val > max) {
      fail(`cluster.${key}`, `must be a whole number from ${min} to ${max}`);
    }
    return val;
  };
  const leaseTtl = num('leaseTtl', o.leaseTtl, 5, 2, 300);
  // A call must give up well inside the lease, so that a partitioned agent
  // notices before its lease runs out.
  const timeoutMs = num('timeout', o.timeout, Math.min(2000, leaseTtl * 400), 100, 60_000);
  // Room for the call, an etcd election and the read-back after it.
  const changeTimeoutMs = num(
    'changeTimeout',
    o.changeTimeout,
    Math.max(3 * timeoutMs, 3000),
    timeoutMs,
    600_000,
  );
  const holdMs = num('holdTimeout', o.holdTimeout, 10, 0, 3600) * 1000;
  const fenceMarginMs = num(
    'fenceMargin',
    o.fenceMargin,
    Math.min(1000, Math.max(250, leaseTtl * 100)),
    50,
    leaseTtl * 500,
  );
  // etcd slow to answer (a loaded host) or not up yet (booted together) is waited for
  const startTimeoutMs = num('startTimeout', o.startTimeout, 30, 0, 3600) * 1000;
  const file = (k: 'ca' | 'cert' | 'key' | 'watchdog'): string | undefined => {
    const f = o[k];
    if (f === undefined) return undefined;
    if (typeof f !== 'string' || !isAbsolute(f)) fail(`cluster.${k}`, 'must be an absolute path');
    return resolve(f);
  };
  const tls = { ca: file('ca'), cert: file('cert'), key: file('key') };
  const https = schemes.has('https');
  if (!https && (tls.ca || tls.cert || tls.key)) {
    fail('cluster', 'ca/cert/key are for https:// endpoints');
  }
  if ((tls.cert === undefined) !== (tls.key === undefined)) {
    fail('cluster', 'cert and key go together');
  }
  const out: ClusterConfig = {
    name,
    etcd,
    host,
    leaseTtl,
    timeoutMs,
    changeTimeoutMs,
    holdMs,
    fenceMarginMs,
    startTimeoutMs,
    prefix: `/ballast/${name}/`,
  };
  const watchdog = file('watchdog');
  if (watchdog) out.watchdog = watchdog;
  if (tls.ca) out.ca = tls.ca;
  if (tls.cert) out.cert = tls.cert;
  if (tls.key) out.key = tls.key;
  return out;
}
