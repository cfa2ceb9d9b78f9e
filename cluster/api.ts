// The cluster's management routes and metrics, mounted by the agent when it
// runs with a cluster: section.

import client from 'prom-client';
import { listOrCache, pageLimit } from '../agent/store/pages.js';
import type { Cluster } from './cluster.js';
import { EtcdStore } from './etcd-store.js';
import type { Fence } from './fence.js';
import { etcdSizing } from './sizing.js';

type Handler = (req: unknown, params: string[], body: Record<string, unknown>) => Promise<unknown>;

interface EtcdStatus {
  status(): Promise<unknown>;
}

function hasStatus(s: unknown): s is EtcdStatus {
  return typeof (s as Partial<EtcdStatus>).status === 'function';
}

/** GET /v1/cluster/status and /v1/cluster/members. */
export function clusterRoutes(cluster: Cluster) {
  return <R>(route: (method: string, path: string, handler: Handler) => R): R[] => [
    route('GET', '/v1/cluster/status', async () => {
      const store = cluster.store;
      let etcd: unknown = null;
      if (hasStatus(store)) {
        try {
          etcd = await store.status();
        } catch (e) {
          etcd = { error: (e as Error).message };
        }
      }
      const members = cluster.members();
      let sizing: unknown = null;
      if (store instanceof EtcdStore) {
        try {
          sizing = await etcdSizing(
            store,
            cluster.config,
            members.filter((m) => m.state === 'alive').length,
          );
        } catch (e) {
          sizing = { error: (e as Error).message };
        }
      }
      return { ...cluster.summary(), etcd, sizing, membersList: members };
    }),
    route('GET', '/v1/cluster/members', async (req) => {
      const url = new URL((req as { url?: string }).url ?? '/', 'http://x');
      const limit = url.searchParams.get('limit');
      const token = url.searchParams.get('continue');
      return listOrCache<Record<string, unknown>>(
        async () => ({
          stale: null,
          ...(await cluster.membersPage(
            limit === null ? undefined : pageLimit(limit),
            token ?? undefined,
          )),
        }),
        (why) => ({ stale: why, members: cluster.members() }),
        true,
        token,
        cluster.staleness(),
      );
    }),
  ];
}

/**
 * ballast_cluster_* metrics; returns the observer for store round trips
 * (the etcd store reports each call's latency to it).
 */
export function clusterMetrics(
  registry: client.Registry,
  cluster: Cluster,
  fence: Fence,
): { roundTrip: (op: string, seconds: number) => void; prChange: (seconds: number) => void } {
  new client.Gauge({
    name: 'ballast_cluster_fenced',
    help: '1 while this agent has fenced itself (I/O to shared devices held or failed), else 0',
    registers: [registry],
    collect() {
      this.set(fence.fenced() ? 1 : 0);
    },
  });
  new client.Gauge({
    name: 'ballast_cluster_held_connections',
    help: 'Connections whose requests are held by the fence',
    registers: [registry],
    collect() {
      this.set(fence.held());
    },
  });
  new client.Counter({
    name: 'ballast_cluster_fences_total',
    help: 'Times this agent fenced itself',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(fence.fences);
    },
  });
  new client.Counter({
    name: 'ballast_cluster_fence_refused_writes_total',
    help: 'Writes (and trims, zeroings) to shared devices refused at their syscall by the fence',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(fence.refused());
    },
  });
  const pr = new client.Histogram({
    name: 'ballast_pr_change_seconds',
    help: 'PR OUT commands, from the request to every serving agent having applied it',
    buckets: [0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30],
    registers: [registry],
  });
  new client.Gauge({
    name: 'ballast_cluster_members',
    help: 'Members of the cluster by state (alive, expired, left), as this agent sees them',
    labelNames: ['state'],
    registers: [registry],
    collect() {
      const m = cluster.members();
      for (const s of ['alive', 'expired', 'left'] as const) {
        this.set({ state: s }, m.filter((x) => x.state === s).length);
      }
    },
  });
  new client.Gauge({
    name: 'ballast_cluster_watch_lag_revisions',
    help: 'Store revisions this agent has seen but not yet applied to its cache',
    registers: [registry],
    collect() {
      this.set(Math.max(0, cluster.storeRevision - cluster.revision));
    },
  });
  new client.Gauge({
    name: 'ballast_cluster_healthy',
    help: '1 while the membership lease is being renewed, 0 while the agent is cut off from etcd',
    registers: [registry],
    collect() {
      this.set(cluster.isHealthy() ? 1 : 0);
    },
  });
  new client.Counter({
    name: 'ballast_cluster_lease_keepalive_failures_total',
    help: 'Membership lease keepalives that failed (timeout, etcd unreachable, lease expired)',
    registers: [registry],
    collect() {
      this.reset();
      this.inc(cluster.stats.keepaliveFailures);
    },
  });
  const rtt = new client.Histogram({
    name: 'ballast_store_round_trip_seconds',
    help: 'Round trips to the cluster store (etcd), per operation',
    labelNames: ['op'],
    buckets: [0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5],
    registers: [registry],
  });
  return {
    roundTrip: (op, seconds) => rtt.observe({ op }, seconds),
    prChange: (seconds) => pr.observe(seconds),
  };
}
