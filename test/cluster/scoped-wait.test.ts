// A change waits for the agents that serve its device, not for the cluster: a
// device in a pool that 2 of 5 agents declare. One of the other 3 is frozen
// (SIGSTOP) and the changes — resize, a reservation, an access list, a remove —
// return without waiting for its lease to run out; the 3 never write an ack for
// them (a change costs the serving agents' writes, not the fleet's). A device
// extended into a pool one of its hosts lacks waits for that host too (it must
// stop serving it), and a host that starts declaring the pool later serves the
// device as it is now.

import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { EtcdStore } from '../../cluster/etcd-store.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools, run } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

interface Settled {
  waitedMs: number;
  hosts: { host: string; how: string }[];
}

describeWithTools(
  ['etcd', 'etcdctl', 'nbdinfo'],
  'cluster: a change waits for who serves it',
  () => {
    let etcd: EtcdCluster;
    let store: EtcdStore;
    const name = `t${randomBytes(4).toString('hex')}`;
    const agents = new Map<string, AgentHandle>();
    let shared: string;

    const pool = (p: string) => ({ name: p, path: path.join(shared, p), shared: true });
    async function agent(host: string, pools: string[]): Promise<AgentHandle> {
      const a = await startAgent({
        pools: [...pools.map(pool), { name: 'local' }],
        cluster: { name, etcd: etcd.endpoints, host, leaseTtl: 2 },
      });
      agents.set(host, a);
      return a;
    }
    const acks = async () =>
      Object.fromEntries(
        (await store.range('acks/')).kvs.map((kv) => [
          kv.key.slice('acks/'.length),
          Number(kv.value),
        ]),
      ) as Record<string, number>;
    const hostsOf = (s: Settled) => s.hosts.map((h) => `${h.host}:${h.how}`).sort();

    beforeAll(async () => {
      etcd = await startEtcdCluster({ size: 3 });
      shared = makeTempDir('ballast-shared-');
      store = await EtcdStore.connect({ endpoints: etcd.endpoints, prefix: `/ballast/${name}/` });
      await agent('a', ['p1']);
      await agent('b', ['p1']);
      await agent('c', ['p2']);
      await agent('d', ['p2']);
      await agent('e', []);
    }, 120_000);
    afterAll(async () => {
      for (const a of agents.values()) {
        a.child.kill('SIGCONT');
        await a.kill9().catch(() => {});
      }
      await store?.close().catch(() => {});
      await etcd?.stop();
    });

    it('changes of a device on 2 of 5 agents return without the other 3, frozen or not, and they write no ack', async () => {
      const a = agents.get('a')!;
      const c = agents.get('c')!;
      const created = await a.api('POST', '/v1/devices', { name: 'd1', size: '4M', pool: 'p1' });
      expect(created.status, JSON.stringify(created.body)).toBe(201);
      expect((created.body as { hosts: string[] }).hosts.sort()).toEqual(['a', 'b']);
      const before = await acks();
      c.child.kill('SIGSTOP');
      try {
        const resized = await a.api('POST', '/v1/devices/d1/resize', { size: '8M' });
        expect(resized.status, JSON.stringify(resized.body)).toBe(200);
        const reg = await a.api('POST', '/v1/devices/d1/pr', {
          action: 'register',
          as: 'a',
          saKey: '0x1',
        });
        expect(reg.status, JSON.stringify(reg.body)).toBe(200);
        expect(hostsOf((reg.body as { settled: Settled }).settled)).toEqual(['a:self', 'b:acked']);
        const res = await a.api('POST', '/v1/devices/d1/pr', {
          action: 'reserve',
          as: 'a',
          key: '0x1',
          type: 'WE',
        });
        expect(res.status, JSON.stringify(res.body)).toBe(200);
        expect(hostsOf((res.body as { settled: Settled }).settled)).toEqual(['a:self', 'b:acked']);
        const acl = await a.api('PUT', '/v1/devices/d1/acl', {
          entries: [
            { identity: 'a', access: 'rw' },
            { identity: 'b', access: 'ro' },
          ],
        });
        expect(acl.status, JSON.stringify(acl.body)).toBe(200);
        // b applied every change before it returned: it serves the new size now.
        const b = agents.get('b')!;
        const size = await run('nbdinfo', ['--size', b.uri('d1')]);
        expect(size.stdout.trim()).toBe(String(8 << 20));
        // The agents that do not serve d1 wrote no ack for any of it.
        const after = await acks();
        for (const h of ['c', 'd', 'e']) expect(after[h], h).toBe(before[h]);
        expect(after.b).toBeGreaterThan(before.b ?? 0);
        // c kept its lease all along (frozen for less than it): nothing was waited out.
        expect(after.c).toBeDefined();
      } finally {
        c.child.kill('SIGCONT');
      }
      // A listing through an agent that does not serve d1 is etcd's: the new size.
      const e = agents.get('e')!;
      const ls = (await e.api('GET', '/v1/devices/d1')).body as { size: number; state: string };
      expect([ls.size, ls.state]).toEqual([8 << 20, 'remote']);
    }, 120_000);

    it('a device extended into a pool one of its hosts lacks waits for that host; a host declaring the pool later serves it as it is', async () => {
      const a = agents.get('a')!;
      const b = agents.get('b')!;
      // a declares p2 too now (a restart with the pool added): d2 on p1+p2 is a's alone.
      await a.stop();
      const a2 = await agent('a', ['p1', 'p2']);
      expect(
        (await a2.api('POST', '/v1/devices', { name: 'd2', size: '4M', pool: 'p1' })).status,
      ).toBe(201);
      b.child.kill('SIGSTOP');
      let extended: { status: number; body: Record<string, unknown> };
      try {
        // b serves d2 until the extend: the extend must wait for b to stop serving it,
        // so with b frozen it returns only once b's lease has run out.
        extended = await a2.api('POST', '/v1/devices/d2/extend', { size: '4M', pool: 'p2' });
        // b, frozen, applied nothing: the extend returned because b's lease is gone.
        expect(await store.get('members/b')).toBeUndefined();
      } finally {
        b.child.kill('SIGCONT');
      }
      expect(extended.status, JSON.stringify(extended.body)).toBe(200);
      expect((extended.body as { hosts: string[] }).hosts).toEqual(['a']);
      await until('b has registered again', async () => (await acks()).b !== undefined, 30_000);
      // A new host declaring p1 and p2: serves d2 at its size at once.
      const f = await agent('f', ['p1', 'p2']);
      const size = await run('nbdinfo', ['--size', f.uri('d2')]);
      expect(size.stdout.trim()).toBe(String(8 << 20));
    }, 180_000);

    it('while an agent that waits for every member is alive (a rolling upgrade), every agent acks every change', async () => {
      const a = agents.get('a')!;
      // A member record as agents write it that wait for every member: no `acks`.
      const lease = await store.grantLease(60);
      const legacy = {
        host: 'legacy',
        version: '0.1.0',
        pid: 1,
        machine: 'elsewhere',
        dataDir: '/nonexistent',
        nbd: {},
        api: [],
        pools: [],
        startedAt: new Date().toISOString(),
        lease,
      };
      await store.put('members/legacy', JSON.stringify(legacy), { lease });
      const resized = await a.apiMade('POST', '/v1/devices/d1/resize', { size: '12M' });
      expect(resized.status, resized.text).toBe(200);
      const rev = (await store.get('devices/d1'))!.modRevision;
      await until('c and e ack a change of a device they do not serve', async () => {
        const now = await acks();
        return (now.c ?? 0) >= rev && (now.e ?? 0) >= rev;
      });
      await store.revokeLease(lease);
      const resized2 = await a.apiMade('POST', '/v1/devices/d1/resize', { size: '16M' });
      expect(resized2.status, resized2.text).toBe(200);
      const rev2 = (await store.get('devices/d1'))!.modRevision;
      await until('b acks the second resize', async () => ((await acks()).b ?? 0) >= rev2);
      const after = await acks();
      expect(after.c).toBeLessThan(rev2);
      expect(after.e).toBeLessThan(rev2);
    }, 120_000);
  },
);
