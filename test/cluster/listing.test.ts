// Cluster-wide listings read from etcd in pages (limit and a continue token, at
// one revision): 10,000 devices listed through an agent, page by page, while
// another agent creates devices — every device once, exactly the set etcd held
// at the listing's revision; a token etcd has compacted away is refused; the
// members list pages the same way; `device ls --json` reads every page.

import { randomBytes } from 'node:crypto';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { op } from '../../agent/store/store.js';
import { EtcdStore } from '../../cluster/etcd-store.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { compactEtcd, type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';

const SEEDED = 10_000;

interface Dev {
  name: string;
  state: string;
  host?: string | null;
}

interface DevicePage {
  devices: Dev[];
  revision: number;
  continue?: string;
}

describeWithTools(['etcd', 'etcdctl'], 'cluster: listings in pages', () => {
  let etcd: EtcdCluster;
  let store: EtcdStore;
  let a: AgentHandle;
  let b: AgentHandle;
  const name = `t${randomBytes(4).toString('hex')}`;

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    const shared = makeTempDir('ballast-shared-');
    const agent = (host: string) =>
      startAgent({
        pools: [{ name: 'shared', path: path.join(shared, name), shared: true }, { name: 'local' }],
        cluster: { name, etcd: etcd.endpoints, host, leaseTtl: 2 },
      });
    a = await agent('host-a');
    b = await agent('host-b');
    // 10,000 devices of a host that is not running: records only, in batches (etcd
    // takes at most 128 operations per transaction).
    store = await EtcdStore.connect({ endpoints: etcd.endpoints, prefix: `/ballast/${name}/` });
    const now = new Date().toISOString();
    for (let i = 0; i < SEEDED; i += 100) {
      const ops = [];
      for (let j = i; j < i + 100; j++) {
        const n = `ghost-${String(j).padStart(5, '0')}`;
        const rec = {
          name: n,
          size: 1 << 20,
          role: 'paging',
          guest: null,
          extents: [{ pool: 'local', file: `/nonexistent/${n}.img`, size: 1 << 20 }],
          state: 'ready',
          createdAt: now,
          updatedAt: now,
          host: 'host-ghost',
        };
        ops.push(op.put(`devices/${n}`, JSON.stringify(rec)));
      }
      await store.txn({ compare: [], success: ops });
    }
  }, 180_000);
  afterAll(async () => {
    await store?.close().catch(() => {});
    await Promise.all([a, b].map((x) => x?.kill9().catch(() => {})));
    await etcd?.stop();
  });

  async function page(x: AgentHandle, q: string): Promise<DevicePage> {
    const r = await x.api('GET', `/v1/devices?${q}`);
    expect(r.status, JSON.stringify(r.body)).toBe(200);
    return r.body as unknown as DevicePage;
  }

  it('lists 10,000 devices in pages while another agent creates more: each once, the set etcd held at the revision', async () => {
    const created: string[] = [];
    let stop = false;
    const creator = (async () => {
      for (let i = 0; !stop && i < 40; i++) {
        const n = `new-${i}`;
        const r = await b.api('POST', '/v1/devices', { name: n, size: '1M', pool: 'shared' });
        expect(r.status, JSON.stringify(r.body)).toBe(201);
        created.push(n);
      }
    })();
    // Wait for a few creates, so some come before the listing and some during it.
    while (created.length < 3) await new Promise((r) => setTimeout(r, 50));
    const before = [...created];
    const names: string[] = [];
    let p = await page(a, 'limit=700');
    const revision = p.revision;
    names.push(...p.devices.map((d) => d.name));
    let pages = 1;
    while (p.continue !== undefined) {
      p = await page(a, `limit=700&continue=${encodeURIComponent(p.continue)}`);
      expect(p.revision).toBe(revision);
      expect(p.devices.length).toBeLessThanOrEqual(700);
      names.push(...p.devices.map((d) => d.name));
      pages++;
    }
    stop = true;
    await creator;
    expect(pages).toBeGreaterThanOrEqual(Math.ceil(SEEDED / 700));
    expect(new Set(names).size).toBe(names.length);
    expect([...names].sort()).toEqual(names);
    const atRevision = (await store.range('devices/', { revision })).kvs.map((kv) =>
      kv.key.slice('devices/'.length),
    );
    expect(names).toEqual(atRevision);
    for (const n of before) expect(names).toContain(n);
    expect(names.filter((n) => n.startsWith('ghost-'))).toHaveLength(SEEDED);
    // Another host's device, not served here: listed as the record says.
    const ghost = (await page(a, 'limit=1')).devices[0];
    expect(ghost).toMatchObject({ name: 'ghost-00000', state: 'remote', host: 'host-ghost' });
  }, 300_000);

  it('refuses a continue token that is not one, a bad limit, and one whose revision etcd compacted', async () => {
    const bad = await a.api('GET', '/v1/devices?limit=10&continue=garbage');
    expect([bad.status, bad.body.code]).toEqual([400, 'BALLAST_BAD_REQUEST']);
    for (const limit of ['0', '-1', '10001', 'x']) {
      const r = await a.api('GET', `/v1/devices?limit=${limit}`);
      expect([r.status, r.body.code], limit).toEqual([400, 'BALLAST_BAD_REQUEST']);
    }
    const first = await page(a, 'limit=10');
    expect(first.continue).toBeDefined();
    // A change after the listing's revision, then compact up to now.
    await b.api('POST', '/v1/devices', { name: 'after-listing', size: '1M', pool: 'shared' });
    await compactEtcd(etcd.endpoints);
    const r = await a.api(
      'GET',
      `/v1/devices?limit=10&continue=${encodeURIComponent(first.continue!)}`,
    );
    expect([r.status, r.body.code]).toEqual([410, 'BALLAST_LIST_EXPIRED']);
    expect(String(r.body.message)).toMatch(/list again from the start/);
  });

  it('pages the members, and `device ls --json` and `cluster members --json` read every page', async () => {
    const one = (await a.api('GET', '/v1/cluster/members?limit=1')).body as {
      members: { host: string; state: string; applied?: number }[];
      continue?: string;
    };
    expect(one.members.map((m) => m.host)).toEqual(['host-a']);
    const two = (
      await a.api(
        'GET',
        `/v1/cluster/members?limit=1&continue=${encodeURIComponent(one.continue!)}`,
      )
    ).body as { members: { host: string; state: string }[]; continue?: string };
    expect(two.members.map((m) => [m.host, m.state])).toEqual([['host-b', 'alive']]);
    expect(two.continue).toBeUndefined();
    expect(one.members[0]).toMatchObject({ state: 'alive' });
    expect(one.members[0]!.applied).toBeGreaterThan(0);

    const cli = async (...args: string[]) => {
      const r = await a.cli(...args, '--json');
      expect(r.code, r.stderr).toBe(0);
      return JSON.parse(r.stdout) as Record<string, unknown>;
    };
    const ls = (await cli('device', 'ls')) as { devices: Dev[] };
    expect(ls.devices.filter((d) => d.name.startsWith('ghost-'))).toHaveLength(SEEDED);
    expect(new Set(ls.devices.map((d) => d.name)).size).toBe(ls.devices.length);
    const members = (await cli('cluster', 'members')) as { members: { host: string }[] };
    expect(members.members.map((m) => m.host)).toEqual(['host-a', 'host-b']);
  }, 120_000);

  it('checks etcd against the cluster: 10,000 devices on the default quota are told to raise it, in status and in the log', async () => {
    const r = await a.cli('cluster', 'status', '--json');
    expect(r.code, r.stderr).toBe(0);
    const sizing = (JSON.parse(r.stdout) as { sizing: Record<string, unknown> }).sizing as {
      dbSize: number;
      quota: number | null;
      devices: number;
      members: number;
      warnings: string[];
    };
    expect(sizing.devices).toBeGreaterThanOrEqual(SEEDED);
    expect(sizing.dbSize).toBeGreaterThan(0);
    expect(sizing.quota).toBe(2 * 1024 ** 3);
    expect(sizing.warnings.join('\n')).toMatch(/default 2 GiB quota.*--quota-backend-bytes/);
    const text = await a.cli('cluster', 'status');
    expect(text.stdout).toMatch(/database \d+ MiB of a 2048 MiB quota/);
    expect(text.stdout).toMatch(/WARNING: etcd runs on its default 2 GiB quota/);
    // At start, before the devices were there: the figures, no warning.
    expect(a.stderr()).toMatch(/cluster: etcd database \d+ MiB of a 2048 MiB quota/);
  });
});
