// A frozen agent's queued writes must not land on the new holder's data. host-a
// streams tagged writes through agent A, whose writes to shared files wait 1 s
// in the thread pool (failpoint slow-writes; longer than the event loop lags on a
// busy machine), so nearly every freeze finds some queued past the fence's
// request-time check when A gets SIGSTOP (the test asks for at least one round). host-b then runs
// `ballast pr DEV preempt-abort --wait` through agent B (it returns once A's lease
// has run out) and overwrites every block; A gets SIGCONT. Every block must still
// hold host-b's data: the fence is checked again immediately before each write's
// syscall, in the thread that makes it. On a paging device (page cache) and a dump
// device (O_DIRECT).

import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { NbdClient } from '../../nbd/client.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const BLOCK = 4096;
const BLOCKS = 64;
const MAGIC_A = 'BALLASTA';
const MAGIC_B = 'BALLASTB';
/** Rounds per device role; BALLAST_FENCE_ITERATIONS=N for longer runs by hand. */
const ROUNDS = Number(process.env.BALLAST_FENCE_ITERATIONS ?? 2);

interface WriteRec {
  seq: number;
  block: number;
  sentAt: number;
  ackedAt: number | null;
  /** When its answer (or the end of its connection) came, whatever it was. */
  doneAt: number | null;
}

/** host-a: tagged 4 KiB writes (seq % BLOCKS), `depth` at once, reconnecting when cut. */
class Writer {
  readonly log = new Map<number, WriteRec>();
  private seq = 0;
  private running = true;
  private done: Promise<void> | undefined;

  constructor(
    private readonly uri: string,
    private readonly depth = 4,
  ) {}

  start(): void {
    this.done = this.loop();
  }

  acked(): number {
    let n = 0;
    for (const w of this.log.values()) if (w.ackedAt !== null) n++;
    return n;
  }

  /** Writes sent before `t` still waiting for their answer. */
  pendingSentBefore(t: number): number {
    let n = 0;
    for (const w of this.log.values()) if (w.sentAt < t && w.doneAt === null) n++;
    return n;
  }

  private async loop(): Promise<void> {
    while (this.running) {
      let c: NbdClient;
      try {
        c = await NbdClient.connect(this.uri, { timeoutMs: 2000 });
      } catch {
        await sleep(100);
        continue;
      }
      await Promise.all(Array.from({ length: this.depth }, () => this.stream(c))).catch(() => {});
      await c.close().catch(() => {});
      await sleep(50);
    }
  }

  private async stream(c: NbdClient): Promise<void> {
    while (this.running) {
      const seq = this.seq++;
      const rec: WriteRec = {
        seq,
        block: seq % BLOCKS,
        sentAt: performance.now(),
        ackedAt: null,
        doneAt: null,
      };
      this.log.set(seq, rec);
      const buf = Buffer.alloc(BLOCK, 0xaa);
      buf.write(MAGIC_A, 0, 'latin1');
      buf.writeUInt32BE(seq, 8);
      try {
        await c.write(rec.block * BLOCK, buf);
        rec.ackedAt = performance.now();
      } catch (e) {
        if ((e as { nbdErrno?: number }).nbdErrno === undefined) throw e; // connection gone
        await sleep(20);
      } finally {
        rec.doneAt ??= performance.now();
      }
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.done;
  }
}

describeWithTools(['etcd', 'etcdctl'], "cluster: a frozen agent's queued writes", () => {
  let etcd: EtcdCluster;
  let a: AgentHandle;
  let b: AgentHandle;

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    const shared = makeTempDir('ballast-shared-');
    const common = (host: string) => ({
      pools: [{ name: 'shared', path: shared, shared: true }],
      nbd: { listen: '127.0.0.1:0' },
      cluster: { name: 'queued', etcd: etcd.endpoints, host, leaseTtl: 2, holdTimeout: 3 },
    });
    a = await startAgent({ ...common('a'), env: { BALLAST_FAILPOINTS: 'slow-writes' } });
    b = await startAgent(common('b'));
  }, 60_000);
  afterAll(async () => {
    a?.child.kill('SIGCONT');
    await a?.kill9().catch(() => {});
    await b?.kill9().catch(() => {});
    await etcd?.stop();
  });

  async function pr(via: AgentHandle, device: string, body: Record<string, unknown>) {
    const r = await via.apiMade('POST', `/v1/devices/${device}/pr`, body);
    expect(r.status, r.text).toBe(200);
  }

  const waitFor = (what: string, ok: () => Promise<boolean>, ms = 30_000) =>
    until(what, ok, ms, 50);

  const healthy = (x: AgentHandle) =>
    waitFor('the agent to be healthy', async () => {
      const st = (await x.api('GET', '/v1/cluster/status').catch(() => null))?.body as
        | { healthy?: boolean }
        | undefined;
      return st?.healthy === true;
    });

  async function refused(x: AgentHandle): Promise<number> {
    const m = (await x.api('GET', '/metrics')).text;
    return Number(/^ballast_cluster_fence_refused_writes_total (\d+)/m.exec(m)?.[1] ?? 0);
  }

  for (const role of ['paging', 'dump'] as const) {
    it(`${role} device: nothing A had queued when frozen lands on what B wrote after the preempt`, async () => {
      // Rounds in which A had writes queued when frozen that the check at the
      // syscall refused (a freeze may also catch none there: all in flight on the
      // socket or in the event loop, which the gate holds).
      const refusedIn: string[] = [];
      for (let round = 0; round < ROUNDS; round++) {
        const name = `q-${role}-${round}`;
        const create = () =>
          a.apiMade('POST', '/v1/devices', {
            name,
            size: `${(BLOCK * BLOCKS) / 1024}K`,
            pool: 'shared',
            role,
          });
        let r = await create();
        // Right after A registered again, a change may be answered NOT made (retry).
        if (r.status === 503 && /NOT made/.test(r.text)) r = await create();
        expect(r.status, `${r.text}\nagent a:\n${a.stderr().slice(-4000)}`).toBe(201);
        const file = (r.body as { extents: { file: string }[] }).extents[0]!.file;
        // On each agent's Unix socket a client is that host's identity: a, b.
        await pr(a, name, { action: 'register', as: 'a', saKey: '0xa' });
        await pr(a, name, { action: 'reserve', as: 'a', key: '0xa', type: 'WE' });
        await pr(b, name, { action: 'register', as: 'b', saKey: '0xb' });
        const refusedBefore = await refused(a);

        const w = new Writer(a.uri(name));
        w.start();
        // Writes flow (each waits 1 s in A's pool): some are queued at any moment.
        await waitFor('host-a writes', async () => w.acked() >= 8);
        a.child.kill('SIGSTOP');
        const stoppedAt = performance.now();
        const inFlight = w.pendingSentBefore(stoppedAt);
        let stopped = true;
        try {
          const pa = await b.cli(
            'pr',
            name,
            'preempt-abort',
            '--as',
            'b',
            '--key',
            '0xb',
            '--sa-key',
            '0xa',
            '--type',
            'WE',
            '--wait',
          );
          const returned = performance.now();
          expect(pa.code, pa.stderr).toBe(0);
          // It waited for A's lease to run out, not for A (frozen) to apply it; on a
          // busy machine the lease may have run out before the command was made,
          // and then A is not waited for at all.
          expect(pa.stdout).toMatch(/^waited [\d.]+ s: /m);
          expect(pa.stdout).not.toMatch(/\ba applied it/);

          // host-b overwrites every block while A is still frozen.
          const c = await NbdClient.connect(b.uri(name));
          for (let blk = 0; blk < BLOCKS; blk++) {
            const buf = Buffer.alloc(BLOCK, 0xbb);
            buf.write(MAGIC_B, 0, 'latin1');
            buf.writeUInt32BE(round * BLOCKS + blk, 8);
            await c.write(blk * BLOCK, buf);
          }
          await c.flush();
          await c.close();

          a.child.kill('SIGCONT');
          stopped = false;
          // A notices, re-registers and serves again; its queued writes are refused
          // at their syscall once they have waited out the rest of their second.
          await healthy(a);
          // Every write A had is answered (the stop waits for each one).
          await w.stop();
          // What stopped them: the check at the syscall, in the pool's threads.
          const n = (await refused(a)) - refusedBefore;
          if (n > 0) refusedIn.push(`round ${round}: ${n} of ${inFlight} in flight`);

          const data = readFileSync(file);
          const bad: string[] = [];
          for (let blk = 0; blk < BLOCKS; blk++) {
            const at = data.subarray(blk * BLOCK, (blk + 1) * BLOCK);
            const tag = at.toString('latin1', 0, 8);
            if (tag === MAGIC_B && at.readUInt32BE(8) === round * BLOCKS + blk) continue;
            if (tag === MAGIC_A) {
              const seq = at.readUInt32BE(8);
              const rec = w.log.get(seq);
              const rel = (t: number | null | undefined) =>
                t == null ? 'never' : `${((t - stoppedAt) / 1000).toFixed(3)} s`;
              bad.push(
                `block ${blk}: holds the old writer's seq ${seq} (sent ${rel(rec?.sentAt)}, acked ${rel(rec?.ackedAt)} after the SIGSTOP; the preempt returned ${rel(returned)} after it)`,
              );
            } else bad.push(`block ${blk}: neither writer's data (${tag})`);
          }
          expect(bad, `${role} round ${round}: blocks the new holder wrote, overwritten`).toEqual(
            [],
          );
        } finally {
          if (stopped) a.child.kill('SIGCONT');
          await w.stop();
        }
      }
      // The check at the syscall did the refusing at least once (each write waits 1 s
      // in the pool, so nearly every freeze finds some there).
      expect(
        refusedIn.length,
        `${role}: no round had a write refused at its syscall`,
      ).toBeGreaterThan(0);
    }, 300_000);
  }
});
