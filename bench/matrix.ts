// A matrix of fio cells against three servers alternating in one run: Ballast with
// its worker threads (--workers auto, the cores available), Ballast on one event
// loop (--workers 1) and nbdkit (file plugin), over a Unix socket, plain and/or TLS.
// Each round starts every server once per file the cells read (server order
// rotated per round) and runs that file's cells against it; per cell the median of
// the rounds, the ratios to nbdkit, each server's CPU seconds per GiB moved, and
// each server process's peak RSS. The connections and cells suites are two
// matrices (bench/connections.ts, bench/cells.ts).

import { readFileSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { type FioRw, parseFioJson, prefill } from './fio.js';
import { makeCertificates, type TlsFiles } from './fixtures.js';
import { JOB_NAMES, type JobName } from './options.js';
import { findProcess, killAll, memoryKiB, run } from './proc.js';
import { median, renderTable } from './report.js';
import { type Endpoint, serverCommand, startServer, stopServer } from './servers.js';

const log = (msg: string): void => {
  process.stderr.write(`[bench] ${msg}\n`);
};

export type Kind = 'ballast' | 'ballast-1' | 'nbdkit';
export const KINDS: readonly Kind[] = ['ballast', 'ballast-1', 'nbdkit'];

/** The servers of round `round` (1-based) in rotated order, so none always goes first. */
export function serverOrder(round: number): Kind[] {
  const k = (round - 1) % KINDS.length;
  return [...KINDS.slice(k), ...KINDS.slice(0, k)];
}

/**
 * The file a cell reads: `data` is pre-filled (every byte written once), `sparse`
 * is truncated to size and never written, so every read lands in a hole.
 */
export type FileKind = 'data' | 'sparse';

export interface CellSpec {
  /** fio's --name. */
  id: string;
  /** In the progress log. */
  name: string;
  /** Identifies the cell in the raw results (spread into each record). */
  key: Record<string, string | number>;
  /** The leading columns of its table row. */
  label: string[];
  rw: FioRw;
  bs: string;
  /** fio numjobs: one NBD connection per job. */
  conns: number;
  /** fio iodepth: requests in flight per connection. */
  iodepth: number;
  /** Percentage of reads, for randrw. */
  rwmixread?: number;
  /** MiB/s or IOPS (for randrw: reads + writes). */
  metric: 'mibps' | 'iops';
  file: FileKind;
}

/** fio's arguments for one run of `cell` against `uri`. */
export function cellFioArgs(
  cell: CellSpec,
  uri: string,
  runtime: number,
  ramp: number,
  outFile: string,
): string[] {
  return [
    `--name=${cell.id}`,
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${cell.rw}`,
    ...(cell.rwmixread === undefined ? [] : [`--rwmixread=${cell.rwmixread}`]),
    `--bs=${cell.bs}`,
    `--iodepth=${cell.iodepth}`,
    `--numjobs=${cell.conns}`,
    '--group_reporting=1',
    '--time_based=1',
    `--runtime=${runtime}`,
    `--ramp_time=${ramp}`,
    '--output-format=json',
    `--output=${outFile}`,
  ];
}

export type MatrixSuite = 'connections' | 'cells';

export interface MatrixOptions {
  rounds: number;
  runtime: number;
  ramp: number;
  /** The TLS settings to run, plain first. */
  tls: boolean[];
  /** Ballast's --workers for the 'ballast' column (undefined: auto). */
  workers: string | undefined;
  sizeMiB: number;
  out: string;
  ballast: string;
  help: boolean;
  /** --suite connections only. */
  connections: number[];
  /** --suite connections only. */
  jobs: JobName[];
}

function count(flag: string, raw: string, min: number): number {
  const n = Number(raw);
  if (raw.trim() === '' || !Number.isInteger(n) || n < min) {
    throw new Error(`${flag}: expected an integer >= ${min}, got '${raw}'`);
  }
  return n;
}

function seconds(flag: string, raw: string, min: number): number {
  const n = Number(raw);
  if (raw.trim() === '' || !Number.isFinite(n) || n < min) {
    throw new Error(`${flag}: expected a number >= ${min}, got '${raw}'`);
  }
  return n;
}

const TLS_CHOICES: Record<string, boolean[]> = { both: [false, true], on: [true], off: [false] };

/** The options of `--suite connections` and `--suite cells`; throws on a bad one. */
export function parseMatrixOptions(suite: MatrixSuite, argv: string[]): MatrixOptions {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      rounds: { type: 'string', default: '3' },
      runtime: { type: 'string', default: '4' },
      ramp: { type: 'string', default: '1' },
      connections: { type: 'string' },
      jobs: { type: 'string' },
      tls: { type: 'string', default: suite === 'connections' ? 'both' : 'off' },
      workers: { type: 'string' },
      'size-mib': { type: 'string', default: '1024' },
      out: { type: 'string', default: `bench-results/${suite}.json` },
      ballast: { type: 'string', default: 'bin/ballast' },
      help: { type: 'boolean', short: 'h', default: false },
    },
  });
  if (suite === 'cells') {
    for (const flag of ['connections', 'jobs'] as const) {
      if (values[flag] !== undefined) {
        throw new Error(`--${flag}: not an option of --suite cells (its cells are fixed)`);
      }
    }
  }
  const jobs = (values.jobs ?? JOB_NAMES.join(',')).split(',') as JobName[];
  for (const j of jobs) if (!JOB_NAMES.includes(j)) throw new Error(`--jobs: unknown ${j}`);
  const tls = Object.hasOwn(TLS_CHOICES, values.tls) ? TLS_CHOICES[values.tls] : undefined;
  if (tls === undefined) {
    throw new Error(`--tls: expected both, on or off, got '${values.tls}'`);
  }
  if (values.workers !== undefined && values.workers !== 'auto') {
    count('--workers', values.workers, 1);
  }
  return {
    rounds: count('--rounds', values.rounds, 1),
    runtime: seconds('--runtime', values.runtime, 1),
    ramp: seconds('--ramp', values.ramp, 0),
    tls,
    workers: values.workers,
    sizeMiB: count('--size-mib', values['size-mib'], 16),
    out: values.out,
    ballast: values.ballast,
    help: values.help,
    connections:
      values.connections === undefined
        ? defaultConnections()
        : values.connections.split(',').map((c) => count('--connections', c, 1)),
    jobs,
  };
}

/** One fio run of one cell against one server. */
interface Measurement {
  round: number;
  kind: Kind;
  tls: boolean;
  [key: string]: string | number | boolean | undefined;
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

export interface Matrix {
  suite: MatrixSuite;
  opts: MatrixOptions;
  /** The repository root (--ballast and --out are relative to it). */
  root: string;
  cells: readonly CellSpec[];
  /** Headers of the cells' label columns. */
  labelHeader: string[];
  /** What each server process ran, for the RSS table's title. */
  rssScope: string;
  /** Further fields of the raw results. */
  extra?: Record<string, unknown>;
}

/** Runs the matrix, prints its tables and writes the raw results; 1 if any cell failed. */
export async function runMatrix(m: Matrix): Promise<number> {
  const { opts, cells } = m;
  const { rounds, runtime, ramp, sizeMiB } = opts;
  const tlsList = opts.tls;
  const files = (['data', 'sparse'] as const).filter((f) => cells.some((c) => c.file === f));
  const ballastPath = resolve(m.root, opts.ballast);
  const outPath = isAbsolute(opts.out) ? opts.out : resolve(m.root, opts.out);
  const startedAt = new Date().toISOString();

  const tmp = await mkdtemp(join(os.tmpdir(), `ballast-bench-${m.suite}-`));
  const onSignal = (): void => {
    killAll();
    process.exit(130);
  };
  process.on('SIGINT', onSignal);
  process.on('SIGTERM', onSignal);
  const results: { cell: CellSpec; rec: Measurement }[] = [];
  const rss: { round: number; kind: Kind; tls: boolean; file?: FileKind; peakMiB: number }[] = [];
  const paths: Record<FileKind, string> = {
    data: join(tmp, 'disk.img'),
    sparse: join(tmp, 'sparse.img'),
  };
  try {
    for (const f of files) {
      await writeFile(paths[f], '');
      await truncate(paths[f], sizeMiB * 2 ** 20);
    }
    if (files.includes('data')) {
      log(`pre-filling ${paths.data} (${sizeMiB} MiB)`);
      await prefill(paths.data, sizeMiB);
    }
    let tls: TlsFiles | undefined;
    if (tlsList.includes(true)) tls = await makeCertificates(join(tmp, 'tls'));
    const total = rounds * KINDS.length * tlsList.length * cells.length;
    log(
      `${total} fio runs of ${ramp}+${runtime} s; about ${Math.round((total * (runtime + ramp + 1)) / 60)} min`,
    );
    for (let round = 1; round <= rounds; round++) {
      for (const withTls of tlsList) {
        for (const file of files) {
          const fileCells = cells.filter((c) => c.file === file);
          for (const kind of serverOrder(round)) {
            const session = file === 'data' ? `${kind}-${round}` : `${kind}-${file}-${round}`;
            const ep: Endpoint = { transport: 'unix', socket: join(tmp, `${session}.sock`) };
            const base = kind === 'nbdkit' ? 'nbdkit' : 'ballast';
            const cmd = serverCommand(
              withTls ? (`${base}-tls` as const) : base,
              paths[file],
              ep,
              ballastPath,
              { tls },
              session,
            );
            if (kind === 'ballast-1') cmd.args.push('--workers', '1');
            else if (kind === 'ballast') cmd.args.push('--workers', opts.workers ?? 'auto');
            const tag = `r${round} ${kind}${withTls ? '-tls' : ''}${file === 'data' ? '' : ` ${file}`}`;
            const record = (cell: CellSpec): Measurement => ({
              round,
              kind,
              tls: withTls,
              ...cell.key,
              ok: false,
              value: Number.NaN,
              cpuPerGiB: Number.NaN,
            });
            let started: Awaited<ReturnType<typeof startServer>>;
            try {
              started = await startServer(cmd, ep);
            } catch (e) {
              const error = `server did not start: ${(e as Error).message}`;
              log(`[${tag}] ${error.trimEnd()}`);
              for (const cell of fileCells) results.push({ cell, rec: { ...record(cell), error } });
              continue;
            }
            const proc = findProcess(started.child.pid, cmd.exePattern);
            const pid = proc?.pid ?? started.child.pid;
            for (const cell of fileCells) {
              const outFile = join(tmp, 'fio.json');
              await rm(outFile, { force: true });
              const cpu0 = cpuSeconds(pid);
              const r = await run(
                'fio',
                cellFioArgs(cell, cmd.uri, runtime, ramp, outFile),
                (runtime + ramp + 60) * 1000,
              );
              const cpu = cpuSeconds(pid) - cpu0;
              const rec = record(cell);
              try {
                const res = parseFioJson(await readFile(outFile, 'utf8'), cell.rw);
                rec.ok = res.ok && r.code === 0;
                if (!rec.ok) rec.error = res.error ?? `fio exited ${r.code}: ${r.output}`;
                rec.value = cell.metric === 'mibps' ? res.mibps : res.iops;
                // Bytes over ramp + runtime at the measured rate.
                const gib = (res.mibps * (runtime + ramp)) / 1024;
                rec.cpuPerGiB = cpu / gib;
              } catch (e) {
                rec.error = `fio: ${(e as Error).message} ${r.output}`;
              }
              results.push({ cell, rec });
              log(
                `[${tag}] ${cell.name}: ${rec.ok ? `${Math.round(rec.value)} ${cell.metric === 'mibps' ? 'MiB/s' : 'IOPS'}, ${rec.cpuPerGiB.toFixed(2)} CPU s/GiB` : `FAILED ${rec.error}`}`,
              );
            }
            const mem = memoryKiB(pid);
            if (mem) {
              rss.push({
                round,
                kind,
                tls: withTls,
                ...(files.length > 1 ? { file } : {}),
                peakMiB: mem.vmHwm / 1024,
              });
            }
            await stopServer(started.child, pid);
            await rm(ep.socket, { force: true });
          }
        }
      }
    }
  } finally {
    killAll();
    await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
  }

  // ---- the table ----
  const med = (kind: Kind, tls: boolean, cell: CellSpec, f: (c: Measurement) => number) =>
    median(
      results
        .filter((x) => x.cell === cell && x.rec.ok && x.rec.kind === kind && x.rec.tls === tls)
        .map((x) => f(x.rec)),
    );
  const fmt = (v: number, unit: string) =>
    !Number.isFinite(v) ? 'fail' : unit === 'MiB/s' ? v.toFixed(0) : Math.round(v).toString();
  const rows: string[][] = [];
  for (const withTls of tlsList) {
    for (const cell of cells) {
      const unit = cell.metric === 'mibps' ? 'MiB/s' : 'IOPS';
      const v = KINDS.map((k) => med(k, withTls, cell, (c) => c.value));
      const cpu = KINDS.map((k) => med(k, withTls, cell, (c) => c.cpuPerGiB));
      const [first = '', ...more] = cell.label;
      rows.push([
        `${first}${withTls ? ' TLS' : ''}`,
        ...more,
        unit,
        ...v.map((x) => fmt(x, unit)),
        `${(v[0]! / v[2]!).toFixed(2)}x`,
        `${(v[1]! / v[2]!).toFixed(2)}x`,
        ...cpu.map((x) => (Number.isFinite(x) ? x.toFixed(2) : '-')),
      ]);
    }
  }
  const table = renderTable(
    [
      ...m.labelHeader,
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
    m.labelHeader.length + 1,
  );
  const rssRows = KINDS.flatMap((k) =>
    tlsList.flatMap((t) =>
      files.map((f) => {
        const xs = rss
          .filter((r) => r.kind === k && r.tls === t && (r.file ?? 'data') === f)
          .map((r) => r.peakMiB);
        const name = `${k}${t ? ' TLS' : ''}${f === 'data' ? '' : ` ${f}`}`;
        return [name, xs.map((x) => x.toFixed(0)).join(' / ')];
      }),
    ),
  );
  const served =
    files.length === 1
      ? `${sizeMiB} MiB file`
      : `${sizeMiB} MiB files (pre-filled; 'sparse': never written)`;
  const header =
    `Median of ${rounds} round(s), ${runtime} s measured after ${ramp} s ramp; Unix socket; ` +
    `${served}; ballast = --workers ${opts.workers ?? `auto (${os.availableParallelism()} here)`}, ballast-1 = --workers 1`;
  process.stdout.write(
    `\n${header}\n\n${table}\n\nPeak RSS (VmHWM, MiB) per server process (${m.rssScope}), per round\n\n${renderTable(['server', 'rounds'], rssRows, 1)}\n`,
  );
  await mkdir(dirname(outPath), { recursive: true });
  const measured = results.map((x) => x.rec);
  await writeFile(
    outPath,
    `${JSON.stringify({ startedAt, host: { cpus: os.availableParallelism(), loadavg: os.loadavg() }, ...m.extra, cells: measured, rss }, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n`,
  );
  log(`raw results: ${outPath}`);
  return measured.some((c) => !c.ok) ? 1 : 0;
}

/** 1, as many as the cores this process may use, 4 and 16: each once, in order. */
export function defaultConnections(cores = os.availableParallelism()): number[] {
  return [...new Set([1, cores, 4, 16])].sort((a, b) => a - b);
}
