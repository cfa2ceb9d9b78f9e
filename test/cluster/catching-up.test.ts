// An agent that (re)starts while a change is not yet applied everywhere: it
// enforces the state the change replaced with the new one, as every agent that
// applied it does, and judges nothing on a state nobody holds.
// Regression (the nemesis, seed 7): host-c's write through a just restarted
// agent was refused with EPERM, though no reservation was held before or after
// the change in flight: the restarting agent allowed nobody anything until the
// change had settled everywhere.
// Regressions (the nemesis, seed 23 in CI and 30-minute seeds 1 and 2): a registered
// identity's write through a just restarted agent refused with EPERM (a) after the
// change that registered it had returned, because the agent that made it had died
// before acking it: the restarted agent held the device though the change's marker
// said every agent had it; (b) while a change waited, because the revision before it
// was compacted (or etcd did not answer at once): the restarted agent allowed nobody.
// Regression (the nemesis, 30-minute seed 3): host-b's write through an agent back
// from a cut-off was refused with EPERM while a change waited, though host-b was
// registered before and after it: the agent had re-listed after a compaction and
// held the device to the state it last knew itself, from before host-b registered.

import { rmSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { FaultProxy } from '../harness/fault-proxy.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { compactEtcd, type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
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
  // Each test's agents go with it: those of the tests before would only load etcd.
  afterEach(async () => {
    for (const a of agents.splice(0)) {
      if (a.child?.pid) {
        try {
          process.kill(a.child.pid, 'SIGCONT');
        } catch {}
      }
      await a.kill9().catch(() => {});
    }
  });
  afterAll(async () => {
    await etcd?.stop();
  });

  /** An agent of cluster `name` (its own pool directory), with the identities by source address. */
  const starter =
    (name: string) =>
    (host: string, leaseTtl: number, env: Record<string, string> = {}, via = etcd.endpoints) =>
      startAgent({
        pools: [{ name: 'shared', path: path.join(shared, name), shared: true }],
        nbd: {
          listen: '127.0.0.1:0',
          identities: Object.entries(SOURCE).map(([id, addr]) => `${addr}=${id}`),
        },
        cluster: { name, etcd: via, host, leaseTtl },
        env,
      }).then((a) => {
        agents.push(a);
        return a;
      });

  /**
   * `ok`, or the errno and message of a 4 KiB write as `identity` through `agent`. A
   * write answered EIO found the agent fenced (its lease not renewed in time, as on a
   * loaded machine): judged on nothing, it is sent again.
   */
  const writeAs = async (agent: AgentHandle, identity: keyof typeof SOURCE, device: string) => {
    let got = '';
    await until(`a write as ${identity} through the agent not refused EIO`, async () => {
      const c = await NbdClient.connect(`nbd://127.0.0.1:${agent.nbdPort}/${device}`, {
        localAddress: SOURCE[identity],
        timeoutMs: 60_000,
      });
      try {
        await c.write(0, Buffer.alloc(4096, 0xab));
        got = 'ok';
      } catch (e) {
        got = `errno ${(e as { nbdErrno?: number }).nbdErrno}: ${(e as Error).message}`;
      } finally {
        await c.close().catch(() => {});
      }
      return !got.startsWith('errno 5:');
    });
    return got;
  };

  /** `host`'s membership (alive, expired, left) as `agent` lists it. */
  const stateOf = async (agent: AgentHandle, host: string) =>
    (
      (await agent.api('GET', '/v1/cluster/members')).body as {
        members: { host: string; state: string }[];
      }
    ).members.find((m) => m.host === host)?.state;

  /**
   * Through `agent`, while `change` waits for the frozen `frozen`: `stays` (allowed
   * before and after it) writes and `gains` (allowed only after) is refused; once
   * `frozen` goes on and the change returns, `gains` writes too.
   */
  const heldUntilSettled = async (
    agent: AgentHandle,
    device: string,
    stays: keyof typeof SOURCE,
    gains: keyof typeof SOURCE,
    frozen: AgentHandle,
    change: Promise<{ status: number }>,
  ) => {
    expect(await writeAs(agent, stays, device), `${stays}'s write`).toBe('ok');
    expect(await writeAs(agent, gains, device), `${gains}'s write`).toMatch(/^errno 1:/);
    process.kill(frozen.child.pid!, 'SIGCONT');
    expect((await change).status).toBe(200);
    expect(await writeAs(agent, gains, device), 'once the change returned').toBe('ok');
  };

  const pr = async (agent: AgentHandle, device: string, body: Record<string, unknown>) => {
    const r = await agent.api('POST', `/v1/devices/${device}/pr`, body);
    expect(r.status, JSON.stringify(r.body)).toBe(200);
  };

  it('a restart while a change waits for a frozen member enforces the state it replaced, not nobody', async () => {
    const start = starter('catchup');
    const A = await start('a', 2);
    // B's lease is long: frozen, it stays a member that has not applied the change for a while
    const B = await start('b', 60);
    const C = await start('c', 2);
    expect(
      (await A.api('POST', '/v1/devices', { name: 'd', size: '1M', pool: 'shared' })).status,
    ).toBe(201);
    await C.kill9();
    await until('c expired', async () => (await stateOf(A, 'c')) === 'expired');
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
      const got = await writeAs(C, 'host-c', 'd');
      // the change is still waiting for B: the write was judged before it settled
      const still = await stateOf(A, 'b');
      expect(got, `host-c's write through C (b is ${still})`).toBe('ok');
      process.kill(B.child.pid!, 'SIGCONT');
      expect((await change).status).toBe(200);
    } finally {
      try {
        process.kill(B.child.pid!, 'SIGCONT');
      } catch {}
    }
  }, 300_000);

  it("a restart after a change returned, whose maker has not acked it yet: the change's marker puts its grant in force", async () => {
    const start = starter('catchup-marker');
    const A = await start('a', 2);
    const B = await start('b', 2, { BALLAST_FAILPOINTS: 'ack-hold' });
    const C = await start('c', 2);
    expect(
      (await A.api('POST', '/v1/devices', { name: 'm', size: '1M', pool: 'shared' })).status,
    ).toBe(201);
    // host-b holds Write Exclusive, Registrants Only; host-a is not registered
    await pr(A, 'm', { action: 'register', as: 'host-b', saKey: '0xb' });
    await pr(A, 'm', { action: 'reserve', as: 'host-b', key: '0xb', type: 'WERO' });
    expect(await writeAs(C, 'host-a', 'm')).toMatch(/^errno 1:/);
    // B makes the grant and does not ack it (as if it died right after): A and C do
    const hold = path.join(B.dataDir, 'ack.hold');
    writeFileSync(hold, '');
    try {
      await pr(B, 'm', { action: 'register', as: 'host-a', saKey: '0xa' });
      // C restarts while B is a live member whose ack is behind the change
      await C.kill9();
      await C.start();
      expect(await writeAs(C, 'host-a', 'm'), "host-a's write through the restarted C").toBe('ok');
      expect(await writeAs(C, 'host-c', 'm')).toMatch(/^errno 1:/);
    } finally {
      rmSync(hold, { force: true });
    }
  }, 300_000);

  it('a restart while a change waits, after etcd compacted the revision before it: the record carries the state it replaced', async () => {
    const start = starter('catchup-compacted');
    const A = await start('a', 2);
    const B = await start('b', 60);
    const C = await start('c', 2);
    expect(
      (await A.api('POST', '/v1/devices', { name: 'k', size: '1M', pool: 'shared' })).status,
    ).toBe(201);
    await pr(A, 'k', { action: 'register', as: 'host-b', saKey: '0xb' });
    await pr(A, 'k', { action: 'reserve', as: 'host-b', key: '0xb', type: 'WERO' });
    await C.kill9();
    await until('c expired', async () => (await stateOf(A, 'c')) === 'expired');
    const generation = async () =>
      ((await A.api('GET', '/v1/devices/k/pr')).body as { generation?: number }).generation ?? 0;
    const before = await generation();
    process.kill(B.child.pid!, 'SIGSTOP');
    try {
      // a grant to host-a, waiting for the frozen B
      const change = A.api('POST', '/v1/devices/k/pr', {
        action: 'register',
        as: 'host-a',
        saKey: '0xa',
      });
      change.catch(() => {}); // awaited below; a failure before that must not go unhandled
      await until('the change committed', async () => (await generation()) > before);
      await compactEtcd(etcd.endpoints);
      await C.start();
      // held to what both states allow: host-b, registered before and after, writes;
      // host-a's grant waits for B
      await heldUntilSettled(C, 'k', 'host-b', 'host-a', B, change);
    } finally {
      try {
        process.kill(B.child.pid!, 'SIGCONT');
      } catch {}
    }
  }, 300_000);

  it('an agent back from a cut-off re-lists past a compaction while a change waits: held to the state the change replaced, not the one it last knew', async () => {
    const proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    const start = starter('catchup-relist');
    const A = await start('a', 2);
    const B = await start('b', 60);
    const C = await start(
      'c',
      2,
      {},
      proxies.map((p) => p.url),
    );
    const generation = async (agent: AgentHandle) =>
      ((await agent.api('GET', '/v1/devices/r/pr')).body as { generation?: number }).generation ??
      0;
    try {
      expect(
        (await A.api('POST', '/v1/devices', { name: 'r', size: '1M', pool: 'shared' })).status,
      ).toBe(201);
      // host-a holds Write Exclusive, Registrants Only; host-b is not registered
      await pr(A, 'r', { action: 'register', as: 'host-a', saKey: '0xa' });
      await pr(A, 'r', { action: 'reserve', as: 'host-a', key: '0xa', type: 'WERO' });
      const setup = await generation(A);
      await until('C applied the setup', async () => (await generation(C)) === setup);
      expect(await writeAs(C, 'host-b', 'r')).toMatch(/^errno 1:/);
      // C is cut off past its lease; meanwhile host-b registers (no wait for C)
      for (const p of proxies) p.partition();
      await until('c expired', async () => (await stateOf(A, 'c')) === 'expired');
      await pr(A, 'r', { action: 'register', as: 'host-b', saKey: '0xb' });
      // then a change that waits for the frozen B: host-c registers
      const before = await generation(A);
      process.kill(B.child.pid!, 'SIGSTOP');
      const change = A.api('POST', '/v1/devices/r/pr', {
        action: 'register',
        as: 'host-c',
        saKey: '0xc',
      });
      change.catch(() => {}); // awaited below; a failure before that must not go unhandled
      await until('the change committed', async () => (await generation(A)) > before);
      // C's watch cannot resume: it lists again and sees only the last record
      await compactEtcd(etcd.endpoints);
      for (const p of proxies) {
        p.reset();
        p.heal();
      }
      await until(
        'C back and caught up',
        async () => (await stateOf(A, 'c')) === 'alive' && (await generation(C)) > before,
      );
      // held to what both the change and the state it replaced allow: host-b,
      // registered before and after, writes; host-c's registration waits for B
      await heldUntilSettled(C, 'r', 'host-b', 'host-c', B, change);
    } finally {
      try {
        process.kill(B.child.pid!, 'SIGCONT');
      } catch {}
      for (const p of proxies) await p.close().catch(() => {});
    }
  }, 300_000);

  it('a re-registration whose answer is lost: the agent is healthy again only once it is a member again', async () => {
    const start = starter('catchup-rejoin');
    const A = await start('a', 2);
    const X = await start('x', 2, { BALLAST_FAILPOINTS: 'register-lost' });
    const stateOfX = () => stateOf(A, 'x');
    process.kill(X.child.pid!, 'SIGSTOP');
    try {
      await until('x expired', async () => (await stateOfX()) === 'expired');
    } finally {
      process.kill(X.child.pid!, 'SIGCONT');
    }
    // its lease is gone: it registers again, and the first try's answer is lost
    await until('the lost registration', () => X.stderr().includes('failpoint register-lost'));
    // a lease kept alive without its member key made it healthy for good, and no member
    await until('x a member again', async () => (await stateOfX()) === 'alive');
    const status = (await X.api('GET', '/v1/cluster/status')).body as { healthy?: boolean };
    expect(status.healthy, JSON.stringify(status)).toBe(true);
  }, 300_000);
});
