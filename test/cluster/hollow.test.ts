// Hollow members (`ballast agent --hollow`, bench/hollow.ts) in one cluster with real
// agents: 20 of them in one process beside 2 real agents and a real 3-member etcd.
// They declare the real agents' shared pool, so they serve its devices as far as the
// cluster can tell: a change through a real agent waits for their acks; frozen, it
// waits until their leases run out; killed, they are listed expired and a change no
// longer waits for them. They make no files.

import { randomBytes } from 'node:crypto';
import { existsSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { HollowProcess, hollowScript } from '../../bench/hollow.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { killAfterAll, makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

const HOLLOW = 20;

interface Member {
  host: string;
  state: string;
  hollow?: boolean;
  pools?: { name: string; shared: boolean }[];
}

interface Settled {
  waitedMs: number;
  hosts: { host: string; how: string }[];
}

describeWithTools(['etcd', 'etcdctl'], 'cluster: hollow members beside real agents', () => {
  let etcd: EtcdCluster;
  let a: AgentHandle;
  let b: AgentHandle;
  let hollow: HollowProcess;
  let sharedPool: string;
  const name = `t${randomBytes(4).toString('hex')}`;
  const hosts = Array.from({ length: HOLLOW }, (_, i) => `hollow-${String(i).padStart(2, '0')}`);

  beforeAll(async () => {
    if (!existsSync(hollowScript())) throw new Error(`${hollowScript()} is missing: npm run build`);
    etcd = await startEtcdCluster({ size: 3 });
    sharedPool = path.join(makeTempDir('ballast-shared-'), name);
    const cluster = { name, etcd: etcd.endpoints, leaseTtl: 2 };
    const agent = (host: string) =>
      startAgent({
        pools: [{ name: 'shared', path: sharedPool, shared: true }, { name: 'local' }],
        cluster: { ...cluster, host },
      });
    a = await agent('host-a');
    b = await agent('host-b');
    hollow = new HollowProcess({
      cluster,
      dir: makeTempDir('ballast-hollow-'),
      members: hosts.map((host) => ({ host, pools: [{ name: 'shared', path: sharedPool }] })),
    });
    killAfterAll(hollow.child);
    await hollow.ready;
  }, 180_000);
  afterAll(async () => {
    await hollow?.kill().catch(() => {});
    await Promise.all([a, b].map((x) => x?.kill9().catch(() => {})));
    await etcd?.stop();
  });

  async function members(): Promise<Member[]> {
    const r = await a.cli('cluster', 'members', '--json');
    expect(r.code, r.stderr).toBe(0);
    return (JSON.parse(r.stdout) as { members: Member[] }).members;
  }

  async function pr(body: Record<string, unknown>): Promise<Settled> {
    const r = await a.api('POST', '/v1/devices/d1/pr', { as: 'guest-a', ...body });
    expect(r.status, JSON.stringify(r.body)).toBe(200);
    return r.body.settled as Settled;
  }

  const howOf = (s: Settled, host: string) => s.hosts.find((h) => h.host === host)?.how;

  it('lists the hollow members beside the real agents, marked hollow', async () => {
    const list = await members();
    expect(list.map((m) => m.host)).toEqual([...hosts, 'host-a', 'host-b']);
    expect(list.every((m) => m.state === 'alive')).toBe(true);
    expect(list.filter((m) => m.hollow).map((m) => m.host)).toEqual(hosts);
    expect(list.find((m) => m.host === 'hollow-00')?.pools).toEqual([
      expect.objectContaining({ name: 'shared', shared: true }),
    ]);
    const table = await a.cli('cluster', 'members');
    expect(table.stdout).toMatch(/hollow-00 +alive.*none \(hollow\)/);
  });

  it('waits for the hollow members: a device they serve, a PR change they ack; no file of theirs', async () => {
    const r = await a.api('POST', '/v1/devices', { name: 'd1', size: '1M', pool: 'shared' });
    expect(r.status, JSON.stringify(r.body)).toBe(201);
    expect((r.body.hosts as string[]).sort()).toEqual([...hosts, 'host-a', 'host-b']);
    const settled = await pr({ action: 'register', saKey: '0xa1' });
    expect(howOf(settled, 'host-a')).toBe('self');
    expect(howOf(settled, 'host-b')).toBe('acked');
    for (const h of hosts) expect(howOf(settled, h), h).toBe('acked');
    // host-a made the one file; the hollow members made none.
    expect(readdirSync(sharedPool).filter((f) => f.endsWith('.img'))).toHaveLength(1);
    const show = await a.api('GET', '/v1/devices/d1/pr');
    const agents = show.body.agents as { host: string; applied: boolean }[];
    expect(agents.filter((x) => x.applied).map((x) => x.host)).toEqual(
      expect.arrayContaining(hosts),
    );
  });

  it('frozen, they hold a change until their leases run out', async () => {
    hollow.signal('SIGSTOP');
    try {
      const settled = await pr({ action: 'register', key: '0xa1', saKey: '0xa2' });
      expect(howOf(settled, 'host-b')).toBe('acked');
      for (const h of hosts) expect(howOf(settled, h), h).toBe('expired');
      // The lease is 2 s; the last keepalive was at most a third of that before the freeze.
      expect(settled.waitedMs).toBeGreaterThan(1000);
    } finally {
      hollow.signal('SIGCONT');
    }
    // Woken, each finds its lease gone and registers again.
    await until('the hollow members to register again', async () =>
      (await members()).every((m) => m.state === 'alive'),
    );
  });

  it('killed, they are listed expired, and a change no longer waits for them', async () => {
    await hollow.kill();
    await until(
      'the hollow members to be listed expired',
      async () => (await members()).filter((m) => m.state === 'expired').length === HOLLOW,
    );
    const settled = await pr({ action: 'register', key: '0xa2', saKey: '0xa3' });
    expect(settled.hosts.map((h) => h.host).sort()).toEqual(['host-a', 'host-b']);
  });
});
