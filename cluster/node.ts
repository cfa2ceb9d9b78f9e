// What an agent does to be one host of a cluster: open the etcd store, list
// the catalog, let the device manager ask the cluster who serves what, and
// feed it the changes other hosts make.

import type { ClusterConfig } from '../agent/cluster-config.js';
import { BallastError } from '../agent/errors.js';
import { type Store, StoreError, type WatchEvent } from '../agent/store/store.js';
import { Cluster, type MemberInfo, type Placed } from './cluster.js';
import { EtcdStore } from './etcd-store.js';

/** Exit code of `ballast agent` when etcd cannot be reached at start (docs/errors.md). */
export const EXIT_CLUSTER_UNREACHABLE = 3;

/**
 * Connects to etcd and checks that it answers, asking again (backing off) for up
 * to `startTimeout` while it does not: etcd not up yet, or slow on a loaded host.
 * A clear error naming the endpoints after that.
 */
export async function openClusterStore(
  config: ClusterConfig,
  onRoundTrip?: (op: string, seconds: number) => void,
  log?: (msg: string) => void,
): Promise<EtcdStore> {
  let store: EtcdStore | undefined;
  const until = performance.now() + config.startTimeoutMs;
  try {
    store = await EtcdStore.connect({
      endpoints: config.etcd,
      prefix: config.prefix,
      ca: config.ca,
      cert: config.cert,
      key: config.key,
      timeoutMs: config.timeoutMs,
      onRoundTrip,
    });
    for (let attempt = 1, delay = 250; ; attempt++, delay = Math.min(delay * 2, 2000)) {
      try {
        await store.revision();
        if (attempt > 1) log?.(`cluster: etcd answered (attempt ${attempt})`);
        return store;
      } catch (e) {
        const left = until - performance.now();
        if (left <= 0 || !(e instanceof StoreError) || !e.retryable) throw e;
        log?.(
          `cluster: etcd does not answer yet (${e.message}); asking again for up to ${Math.ceil(left / 1000)} s`,
        );
        await new Promise((r) => setTimeout(r, Math.min(delay, left)));
      }
    }
  } catch (e) {
    await store?.close().catch(() => {});
    const err = new BallastError(
      'BALLAST_CLUSTER_UNREACHABLE',
      `cannot reach etcd at ${config.etcd.join(', ')}: ${(e as Error).message}; ` +
        'is etcd running there, and does `cluster.etcd` in the config name it? ' +
        '(without a `cluster:` section the agent runs alone on its embedded store)',
      { cause: e },
    );
    Object.assign(err, { exitCode: EXIT_CLUSTER_UNREACHABLE });
    throw err;
  }
}

/** Who serves a device: its owner, or every alive host that has all its (shared) pools. */
export function servingHosts(cluster: Cluster, rec: Placed): string[] {
  if (rec.host) return cluster.alive(rec.host) ? [rec.host] : [];
  return cluster.hostsWithSharedPools(rec.extents);
}

/**
 * Who a change of the device must wait for: the hosts serving it as the cache has
 * it (`devices/<name>`), and as it was (`also`: a change that moves a device off
 * some hosts waits for them too). Every alive member when the cache has no
 * readable record: nobody can say who serves it.
 */
export function waitFor(cluster: Cluster, device: string, ...also: Placed[]): string[] {
  const kv = cluster.cached(`devices/${device}`);
  let rec: Placed | undefined;
  try {
    rec = kv ? (JSON.parse(kv.value) as Placed) : undefined;
  } catch {
    rec = undefined;
  }
  const recs = [...(rec && Array.isArray(rec.extents) ? [rec] : []), ...also];
  if (recs.length === 0) {
    return cluster
      .members()
      .filter((m) => m.state === 'alive')
      .map((m) => m.host);
  }
  return [...new Set(recs.flatMap((r) => servingHosts(cluster, r)))];
}

export interface CatalogSinks {
  device(name: string, ev: WatchEvent): Promise<void>;
  reservation?(device: string, kind: 'pr' | 'acl' | 'settled', ev: WatchEvent): Promise<void>;
}

/** Routes catalog events to the managers that keep them. */
export function catalogApplier(sinks: CatalogSinks): (ev: WatchEvent) => Promise<void> {
  return async (ev) => {
    const key = ev.kv.key;
    if (key.startsWith('devices/')) await sinks.device(key.slice('devices/'.length), ev);
    else if (key.startsWith('pr/')) await sinks.reservation?.(key.slice('pr/'.length), 'pr', ev);
    else if (key.startsWith('acl/')) {
      await sinks.reservation?.(key.slice('acl/'.length), 'acl', ev);
    } else if (key.startsWith('pr-settled/')) {
      await sinks.reservation?.(key.slice('pr-settled/'.length), 'settled', ev);
    }
  };
}

export { Cluster, type MemberInfo, type Store };
