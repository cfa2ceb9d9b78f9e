// What the agent expects of the etcd it runs on, checked at start and shown by
// `ballast cluster status`: a backend quota that fits the cluster, history that
// gets compacted, room left. etcd answers its size and revisions over gRPC; its
// quota only on /metrics (`etcd_server_quota_backend_bytes`), read best effort.

import { readFileSync } from 'node:fs';
import http from 'node:http';
import https from 'node:https';
import type { ClusterConfig } from '../agent/cluster-config.js';
import type { EtcdStore } from './etcd-store.js';

/** etcd's default backend quota (`--quota-backend-bytes` unset): 2 GiB. */
export const DEFAULT_QUOTA = 2 * 1024 ** 3;
/** A cluster this large should not run on the default quota. */
export const LARGE_DEVICES = 10_000;
export const LARGE_MEMBERS = 100;
/** More history than this and nothing compacts it (each change is several revisions). */
export const HISTORY_LIMIT = 1_000_000;
/** A database past this share of its quota is close to etcd's NOSPACE alarm. */
export const FULL_SHARE = 0.5;

export interface Sizing {
  /** The largest member's database file, bytes. */
  dbSize: number;
  /** The backend quota, bytes; null when /metrics did not say. */
  quota: number | null;
  revision: number;
  compactRevision: number;
  devices: number;
  members: number;
  /** What to change, one line each; empty when all is well. */
  warnings: string[];
}

const MiB = 1024 * 1024;
const mib = (n: number) => `${Math.round(n / MiB)} MiB`;

/** The warnings for a set of figures (pure: tested on its own). */
export function judgeSizing(f: Omit<Sizing, 'warnings'>): string[] {
  const out: string[] = [];
  const large = f.devices >= LARGE_DEVICES || f.members >= LARGE_MEMBERS;
  if (f.quota === DEFAULT_QUOTA && large) {
    out.push(
      `etcd runs on its default 2 GiB quota with ${f.devices} devices and ${f.members} members: ` +
        'start its members with --quota-backend-bytes=8589934592 (8 GiB) (docs/cluster.md, "Sizing etcd")',
    );
  }
  if (f.quota !== null && f.dbSize > f.quota * FULL_SHARE) {
    out.push(
      `etcd's database is ${mib(f.dbSize)} of its ${mib(f.quota)} quota: past it etcd refuses every write ` +
        '(NOSPACE) and no change can be made; compact and defragment it (etcdctl defrag), or raise --quota-backend-bytes',
    );
  }
  const history = f.revision - Math.max(f.compactRevision, 1);
  if (history > HISTORY_LIMIT) {
    out.push(
      `etcd keeps ${history} revisions of history (compacted up to ${f.compactRevision}): nothing seems to compact it, ` +
        'so its database only grows; start its members with --auto-compaction-mode=periodic --auto-compaction-retention=1h',
    );
  }
  return out;
}

/** etcd's backend quota from a member's /metrics, or null (not reachable, not said). */
async function quotaOf(
  url: string,
  config: ClusterConfig,
  timeoutMs: number,
): Promise<number | null> {
  const target = new URL('/metrics', url);
  const tls = target.protocol === 'https:';
  const text = await new Promise<string | null>((resolve) => {
    const opts: https.RequestOptions = { timeout: timeoutMs };
    if (tls) {
      try {
        if (config.ca) opts.ca = readFileSync(config.ca);
        if (config.cert) opts.cert = readFileSync(config.cert);
        if (config.key) opts.key = readFileSync(config.key);
      } catch {
        resolve(null);
        return;
      }
    }
    const req = (tls ? https : http).get(target, opts, (res) => {
      if (res.statusCode !== 200) {
        res.resume();
        resolve(null);
        return;
      }
      const chunks: Buffer[] = [];
      res.on('data', (c: Buffer) => chunks.push(c));
      res.on('end', () => resolve(Buffer.concat(chunks).toString('utf8')));
      res.on('error', () => resolve(null));
    });
    req.on('timeout', () => req.destroy());
    req.on('error', () => resolve(null));
  });
  const m = text?.match(/^etcd_server_quota_backend_bytes\s+([0-9.e+]+)\s*$/m);
  return m ? Number(m[1]) : null;
}

/** The figures of the etcd under `store`, and what to change. */
export async function etcdSizing(
  store: EtcdStore,
  config: ClusterConfig,
  members: number,
): Promise<Sizing> {
  const [status, compactRevision, devices] = await Promise.all([
    store.status(),
    store.compactRevision(),
    store.count('devices/'),
  ]);
  const answering = status.endpoints.filter((e) => e.ok);
  const dbSize = Math.max(0, ...answering.map((e) => e.dbSize ?? 0));
  let quota: number | null = null;
  for (const e of answering) {
    quota = await quotaOf(e.url, config, config.timeoutMs);
    if (quota !== null) break;
  }
  const f = { dbSize, quota, revision: status.revision, compactRevision, devices, members };
  return { ...f, warnings: judgeSizing(f) };
}

/** One line for the log: the figures. */
export function sizingLine(s: Sizing): string {
  return (
    `cluster: etcd database ${mib(s.dbSize)}` +
    (s.quota !== null
      ? ` of a ${mib(s.quota)} quota`
      : ' (quota not known: /metrics did not answer)') +
    `, revision ${s.revision}, compacted up to ${s.compactRevision}; ${s.devices} devices, ${s.members} members`
  );
}
