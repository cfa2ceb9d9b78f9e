// A long run of the agent under a mix of everything at once:
//   npm run soak -- --minutes N [--restart-minutes M] [--dir DIR]
// - fio (nbd engine, libnbd) writes with verification (crc32c) on two paging
//   devices, round after round; a mismatch is data loss;
// - devices are created, resized and deleted over and over;
// - reservations flip between two identities on a third device;
// - fio clients are killed mid-run (SIGKILL);
// - the agent is restarted (SIGTERM, start) every few minutes (--restart-minutes;
//   0: never, to watch one agent's memory over the whole run), and the
//   devices' data, written and verified before, is verified again after;
// - the agent's RSS is sampled every 5 s.
// At the end: counts, errors, mismatches (must be 0) and the agent's memory
// over time (must be flat). Exit 1 on a mismatch or an unexpected error.
// Not part of the test suite.

import { mkdirSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import { dirname, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Child, killAll, memoryKiB, run } from './proc.js';

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), '..', '..');
const BALLAST = join(ROOT, 'bin', 'ballast');

function parseArgs(argv: string[]): { minutes: number; restartMinutes?: number; dir: string } {
  let minutes = 5;
  let restartMinutes: number | undefined;
  let dir = '';
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === '--minutes') minutes = Number(argv[++i]);
    else if (a === '--restart-minutes') restartMinutes = Number(argv[++i]);
    else if (a === '--dir') dir = argv[++i] ?? '';
    else {
      process.stderr.write(
        'usage: npm run soak -- --minutes N [--restart-minutes M (0: never)] [--dir DIR]\n',
      );
      process.exit(2);
    }
  }
  if (!(minutes > 0)) {
    process.stderr.write('--minutes must be a positive number\n');
    process.exit(2);
  }
  if (restartMinutes !== undefined && !(restartMinutes >= 0)) {
    process.stderr.write('--restart-minutes must be a number >= 0\n');
    process.exit(2);
  }
  return { minutes, restartMinutes, dir: dir || join(os.tmpdir(), `ballast-soak-${process.pid}`) };
}

const log = (m: string) =>
  process.stderr.write(`[soak ${new Date().toISOString().slice(11, 19)}] ${m}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface ApiBody {
  code?: string;
  message?: string;
}

class Agent {
  child: Child | null = null;
  constructor(
    readonly dir: string,
    readonly config: string,
  ) {}
  get socket() {
    return join(this.dir, 'api.sock');
  }
  uri(dev: string) {
    return `nbd+unix:///${dev}?socket=${join(this.dir, 'nbd.sock')}`;
  }
  async start(): Promise<void> {
    this.child = new Child(process.execPath, [BALLAST, 'agent', '--config', this.config]);
    for (let i = 0; i < 300; i++) {
      if (!this.child.running) throw new Error(`agent exited at start:\n${this.child.output()}`);
      try {
        if ((await this.api('GET', '/healthz')).status === 200) return;
      } catch {}
      await sleep(100);
    }
    throw new Error('agent did not come up');
  }
  async stop(): Promise<void> {
    const st = await this.child?.stop(30_000);
    if (st && (st.code !== 0 || st.killed))
      throw new Error(`agent stop: ${JSON.stringify(st)}\n${this.child?.output()}`);
  }
  api(method: string, path: string, body?: unknown): Promise<{ status: number; body: ApiBody }> {
    const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
    return new Promise((resolve, reject) => {
      const req = http.request(
        {
          socketPath: this.socket,
          method,
          path,
          headers: payload
            ? { 'content-type': 'application/json', 'content-length': payload.length }
            : {},
        },
        (res) => {
          let t = '';
          res.on('data', (c) => {
            t += c;
          });
          res.on('end', () => {
            let b: ApiBody = {};
            try {
              b = JSON.parse(t) as ApiBody;
            } catch {}
            resolve({ status: res.statusCode ?? 0, body: b });
          });
        },
      );
      req.on('error', reject);
      req.setTimeout(30_000, () => req.destroy(new Error('API timeout')));
      req.end(payload);
    });
  }
}

interface Stats {
  fioRounds: number;
  fioBytes: number;
  mismatches: number;
  fioErrors: string[];
  killedClients: number;
  /** Kills planned for a round that had already ended: they did not land. */
  killsMissed: number;
  created: number;
  resized: number;
  deleted: number;
  churnErrors: string[];
  prFlips: number;
  prErrors: string[];
  restarts: number;
  reverified: number;
  rss: { t: number; kib: number }[];
}

/** fio with verification over the nbd engine; `verifyOnly` re-reads what an earlier round wrote. */
function fioArgs(uri: string, seconds: number, verifyOnly: boolean, seed: number): string[] {
  return [
    '--name=soak',
    '--ioengine=nbd',
    `--uri=${uri}`,
    '--size=48M',
    '--bs=16k',
    '--iodepth=8',
    '--rw=randwrite',
    '--verify=crc32c',
    '--verify_fatal=1',
    '--verify_state_save=0',
    '--do_verify=1',
    `--randseed=${seed}`,
    ...(verifyOnly ? ['--verify_only'] : [`--runtime=${seconds}`, '--time_based=0', '--loops=1']),
    // The job as a thread of fio's one process: a forked job process puts itself in a
    // session of its own, outlives a SIGKILL of fio's group, keeps its NBD connection
    // and fio's output pipes open, and the round never ends.
    '--thread',
    '--output-format=json',
  ];
}

/** How long a fio round may take before it counts as stuck (48 MiB written and verified). */
const ROUND_LIMIT_MS = 120_000;

/**
 * Waits for a fio round to end. A round that outlives ROUND_LIMIT_MS (or its kill by
 * 10 s) is recorded as an error with what its processes were doing, then killed again
 * by pid and group; if its pipes still do not close, its exit is taken from the
 * process itself, so one stuck client cannot hang the whole run.
 */
async function exitedOrStuck(c: Child, killAfterMs: number | undefined, st: Stats) {
  const limit = killAfterMs === undefined ? ROUND_LIMIT_MS : killAfterMs + 10_000;
  let timer: NodeJS.Timeout | undefined;
  const late = new Promise<'late'>((r) => {
    timer = setTimeout(() => r('late'), limit);
  });
  const first = await Promise.race([c.exited, late]);
  clearTimeout(timer);
  if (first !== 'late') return first;
  const ps = await run('ps', ['-o', 'pid,pgid,stat,wchan:24,etimes,args', '-g', String(c.pid)]);
  st.fioErrors.push(
    `fio pid ${c.pid} still running ${limit} ms after it started or was killed:\n${ps.output}`,
  );
  log(`stuck fio ${c.pid}:\n${ps.output}`);
  c.killGroup('SIGKILL');
  c.proc.kill('SIGKILL');
  const exit = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((r) => {
    if (c.proc.exitCode !== null || c.proc.signalCode !== null)
      r({ code: c.proc.exitCode, signal: c.proc.signalCode });
    else c.proc.once('exit', (code, signal) => r({ code, signal }));
  });
  const settled = await Promise.race([c.exited, exit]);
  c.proc.stdout?.destroy();
  c.proc.stderr?.destroy();
  return settled;
}

async function fioRound(
  agent: Agent,
  dev: string,
  seed: number,
  st: Stats,
  killAfterMs?: number,
): Promise<void> {
  const c = new Child('fio', fioArgs(agent.uri(dev), 20, false, seed), { group: true });
  let killed = false;
  if (killAfterMs !== undefined) {
    setTimeout(() => {
      if (c.running) {
        killed = true;
        c.killGroup('SIGKILL');
      } else st.killsMissed++;
    }, killAfterMs).unref();
  }
  const x = await exitedOrStuck(c, killAfterMs, st);
  if (killed) {
    st.killedClients++;
    return;
  }
  const out = c.output();
  if (/verify: bad|crc32c: verify failed|bad magic header/i.test(out)) {
    st.mismatches++;
    st.fioErrors.push(`${dev}: VERIFY FAILED\n${out.slice(-2000)}`);
    return;
  }
  if (x.code !== 0) {
    st.fioErrors.push(`${dev}: fio exit ${x.code}: ${out.slice(-500)}`);
    return;
  }
  st.fioRounds++;
  st.fioBytes += 48 << 20;
}

async function reverify(agent: Agent, dev: string, seed: number, st: Stats): Promise<void> {
  const r = await run('fio', fioArgs(agent.uri(dev), 0, true, seed), 300_000);
  if (/verify: bad|verify failed|bad magic/i.test(r.output)) {
    st.mismatches++;
    st.fioErrors.push(`${dev}: re-verify after restart FAILED\n${r.output.slice(-2000)}`);
  } else if (r.code !== 0) {
    st.fioErrors.push(`${dev}: re-verify fio exit ${r.code}: ${r.output.slice(-500)}`);
  } else st.reverified++;
}

async function churn(agent: Agent, st: Stats, stop: () => boolean): Promise<void> {
  let n = 0;
  while (!stop()) {
    const name = `churn-${n++ % 5}`;
    try {
      const c = await agent.api('POST', '/v1/devices', { name, size: '8M', role: 'data' });
      if (c.status === 201) st.created++;
      else if (c.status !== 409) st.churnErrors.push(`create ${name}: ${c.status} ${c.body.code}`);
      const r = await agent.api('POST', `/v1/devices/${name}/resize`, { size: '16M' });
      if (r.status === 200) st.resized++;
      else st.churnErrors.push(`resize ${name}: ${r.status} ${r.body.code}`);
      const d = await agent.api('DELETE', `/v1/devices/${name}?force=true`);
      if (d.status === 200) st.deleted++;
      else st.churnErrors.push(`delete ${name}: ${d.status} ${d.body.code}`);
    } catch (e) {
      // The agent restarting: the API is briefly away.
      await sleep(500);
      if (!/ECONNREFUSED|ENOENT|socket hang up|ECONNRESET|EPIPE/.test(String(e)))
        st.churnErrors.push(String(e));
    }
    await sleep(200);
  }
}

async function flips(agent: Agent, st: Stats, stop: () => boolean): Promise<void> {
  const key = (h: string) => (h === 'host-a' ? '0xa' : '0xb');
  // Both registered, as far as confirmed answers tell: a registration that
  // then goes missing was lost by the agent.
  let bothConfirmed = false;
  while (!stop()) {
    try {
      const show = await agent.api('GET', '/v1/devices/pr0/pr');
      const s = show.body as unknown as {
        reservation: { holder: string | null } | null;
        registrations: { identity: string }[];
      };
      if (show.status !== 200) throw new Error(`show: ${show.status}`);
      const have = new Set(s.registrations.map((r) => r.identity));
      if (bothConfirmed && (!have.has('host-a') || !have.has('host-b')))
        st.prErrors.push(`a registration was lost: ${[...have].join(', ')}`);
      bothConfirmed = false;
      for (const h of ['host-a', 'host-b']) {
        if (have.has(h)) continue;
        const r = await agent.api('POST', '/v1/devices/pr0/pr', {
          action: 'register',
          as: h,
          key: '0',
          saKey: key(h),
        });
        if (r.status !== 200) st.prErrors.push(`register ${h}: ${r.status} ${r.body.code}`);
      }
      const holder = s.reservation?.holder ?? 'host-b';
      const other = holder === 'host-a' ? 'host-b' : 'host-a';
      const r = await agent.api('POST', '/v1/devices/pr0/pr', {
        action: 'preempt',
        as: other,
        key: key(other),
        saKey: key(holder),
        type: 'WE',
      });
      if (r.status !== 200) {
        st.prErrors.push(`preempt: ${r.status} ${r.body.code} ${r.body.message}`);
        continue;
      }
      st.prFlips++;
      // A preempt removes the victim's registration: it registers again.
      const again = await agent.api('POST', '/v1/devices/pr0/pr', {
        action: 'register',
        as: holder,
        key: '0',
        saKey: key(holder),
      });
      if (again.status === 200) bothConfirmed = true;
      else st.prErrors.push(`register ${holder}: ${again.status} ${again.body.code}`);
    } catch {
      // The agent restarting: the API is briefly away.
      bothConfirmed = false;
      await sleep(500);
    }
    await sleep(300);
  }
}

async function main(): Promise<void> {
  const { minutes, restartMinutes, dir } = parseArgs(process.argv.slice(2));
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const config = join(dir, 'agent.yaml');
  writeFileSync(
    config,
    [
      `dataDir: ${join(dir, 'data')}`,
      `nbd: { socket: ${join(dir, 'nbd.sock')} }`,
      `api: { listen: 127.0.0.1:0, socket: ${join(dir, 'api.sock')} }`,
      `pools: [{ name: default, path: ${join(dir, 'pool')} }]`,
      '',
    ].join('\n'),
  );
  const agent = new Agent(dir, config);
  await agent.start();
  for (const [name, size] of [
    ['swap0', '64M'],
    ['swap1', '64M'],
    ['pr0', '16M'],
  ] as const) {
    const r = await agent.api('POST', '/v1/devices', { name, size, role: 'paging' });
    if (r.status !== 201) throw new Error(`create ${name}: ${r.status} ${JSON.stringify(r.body)}`);
  }
  for (const [as, k] of [
    ['host-a', '0xa'],
    ['host-b', '0xb'],
  ] as const) {
    await agent.api('POST', '/v1/devices/pr0/pr', { action: 'register', as, key: '0', saKey: k });
  }
  await agent.api('POST', '/v1/devices/pr0/pr', {
    action: 'reserve',
    as: 'host-a',
    key: '0xa',
    type: 'WE',
  });

  const st: Stats = {
    fioRounds: 0,
    fioBytes: 0,
    mismatches: 0,
    fioErrors: [],
    killedClients: 0,
    killsMissed: 0,
    created: 0,
    resized: 0,
    deleted: 0,
    churnErrors: [],
    prFlips: 0,
    prErrors: [],
    restarts: 0,
    reverified: 0,
    rss: [],
  };
  const t0 = performance.now();
  const end = t0 + minutes * 60_000;
  let stopping = false;
  let restarting = false;
  const stop = () => stopping;
  const sampler = setInterval(() => {
    const pid = agent.child?.pid;
    const m = pid ? memoryKiB(pid) : undefined;
    if (m && !restarting) st.rss.push({ t: (performance.now() - t0) / 1000, kib: m.vmRss });
  }, 5000);
  const background = [churn(agent, st, stop), flips(agent, st, stop)];
  process.on('SIGINT', () => {
    killAll();
    process.exit(130);
  });

  const seeds = { swap0: 1, swap1: 2 };
  const restartEvery =
    restartMinutes === undefined
      ? Math.max(60_000, Math.min(180_000, (minutes * 60_000) / 4))
      : restartMinutes === 0
        ? Number.POSITIVE_INFINITY
        : restartMinutes * 60_000;
  let nextRestart = t0 + restartEvery;
  let round = 0;
  while (performance.now() < end) {
    round++;
    // Both devices at once; every fourth round one client is killed mid-run.
    seeds.swap0 = round * 2 + 1;
    seeds.swap1 = round * 2 + 2;
    // A round takes about a second here: the kill lands somewhere in its first
    // 100-800 ms (handshake, writes, or verification reads), a different moment each time.
    const killAt = round % 4 === 0 ? 100 + ((round * 137) % 700) : undefined;
    await Promise.all([
      fioRound(agent, 'swap0', seeds.swap0, st),
      fioRound(agent, 'swap1', seeds.swap1, st, killAt),
    ]);
    if (performance.now() >= nextRestart && performance.now() < end) {
      log(`restart ${st.restarts + 1}`);
      restarting = true;
      await agent.stop();
      await agent.start();
      restarting = false;
      st.restarts++;
      nextRestart = performance.now() + restartEvery;
      // What the last complete round wrote on swap0 is still there.
      await reverify(agent, 'swap0', seeds.swap0, st);
    }
    if (round % 5 === 0)
      log(
        `round ${round}: ${st.fioRounds} fio rounds, ${st.mismatches} mismatches, ${st.created} creates, ${st.prFlips} flips, RSS ${st.rss.at(-1)?.kib ?? 0} KiB`,
      );
  }
  stopping = true;
  await Promise.all(background);
  clearInterval(sampler);
  await agent.stop();

  // Memory: medians of the first and last thirds of the samples.
  const med = (a: number[]) => {
    const s = [...a].sort((x, y) => x - y);
    return s[Math.floor(s.length / 2)] ?? 0;
  };
  const n = st.rss.length;
  const firstThird = st.rss.slice(0, Math.max(1, Math.floor(n / 3))).map((s) => s.kib);
  const lastThird = st.rss.slice(Math.floor((2 * n) / 3)).map((s) => s.kib);
  const growth = med(lastThird) / Math.max(1, med(firstThird));
  const report = {
    minutes,
    fioRounds: st.fioRounds,
    fioGiB: +(st.fioBytes / 2 ** 30).toFixed(2),
    mismatches: st.mismatches,
    reverifiedAfterRestart: st.reverified,
    fioErrors: st.fioErrors.length,
    killedClients: st.killedClients,
    killsMissed: st.killsMissed,
    devicesCreated: st.created,
    resized: st.resized,
    deleted: st.deleted,
    churnErrors: st.churnErrors.length,
    reservationFlips: st.prFlips,
    reservationErrors: st.prErrors.length,
    agentRestarts: st.restarts,
    rssKiB: {
      samples: n,
      min: Math.min(...st.rss.map((s) => s.kib)),
      max: Math.max(...st.rss.map((s) => s.kib)),
      medianFirstThird: med(firstThird),
      medianLastThird: med(lastThird),
      lastOverFirst: +growth.toFixed(2),
    },
  };
  writeFileSync(join(dir, 'soak-report.json'), `${JSON.stringify({ ...report, st }, null, 2)}\n`);
  process.stdout.write(`${JSON.stringify(report, null, 2)}\n`);
  for (const e of [...st.fioErrors, ...st.churnErrors, ...st.prErrors].slice(0, 10))
    process.stderr.write(`error: ${e}\n`);
  const flat = growth < 1.5;
  if (!flat) log(`memory grew: ${med(firstThird)} → ${med(lastThird)} KiB`);
  const ok =
    st.mismatches === 0 &&
    st.fioErrors.length === 0 &&
    st.churnErrors.length === 0 &&
    st.prErrors.length === 0 &&
    flat;
  log(ok ? 'PASS' : 'FAIL');
  process.exit(ok ? 0 : 1);
}

main().catch((e) => {
  killAll();
  process.stderr.write(`soak: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
