import { afterEach, describe, expect, it } from 'vitest';
import { parseClusterConfig } from '../agent/cluster-config.js';
import type { Store, WatchEvent } from '../agent/store/store.js';
import { openMemoryStore } from '../test/helpers/memory-store.js';
import { Cluster, type MemberInfo } from './cluster.js';

const fail = (k: string, p: string): never => {
  throw new Error(`${k}: ${p}`);
};

function info(host: string, over: Partial<MemberInfo> = {}): Omit<MemberInfo, 'lease'> {
  return {
    host,
    version: 'test',
    pid: process.pid,
    machine: 'm1',
    dataDir: `/tmp/${host}`,
    nbd: { socket: `/run/${host}.sock` },
    api: [`unix:/run/${host}-api.sock`],
    pools: [{ name: 'shared', path: '/srv/shared', shared: true, media: 'ssd' }],
    startedAt: new Date().toISOString(),
    ...over,
  };
}

const stores: Store[] = [];
const clusters: Cluster[] = [];
afterEach(async () => {
  for (const c of clusters.splice(0)) await c.leave().catch(() => {});
  for (const s of stores.splice(0)) await s.close();
});

async function node(
  store: Store,
  host: string,
  applied: WatchEvent[] = [],
  over: Partial<MemberInfo> = {},
): Promise<Cluster> {
  const config = parseClusterConfig({ etcd: ['http://127.0.0.1:2379'], host, leaseTtl: 2 }, fail)!;
  const c = await Cluster.open({
    store,
    config,
    log: () => {},
    apply: async (ev) => {
      applied.push(ev);
    },
  });
  await c.join(info(host, over));
  clusters.push(c);
  return c;
}

describe('cluster config', () => {
  it('fills defaults and refuses bad values with the key named', () => {
    const c = parseClusterConfig({ etcd: 'http://127.0.0.1:2379', host: 'a' }, fail)!;
    expect(c).toMatchObject({ name: 'default', leaseTtl: 5, prefix: '/ballast/default/' });
    expect(() => parseClusterConfig({ etcd: [] }, fail)).toThrow(/cluster.etcd/);
    expect(() => parseClusterConfig({ etcd: ['ftp://x:1'] }, fail)).toThrow(/cluster.etcd\[0\]/);
    expect(() => parseClusterConfig({ etcd: ['http://x:1'], host: 'A B' }, fail)).toThrow(
      /cluster.host/,
    );
    expect(() => parseClusterConfig({ etcd: ['http://x:1'], leaseTtl: 1 }, fail)).toThrow(
      /leaseTtl/,
    );
    expect(() => parseClusterConfig({ etcd: ['http://x:1'], bogus: 1 }, fail)).toThrow(
      /cluster.bogus: unknown key/,
    );
    expect(() => parseClusterConfig({ etcd: ['http://x:1', 'https://y:2'] }, fail)).toThrow(
      /mixes/,
    );
  });
});

describe('Cluster (membership, cache, acks) on the embedded store', () => {
  it('members see each other; a change settles once every member acked it', async () => {
    const store = await openMemoryStore();
    stores.push(store);
    const seenB: WatchEvent[] = [];
    const a = await node(store, 'a');
    const b = await node(store, 'b', seenB);
    await a.waitUntil(() => a.alive('b'), 2000);
    expect(a.members().map((m) => [m.host, m.state])).toEqual([
      ['a', 'alive'],
      ['b', 'alive'],
    ]);
    const put = await store.put('devices/x', '{}');
    await a.settle(put.revision, () => ['a', 'b']);
    expect(a.ackOf('b')).toBeGreaterThanOrEqual(put.revision);
    expect(seenB.some((e) => e.kv.key === 'devices/x')).toBe(true);
    expect(a.hostsWithSharedPools([{ pool: 'shared', file: '/srv/shared/x.img' }])).toEqual([
      'a',
      'b',
    ]);
    expect(a.hostsWithSharedPools([{ pool: 'shared', file: '/elsewhere/x.img' }])).toEqual([]);
    await b.leave();
    await a.waitUntil(() => !a.alive('b'), 2000);
    expect(a.members().find((m) => m.host === 'b')?.state).toBe('left');
  });

  it('a second live agent with the same host name is refused', async () => {
    const store = await openMemoryStore();
    stores.push(store);
    await node(store, 'a');
    await expect(node(store, 'a', [], { dataDir: '/tmp/other' })).rejects.toMatchObject({
      code: 'BALLAST_CLUSTER_HOST_TAKEN',
    });
  });

  it('a member whose lease runs out is listed expired; foreign keys are skipped and reported', async () => {
    const store = await openMemoryStore();
    stores.push(store);
    await store.put('not-ballast/garbage', '\u0000\u0001');
    await store.put('members/zz', 'not json');
    const a = await node(store, 'a');
    const lease = await store.grantLease(1);
    await store.put('members/gone', JSON.stringify(info('gone')), { lease });
    await store.put('hosts/gone', JSON.stringify({ host: 'gone', state: 'up', since: 'x' }));
    await a.waitUntil(() => a.alive('gone'), 2000);
    expect(a.summary().foreignKeyCount).toBe(1);
    // Nobody keeps the lease alive: it expires, the member key goes with it.
    expect(await a.waitUntil(() => !a.alive('gone'), 4000)).toBe(true);
    expect(a.members().find((m) => m.host === 'gone')?.state).toBe('expired');
    // settle does not wait for a member that is gone
    const put = await store.put('devices/y', '{}');
    await a.settle(put.revision, () => ['a', 'gone']);
  });
});
