// The connections axis: Ballast with its worker threads (default --workers auto,
// the cores available), Ballast on one event loop (--workers 1) and nbdkit (file
// plugin), plain and TLS, under 1, 4 and 16 connections (fio numjobs, one NBD
// connection per job) of the four jobs. Alternating in one run, server order
// rotated per round; per cell the median of the rounds, the ratios to nbdkit,
// each server's CPU seconds per GiB moved, and each server process's peak RSS.
//
//   npm run bench -- --suite connections [--rounds 3] [--runtime 4] [--ramp 1]
//                    [--connections 1,4,16] [--jobs ...] [--tls both|on|off]
//                    [--workers N] [--size-mib 1024] [--out FILE]

import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { JOBS, type JobSpec, parseFioJson, prefill } from './fio.js';
import { makeCertificates, type TlsFiles } from './fixtures.js';
import { JOB_NAMES, type JobName } from './options.js';
import { findProcess, killAll, memoryKiB, run } from './proc.js';
import { median, renderTable } from './report.js';
import { type Endpoint, serverCommand, startServer, stopServer } from './servers.js';

const log = (msg: string): void => {
  process.stderr.write(`[bench] ${msg}\n`);
};

type Kind = 'ballast' | 'ballast-1' | 'nbdkit';
const KINDS: readonly Kind[] = ['ballast', 'ballast-1', 'nbdkit'];

export const CONNECTIONS_USAGE = `Usage: npm run bench -- --suite connections [options]

Many connections at once: Ballast (--workers N, default auto: the cores available),
Ballast on one event loop (--workers 1) and nbdkit's file plugin, plain and TLS,
over the Unix socket, under 1, 4 and 16 connections (fio numjobs: one NBD
connection per job). Per-connection queue depth: the job's own with one
connection, else max(4, depth / connections).

Options:
  --rounds N          rounds (default 3)
  --runtime S         measured seconds per fio run (default 4)
  --ramp S            warm-up seconds per fio run (default 1)
  --connections LIST  comma list (default 1,4,16)
  --jobs LIST         comma list of ${JOB_NAMES.join(', ')} (default all)
  --tls both|on|off   (default both)
  --workers N         Ballast's --workers for the 'ballast' column (default: auto)
  --size-mib N        served file (default 1024)
  --out FILE          raw results (default bench-results/connections.json)
`;

interface Cell {
  round: number;
  kind: Kind;
  tls: boolean;
  job: JobName;
  conns: number;
  ok: boolean;
  error?: string;
  /** MiB/s for sequential jobs, IOPS for random ones. */
  value: number;
  /** Server CPU seconds (user + system, all threads) per GiB moved. */
  cpuPerGiB: number;
}

/** utime + stime of a process, all threads, in seconds. */
function cpuSeconds(pid: number): number {
  try {
    const s = readFileSync(`/proc/${pid}/stat`, 'utf8');
    const f = s.slice(s.lastIndexOf(')') + 2).split(' ');
    // Fields 14 and 15 (1-based) are utime and stime; f starts at field 3.
    return (Number(f[11]) + Number(f[12])) / 100;
  } catch {
    return Number.NaN;
  }
}

function depth(job: JobSpec, conns: number): number {
  return conns === 1 ? job.iodepth : Math.max(4, Math.round(job.iodepth / conns));
}

export async function connectionsMain(argv: string[], root: string): Promise<number> {
  const { values } = parseArgs({
    args: argv,
    options: {
      rounds: { type: 'string', default: '3' },
      runtime: { type: 'string', default: '4' },
      ramp: { type: 'string', default: '1' },
      connections: { type: 'string', default: '1,4,16' },
      jobs: { type: 'string', default: JOB_NAMES.join(',') },
      tls: { type: 'string', default: 'both' },
      workers: { type: 'string' },
      'size-mib': { type: 'string', default: '1024' },
      out: { type: 'string', default: 'bench-results/connections.json' },
      ballast: { type: 'string', default: 'bin/ballast' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (values.help) {
    process.stdout.write(CONNECTIONS_USAGE);
    return 0;
  }
  const rounds = Number(values.rounds);
  const runtime = Number(values.runtime);
  const ramp = Number(values.ramp);
  const connList = values.connections.split(',').map(Number);
  const jobs = values.jobs.split(',') as JobName[];
  for (const j of jobs) if (!JOB_NAMES.includes(j)) throw new Error(`--jobs: unknown ${j}`);
  const tlsList = values.tls === 'both' ? [false, true] : [values.tls === 'on'];
  const sizeMiB = Number(values['size-mib']);
  const ballastPath = resolve(root, values.ballast);
  const outPath = isAbsolute(values.out) ? values.out : resolve(root, values.out);

  const tmp = await mkdtemp(join(os.tmpdir(), 'ballast-bench-conn-'));
  const onSignal = (): void => {
    killAll();
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const cells: Cell[] = [];
  const rss: { round: number; kind: Kind; tls: boolean; peakMiB: number }[] = [];
  const file = join(tmp, 'disk.img');
  try {
    await writeFile(file, '');
    await truncate(file, sizeMiB * 2 ** 20);
    log(`pre-filling ${file} (${sizeMiB} MiB)`);
    await prefill(file, sizeMiB);
    let tls: TlsFiles | undefined;
    if (tlsList.includes(true)) tls = await makeCertificates(join(tmp, 'tls'));
    const total = rounds * KINDS.length * tlsList.length * jobs.length * connList.length;
    log(
      `${total} fio runs of ${ramp}+${runtime} s; about ${Math.round((total * (runtime + ramp + 1)) / 60)} min`,
    );
    for (let round = 1; round <= rounds; round++) {
      for (const withTls of tlsList) {
        const order = [...KINDS.slice((round - 1) % 3), ...KINDS.slice(0, (round - 1) % 3)];
        for (const kind of order) {
          const ep: Endpoint = { transport: 'unix', socket: join(tmp, `${kind}-${round}.sock`) };
          const base = kind === 'nbdkit' ? 'nbdkit' : 'ballast';
          const cmd = serverCommand(
            withTls ? (`${base}-tls` as const) : base,
            file,
            ep,
            ballastPath,
            { tls },
            `${kind}-${round}`,
          );
          if (kind === 'ballast-1') cmd.args.push('--workers', '1');
          else if (kind === 'ballast') cmd.args.push('--workers', values.workers ?? 'auto');
          const started = await startServer(cmd, ep);
          const proc = findProcess(started.child.pid, cmd.exePattern);
          const pid = proc?.pid ?? started.child.pid;
          const tag = `r${round} ${kind}${withTls ? '-tls' : ''}`;
          for (const job of jobs) {
            for (const conns of connList) {
              const spec = JOBS[job];
              const outFile = join(tmp, 'fio.json');
              await rm(outFile, { force: true });
              const cpu0 = cpuSeconds(pid);
              const r = await run(
                'fio',
                [
                  `--name=${job}`,
                  '--ioengine=nbd',
                  `--uri=${cmd.uri}`,
                  `--rw=${spec.rw}`,
                  `--bs=${spec.bs}`,
                  `--iodepth=${depth(spec, conns)}`,
                  `--numjobs=${conns}`,
                  '--group_reporting=1',
                  '--time_based=1',
                  `--runtime=${runtime}`,
                  `--ramp_time=${ramp}`,
                  '--output-format=json',
                  `--output=${outFile}`,
                ],
                (runtime + ramp + 60) * 1000,
              );
              const cpu = cpuSeconds(pid) - cpu0;
              const cell: Cell = {
                round,
                kind,
                tls: withTls,
                job,
                conns,
                ok: false,
                value: Number.NaN,
                cpuPerGiB: Number.NaN,
              };
              try {
                const res = parseFioJson(await readFile(outFile, 'utf8'), spec.rw);
                cell.ok = res.ok && r.code === 0;
                if (!cell.ok) cell.error = res.error ?? `fio exited ${r.code}: ${r.output}`;
                cell.value = spec.metric === 'mibps' ? res.mibps : res.iops;
                // Bytes over ramp + runtime at the measured rate.
                const gib = (res.mibps * (runtime + ramp)) / 1024;
                cell.cpuPerGiB = cpu / gib;
              } catch (e) {
                cell.error = `fio: ${(e as Error).message} ${r.output}`;
              }
              cells.push(cell);
              log(
                `[${tag}] ${job} x${conns}: ${cell.ok ? `${Math.round(cell.value)} ${spec.metric === 'mibps' ? 'MiB/s' : 'IOPS'}, ${cell.cpuPerGiB.toFixed(2)} CPU s/GiB` : `FAILED ${cell.error}`}`,
              );
            }
          }
          const mem = memoryKiB(pid);
          if (mem) rss.push({ round, kind, tls: withTls, peakMiB: mem.vmHwm / 1024 });
          await stopServer(started.child, pid);
          await rm(ep.socket, { force: true });
        }
      }
    }
  } finally {
    killAll();
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
  }

  // ---- the table ----
  const med = (kind: Kind, tls: boolean, job: JobName, conns: number, f: (c: Cell) => number) =>
    median(
      cells
        .filter(
          (c) => c.ok && c.kind === kind && c.tls === tls && c.job === job && c.conns === conns,
        )
        .map(f),
    );
  const fmt = (v: number, unit: string) =>
    !Number.isFinite(v) ? 'fail' : unit === 'MiB/s' ? v.toFixed(0) : Math.round(v).toString();
  const rows: string[][] = [];
  for (const withTls of tlsList) {
    for (const job of jobs) {
      const unit = JOBS[job].metric === 'mibps' ? 'MiB/s' : 'IOPS';
      for (const conns of connList) {
        const v = KINDS.map((k) => med(k, withTls, job, conns, (c) => c.value));
        const cpu = KINDS.map((k) => med(k, withTls, job, conns, (c) => c.cpuPerGiB));
        rows.push([
          `${job}${withTls ? ' TLS' : ''}`,
          String(conns),
          unit,
          ...v.map((x) => fmt(x, unit)),
          `${(v[0]! / v[2]!).toFixed(2)}x`,
          `${(v[1]! / v[2]!).toFixed(2)}x`,
          ...cpu.map((x) => (Number.isFinite(x) ? x.toFixed(2) : '-')),
        ]);
      }
    }
  }
  const table = renderTable(
    [
      'job',
      'conns',
      'unit',
      'ballast',
      'ballast-1',
      'nbdkit',
      'ballast/nbdkit',
      'ballast-1/nbdkit',
      'CPU s/GiB ballast',
      'ballast-1',
      'nbdkit',
    ],
    rows,
    3,
  );
  const rssRows = KINDS.flatMap((k) =>
    tlsList.map((t) => {
      const xs = rss.filter((r) => r.kind === k && r.tls === t).map((r) => r.peakMiB);
      return [`${k}${t ? ' TLS' : ''}`, xs.map((x) => x.toFixed(0)).join(' / ')];
    }),
  );
  const header =
    `Median of ${rounds} round(s), ${runtime} s measured after ${ramp} s ramp; Unix socket; ` +
    `${sizeMiB} MiB file; ballast = --workers ${values.workers ?? `auto (${os.availableParallelism()} here)`}, ballast-1 = --workers 1`;
  process.stdout.write(
    `\n${header}\n\n${table}\n\nPeak RSS (VmHWM, MiB) per server process (all jobs and connection counts), per round\n\n${renderTable(['server', 'rounds'], rssRows, 1)}\n`,
  );
  await mkdir(dirname(outPath), { recursive: true });
  await writeFile(
    outPath,
    `${JSON.stringify({ startedAt: new Date().toISOString(), host: { cpus: os.availableParallelism(), loadavg: os.loadavg() }, cells, rss }, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n`,
  );
  log(`raw results: ${outPath}`);
  return cells.some((c) => !c.ok) ? 1 : 0;
}
