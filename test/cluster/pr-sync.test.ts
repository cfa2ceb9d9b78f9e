// Reservations across three agents on a real 3-member etcd, with commands racing
// through different agents and every agent's data path probed by real NBD
// requests the moment a command returns. Identities come from the TCP source
// address (127.0.0.1 / .2 / .3 = host-a / host-b / host-c), on every agent.
// Regressions:
// - a grant (host-b preempting host-a) was in force only on the agent the
//   command went through when it returned; host-b's first WRITE through the
//   other agents got EPERM for a few ms;
// - PREEMPT AND ABORT left host-a's connection open on an agent whose own PR
//   command lost the race to it (it read the record back and never aborted);
// - refusals made before the reservation logic went missing from the audit trail;
// - refusals rewrote pr/<device>, so a real change racing them gave up with
//   BALLAST_CONFLICT.

import { afterAll, beforeAll, expect, it } from 'vitest';
import { httpRequest } from '../../bench/api.js';
import { NbdClient } from '../../nbd/client.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';

const EPERM = 1;
/** Rounds per race; BALLAST_PRSYNC_ROUNDS=N for longer runs by hand. */
const ROUNDS = Number(process.env.BALLAST_PRSYNC_ROUNDS ?? 16);
const SOURCE = { 'host-a': '127.0.0.1', 'host-b': '127.0.0.2', 'host-c': '127.0.0.3' } as const;
type Host = keyof typeof SOURCE;

interface Refusal {
  code?: string;
}

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
        (e: { nbdErrno?: number; code?: string; message?: string }) =>
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

describeWithTools(['etcd', 'etcdctl'], 'cluster: reservations in step across agents', () => {
  let etcd: EtcdCluster;
  const agents: AgentHandle[] = [];
  let A: AgentHandle;
  let B: AgentHandle;
  let C: AgentHandle;

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    const shared = makeTempDir('ballast-shared-');
    for (const host of ['a', 'b', 'c']) {
      agents.push(
        await startAgent({
          pools: [{ name: 'shared', path: shared, shared: true }],
          nbd: {
            listen: '127.0.0.1:0',
            identities: Object.entries(SOURCE).map(([name, addr]) => `${addr}=${name}`),
          },
          // A long lease: nothing here is about fencing, and a loaded machine must not
          // expire anyone (nor agent A while it is frozen for a restart of C).
          cluster: { name: 'prsync', etcd: etcd.endpoints, host, leaseTtl: 20 },
        }),
      );
    }
    [A, B, C] = agents as [AgentHandle, AgentHandle, AgentHandle];
  }, 120_000);
  afterAll(async () => {
    for (const a of agents) await a.kill9().catch(() => {});
    await etcd?.stop();
  });

  const pr = (via: AgentHandle, dev: string, body: Record<string, unknown>) =>
    via.api('POST', `/v1/devices/${dev}/pr`, body);
  async function ok(via: AgentHandle, dev: string, body: Record<string, unknown>) {
    const r = await pr(via, dev, body);
    expect(r.status, r.text).toBe(200);
    return r;
  }
  async function create(dev: string): Promise<void> {
    const r = await A.api('POST', '/v1/devices', { name: dev, size: '1M', pool: 'shared' });
    expect(r.status, r.text).toBe(201);
  }
  const connect = (via: AgentHandle, dev: string, who: Host) =>
    NbdClient.connect(`nbd://127.0.0.1:${via.nbdPort}/${dev}`, {
      localAddress: SOURCE[who],
      timeoutMs: 30_000,
    });
  async function audit(dev: string) {
    const r = await A.api('GET', `/v1/devices/${dev}/pr/audit`);
    expect(r.status, r.text).toBe(200);
    return (
      r.body as {
        entries: {
          seq: number;
          outcome: string;
          code?: string;
          generation: number;
          action: string;
        }[];
      }
    ).entries;
  }

  it('a grant is in force through every agent when the command returns, and so is what it takes away', async () => {
    const vias = [A, B, C];
    const names = ['A', 'B', 'C'];
    const bad: string[] = [];
    const waited: number[] = [];
    for (let round = 0; round < ROUNDS; round++) {
      const dev = `grant${round}`;
      // EA withholds reads too: the grant gives host-b reads and writes, the preempt takes both from host-a.
      const type = round % 2 === 0 ? 'WE' : 'EA';
      await create(dev);
      await ok(A, dev, { action: 'register', as: 'host-a', saKey: '0xa' });
      await ok(A, dev, { action: 'reserve', as: 'host-a', key: '0xa', type });
      await ok(B, dev, { action: 'register', as: 'host-b', saKey: '0xb' });
      const newHolder = await Promise.all(vias.map((v) => connect(v, dev, 'host-b')));
      const oldHolder = await Promise.all(vias.map((v) => connect(v, dev, 'host-a')));
      for (const c of newHolder)
        expect(await outcome(c.write(0, Buffer.alloc(4096, 1)))).toBe('EPERM');

      const origin = round % 3;
      const r = await ok(vias[origin]!, dev, {
        action: 'preempt',
        as: 'host-b',
        key: '0xb',
        saKey: '0xa',
        type,
      });
      // The instant it returns: host-b writes and reads through every agent, host-a writes through none.
      const got = await Promise.all([
        ...newHolder.map((c) => outcome(c.write(4096, Buffer.alloc(4096, 2)))),
        ...newHolder.map((c) => outcome(c.read(0, 4096))),
        ...oldHolder.map((c) => outcome(c.write(8192, Buffer.alloc(4096, 3)))),
      ]);
      const want = [...vias.map(() => 'ok'), ...vias.map(() => 'ok'), ...vias.map(() => 'EPERM')];
      const what = ['host-b WRITE', 'host-b READ', 'host-a WRITE'];
      got.forEach((g, i) => {
        if (g !== want[i]) {
          bad.push(
            `round ${round} (${type}, preempt through ${names[origin]}): ${what[Math.floor(i / 3)]} through ${names[i % 3]}: ${g}, want ${want[i]}`,
          );
        }
      });
      waited.push((r.body as { settled: { waitedMs: number } }).settled.waitedMs);
      for (const c of [...newHolder, ...oldHolder]) await c.close().catch(() => {});
    }
    console.log(`preempt waited for the agents: ${waited.join(', ')} ms`);
    expect(bad).toEqual([]);
  }, 300_000);

  it('PREEMPT AND ABORT racing other PR commands closes the preempted connections on every agent', async () => {
    const vias = [A, B, C];
    const names = ['A', 'B', 'C'];
    const bad: string[] = [];
    let raced = 0;
    for (let round = 0; round < ROUNDS; round++) {
      const dev = `abort${round}`;
      await create(dev);
      await ok(A, dev, { action: 'register', as: 'host-a', saKey: '0xa' });
      await ok(A, dev, { action: 'reserve', as: 'host-a', key: '0xa', type: 'WE' });
      await ok(B, dev, { action: 'register', as: 'host-b', saKey: '0xb' });
      const oldHolder = await Promise.all(vias.map((v) => connect(v, dev, 'host-a')));
      for (const c of oldHolder)
        expect(await outcome(c.write(0, Buffer.alloc(4096, 1)))).toBe('ok');

      // Genuine changes through every agent at once, several at a time on each:
      // each racer re-registers its own identity with a new key.
      let racing = true;
      const racers = vias.flatMap((v, i) =>
        [0, 1, 2, 3].map(async (j) => {
          let n = 0;
          while (racing) {
            const r = await pr(v, dev, {
              action: 'register-ignore',
              as: `racer-${i}-${j}`,
              saKey: String(1000 * (4 * i + j + 1) + (n++ % 500) + 1),
            });
            if (r.status === 200) raced++;
          }
        }),
      );
      await new Promise((r) => setTimeout(r, 100));
      const origin = round % 3;
      let r = await pr(vias[origin]!, dev, {
        action: 'preempt-abort',
        as: 'host-b',
        key: '0xb',
        saKey: '0xa',
        type: 'WE',
      });
      // Giving up after other agents kept changing the device first is allowed (NOT made): again.
      for (let i = 0; i < 20 && r.status === 409 && r.body.code === 'BALLAST_CONFLICT'; i++) {
        r = await pr(vias[origin]!, dev, {
          action: 'preempt-abort',
          as: 'host-b',
          key: '0xb',
          saKey: '0xa',
          type: 'WE',
        });
      }
      expect(r.status, r.text).toBe(200);
      expect((r.body as { preempted: string[] }).preempted).toEqual(['host-a']);
      const got = await Promise.all(
        oldHolder.map((c) => outcome(c.write(4096, Buffer.alloc(4096, 2)))),
      );
      racing = false;
      await Promise.all(racers);
      got.forEach((g, i) => {
        if (g !== 'closed') {
          bad.push(
            `round ${round} (preempt-abort through ${names[origin]}): host-a's connection through ${names[i]}: ${g}, want closed`,
          );
        }
      });
      for (const c of oldHolder) await c.close().catch(() => {});
    }
    console.log(`racing changes made: ${raced}`);
    expect(raced).toBeGreaterThan(ROUNDS);
    expect(bad).toEqual([]);
  }, 300_000);

  it('an agent restarted while a grant waits for another agent grants nothing before that agent applied it', async () => {
    const dev = 'restart';
    await create(dev);
    await ok(A, dev, { action: 'register', as: 'host-a', saKey: '0xa' });
    await ok(A, dev, { action: 'reserve', as: 'host-a', key: '0xa', type: 'WE' });
    await ok(B, dev, { action: 'register', as: 'host-b', saKey: '0xb' });
    // A (the old holder's agent) cannot apply the preempt while it is frozen.
    A.child.kill('SIGSTOP');
    let preempt: ReturnType<typeof httpRequest> | undefined;
    try {
      // It returns only once A has applied it: longer than the client's default 5 s.
      preempt = httpRequest(
        { socketPath: B.apiSocket },
        'POST',
        `/v1/devices/${dev}/pr`,
        { action: 'preempt', as: 'host-b', key: '0xb', saKey: '0xa', type: 'WE' },
        { timeoutMs: 120_000 },
      );
      // Committed (B applied it) but not returned: A has not acked.
      for (;;) {
        const show = (await B.api('GET', `/v1/devices/${dev}/pr`)).body as {
          reservation: { holder: string } | null;
        };
        if (show.reservation?.holder === 'host-b') break;
        await new Promise((r) => setTimeout(r, 20));
      }
      await C.kill9();
      await C.start();
      const viaC = await connect(C, dev, 'host-b');
      expect(
        await outcome(viaC.write(0, Buffer.alloc(4096, 1))),
        'host-b through the restarted C',
      ).toBe('EPERM');
      A.child.kill('SIGCONT');
      const r = await preempt;
      expect(r.status, r.text).toBe(200);
      const how = (r.body as { settled: { hosts: { host: string; how: string }[] } }).settled.hosts;
      expect(how.find((h) => h.host === 'a')?.how, 'A applied it (its lease held)').toBe('acked');
      expect(await outcome(viaC.write(0, Buffer.alloc(4096, 2))), 'once it returned').toBe('ok');
      await viaC.close();
    } finally {
      A.child.kill('SIGCONT');
      await preempt?.catch(() => {});
    }
  }, 300_000);

  it('every refusal, through any agent, is on the audit trail', async () => {
    const dev = 'refusals';
    await create(dev);
    await ok(A, dev, { action: 'register', as: 'host-a', saKey: '0xa' });
    await ok(A, dev, { action: 'reserve', as: 'host-a', key: '0xa', type: 'WE' });
    const codes = new Map<string, number>();
    const flood = async (via: AgentHandle, n: number, body: Record<string, unknown>) => {
      for (let i = 0; i < n; i += 8) {
        const rs = await Promise.all(
          Array.from({ length: Math.min(8, n - i) }, () => pr(via, dev, body)),
        );
        for (const r of rs) {
          const code = (r.body as Refusal).code ?? `status ${r.status}`;
          codes.set(code, (codes.get(code) ?? 0) + 1);
        }
      }
    };
    await Promise.all([
      flood(B, 80, { action: 'reserve', as: 'host-b', key: '0xb', type: 2 }),
      flood(C, 80, { action: 'reserve', as: 'host-c', key: '0xc', type: 'XX' }),
      flood(A, 40, { action: 'reserve', as: 'host-c', key: '0xc', type: 'WE' }),
    ]);
    const trail = await audit(dev);
    const refused = new Map<string, number>();
    for (const e of trail.filter((x) => x.outcome === 'refused')) {
      refused.set(e.code!, (refused.get(e.code!) ?? 0) + 1);
    }
    expect(Object.fromEntries(refused), 'refusals on the trail').toEqual(Object.fromEntries(codes));
    expect(Object.fromEntries(codes), 'answers').toEqual({ PR_BAD_TYPE: 160, PR_CONFLICT: 40 });
    expect(trail.map((e) => e.seq)).toEqual(trail.map((_, i) => i));
  }, 300_000);

  it('refusals never make a real change give up with BALLAST_CONFLICT', async () => {
    const dev = 'contend';
    await create(dev);
    await ok(A, dev, { action: 'register', as: 'host-a', saKey: '0xa' });
    let flooding = true;
    let refusals = 0;
    const flood = async (via: AgentHandle, body: Record<string, unknown>) => {
      while (flooding) {
        const rs = await Promise.all(Array.from({ length: 4 }, () => pr(via, dev, body)));
        refusals += rs.filter((r) => r.status === 400 || r.status === 409).length;
      }
    };
    const floods = [
      flood(B, { action: 'reserve', as: 'host-b', key: '0xb', type: 2 }),
      flood(C, { action: 'reserve', as: 'host-c', key: '0xc', type: 'WE' }),
    ];
    const failed: string[] = [];
    const CHANGES = 30;
    let key = 0xa;
    for (let i = 0; i < CHANGES; i++) {
      const r = await pr(A, dev, {
        action: 'register',
        as: 'host-a',
        key: `0x${key.toString(16)}`,
        saKey: `0x${(key + 1).toString(16)}`,
      });
      if (r.status === 200) key++;
      else failed.push(`change ${i}: ${r.status} ${r.text}`);
    }
    flooding = false;
    await Promise.all(floods);
    expect(failed).toEqual([]);
    expect(refusals).toBeGreaterThan(CHANGES);
    // The trail holds every change and every refusal, in order: generations never go back.
    const trail = await audit(dev);
    expect(trail.filter((e) => e.outcome === 'changed')).toHaveLength(CHANGES + 1);
    expect(trail.filter((e) => e.outcome === 'refused')).toHaveLength(refusals);
    const gens = trail.map((e) => e.generation);
    expect(gens).toEqual([...gens].sort((x, y) => x - y));
  }, 300_000);
});
