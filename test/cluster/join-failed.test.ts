// A request that reaches an agent while it starts waits until the agent has
// joined the cluster; if the join fails (the agent then stops), the request
// was never carried out, and its answer says so: STORE_UNAVAILABLE, NOT made.
// Regression (the nemesis, seed 3, 30 min): a create sent to c while c started
// again, with the etcd leader killed, was answered with the join's own error,
// "STORE_TIMEOUT: etcd txn ...: Deadline exceeded", a change in doubt, though
// nothing of it had been sent.
//
// And an agent whose first listing of the cluster is compacted away before its
// watch starts lists again and serves, rather than failing its start with
// STORE_COMPACTED.

import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { EtcdStore } from '../../cluster/etcd-store.js';
import { AgentHandle, httpRequest, writeAgentConfig } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

describeWithTools(['etcd', 'etcdctl'], 'cluster: a request while the join fails', () => {
  let etcd: EtcdCluster;
  let agent: AgentHandle | undefined;
  const frozen = new Set<number>();

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
  }, 60_000);
  afterAll(async () => {
    for (const pid of frozen) {
      try {
        process.kill(pid, 'SIGCONT');
      } catch {}
    }
    await agent?.kill9().catch(() => {});
    await etcd?.stop();
  });

  it('a create sent while the agent joins, whose join then fails, answers NOT made', async () => {
    const dir = makeTempDir('ballast-join-');
    const file = writeAgentConfig(dir, {
      pools: [{ name: 'shared', path: path.join(dir, 'p'), shared: true }],
      cluster: { name: 'join', etcd: etcd.endpoints, host: 'x', leaseTtl: 2 },
    });
    agent = new AgentHandle(dir, file, { BALLAST_FAILPOINTS: 'join-delay' });
    const started = agent.start().then(
      () => 'started',
      (e: Error) => e.message,
    );
    const x = agent;
    await until('the agent holding its join', async () =>
      /failpoint join-delay: waiting/.test(x.stderr()),
    );
    // etcd stops answering: the join that follows fails on its deadline
    for (let i = 0; i < 3; i++) {
      const pid = etcd.pid(i);
      if (pid) {
        process.kill(pid, 'SIGSTOP');
        frozen.add(pid);
      }
    }
    const r = await httpRequest({ socketPath: x.apiSocket }, 'POST', '/v1/devices', {
      name: 'd',
      size: '1M',
      pool: 'shared',
    });
    for (const pid of frozen) process.kill(pid, 'SIGCONT');
    frozen.clear();
    expect(`${r.status} ${r.body.code}`, String(r.body.message)).toBe('503 STORE_UNAVAILABLE');
    expect(String(r.body.message)).toMatch(/could not join the cluster/);
    expect(String(r.body.message)).toMatch(/NOT made/);
    expect(await started).toMatch(/exited/);
  }, 120_000);

  it('a compaction between the first listing and the watch: the agent lists again and serves', async () => {
    const dir = makeTempDir('ballast-join-');
    const file = writeAgentConfig(dir, {
      pools: [{ name: 'shared', path: path.join(dir, 'p'), shared: true }],
      cluster: { name: 'join2', etcd: etcd.endpoints, host: 'y', leaseTtl: 2 },
    });
    const x = new AgentHandle(dir, file, { BALLAST_FAILPOINTS: 'watch-start-hold' });
    agent = x;
    mkdirSync(x.dataDir, { recursive: true });
    const hold = path.join(x.dataDir, 'watch-start.hold');
    writeFileSync(hold, '');
    const started = x.start().then(
      () => 'started',
      (e: Error) => e.message,
    );
    await until('the agent holding before its watch', async () =>
      /failpoint watch-start-hold: waiting/.test(x.stderr()),
    );
    // Writes after its listing, then compacted: the watch's start revision is gone.
    const direct = await EtcdStore.connect({
      endpoints: etcd.endpoints,
      prefix: '/compactor/',
      timeoutMs: 5000,
    });
    try {
      for (let i = 0; i < 3; i++) await direct.put(`k${i}`, String(i));
      await direct.compact(await direct.revision());
    } finally {
      await direct.close();
    }
    rmSync(hold);
    expect(await started, x.stderr().slice(-3000)).toBe('started');
    expect(x.stderr()).toMatch(/compacted[\s\S]*listing again/);
    // Its 2 s lease may lapse on a busy machine: until it is back it refuses, NOT made.
    const r = await x.apiMade('POST', '/v1/devices', { name: 'after', size: '1M', pool: 'shared' });
    expect(r.status, r.text).toBe(201);
    await x.stop();
  }, 120_000);
});
