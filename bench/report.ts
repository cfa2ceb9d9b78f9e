// Medians, ratios and the plain-text tables.

import { type FioResult, JOBS } from './fio.js';
import { BASE_SERVERS, type JobName, type ServerName, type Transport } from './options.js';

export interface RunRecord extends FioResult {
  round: number;
  transport: Transport;
  server: ServerName;
  job: JobName;
}

export interface SessionRecord {
  round: number;
  transport: Transport;
  server: ServerName;
  command: string[];
  ok: boolean;
  error?: string;
  spawnedPid: number;
  startMs?: number;
  /** /proc figures of the server proper, read just before SIGTERM. */
  memory?: { pid: number; exe: string; how: string; vmHwmKiB: number; vmRssKiB: number };
  exit?: { code: number | null; signal: string | null; killed: boolean };
  /** fdatasync of the image after the server stopped (writeback of its writes). */
  syncMs?: number;
}

export interface SummaryRow {
  job: JobName;
  transport: Transport;
  unit: 'MiB/s' | 'IOPS';
  /** Median over the rounds that succeeded, per server (absent: no successful round). */
  median: Partial<Record<ServerName, number>>;
  min: Partial<Record<ServerName, number>>;
  max: Partial<Record<ServerName, number>>;
  /** Successful rounds per server (absent: the server did not run on this transport). */
  samples: Partial<Record<ServerName, number>>;
  /** The medians' ratios of RATIOS, keyed `num/den` (e.g. `ballast/nbdkit`). */
  ratio: Record<string, number>;
}

/** The ratios reported when both servers ran: the first over the second. */
export const RATIOS: readonly { num: ServerName; den: ServerName; what: string }[] = [
  { num: 'ballast', den: 'nbdkit', what: 'Ballast vs nbdkit' },
  { num: 'ballast', den: 'qemu-nbd', what: 'Ballast vs qemu-nbd' },
  { num: 'ballast-tls', den: 'nbdkit-tls', what: 'Ballast vs nbdkit, both TLS' },
  { num: 'ballast-tls', den: 'ballast', what: 'TLS on Ballast' },
  { num: 'nbdkit-tls', den: 'nbdkit', what: 'TLS on nbdkit' },
  { num: 'ballast-agent', den: 'ballast', what: 'agent vs ballast serve' },
  { num: 'ballast-pr', den: 'ballast-agent', what: 'reservation enforced' },
  { num: 'ballast-pr-tls', den: 'ballast-pr', what: 'TLS on the agent' },
  { num: 'ballast-pr-tls', den: 'ballast-agent', what: 'reservation + TLS vs neither' },
];

export const ratioKey = (r: { num: ServerName; den: ServerName }): string => `${r.num}/${r.den}`;

export function median(xs: readonly number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return Number.NaN;
  const mid = s.length >> 1;
  return s.length % 2 === 1 ? s[mid]! : (s[mid - 1]! + s[mid]!) / 2;
}

export function summarize(
  runs: readonly RunRecord[],
  jobs: readonly JobName[],
  transports: readonly Transport[],
  servers: readonly ServerName[],
): SummaryRow[] {
  const rows: SummaryRow[] = [];
  for (const job of jobs) {
    const spec = JOBS[job];
    for (const transport of transports) {
      const row: SummaryRow = {
        job,
        transport,
        unit: spec.metric === 'mibps' ? 'MiB/s' : 'IOPS',
        median: {},
        min: {},
        max: {},
        samples: {},
        ratio: {},
      };
      for (const server of servers) {
        const cell = runs.filter(
          (r) => r.job === job && r.transport === transport && r.server === server,
        );
        if (cell.length === 0) continue;
        const xs = cell
          .filter((r) => r.ok)
          .map((r) => (spec.metric === 'mibps' ? r.mibps : r.iops));
        row.samples[server] = xs.length;
        if (xs.length === 0) continue;
        row.median[server] = median(xs);
        row.min[server] = Math.min(...xs);
        row.max[server] = Math.max(...xs);
      }
      for (const r of RATIOS) {
        const n = row.median[r.num];
        const d = row.median[r.den];
        if (n !== undefined && d !== undefined && d > 0) row.ratio[ratioKey(r)] = n / d;
      }
      // A transport none of the servers ran on (the TLS and agent kinds alone, TCP).
      if (Object.keys(row.samples).length > 0) rows.push(row);
    }
  }
  return rows;
}

/** A median or range cell: `-` when the server did not run there, `fail` when no round succeeded. */
function fmtCell(r: SummaryRow, s: ServerName, v: (s: ServerName) => string): string {
  const n = r.samples[s];
  if (n === undefined) return '-';
  return n === 0 ? 'fail' : v(s);
}

function fmtValue(v: number | undefined, unit: SummaryRow['unit']): string {
  if (v === undefined || !Number.isFinite(v)) return 'fail';
  return unit === 'MiB/s' ? v.toFixed(0) : Math.round(v).toLocaleString('en-US');
}

function fmtRatio(v: number | undefined): string {
  return v === undefined || !Number.isFinite(v) ? '-' : `${v.toFixed(2)}x`;
}

/** Renders rows of cells as an aligned table; the first `leftCols` columns are left-aligned. */
export function renderTable(header: string[], rows: string[][], leftCols: number): string {
  const widths = header.map((h, i) => Math.max(h.length, ...rows.map((r) => (r[i] ?? '').length)));
  const line = (cells: string[]): string =>
    cells
      .map((c, i) => (i < leftCols ? c.padEnd(widths[i]!) : c.padStart(widths[i]!)))
      .join('  ')
      .trimEnd();
  const sep = widths.map((w) => '-'.repeat(w)).join('  ');
  return [line(header), sep, ...rows.map(line)].join('\n');
}

/** The ratios whose two servers both ran. */
function ratiosOf(servers: readonly ServerName[]) {
  return RATIOS.filter((r) => servers.includes(r.num) && servers.includes(r.den));
}

/** True when only the plain file servers ran: their ratios then sit in the medians table. */
export function ratiosInline(servers: readonly ServerName[]): boolean {
  return servers.every((s) => BASE_SERVERS.includes(s));
}

/** Medians per job x transport x server (with Ballast's ratios when only the plain servers ran). */
export function throughputTable(rows: readonly SummaryRow[], servers: readonly ServerName[]) {
  const ratios = ratiosInline(servers) ? ratiosOf(servers) : [];
  const header = ['job', 'transport', 'unit', ...servers, ...ratios.map(ratioKey)];
  const body = rows.map((r) => [
    r.job,
    r.transport,
    r.unit,
    ...servers.map((s) => fmtCell(r, s, (x) => fmtValue(r.median[x], r.unit))),
    ...ratios.map((x) => fmtRatio(r.ratio[ratioKey(x)])),
  ]);
  return renderTable(header, body, 3);
}

/**
 * The ratios of medians as a table of their own (used when the TLS or agent
 * kinds ran): one row per ratio x transport, one column per job. Rows with no
 * value at all (a kind that did not run on that transport) are left out; no
 * rows at all gives ''.
 */
export function ratioTable(
  rows: readonly SummaryRow[],
  servers: readonly ServerName[],
  jobs: readonly JobName[],
  transports: readonly Transport[],
): string {
  const header = ['ratio', 'meaning', 'transport', ...jobs];
  const body: string[][] = [];

  for (const x of ratiosOf(servers)) {
    for (const transport of transports) {
      const cells = jobs.map((job) => {
        const r = rows.find((y) => y.job === job && y.transport === transport);
        return fmtRatio(r?.ratio[ratioKey(x)]);
      });
      if (cells.every((c) => c === '-')) continue;
      body.push([ratioKey(x), x.what, transport, ...cells]);
    }
  }
  return body.length === 0 ? '' : renderTable(header, body, 3);
}

/** The lowest and highest value over the rounds, per server: how noisy each median is. */
export function rangeTable(rows: readonly SummaryRow[], servers: readonly ServerName[]): string {
  const header = ['job', 'transport', 'unit', ...servers];
  const body = rows.map((r) => [
    r.job,
    r.transport,
    r.unit,
    ...servers.map((s) =>
      fmtCell(r, s, (x) => `${fmtValue(r.min[x], r.unit)}-${fmtValue(r.max[x], r.unit)}`),
    ),
  ]);
  return renderTable(header, body, 3);
}

/** Peak RSS (VmHWM) per round, one column per server x transport, ballast first. */
export function rssTable(
  sessions: readonly SessionRecord[],
  rounds: number,
  servers: readonly ServerName[],
  transports: readonly Transport[],
): string {
  const cols: { server: ServerName; transport: Transport }[] = [];
  for (const server of servers)
    for (const transport of transports)
      if (sessions.some((x) => x.server === server && x.transport === transport))
        cols.push({ server, transport });
  const header = ['round', ...cols.map((c) => `${c.server} ${c.transport}`)];
  const body: string[][] = [];
  for (let round = 1; round <= rounds; round++) {
    body.push([
      String(round),
      ...cols.map((c) => {
        const s = sessions.find(
          (x) => x.round === round && x.server === c.server && x.transport === c.transport,
        );
        return s?.memory === undefined ? '-' : (s.memory.vmHwmKiB / 1024).toFixed(1);
      }),
    ]);
  }
  return renderTable(header, body, 1);
}
