// Ballast benchmark harness: Ballast vs nbdkit vs qemu-nbd, driven by fio's nbd
// engine (libnbd), over a Unix socket and over TCP on 127.0.0.1; on request also
// with TLS, and through the agent with and without a reservation.
//
//   npm run bench -- --help
//
// Progress goes to stderr, the tables to stdout, the raw results to
// bench-results/latest.json. See BENCHMARKING.md.

import { spawn } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';
import { mkdir, mkdtemp, open, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cellsMain } from './cells.js';
import { clusterMain } from './cluster.js';
import { splitSuite } from './cluster-options.js';
import { connectionsMain } from './connections.js';
import { failedFio, JOBS, prefill, runFio } from './fio.js';
import {
  AGENT_DEVICE,
  type AgentFixture,
  BENCH_IDENTITY,
  makeAgentFixture,
  makeCertificates,
  type TlsFiles,
} from './fixtures.js';
import {
  EXTRA_SERVERS,
  type Options,
  parseOptions,
  type ServerName,
  type Transport,
  USAGE,
} from './options.js';
import { killAll, run } from './proc.js';
import {
  type RunRecord,
  rangeTable,
  ratiosInline,
  ratioTable,
  rssTable,
  type SessionRecord,
  summarize,
  throughputTable,
} from './report.js';
import { scaleMain } from './scale.js';
import {
  ballastInvocation,
  type Endpoint,
  freePort,
  type ServerFixtures,
  serverCommand,
  serverMemory,
  startServer,
  stopServer,
} from './servers.js';

const log = (msg: string): void => {
  process.stderr.write(`[bench] ${msg}\n`);
};

/** The repository root: the nearest directory above this file with ballast's package.json. */
function findRoot(): string {
  let dir = dirname(fileURLToPath(import.meta.url));
  for (;;) {
    const pkg = join(dir, 'package.json');
    if (existsSync(pkg)) {
      try {
        if ((JSON.parse(readFileSync(pkg, 'utf8')) as { name?: unknown }).name === 'ballast') {
          return dir;
        }
      } catch {
        // not ours; keep looking
      }
    }
    const up = dirname(dir);
    if (up === dir) return process.cwd();
    dir = up;
  }
}

interface ToolInfo {
  fio: string;
  nbdkit?: string;
  qemuNbd?: string;
  openssl?: string;
}

const TLS_SERVERS: readonly ServerName[] = ['ballast-tls', 'nbdkit-tls', 'ballast-pr-tls'];

const firstLine = (s: string): string => s.trim().split('\n')[0] ?? '';

/** Checks the external tools the selected servers need; exits 2 naming the packages. */
async function checkTools(servers: readonly ServerName[]): Promise<ToolInfo> {
  const missing: { what: string; pkg: string }[] = [];
  const info: ToolInfo = { fio: '' };
  const tryRun = async (cmd: string, args: string[]) => {
    try {
      return await run(cmd, args, 20_000);
    } catch {
      return { code: null, output: '', timedOut: false };
    }
  };

  const fio = await tryRun('fio', ['--version']);
  if (fio.code !== 0) {
    missing.push({ what: 'fio', pkg: 'fio' });
  } else {
    info.fio = firstLine(fio.output);
    const eng = await tryRun('fio', ['--enghelp=nbd']);
    if (eng.code !== 0 || !/uri/.test(eng.output)) {
      missing.push({ what: "fio's nbd ioengine (fio built with libnbd)", pkg: 'fio' });
    }
  }
  if (servers.includes('nbdkit') || servers.includes('nbdkit-tls')) {
    const v = await tryRun('nbdkit', ['--version']);
    if (v.code !== 0) {
      missing.push({ what: 'nbdkit', pkg: 'nbdkit' });
    } else {
      info.nbdkit = firstLine(v.output);
      const p = await tryRun('nbdkit', ['--dump-plugin', 'file']);
      if (p.code !== 0) missing.push({ what: "nbdkit's file plugin", pkg: 'nbdkit' });
      if (servers.includes('nbdkit-tls')) {
        const c = await tryRun('nbdkit', ['--dump-config']);
        if (!/^tls=yes$/m.test(c.output)) {
          missing.push({ what: 'nbdkit built with TLS (GnuTLS)', pkg: 'nbdkit' });
        }
      }
    }
  }
  if (servers.some((s) => TLS_SERVERS.includes(s))) {
    const v = await tryRun('openssl', ['version']);
    if (v.code !== 0)
      missing.push({ what: 'openssl (to make the TLS certificates)', pkg: 'openssl' });
    else info.openssl = firstLine(v.output);
  }
  if (servers.includes('qemu-nbd')) {
    const v = await tryRun('qemu-nbd', ['--version']);
    if (v.code !== 0) missing.push({ what: 'qemu-nbd', pkg: 'qemu-utils' });
    else info.qemuNbd = firstLine(v.output);
  }
  if (missing.length > 0) {
    for (const m of missing) log(`missing: ${m.what}`);
    const pkgs = [...new Set(missing.map((m) => m.pkg))];
    log(`install with:  apt-get update && apt-get install -y ${pkgs.join(' ')}`);
    process.exit(2);
  }
  return info;
}

/**
 * Makes what the TLS and agent kinds need, once per run: certificates, and one
 * agent data directory per reservation state, each with a device that is a
 * hard link to the benchmark image.
 */
async function prepareFixtures(
  servers: readonly ServerName[],
  tmp: string,
  image: string,
  sizeMiB: number,
  ballastPath: string,
): Promise<ServerFixtures> {
  const fx: ServerFixtures = {};
  if (servers.some((s) => TLS_SERVERS.includes(s))) {
    const tls: TlsFiles = await makeCertificates(join(tmp, 'tls'));
    log(`TLS: CA and server certificate (CN=localhost) made in ${tls.dir}`);
    fx.tls = tls;
  }
  const agent = async (name: string, reserve: boolean): Promise<AgentFixture> => {
    const t0 = performance.now();
    const a = await makeAgentFixture({
      dir: join(tmp, name),
      ballast: ballastInvocation(ballastPath),
      image,
      sizeMiB,
      reserve,
    });
    log(
      `agent data directory ${a.dir}: device ${AGENT_DEVICE} = the image` +
        (reserve ? `, Write Exclusive reserved by ${BENCH_IDENTITY}` : ', no reservation') +
        ` (${Math.round(performance.now() - t0)} ms)`,
    );
    return a;
  };
  if (servers.includes('ballast-agent')) fx.agent = await agent('agent', false);
  if (servers.includes('ballast-pr') || servers.includes('ballast-pr-tls')) {
    fx.agentPr = await agent('agent-pr', true);
  }
  return fx;
}

function fmtDuration(s: number): string {
  const m = Math.floor(s / 60);
  const r = Math.round(s - m * 60);
  return m > 0 ? `${m} min ${r} s` : `${r} s`;
}

async function datasync(file: string): Promise<number> {
  const t0 = performance.now();
  const fh = await open(file, 'r+');
  try {
    await fh.datasync();
  } finally {
    await fh.close();
  }
  return Math.round(performance.now() - t0);
}

/** The servers of a round in rotated order, so none always goes first or last. */
function rotate<T>(xs: readonly T[], by: number): T[] {
  const k = xs.length === 0 ? 0 : by % xs.length;
  return [...xs.slice(k), ...xs.slice(0, k)];
}

/** `--suite events`: bench/events.ts, as its own process (it reads its own argv). */
function runEventsBench(argv: string[]): Promise<number> {
  const script = join(dirname(fileURLToPath(import.meta.url)), 'events.js');
  return new Promise((res) => {
    const child = spawn(process.execPath, [script, ...argv], { stdio: 'inherit' });
    child.once('exit', (code) => res(code ?? 1));
    child.once('error', () => res(1));
  });
}

async function main(): Promise<number> {
  let argv: string[];
  try {
    const split = splitSuite(process.argv.slice(2));
    if (split.suite === 'cluster') return clusterMain(split.rest, findRoot());
    if (split.suite === 'events') return runEventsBench(split.rest);
    if (split.suite === 'connections') return connectionsMain(split.rest, findRoot());
    if (split.suite === 'cells') return cellsMain(split.rest, findRoot());
    if (split.suite === 'scale') return scaleMain(split.rest, findRoot());
    argv = split.rest;
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${USAGE}`);
    return 2;
  }
  let opts: Options;
  try {
    opts = parseOptions(argv);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${USAGE}`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(USAGE);
    return 0;
  }
  const root = findRoot();
  const ballastPath = isAbsolute(opts.ballast) ? opts.ballast : resolve(root, opts.ballast);
  const outPath = isAbsolute(opts.out) ? opts.out : resolve(root, opts.out);

  let servers = [...opts.servers];
  const isBallast = (s: ServerName): boolean => s.startsWith('ballast');
  if (servers.some(isBallast) && !existsSync(ballastPath)) {
    if (opts.serversExplicit) {
      log(`${servers.filter(isBallast).join(', ')} asked for but ${ballastPath} does not exist`);
      return 2;
    }
    log(`warning: ${ballastPath} does not exist; benchmarking without ballast`);
    servers = servers.filter((s) => !isBallast(s));
  }
  if (servers.length === 0) {
    log('no server left to benchmark');
    return 2;
  }
  const tools = await checkTools(servers);
  const { jobs, transports, rounds, runtime, ramp } = opts;
  // The TLS and agent kinds answer questions TCP adds nothing to: Unix socket
  // only, unless --transports was given.
  const runsOn = (server: ServerName, transport: Transport): boolean =>
    transport === 'unix' || opts.transportsExplicit || !EXTRA_SERVERS.includes(server);
  const sessionsPerRound = transports
    .map((t) => servers.filter((s) => runsOn(s, t)).length)
    .reduce((a, b) => a + b, 0);

  const fioRuns = rounds * sessionsPerRound * jobs.length;
  const estimate = fioRuns * (runtime + ramp + 0.6) + rounds * sessionsPerRound;
  log(
    `${rounds} round(s) x ${sessionsPerRound} server session(s) x ${jobs.length} job(s) = ` +
      `${fioRuns} fio runs of ${ramp}+${runtime} s; about ${fmtDuration(estimate)}`,
  );
  log(`servers: ${servers.join(', ')}; ${tools.fio}; client: fio nbd engine (libnbd)`);
  const unixOnly = servers.filter((s) => transports.includes('tcp') && !runsOn(s, 'tcp'));
  if (unixOnly.length > 0) {
    log(`${unixOnly.join(', ')}: Unix socket only (give --transports to run them over TCP too)`);
  }

  const tmp = await mkdtemp(join(opts.dir ?? os.tmpdir(), 'ballast-bench-'));
  let interrupted = false;
  const onSignal = (sig: NodeJS.Signals): void => {
    if (interrupted) return;
    interrupted = true;
    log(`${sig}: stopping`);
    killAll();
    rmSync(tmp, { recursive: true, force: true });
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);

  const runs: RunRecord[] = [];
  const sessions: SessionRecord[] = [];
  const startedAt = new Date().toISOString();
  const loadStart = os.loadavg();
  const file = join(tmp, 'disk.img');
  let prefillMs = 0;
  let fixtures: ServerFixtures = {};
  try {
    await writeFile(file, '');
    await truncate(file, opts.sizeMiB * 2 ** 20);
    log(`pre-filling ${file} (${opts.sizeMiB} MiB, sparse, written once with fio)`);
    const t0 = performance.now();
    await prefill(file, opts.sizeMiB);
    prefillMs = Math.round(performance.now() - t0);
    log(`pre-filled in ${(prefillMs / 1000).toFixed(1)} s`);
    fixtures = await prepareFixtures(servers, tmp, file, opts.sizeMiB, ballastPath);

    for (let round = 1; round <= rounds; round++) {
      for (const transport of transports) {
        for (const server of rotate(servers, round - 1)) {
          if (interrupted) return 130;
          if (!runsOn(server, transport)) continue;
          const tag = `r${round}/${rounds} ${transport} ${server}`;
          const ep: Endpoint =
            transport === 'unix'
              ? { transport, socket: join(tmp, `${server}-r${round}.sock`) }
              : { transport, port: await freePort() };
          const cmd = serverCommand(
            server,
            file,
            ep,
            ballastPath,
            fixtures,
            `${server}-r${round}-${transport}`,
          );
          const session: SessionRecord = {
            round,
            transport,
            server,
            command: [cmd.command, ...cmd.args],
            ok: false,
            spawnedPid: -1,
          };
          sessions.push(session);
          let started: Awaited<ReturnType<typeof startServer>>;
          try {
            started = await startServer(cmd, ep);
          } catch (e) {
            session.error = `failed to start: ${(e as Error).message}`;
            log(`[${tag}] ${session.error.trimEnd()}`);
            for (const job of jobs) {
              runs.push({ round, transport, server, job, ...failedFio('server did not start') });
            }
            continue;
          }
          session.spawnedPid = started.child.pid;
          session.startMs = started.startMs;
          log(`[${tag}] listening after ${started.startMs} ms (pid ${started.child.pid})`);
          const uri = cmd.uri;
          let sessionOk = true;
          for (const job of jobs) {
            if (interrupted) return 130;
            const spec = JOBS[job];
            const res = await runFio({
              uri,
              job: spec,
              runtime,
              ramp,
              outFile: join(tmp, 'fio.json'),
            });
            runs.push({ round, transport, server, job, ...res });
            if (res.ok) {
              const main =
                spec.metric === 'mibps'
                  ? `${res.mibps.toFixed(0)} MiB/s`
                  : `${Math.round(res.iops)} IOPS`;
              log(
                `[${tag}] ${job}: ${main} (clat mean ${res.clatMeanUs.toFixed(0)} us, ` +
                  `p99 ${res.clatP99Us.toFixed(0)} us, fio cpu ${res.clientCpuPct.toFixed(0)}%)`,
              );
            } else {
              sessionOk = false;
              log(`[${tag}] ${job}: FAILED: ${res.error ?? '?'}`);
            }
            if (!started.child.running) {
              sessionOk = false;
              log(`[${tag}] server exited during ${job}:\n${started.child.output()}`);
              break;
            }
          }
          if (started.child.running) {
            session.memory = serverMemory(started.child, cmd.exePattern);
            if (session.memory === undefined) {
              log(`[${tag}] warning: could not read the server's /proc/PID/status`);
            }
          }
          const st = await stopServer(started.child, session.memory?.pid);
          session.exit = { code: st.code, signal: st.signal, killed: st.killed };
          if (st.signal !== null && !st.killed && session.memory?.pid === started.child.pid) {
            log(`[${tag}] warning: died of ${st.signal} instead of exiting 0`);
          }
          if (st.killed || (st.code !== null && st.code !== 0)) {
            sessionOk = false;
            session.error = st.killed
              ? 'did not exit within 10 s of SIGTERM; killed'
              : `exited with code ${st.code} after SIGTERM`;
            log(`[${tag}] ${session.error}\n${started.child.output().trimEnd()}`);
          }
          session.syncMs = await datasync(file);
          session.ok = sessionOk;
          const mem = session.memory;
          log(
            `[${tag}] stopped (exit ${st.code ?? st.signal}; datasync ${session.syncMs} ms)` +
              (mem === undefined
                ? ''
                : `; peak RSS ${(mem.vmHwmKiB / 1024).toFixed(1)} MiB (${mem.exe} pid ${mem.pid}, ${mem.how})`),
          );
          if (ep.transport === 'unix') await rm(ep.socket, { force: true });
        }
      }
    }
  } finally {
    killAll();
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
  }

  const summary = summarize(runs, jobs, transports, servers);
  const header =
    `Median of ${rounds} round(s), ${runtime} s measured after ${ramp} s ramp each; ` +
    `client ${tools.fio} nbd engine (libnbd); ${opts.sizeMiB} MiB file`;
  process.stdout.write(`\n${header}\n\n${throughputTable(summary, servers)}\n`);
  const ratios = ratiosInline(servers) ? '' : ratioTable(summary, servers, jobs, transports);
  if (ratios !== '') {
    process.stdout.write(
      `\nRatios of the medians (first server / second; above 1.00x the first is faster)\n\n` +
        `${ratios}\n`,
    );
  }
  if (rounds > 1) {
    process.stdout.write(
      `\nRange over the rounds (min-max), same units\n\n${rangeTable(summary, servers)}\n`,
    );
  }
  process.stdout.write(
    `\nPeak RSS (VmHWM, MiB) of each server process, per round` +
      ` (one process per server x transport x round, all jobs)\n\n` +
      `${rssTable(sessions, rounds, servers, transports)}\n`,
  );

  const failures = runs.filter((r) => !r.ok).length + sessions.filter((s) => !s.ok).length;
  const result = {
    version: 1,
    startedAt,
    finishedAt: new Date().toISOString(),
    host: {
      hostname: os.hostname(),
      kernel: os.release(),
      cpus: os.cpus().length,
      cpuModel: os.cpus()[0]?.model ?? '',
      memGiB: Math.round(os.totalmem() / 2 ** 30),
      node: process.version,
      loadavgStart: loadStart,
      loadavgEnd: os.loadavg(),
    },
    tools: { ...tools, client: 'fio nbd ioengine (libnbd)' },
    config: {
      rounds,
      runtimeS: runtime,
      rampS: ramp,
      jobs: jobs.map((j) => ({ ...JOBS[j] })),
      servers,
      transports,
      unixOnly,
      sizeMiB: opts.sizeMiB,
      tls:
        fixtures.tls === undefined
          ? undefined
          : { certificates: 'CA + server certificate (P-256), no client certificate' },
      agent:
        fixtures.agent === undefined && fixtures.agentPr === undefined
          ? undefined
          : {
              device: AGENT_DEVICE,
              identity: BENCH_IDENTITY,
              reservation: fixtures.agentPr ? 'Write Exclusive, held by the identity' : undefined,
            },
      ballast: ballastPath,
      prefillMs,
    },
    summary,
    sessions,
    runs,
    failures,
  };
  await mkdir(dirname(outPath), { recursive: true });
  // NaN is not JSON: failed figures are written as null.
  await writeFile(
    outPath,
    `${JSON.stringify(result, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n`,
  );
  log(`raw results: ${outPath}`);
  if (failures > 0) {
    log(`${failures} failure(s): see the log above and ${outPath}`);
    return 1;
  }
  return 0;
}

main().then(
  (code) => process.exit(code),
  (e: unknown) => {
    killAll();
    process.stderr.write(`[bench] fatal: ${(e as Error)?.stack ?? String(e)}\n`);
    process.exit(1);
  },
);
