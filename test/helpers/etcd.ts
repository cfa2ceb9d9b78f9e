// The tests' etcd clusters: test/harness/local-etcd.ts, run with the tools' environment.

import { EtcdStore } from '../../cluster/etcd-store.js';
import {
  type EtcdCluster,
  type EtcdClusterOptions,
  startEtcdCluster as start,
} from '../harness/local-etcd.js';
import { toolEnv } from './tools.js';

export type { EtcdCluster, EtcdClusterOptions, EtcdMember } from '../harness/local-etcd.js';

/** The programs an etcd test needs (for describeWithTools). */
export const ETCD_TOOLS = ['etcd', 'etcdctl'] as const;

/** Starts a real etcd cluster on loopback and waits until every member is healthy. */
export function startEtcdCluster(opts: EtcdClusterOptions = {}): Promise<EtcdCluster> {
  return start({ env: toolEnv(), ...opts });
}

/** Compacts the cluster's history at its current revision, through a client of its own. */
export async function compactEtcd(endpoints: string[]): Promise<void> {
  const direct = await EtcdStore.connect({ endpoints, prefix: '/compactor/', timeoutMs: 5000 });
  try {
    await direct.compact(await direct.revision());
  } finally {
    await direct.close();
  }
}
