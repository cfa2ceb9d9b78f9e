// Notifications and the event stream of a cluster under etcd's faults: every etcd
// member frozen past the agents' lease TTL, a real compaction behind a recipient and a
// stream, a pool's medium changed while its agent was down. A real 3-member etcd, real
// agents, a real webhook receiver.

import type { ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { idKey, Receiver } from '../helpers/receiver.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(what: string, pred: () => boolean | Promise<boolean>, ms = 60_000) {
  const deadline = Date.now() + ms;
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

describeWithTools(['etcd', 'etcdctl'], 'cluster: events under etcd faults', () => {
  let etcd: EtcdCluster;
  let shared: string;
  const started: AgentHandle[] = [];
  const children: ChildProcess[] = [];

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    shared = makeTempDir('ballast-shared-');
  }, 60_000);
  afterAll(async () => {
    for (const c of children) c.kill('SIGKILL');
    for (let i = 0; i < 3; i++) {
      const pid = etcd?.pid(i);
      if (pid) process.kill(pid, 'SIGCONT');
    }
    await Promise.all(started.map((a) => a.kill9().catch(() => {})));
    await etcd?.stop();
  });

  const clusterName = () => `t${randomBytes(4).toString('hex')}`;

  async function agent(
    cluster: string,
    host: string,
    extra: { dir?: string; pools?: import('../helpers/agent.js').PoolSpec[] } = {},
  ): Promise<AgentHandle> {
    const a = await startAgent({
      ...(extra.dir ? { dir: extra.dir } : {}),
      pools: extra.pools ?? [
        { name: 'shared', path: path.join(shared, cluster), shared: true },
        { name: 'local' },
      ],
      cluster: { name: cluster, etcd: etcd.endpoints, host, leaseTtl: 2 },
      events: { retryCap: 0.5, deliveryTimeout: 2, rescanInterval: 0 },
    });
    started.push(a);
    return a;
  }

  function signalAll(sig: NodeJS.Signals): void {
    for (let i = 0; i < 3; i++) {
      const pid = etcd.pid(i);
      if (pid) process.kill(pid, sig);
    }
  }

  it('delivery goes on after every etcd member was frozen past the lease TTL', async () => {
    const name = clusterName();
    const [a, b] = await Promise.all([agent(name, 'a'), agent(name, 'b')]);
    const rx = new Receiver();
    await rx.start();
    try {
      expect(
        (await a.cli('notify', 'add', 'ops', '--url', rx.url, '--types', 'device.*')).code,
      ).toBe(0);
      expect(
        (await a.cli('device', 'create', 'before', '--size', '1M', '--pool', 'local')).code,
      ).toBe(0);
      await until('the first delivered', () => rx.got.some((g) => g.subject === 'before'));
      // Frozen long enough that etcd expires the leases when it runs again: both agents
      // re-register (longer each time, should a keepalive slip through first).
      const lost = () => [a, b].some((x) => /lease lost, registered again/.test(x.stderr()));
      for (let i = 0; !lost(); i++) {
        if (i === 3) throw new Error('no agent lost its lease in three freezes of etcd');
        signalAll('SIGSTOP');
        await sleep((3 + 3 * i) * 1000);
        signalAll('SIGCONT');
        await until('an agent re-registered', lost, 20_000).catch(() => {});
      }
      for (const [x, d] of [
        [a, 'after-a'],
        [b, 'after-b'],
      ] as const) {
        await until(`${d} created`, async () => {
          const r = await x.cli('device', 'create', d, '--size', '1M', '--pool', 'local');
          return r.code === 0 || /EXISTS/.test(r.stderr);
        });
      }
      await until('both delivered after the blip', () =>
        ['after-a', 'after-b'].every((d) => rx.got.some((g) => g.subject === d)),
      );
      const ls = JSON.parse((await a.cli('notify', 'ls', '--json')).stdout) as {
        recipients: { deliveredBy: string | null; cursor: string | null }[];
      };
      expect(['a', 'b']).toContain(ls.recipients[0]!.deliveredBy);
      const keys = rx.ids().map(idKey);
      expect([...keys].sort((x, y) => x - y)).toEqual(keys);
    } finally {
      signalAll('SIGCONT');
      await rx.stop();
      await Promise.all([a.stop(), b.stop()]);
    }
  }, 180_000);
});
