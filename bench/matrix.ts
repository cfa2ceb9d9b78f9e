// A matrix of fio cells against servers alternating in one run: Ballast with its
// worker threads (--workers auto, the cores available), Ballast on one event loop
// (--workers 1), nbdkit (file plugin) and qemu-nbd, over a Unix socket, plain
// and/or TLS. Each round starts every server once per file the cells read (server
// order rotated per round) and runs that file's cells against it; per cell the
// median of the rounds, the ratios to nbdkit and qemu-nbd, each server's CPU
// seconds per GiB moved, the file's data runs, and each server process's peak RSS.
// The connections and cells suites are two matrices (bench/connections.ts,
// bench/cells.ts).

import { spawn } from 'node:child_process';
import { closeSync, existsSync, openSync } from 'node:fs';
import { mkdir, mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { dirname, isAbsolute, join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { loadNative } from '../agent/native.js';
import { type FioRw, parseFioJson, prefill } from './fio.js';
import { makeCertificates, type TlsFiles } from './fixtures.js';
import { JOB_NAMES, type JobName } from './options.js';
import { cpuSeconds, findProcess, killAll, memoryKiB, run } from './proc.js';
import { median, renderTable } from './report.js';
import {
  type Endpoint,
  type ServerCommand,
  serverCommand,
  startServer,
  stopServer,
} from './servers.js';

const log = (msg: string): void => {
  process.stderr.write(`[bench] ${msg}\n`);
};

export type Kind = 'ballast' | 'ballast-1' | 'nbdkit' | 'qemu-nbd';
export const KINDS: readonly Kind[] = ['ballast', 'ballast-1', 'nbdkit', 'qemu-nbd'];

/** The servers of round `round` (1-based) in rotated order, so none always goes first. */
export function serverOrder(round: number, kinds: readonly Kind[] = KINDS): Kind[] {
  const k = (round - 1) % kinds.length;
  return [...kinds.slice(k), ...kinds.slice(0, k)];
}

/**
 * The file a cell reads: `data` is pre-filled (every byte written once), `sparse`
 * is truncated to size and never written, so every read lands in a hole, `paged`
 * is what swap leaves: a sparse file written by random 4 KiB writes to
 * `CellSpec.pagedPct` percent of its pages (tens of thousands of data runs).
 */
export type FileKind = 'data' | 'sparse' | 'paged';

/** The file states of --files, in this order. */
export const FILE_KINDS: readonly FileKind[] = ['data', 'sparse', 'paged'];

/**
 * Which file (and so which server session) a cell runs on: one per kind; a paged
 * file per percentage for the cells that read, and one of its own for each cell
 * that writes, so that every cell starts from the paged state.
 */
export function fileKey(cell: Pick<CellSpec, 'file' | 'pagedPct' | 'rw' | 'name'>): string {
  if (cell.file !== 'paged') return cell.file;
  const base = `paged${cell.pagedPct ?? 0}`;
  return writes(cell) ? `${base}-${cell.name.replace(/[^A-Za-z0-9]+/g, '-')}` : base;
}

/** How the table and log name a file state. */
export function fileLabel(cell: Pick<CellSpec, 'file' | 'pagedPct'>): string {
  return cell.file === 'paged' ? `paged ${cell.pagedPct ?? 0}%` : cell.file;
}

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
  /** For `paged`: the percentage of 4 KiB pages written before the cell. */
  pagedPct?: number;
}

/** Whether a cell writes (its file is no longer the state the next cell expects). */
export function writes(cell: Pick<CellSpec, 'rw'>): boolean {
  return cell.rw.includes('write') || cell.rw === 'randrw';
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
  /** The servers, in their first round's order. */
  servers: Kind[];
  /** The file states whose cells run. */
  files: FileKind[];
  /** Percentages of pages written for the paged file state. */
  paged: number[];
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
      servers: { type: 'string', default: KINDS.join(',') },
      files: { type: 'string', default: suite === 'connections' ? 'data' : FILE_KINDS.join(',') },
      paged: { type: 'string', default: '30,80' },
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
  const servers = values.servers.split(',') as Kind[];
  for (const k of servers) if (!KINDS.includes(k)) throw new Error(`--servers: unknown ${k}`);
  if (!servers.includes('nbdkit')) throw new Error('--servers: nbdkit is the reference, keep it');
  const files = values.files.split(',') as FileKind[];
  for (const f of files) if (!FILE_KINDS.includes(f)) throw new Error(`--files: unknown ${f}`);
  if (suite === 'connections' && files.includes('sparse')) {
    throw new Error('--files: sparse is not a state of --suite connections (data or paged)');
  }
  const paged = values.paged.split(',').map((p) => count('--paged', p, 1));
  for (const p of paged) if (p > 99) throw new Error(`--paged: a percentage below 100, got ${p}`);
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
    servers: KINDS.filter((k) => servers.includes(k)),
    files: FILE_KINDS.filter((f) => files.includes(f)),
    paged: [...new Set(paged)],
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

/**
 * The data runs of a file, by SEEK_DATA/SEEK_HOLE: what a server asking the
 * allocation map walks. On a paged copy it is also the extent count FIEMAP
 * reports (`filefrag`); on fio's template `filefrag` says far fewer, merging the
 * extents that writeback laid out side by side on disk.
 */
export function dataRuns(file: string): number {
  const n = loadNative();
  const c = n.constants;
  const fd = openSync(file, 'r');
  try {
    let runs = 0;
    let pos = 0;
    for (;;) {
      const d = n.lseek(fd, pos, c.SEEK_DATA);
      if (d < 0) return runs; // ENXIO: no data past pos
      const h = n.lseek(fd, d, c.SEEK_HOLE);
      if (h <= d) return runs;
      runs++;
      pos = h;
    }
  } finally {
    closeSync(fd);
  }
}

/**
 * Makes `file` the paged state again, in place (a server may have it open): every
 * page deallocated, then `pct` percent of its 4 KiB pages written in random order
 * from a fixed seed (fio's random map: each page once), then fsync. The same
 * layout every time, for every server.
 */
export async function pageFile(file: string, sizeMiB: number, pct: number): Promise<void> {
  const bytes = sizeMiB * 2 ** 20;
  const n = loadNative();
  const fd = openSync(file, 'r+');
  let punched: number;
  try {
    punched = await n.fallocate(
      fd,
      n.constants.FALLOC_FL_PUNCH_HOLE | n.constants.FALLOC_FL_KEEP_SIZE,
      0,
      bytes,
    );
  } finally {
    closeSync(fd);
  }
  if (punched < 0) throw new Error(`cannot punch ${file} empty: errno ${-punched}`);
  const pages = Math.round(((bytes / 4096) * pct) / 100);
  const res = await run(
    'fio',
    [
      '--name=paged',
      '--ioengine=psync',
      '--rw=randwrite',
      '--bs=4k',
      `--size=${bytes}`,
      `--io_size=${pages * 4096}`,
      '--randrepeat=1',
      '--randseed=2026',
      // Known bytes (never zero), so that the file is the same byte for byte too.
      '--buffer_pattern=0x5a5aa5a5',
      `--filename=${file}`,
      '--end_fsync=1',
      '--output-format=terse',
    ],
    600_000,
  );
  if (res.code !== 0)
    throw new Error(`paging the file with fio failed (exit ${res.code}): ${res.output}`);
}

/** Runs the matrix, prints its tables and writes the raw results; 1 if any cell failed. */
export async function runMatrix(m: Matrix): Promise<number> {
  const { opts, cells } = m;
  const { rounds, runtime, ramp, sizeMiB } = opts;
  const kinds = opts.servers;
  const tlsList = opts.tls;
  // One file per state (and per paged percentage), in the cells' order.
  const files = [...new Set(cells.map(fileKey))];
  const fileOf = new Map(cells.map((c) => [fileKey(c), c]));
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
  const rss: { round: number; kind: Kind; tls: boolean; file?: string; peakMiB: number }[] = [];
  const pathOf = (key: string): string => join(tmp, key === 'data' ? 'disk.img' : `${key}.img`);
  // Paged files: one template per percentage, made once; every session gets a fresh
  // sparse copy (cp copies the data runs only), kept to the end. Making the state
  // again in place would punch tens of thousands of extents, which on a file system
  // mounted with discard waits on a discard per extent (minutes here).
  const templateOf = (c: CellSpec): string => join(tmp, `template${c.pagedPct ?? 0}.img`);
  // A new name per session: copying over the last copy would free its extents too.
  let copies = 0;
  const fresh = async (key: string): Promise<string> => {
    const c = fileOf.get(key)!;
    if (c.file !== 'paged') return pathOf(key);
    const path = pathOf(`${key}-${++copies}`);
    const r = await run('cp', ['--sparse=always', templateOf(c), path], 600_000);
    if (r.code !== 0) throw new Error(`copying the paged file failed: ${r.output}`);
    return path;
  };
  try {
    for (const f of files) {
      const c = fileOf.get(f)!;
      const path = c.file === 'paged' ? templateOf(c) : pathOf(f);
      if (c.file === 'paged' && existsSync(path)) continue; // one template per percentage
      await writeFile(path, '');
      await truncate(path, sizeMiB * 2 ** 20);
      if (c.file === 'paged') {
        const t0 = performance.now();
        await pageFile(path, sizeMiB, c.pagedPct ?? 0);
        log(
          `${fileLabel(c)}: ${dataRuns(path)} data runs, made in ${Math.round(performance.now() - t0)} ms`,
        );
      }
    }
    if (files.includes('data')) {
      log(`pre-filling ${pathOf('data')} (${sizeMiB} MiB)`);
      await prefill(pathOf('data'), sizeMiB);
    }
    let tls: TlsFiles | undefined;
    if (tlsList.includes(true)) tls = await makeCertificates(join(tmp, 'tls'));
    const total = rounds * kinds.length * tlsList.length * cells.length;
    log(
      `${total} fio runs of ${ramp}+${runtime} s; about ${Math.round((total * (runtime + ramp + 1)) / 60)} min`,
    );
    for (let round = 1; round <= rounds; round++) {
      for (const withTls of tlsList) {
        for (const file of files) {
          const fileCells = cells.filter((c) => fileKey(c) === file);
          for (const kind of serverOrder(round, kinds)) {
            const path = await fresh(file);
            const session = file === 'data' ? `${kind}-${round}` : `${kind}-${file}-${round}`;
            const ep: Endpoint = { transport: 'unix', socket: join(tmp, `${session}.sock`) };
            const base = kind === 'ballast-1' ? 'ballast' : kind;
            const cmd = serverCommand(
              withTls && base !== 'qemu-nbd' ? (`${base}-tls` as const) : base,
              path,
              ep,
              ballastPath,
              { tls },
              session,
            );
            if (kind === 'ballast-1') cmd.args.push('--workers', '1');
            else if (kind === 'ballast') cmd.args.push('--workers', opts.workers ?? 'auto');
            else if (kind === 'qemu-nbd') qemuNbdMatrix(cmd, withTls ? tls : undefined);
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
              const runs = dataRuns(path);
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
              rec.dataRuns = runs;
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
                `[${tag}] ${cell.name}: ${rec.ok ? `${Math.round(rec.value)} ${cell.metric === 'mibps' ? 'MiB/s' : 'IOPS'}, ${rec.cpuPerGiB.toFixed(2)} CPU s/GiB, ${runs} data runs` : `FAILED ${rec.error}`}`,
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
    if (files.some((f) => fileOf.get(f)!.file === 'paged')) {
      // Freeing the paged copies' tens of thousands of extents waits on a discard per
      // extent where the file system is mounted with discard (minutes): the copies stay
      // until the end, and are removed behind the tables by a process of their own.
      spawn('rm', ['-rf', tmp], { detached: true, stdio: 'ignore' }).unref();
    } else {
      await rm(tmp, { recursive: true, force: true }).catch(() => undefined);
    }
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
  // Every other server against nbdkit, and Ballast against qemu-nbd when both ran.
  const ratios: [Kind, Kind][] = kinds
    .filter((k) => k !== 'nbdkit' && k !== 'qemu-nbd')
    .map((k): [Kind, Kind] => [k, 'nbdkit']);
  if (kinds.includes('qemu-nbd')) {
    ratios.push(['qemu-nbd', 'nbdkit']);
    if (kinds.includes('ballast')) ratios.push(['ballast', 'qemu-nbd']);
  }
  const rows: string[][] = [];
  for (const withTls of tlsList) {
    for (const cell of cells) {
      const unit = cell.metric === 'mibps' ? 'MiB/s' : 'IOPS';
      const v = new Map(kinds.map((k) => [k, med(k, withTls, cell, (c) => c.value)]));
      const cpu = kinds.map((k) => med(k, withTls, cell, (c) => c.cpuPerGiB));
      const runs = median(
        results
          .filter((x) => x.cell === cell && x.rec.tls === withTls)
          .map((x) => Number(x.rec.dataRuns)),
      );
      const [first = '', ...more] = cell.label;
      rows.push([
        `${first}${withTls ? ' TLS' : ''}`,
        ...more,
        Number.isFinite(runs) ? String(runs) : '-',
        unit,
        ...kinds.map((k) => fmt(v.get(k)!, unit)),
        ...ratios.map(([a, b]) => `${(v.get(a)! / v.get(b)!).toFixed(2)}x`),
        ...cpu.map((x) => (Number.isFinite(x) ? x.toFixed(2) : '-')),
      ]);
    }
  }
  const table = renderTable(
    [
      ...m.labelHeader,
      'data runs',
      'unit',
      ...kinds,
      ...ratios.map(([a, b]) => `${a}/${b}`),
      ...kinds.map((k, i) => (i === 0 ? `CPU s/GiB ${k}` : k)),
    ],
    rows,
    m.labelHeader.length + 2,
  );
  const rssRows = kinds.flatMap((k) =>
    tlsList.flatMap((t) =>
      files.map((f) => {
        const xs = rss
          .filter((r) => r.kind === k && r.tls === t && (r.file ?? files[0]) === f)
          .map((r) => r.peakMiB);
        const name = `${k}${t ? ' TLS' : ''}${f === 'data' ? '' : ` ${f}`}`;
        return [name, xs.map((x) => x.toFixed(0)).join(' / ')];
      }),
    ),
  );
  const states = files.map((f) => {
    const c = fileOf.get(f)!;
    if (c.file === 'data') return 'data: pre-filled';
    if (c.file === 'sparse') return 'sparse: never written';
    return `${fileLabel(c)}: that share of 4 KiB pages written in random order, a fresh copy for every server session, a session of its own for each cell that writes`;
  });
  const served = `${sizeMiB} MiB file${files.length > 1 ? 's' : ''} (${[...new Set(states)].join('; ')})`;
  const header =
    `Median of ${rounds} round(s), ${runtime} s measured after ${ramp} s ramp; Unix socket; ` +
    `${served}; ballast = --workers ${opts.workers ?? `auto (${os.availableParallelism()} here)`}, ballast-1 = --workers 1; ` +
    `'data runs': the file's runs of data (SEEK_DATA/SEEK_HOLE) when the cell started`;
  process.stdout.write(
    `\n${header}\n\n${table}\n\nPeak RSS (VmHWM, MiB) per server process (${m.rssScope}), per round\n\n${renderTable(['server', 'rounds'], rssRows, 1)}\n`,
  );
  await mkdir(dirname(outPath), { recursive: true });
  const measured = results.map((x) => x.rec);
  await writeFile(
    outPath,
    `${JSON.stringify({ startedAt, host: { cpus: os.availableParallelism(), loadavg: os.loadavg() }, servers: kinds, ...m.extra, cells: measured, rss }, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n`,
  );
  log(`raw results: ${outPath}`);
  return measured.some((c) => !c.ok) ? 1 : 0;
}

/**
 * qemu-nbd as the matrix runs it: as many clients as fio opens (up to 16 connections,
 * and the one that sizes the export), and with TLS the same certificate directory as
 * the others (QEMU's tls-creds-x509 reads the same three file names as nbdkit).
 */
function qemuNbdMatrix(cmd: ServerCommand, tls: TlsFiles | undefined): void {
  const e = cmd.args.indexOf('-e');
  if (e >= 0) cmd.args[e + 1] = '64';
  if (tls) {
    cmd.args.unshift(
      '--object',
      `tls-creds-x509,id=tls0,endpoint=server,verify-peer=off,dir=${tls.dir}`,
      '--tls-creds',
      'tls0',
    );
    cmd.uri = cmd.uri.replace(/^nbd\+unix:/, 'nbds+unix:').replace(/\?/, '?tls-verify-peer=false&');
  }
}

/** 1, as many as the cores this process may use, 4 and 16: each once, in order. */
export function defaultConnections(cores = os.availableParallelism()): number[] {
  return [...new Set([1, cores, 4, 16])].sort((a, b) => a - b);
}
