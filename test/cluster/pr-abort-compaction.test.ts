// PREEMPT AND ABORT on an agent whose watch fell behind an etcd compaction. Agent A
// reaches a real 3-member etcd through fault proxies, agent B directly; host-a's
// connection goes through A. A is cut off; through B, host-b preempts host-a with
// abort, then another change follows; etcd is compacted past A's cursor; A is let
// back, its watch cannot resume, it lists again and sees only the last record.
// Regression: the abort of the change it skipped was never carried out on A, and
// host-a's connection there stayed open (its writes got EPERM, for good).

import { afterAll, beforeAll, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { FaultProxy } from '../harness/fault-proxy.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { compactEtcd, type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

const EPERM = 1;
const SOURCE = { 'host-a': '127.0.0.1', 'host-b': '127.0.0.2', 'host-c': '127.0.0.3' } as const;

/** What became of one NBD request: ok, EPERM, closed (the connection is gone), or the error. */
async function outcome(p: Promise<unknown>): Promise<string> {
  let timer: NodeJS.Timeout | undefined;
  const hung = new Promise<string>((r) => {
    timer = setTimeout(() => r('no answer in 30 s'), 30_000);
  });
  try {
    return await Promise.race([
      p.then(
        () => 'ok',
        (e: { nbdErrno?: number; message?: string }) =>
          e.nbdErrno === EPERM
            ? 'EPERM'
            : e.nbdErrno === undefined
              ? 'closed'
              : `errno ${e.nbdErrno}: ${e.message}`,
      ),
      hung,
    ]);
  } finally {
    clearTimeout(timer);
  }
}

describeWithTools(['etcd', 'etcdctl'], 'cluster: an abort skipped by a compaction', () => {
  let etcd: EtcdCluster;
  let proxies: FaultProxy[] = [];
  const agents: AgentHandle[] = [];
  let A: AgentHandle;
  let B: AgentHandle;

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    const shared = makeTempDir('ballast-shared-');
    for (const [host, endpoints] of [
      ['a', proxies.map((p) => p.url)],
      ['b', etcd.endpoints],
    ] as const) {
      agents.push(
        await startAgent({
          pools: [{ name: 'shared', path: shared, shared: true }],
          nbd: {
            listen: '127.0.0.1:0',
            identities: Object.entries(SOURCE).map(([name, addr]) => `${addr}=${name}`),
          },
          // Short: the preempt through B waits for A's lease to expire while A is cut off.
          cluster: { name: 'prcompact', etcd: endpoints, host, leaseTtl: 4 },
        }),
      );
    }
    [A, B] = agents as [AgentHandle, AgentHandle];
  }, 120_000);
  afterAll(async () => {
    for (const a of agents) await a.kill9().catch(() => {});
    for (const p of proxies) await p.close().catch(() => {});
    await etcd?.stop();
  });

  async function ok(via: AgentHandle, dev: string, body: Record<string, unknown>) {
    const r = await via.api('POST', `/v1/devices/${dev}/pr`, body);
    expect(r.status, r.text).toBe(200);
    return r;
  }
  const generation = async (via: AgentHandle, dev: string) =>
    ((await via.api('GET', `/v1/devices/${dev}/pr`)).body as { generation?: number }).generation;
  const aliveOnB = async (host: string) =>
    (
      (await B.api('GET', '/v1/cluster/members')).body as {
        members: { host: string; state: string }[];
      }
    ).members.find((m) => m.host === host)?.state === 'alive';

  it("a preempt-abort overwritten and compacted away while an agent was cut off still closes the preempted identity's connections there", async () => {
    const dev = 'skipped';
    const c = await B.api('POST', '/v1/devices', { name: dev, size: '1M', pool: 'shared' });
    expect(c.status, c.text).toBe(201);
    await ok(B, dev, { action: 'register', as: 'host-a', saKey: '0xa' });
    await ok(B, dev, { action: 'reserve', as: 'host-a', key: '0xa', type: 'WE' });
    await ok(B, dev, { action: 'register', as: 'host-b', saKey: '0xb' });
    const gen = await generation(B, dev);
    await until('A applied the setup', async () => (await generation(A, dev)) === gen);
    const held = await NbdClient.connect(`nbd://127.0.0.1:${A.nbdPort}/${dev}`, {
      localAddress: SOURCE['host-a'],
      timeoutMs: 30_000,
    });
    try {
      expect(await outcome(held.write(0, Buffer.alloc(4096, 1)))).toBe('ok');

      for (const p of proxies) p.partition();
      // Returns once A's lease has expired (A cannot ack it).
      const r = await ok(B, dev, {
        action: 'preempt-abort',
        as: 'host-b',
        key: '0xb',
        saKey: '0xa',
        type: 'WE',
      });
      expect((r.body as { preempted: string[] }).preempted).toEqual(['host-a']);
      // A later change overwrites pr/<device>: the abort is in no current record.
      await ok(B, dev, { action: 'register', as: 'host-c', saKey: '0xc' });
      const last = await generation(B, dev);

      await compactEtcd(etcd.endpoints);
      // New connections: A's watch must resume from a compacted revision.
      for (const p of proxies) {
        p.reset();
        p.heal();
      }
      await until('A caught up and back', async () => {
        return (await generation(A, dev)) === last && (await aliveOnB('a'));
      });
      expect(await outcome(held.write(4096, Buffer.alloc(4096, 2)))).toBe('closed');
    } finally {
      await held.close().catch(() => {});
    }
  }, 180_000);
});
