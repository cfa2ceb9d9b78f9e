// Reservations across hosts, judged on a recorded history: writer A streams
// tagged writes through agent A while B preempts-and-aborts A through agent B;
// A is healthy, partitioned from etcd (fault proxy), frozen (SIGSTOP) past its
// lease, or killed (-9). Afterwards the shared file is read directly: no block
// may hold a write of A sent after B's preempt returned, and every write
// acknowledged to A must still be there (or overwritten by a later one of A's).

import { readFileSync } from 'node:fs';
import { performance } from 'node:perf_hooks';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { PR_TYPE_NAMES, PR_TYPES, type PrState, prAccess } from '../../agent/pr.js';
import { NbdClient } from '../../nbd/client.js';
import { FaultProxy } from '../harness/fault-proxy.js';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { type EtcdCluster, startEtcdCluster } from '../helpers/etcd.js';
import { makeTempDir } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until } from '../helpers/wait.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const BLOCK = 4096;
const BLOCKS = 256;
const MAGIC = 'BALLASTW';
const EPERM = 1;
const EIO = 5;
/** Iterations per fault in the suite; BALLAST_FENCE_ITERATIONS=N for longer runs by hand. */
const ITERATIONS = Number(process.env.BALLAST_FENCE_ITERATIONS ?? 3);

interface WriteRec {
  seq: number;
  block: number;
  sentAt: number;
  ackedAt: number | null;
  errno: number | null;
}

/** Writes tagged 4 KiB blocks (seq % BLOCKS) through one agent, reconnecting when cut. */
class Writer {
  readonly log: WriteRec[] = [];
  private seq = 0;
  private running = true;
  private done: Promise<void> | undefined;
  connects = 0;

  constructor(
    private readonly uri: string,
    private readonly depth = 4,
  ) {}

  start(): void {
    this.done = this.loop();
  }

  private async loop(): Promise<void> {
    while (this.running) {
      let c: NbdClient;
      try {
        c = await NbdClient.connect(this.uri, { timeoutMs: 2000 });
        this.connects++;
      } catch {
        await sleep(100);
        continue;
      }
      try {
        await Promise.all(Array.from({ length: this.depth }, () => this.stream(c)));
      } catch {}
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
        errno: null,
      };
      this.log.push(rec);
      const buf = Buffer.alloc(BLOCK, seq & 0xff);
      buf.write(MAGIC, 0, 'latin1');
      buf.writeUInt32BE(seq, 8);
      try {
        await c.write(rec.block * BLOCK, buf);
        rec.ackedAt = performance.now();
      } catch (e) {
        rec.errno = (e as { nbdErrno?: number }).nbdErrno ?? -1;
        if (rec.errno === -1) throw e; // the connection is gone: reconnect
        await sleep(20);
      }
    }
  }

  async stop(): Promise<void> {
    this.running = false;
    await this.done;
  }
}

/** The seq found in each block of the file (-1: never written by the writer). */
function blocksOf(file: string): number[] {
  const data = readFileSync(file);
  const out: number[] = [];
  for (let b = 0; b < BLOCKS; b++) {
    const blk = data.subarray(b * BLOCK, (b + 1) * BLOCK);
    out.push(blk.toString('latin1', 0, 8) === MAGIC ? blk.readUInt32BE(8) : -1);
  }
  return out;
}

/** The fencing property on the recorded history; returns what it found wrong. */
function check(log: WriteRec[], found: number[], preemptReturned: number): string[] {
  const bad: string[] = [];
  const bySeq = new Map(log.map((w) => [w.seq, w]));
  const lastAcked = new Array<number>(BLOCKS).fill(-1);
  for (const w of log) {
    if (w.ackedAt !== null && w.seq > lastAcked[w.block]!) lastAcked[w.block] = w.seq;
  }
  for (let b = 0; b < BLOCKS; b++) {
    const s = found[b]!;
    if (s >= 0) {
      const w = bySeq.get(s);
      if (!w) bad.push(`block ${b}: seq ${s} was never sent`);
      else if (w.sentAt >= preemptReturned) {
        bad.push(
          `block ${b}: holds seq ${s}, sent ${(w.sentAt - preemptReturned).toFixed(1)} ms after the preempt returned`,
        );
      }
    }
    if (lastAcked[b]! > s)
      bad.push(`block ${b}: acknowledged seq ${lastAcked[b]} lost (holds ${s})`);
  }
  return bad;
}

describeWithTools(['etcd', 'etcdctl'], 'cluster: reservations across hosts, fencing', () => {
  let etcd: EtcdCluster;
  let proxies: FaultProxy[] = [];
  let a: AgentHandle;
  let b: AgentHandle;
  const TTL = 2;
  const HOLD = 3;

  beforeAll(async () => {
    etcd = await startEtcdCluster({ size: 3 });
    proxies = await Promise.all(etcd.endpoints.map((e) => FaultProxy.start(e)));
    const shared = makeTempDir('ballast-shared-');
    const common = (host: string, endpoints: string[]) => ({
      pools: [{ name: 'shared', path: shared, shared: true }],
      nbd: { listen: '127.0.0.1:0', identities: ['127.0.0.1=c'] },
      cluster: { name: 'fence', etcd: endpoints, host, leaseTtl: TTL, holdTimeout: HOLD },
    });
    a = await startAgent(
      common(
        'a',
        proxies.map((p) => p.url),
      ),
    );
    b = await startAgent(common('b', etcd.endpoints));
  }, 60_000);
  afterAll(async () => {
    await a?.kill9().catch(() => {});
    await b?.kill9().catch(() => {});
    for (const p of proxies) await p.close();
    await etcd?.stop();
  });

  async function pr(via: AgentHandle, device: string, body: Record<string, unknown>) {
    return via.api('POST', `/v1/devices/${device}/pr`, body);
  }

  async function device(name: string, size = `${(BLOCK * BLOCKS) / 1024}K`): Promise<string> {
    const r = await a.api('POST', '/v1/devices', { name, size, pool: 'shared', role: 'paging' });
    expect(r.status, r.text).toBe(201);
    return (r.body as { extents: { file: string }[] }).extents[0]!.file;
  }

  async function healthy(x: AgentHandle): Promise<void> {
    const deadline = Date.now() + 20_000;
    for (;;) {
      const st = (await x.api('GET', '/v1/cluster/status').catch(() => null))?.body as
        | { healthy?: boolean }
        | undefined;
      if (st?.healthy) return;
      if (Date.now() > deadline) throw new Error('agent did not become healthy');
      await sleep(100);
    }
  }

  it('the access matrix, with the holder on agent A and the others on agent B', async () => {
    await device('matrix');
    const clients = {
      a: await NbdClient.connect(a.uri('matrix')),
      b: await NbdClient.connect(b.uri('matrix')),
      c: await NbdClient.connect(`nbd://127.0.0.1:${b.nbdPort}/matrix`),
      cOnA: await NbdClient.connect(`nbd://127.0.0.1:${a.nbdPort}/matrix`),
    };
    const ask = async (c: NbdClient, what: 'read' | 'write') => {
      try {
        if (what === 'read') await c.read(0, 512);
        else await c.write(0, Buffer.alloc(512, 0x5a));
        return 'ok';
      } catch (e) {
        return (e as { nbdErrno?: number }).nbdErrno === EPERM ? 'EPERM' : String(e);
      }
    };
    expect((await pr(a, 'matrix', { action: 'register', as: 'a', saKey: '0xa' })).status).toBe(200);
    expect((await pr(b, 'matrix', { action: 'register', as: 'b', saKey: '0xb' })).status).toBe(200);
    for (const type of PR_TYPES) {
      const name = PR_TYPE_NAMES[type];
      const r = await pr(a, 'matrix', { action: 'reserve', as: 'a', key: '0xa', type: name });
      expect(r.status, r.text).toBe(200);
      // What the SPC-4 model says, for the state both agents now hold.
      const state: PrState = {
        generation: 0,
        registrations: new Map([
          ['a', 0xan],
          ['b', 0xbn],
        ]),
        reservation: { type, holder: 'a' },
      };
      const want = (who: string) => {
        const acc = prAccess(state, who);
        return `${acc.read ? 'ok' : 'EPERM'} ${acc.write ? 'ok' : 'EPERM'}`;
      };
      for (const [who, c] of Object.entries(clients)) {
        const id = who === 'cOnA' ? 'c' : who;
        const got = `${await ask(c, 'read')} ${await ask(c, 'write')}`;
        expect({ type: name, who, got }).toEqual({ type: name, who, got: want(id) });
      }
      // what each agent applied, as B's cache sees their acks (they follow shortly)
      const deadline = Date.now() + 10_000;
      for (;;) {
        const show = (await b.api('GET', '/v1/devices/matrix/pr')).body as {
          agents: { host: string; applied: boolean }[];
        };
        if (show.agents.length === 2 && show.agents.every((x) => x.applied)) break;
        expect(Date.now(), JSON.stringify(show.agents)).toBeLessThan(deadline);
        await sleep(50);
      }
      expect(
        (await pr(b, 'matrix', { action: 'release', as: 'a', key: '0xa', type: name })).status,
      ).toBe(200);
    }
    for (const c of Object.values(clients)) await c.close();
  });

  const modes = ['healthy', 'partition', 'sigstop', 'kill9'] as const;
  for (const mode of modes) {
    it(`two writers: B preempts A (A ${mode}); nothing A sent after the preempt returned lands`, async () => {
      for (let iter = 0; iter < ITERATIONS; iter++) {
        const name = `f-${mode}-${iter}`;
        const file = await device(name);
        expect((await pr(a, name, { action: 'register', as: 'a', saKey: '0xa' })).status).toBe(200);
        expect(
          (await pr(a, name, { action: 'reserve', as: 'a', key: '0xa', type: 'WE' })).status,
        ).toBe(200);
        expect((await pr(b, name, { action: 'register', as: 'b', saKey: '0xb' })).status).toBe(200);
        const w = new Writer(a.uri(name));
        w.start();
        await sleep(100 + Math.random() * 400);
        if (mode === 'partition') for (const p of proxies) p.partition();
        if (mode === 'sigstop') a.child.kill('SIGSTOP');
        if (mode === 'kill9') await a.kill9();
        if (mode !== 'healthy') await sleep(Math.random() * 300);
        const t0 = performance.now();
        const r = await pr(b, name, {
          action: 'preempt-abort',
          as: 'b',
          key: '0xb',
          saKey: '0xa',
          type: 'WE',
        });
        const returned = performance.now();
        expect(r.status, r.text).toBe(200);
        const settled = (r.body as { settled: { hosts: { host: string; how: string }[] } }).settled;
        const howA = settled.hosts.find((h) => h.host === 'a')?.how;
        if (mode === 'healthy') expect(howA).toBe('acked');
        else {
          // waited for A's lease to run out: about the TTL
          expect(howA).toBe('expired');
          expect(returned - t0).toBeGreaterThan(500);
        }
        // A keeps trying for a while, then its agent comes back and refuses it.
        await sleep(200 + Math.random() * 500);
        if (mode === 'partition') for (const p of proxies) p.heal();
        if (mode === 'sigstop') a.child.kill('SIGCONT');
        if (mode === 'kill9') await a.start();
        await healthy(a);
        await sleep(500);
        await w.stop();
        const bad = check(w.log, blocksOf(file), returned);
        expect(bad, `${mode} #${iter}`).toEqual([]);
        const late = w.log.filter((x) => x.sentAt > returned + 100 && x.errno !== null);
        expect(late.length, 'A kept trying after the preempt').toBeGreaterThan(0);
        const afterRejoin = w.log.filter((x) => x.sentAt > returned + 100);
        expect(afterRejoin.every((x) => x.ackedAt === null)).toBe(true);
        expect(late.some((x) => x.errno === EPERM)).toBe(true);
        // the new holder writes
        const c = await NbdClient.connect(b.uri(name));
        await c.write(0, Buffer.alloc(BLOCK, 0xbb));
        await c.close();
        expect(
          readFileSync(file)
            .subarray(0, BLOCK)
            .every((x) => x === 0xbb),
        ).toBe(true);
      }
    });
  }

  it('partitioned: held requests fail with EIO after the bound and never reach the file', async () => {
    const file = await device('held');
    const c = await NbdClient.connect(a.uri('held'));
    await c.write(0, Buffer.alloc(BLOCK, 0x11));
    for (const p of proxies) p.partition();
    try {
      await sleep(TTL * 1000); // past the lease deadline: A has fenced itself
      const t0 = performance.now();
      const err = await c.write(0, Buffer.alloc(BLOCK, 0x22)).then(
        () => null,
        (e: { nbdErrno?: number }) => e.nbdErrno,
      );
      const held = performance.now() - t0;
      expect(err).toBe(EIO);
      expect(held).toBeGreaterThan(HOLD * 1000 - TTL * 1000 - 200);
      expect(held).toBeLessThan(HOLD * 1000 + 2000);
      expect(
        readFileSync(file)
          .subarray(0, BLOCK)
          .every((x) => x === 0x11),
      ).toBe(true);
      const m = (await a.api('GET', '/metrics')).text;
      expect(m).toMatch(/ballast_cluster_fenced 1/);
    } finally {
      for (const p of proxies) p.heal();
    }
    await healthy(a);
    await sleep(300);
    await c.write(0, Buffer.alloc(BLOCK, 0x33));
    expect(
      readFileSync(file)
        .subarray(0, BLOCK)
        .every((x) => x === 0x33),
    ).toBe(true);
    await c.close();
  });

  it('conflicting PR commands from two agents: one wins; stale generations are refused', async () => {
    await device('race');
    expect((await pr(a, 'race', { action: 'register', as: 'a', saKey: '0xa' })).status).toBe(200);
    expect((await pr(b, 'race', { action: 'register', as: 'b', saKey: '0xb' })).status).toBe(200);
    for (let i = 0; i < 10; i++) {
      const [ra, rb] = await Promise.all([
        pr(a, 'race', { action: 'reserve', as: 'a', key: '0xa', type: 'WE' }),
        pr(b, 'race', { action: 'reserve', as: 'b', key: '0xb', type: 'WE' }),
      ]);
      const statuses = [ra.status, rb.status].sort();
      expect(statuses).toEqual([200, 409]);
      const loser = ra.status === 409 ? ra : rb;
      expect((loser.body as { code: string }).code).toBe('PR_CONFLICT');
      const winner = ra.status === 200 ? 'a' : 'b';
      const show = (await a.api('GET', '/v1/devices/race/pr')).body as {
        reservation: { holder: string };
      };
      expect(show.reservation.holder).toBe(winner);
      const rel = await pr(winner === 'a' ? b : a, 'race', {
        action: 'release',
        as: winner,
        key: winner === 'a' ? '0xa' : '0xb',
        type: 'WE',
      });
      expect(rel.status, rel.text).toBe(200);
    }
    const gen = ((await b.api('GET', '/v1/devices/race/pr')).body as { generation: number })
      .generation;
    const stale = await pr(a, 'race', {
      action: 'register',
      as: 'c',
      saKey: '0xc',
      ifGeneration: gen - 1,
    });
    expect(stale.status).toBe(409);
    expect(stale.text).toMatch(/stale-generation/);
    const fresh = await pr(a, 'race', {
      action: 'register',
      as: 'c',
      saKey: '0xc',
      ifGeneration: gen,
    });
    expect(fresh.status, fresh.text).toBe(200);
  });

  it('etcd leader killed during PR changes: each holds everywhere or nowhere, and the answer says which', async () => {
    await device('lk');
    // The model: who is registered for certain, and who is in doubt (an answer
    // "may have been made": etcd did not answer within the deadline). An identity
    // in doubt is not used again; at the end it may be either way, but every
    // agent must agree, and every certain one must be exactly as answered.
    const keys = new Set<string>();
    const doubt = new Set<string>();
    const outcomes: string[] = [];
    const burst = (async () => {
      for (let i = 0; i < 40; i++) {
        const who = `id${i % 5}`;
        if (doubt.has(who)) continue;
        const registered = keys.has(who);
        const r = await pr(i % 2 ? a : b, 'lk', {
          action: 'register',
          as: who,
          key: registered ? `0x${(i % 5) + 1}` : '0',
          saKey: registered ? '0' : `0x${(i % 5) + 1}`,
        });
        const code = r.status === 200 ? 'ok' : (r.body as { code: string }).code;
        outcomes.push(`${i}:${who}:${registered ? 'unregister' : 'register'}:${code}`);
        const made = () => (registered ? keys.delete(who) : keys.add(who));
        if (r.status === 200 || code === 'BALLAST_CLUSTER_NOT_APPLIED') {
          // NOT_APPLIED: made, and enforced everywhere; a grant completes later.
          made();
        } else if (/may have been made/.test(r.text)) {
          expect(code, r.text).toBe('STORE_TIMEOUT');
          doubt.add(who);
        } else {
          // Any other failure must say the change was not made.
          expect(r.text, outcomes.join(' ')).toMatch(/NOT made/);
          expect(r.text).not.toMatch(/may or may not/);
        }
      }
    })();
    await sleep(150);
    const leader = await etcd.leader();
    await etcd.kill(leader, 'SIGKILL');
    await burst;
    await etcd.restart(leader);
    await healthy(a);
    await healthy(b);
    const want = [...keys].map((w) => `0x${Number(w.slice(2)) + 1}`);
    const inDoubt = [...doubt].map((w) => `0x${Number(w.slice(2)) + 1}`);
    const read = async (x: AgentHandle) =>
      ((await x.api('GET', '/v1/devices/lk/pr/keys')).body as { keys: string[] }).keys;
    // Every change this test saw answered is applied on both agents once they
    // are healthy; wait for the two to agree (a grant settles by itself).
    await until('both agents show the same keys', async () => {
      const [ka, kb] = [await read(a), await read(b)];
      return JSON.stringify([...ka].sort()) === JSON.stringify([...kb].sort());
    });
    for (const x of [a, b]) {
      const k = (await read(x)).filter((key) => !inDoubt.includes(key));
      expect(k.sort(), `keys on ${x === a ? 'a' : 'b'}: ${outcomes.join(' ')}`).toEqual(
        want.sort(),
      );
    }
  });
});
