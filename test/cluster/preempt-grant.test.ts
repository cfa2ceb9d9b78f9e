// A preempting new holder may write only once the old holder can write nowhere.
// Regression: agents enforced a committed PREEMPT AND ABORT as soon as they
// applied it, so the new holder's writes went through (through its own agent and
// any other) while the old holder's agent, cut off from etcd but still within
// its lease, kept writing too; a late write of the old holder could then land
// over the new holder's data. The fail-over benchmark showed writes of the new
// holder 20-40 ms after the preempt was sent, long before the old lease ended.

import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { FaultProxy } from '../harness/fault-proxy.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const TTL = 2;

/** Writes every 20 ms until stopped; keeps the acknowledgement times of the writes that succeeded. */
class Prober {
  readonly acked: number[] = [];
  private running = true;
  private readonly done: Promise<void>;

  constructor(private readonly c: NbdClient) {
    this.done = this.loop();
  }

  private async loop(): Promise<void> {
    const block = Buffer.alloc(4096, 0xbb);
    while (this.running) {
      const ok = await this.c.write(0, block).then(
        () => true,
        () => false,
      );
      if (ok) this.acked.push(performance.now());
      await sleep(20);
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.done;
  }
}

describeWithTools(['etcd', 'etcdctl'], 'cluster: preempt grants nothing early', () => {
  let etcd: EtcdCluster;
  let proxies: FaultProxy[] = [];
  const agents: AgentHandle[] = [];

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
  }, 60_000);
  afterAll(async () => {
    for (const a of agents) await a.kill9().catch(() => {});
    for (const p of proxies) await p.close();
    await etcd?.stop();
  });

  it('old holder cut off from etcd: no write of the new holder succeeds, on any agent, before the old lease can have ended', async () => {
    const shared = makeTempDir('ballast-shared-');
    const common = (host: string, endpoints: string[]) => ({
      pools: [{ name: 'shared', path: shared, shared: true }],
      // TCP clients of every agent are the new holder's guest, b.
      nbd: { listen: '127.0.0.1:0', identities: ['127.0.0.1=b'] },
      cluster: { name: 'grant', etcd: endpoints, host, leaseTtl: TTL, holdTimeout: 3 },
    });
    const a = await startAgent(
      common(
        'a',
        proxies.map((p) => p.url),
      ),
    );
    agents.push(a);
    const b = await startAgent(common('b', etcd.endpoints));
    agents.push(b);
    const c = await startAgent(common('c', etcd.endpoints));
    agents.push(c);
    const pr = (via: AgentHandle, body: Record<string, unknown>) =>
      via.api('POST', '/v1/devices/g/pr', body);
    expect(
      (await a.api('POST', '/v1/devices', { name: 'g', size: '1M', pool: 'shared' })).status,
    ).toBe(201);
    expect((await pr(a, { action: 'register', as: 'a', saKey: '0xa' })).status).toBe(200);
    expect((await pr(a, { action: 'reserve', as: 'a', key: '0xa', type: 'WE' })).status).toBe(200);
    expect((await pr(b, { action: 'register', as: 'b', saKey: '0xb' })).status).toBe(200);
    // b's guest, through its own agent (a local client is named after the host) and through c.
    const viaB = await NbdClient.connect(b.uri('g'));
    const viaC = await NbdClient.connect(`nbd://127.0.0.1:${c.nbdPort}/g`);
    for (const cl of [viaB, viaC]) {
      await expect(cl.write(0, Buffer.alloc(4096, 1))).rejects.toMatchObject({ nbdErrno: 1 });
    }

    for (const p of proxies) p.partition();
    const cut = performance.now();
    const probes = [new Prober(viaB), new Prober(viaC)];
    const r = await pr(b, {
      action: 'preempt-abort',
      as: 'b',
      key: '0xb',
      saKey: '0xa',
      type: 'WE',
    });
    const returned = performance.now();
    expect(r.status, r.text).toBe(200);
    const settled = (r.body as { settled: { hosts: { host: string; how: string }[] } }).settled;
    expect(settled.hosts.find((h) => h.host === 'a')?.how).toBe('expired');
    await sleep(500);
    await Promise.all(probes.map((p) => p.stop()));
    for (const p of proxies) p.heal();

    // A renews its lease every TTL/3: etcd cannot have expired it before
    // cut + TTL - TTL/3, and until then A may still write.
    const earliest = cut + (TTL * 1000 * 2) / 3 - 100;
    for (const [i, p] of probes.entries()) {
      const via = i === 0 ? 'b' : 'c';
      expect(p.acked.length, `the new holder writes through ${via}`).toBeGreaterThan(0);
      const first = p.acked[0]!;
      expect(
        first,
        `through ${via}: first write ${(first - cut).toFixed(0)} ms after the cut, the preempt returned after ${(returned - cut).toFixed(0)} ms`,
      ).toBeGreaterThan(earliest);
    }
    await viaB.close();
    await viaC.close();
    await Promise.all([a.stop(), b.stop(), c.stop()]);
  });
});
