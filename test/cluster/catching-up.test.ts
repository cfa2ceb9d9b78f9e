// An agent that (re)starts while a change is not yet applied everywhere: it
// enforces the state the change replaced with the new one, as every agent that
// applied it does, and judges nothing on a state nobody holds.
// Regression (the nemesis, seed 7): host-c's write through a just restarted
// agent was refused with EPERM, though no reservation was held before or after
// the change in flight: the restarting agent allowed nobody anything until the
// change had settled everywhere.

import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until as waitUntil } from '../helpers/wait.js';

const until = (what: string, pred: () => boolean | Promise<boolean>, ms = 120_000) =>
  waitUntil(what, pred, ms);

const SOURCE = { 'host-a': '127.0.0.1', 'host-b': '127.0.0.2', 'host-c': '127.0.0.3' } as const;

describeWithTools(['etcd', 'etcdctl'], 'cluster: an agent catching up', () => {
  let etcd: EtcdCluster;
  let shared: string;
  const agents: AgentHandle[] = [];

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    shared = makeTempDir('ballast-catchup-');
  }, 60_000);
  afterAll(async () => {
    for (const a of agents) {
      if (a.child?.pid) {
        try {
          process.kill(a.child.pid, 'SIGCONT');
        } catch {}
      }
      await a.kill9().catch(() => {});
    }
    await etcd?.stop();
  });

  it('a restart while a change waits for a frozen member enforces the state it replaced, not nobody', async () => {
    const start = (host: string, leaseTtl: number) =>
      startAgent({
        pools: [{ name: 'shared', path: path.join(shared, 'p'), shared: true }],
        nbd: {
          listen: '127.0.0.1:0',
          identities: Object.entries(SOURCE).map(([id, addr]) => `${addr}=${id}`),
        },
        cluster: { name: 'catchup', etcd: etcd.endpoints, host, leaseTtl },
      }).then((a) => {
        agents.push(a);
        return a;
      });
    const A = await start('a', 2);
    // B's lease is long: frozen, it stays a member that has not applied the change for a while
    const B = await start('b', 60);
    const C = await start('c', 2);
    expect(
      (await A.api('POST', '/v1/devices', { name: 'd', size: '1M', pool: 'shared' })).status,
    ).toBe(201);
    const members = async () =>
      (
        (await A.api('GET', '/v1/cluster/members')).body as {
          members: { host: string; state: string }[];
        }
      ).members;
    await C.kill9();
    await until(
      'c expired',
      async () => (await members()).find((m) => m.host === 'c')?.state === 'expired',
    );
    process.kill(B.child.pid!, 'SIGSTOP');
    try {
      // No reservation before or after: a registration changes nobody's access.
      const change = A.api('POST', '/v1/devices/d/pr', {
        action: 'register',
        as: 'host-a',
        saKey: '0xa',
      });
      await until('the change committed', async () => {
        const s = (await A.api('GET', '/v1/devices/d/pr')).body as { generation?: number };
        return (s.generation ?? 0) >= 1;
      });
      // C starts while B (alive, frozen) has not applied it
      await C.start();
      const viaC = await NbdClient.connect(`nbd://127.0.0.1:${C.nbdPort}/d`, {
        localAddress: SOURCE['host-c'],
        timeoutMs: 60_000,
      });
      let got = 'ok';
      try {
        await viaC.write(0, Buffer.alloc(4096, 0xc));
      } catch (e) {
        got = `errno ${(e as { nbdErrno?: number }).nbdErrno}: ${(e as Error).message}`;
      }
      // the change is still waiting for B: the write was judged before it settled
      const still = (await members()).find((m) => m.host === 'b')?.state;
      expect(got, `host-c's write through C (b is ${still})`).toBe('ok');
      await viaC.close();
      process.kill(B.child.pid!, 'SIGCONT');
      expect((await change).status).toBe(200);
    } finally {
      try {
        process.kill(B.child.pid!, 'SIGCONT');
      } catch {}
    }
  }, 300_000);
});
