// The tests' etcd clusters: cluster/local-etcd.ts, run with the tools' environment.

import {
  type EtcdCluster,
  type EtcdClusterOptions,
  startEtcdCluster as start,
} from '../../cluster/local-etcd.js';
import { toolEnv } from './tools.js';

export type { EtcdCluster, EtcdClusterOptions, EtcdMember } from '../../cluster/local-etcd.js';

/** The programs an etcd test needs (for describeWithTools). */
export const ETCD_TOOLS = ['etcd', 'etcdctl'] as const;

/** Starts a real etcd cluster on loopback and waits until every member is healthy. */
export function startEtcdCluster(opts: EtcdClusterOptions = {}): Promise<EtcdCluster> {
  return start({ env: toolEnv(), ...opts });
}
