// The Store contract against EtcdStore on a real 3-member etcd cluster. The
// store reaches each member through a FaultProxy, so that `disconnect` cuts its
// connections for real (an RST from the network) while etcd keeps running.
// Every test gets its own random prefix on the one cluster of this file.
import { randomBytes } from 'node:crypto';
import { afterAll, beforeAll } from 'vitest';
import { FaultProxy } from '../test/harness/fault-proxy.js';
import { ETCD_TOOLS, type EtcdCluster, startEtcdCluster } from '../test/helpers/etcd.js';
import { storeContract } from '../test/helpers/store-contract.js';
import { describeWithTools } from '../test/helpers/tools.js';
import { EtcdStore } from './etcd-store.js';

describeWithTools([...ETCD_TOOLS], 'EtcdStore on a 3-member etcd', () => {
  let cluster: EtcdCluster;
  let proxies: FaultProxy[] = [];

  beforeAll(async () => {
    cluster = await startEtcdCluster({ size: 3 });
    proxies = await Promise.all(cluster.endpoints.map((e) => FaultProxy.start(e)));
  });

  afterAll(async () => {
    for (const p of proxies) await p.close();
    await cluster?.stop();
  });

  storeContract('EtcdStore', {
    open: () =>
      EtcdStore.connect({
        endpoints: proxies.map((p) => p.url),
        prefix: `/contract/${randomBytes(6).toString('hex')}/`,
        timeoutMs: 2000,
      }),
    disconnect: async () => {
      for (const p of proxies) p.reset();
    },
  });
});
