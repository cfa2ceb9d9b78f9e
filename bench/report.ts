// Medians, ratios and the plain-text tables.

import { type FioResult, JOBS } from './fio.js';
import type { JobName, ServerName, Transport } from './options.js';

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
  samples: Partial<Record<ServerName, number>>;
  /** ballast median / other server's median. */
  ratio: { nbdkit?: number; 'qemu-nbd'?: number };
}

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
        const xs = runs
          .filter((r) => r.ok && r.job === job && r.transport === transport && r.server === server)
          .map((r) => (spec.metric === 'mibps' ? r.mibps : r.iops));
        row.samples[server] = xs.length;
        if (xs.length === 0) continue;
        row.median[server] = median(xs);
        row.min[server] = Math.min(...xs);
        row.max[server] = Math.max(...xs);
      }
      const b = row.median.ballast;
      if (b !== undefined) {
        const k = row.median.nbdkit;
        const q = row.median['qemu-nbd'];
        if (k !== undefined && k > 0) row.ratio.nbdkit = b / k;
        if (q !== undefined && q > 0) row.ratio['qemu-nbd'] = b / q;
      }
      rows.push(row);
    }
  }
  return rows;
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

export function throughputTable(rows: readonly SummaryRow[], servers: readonly ServerName[]) {
  const withRatios = servers.includes('ballast');
  const others = servers.filter((s) => s !== 'ballast') as ('nbdkit' | 'qemu-nbd')[];
  const header = ['job', 'transport', 'unit', ...servers];
  if (withRatios) for (const o of others) header.push(`ballast/${o}`);
  const body = rows.map((r) => {
    const cells = [
      r.job,
      r.transport,
      r.unit,
      ...servers.map((s) => fmtValue(r.median[s], r.unit)),
    ];
    if (withRatios) for (const o of others) cells.push(fmtRatio(r.ratio[o]));
    return cells;
  });
  return renderTable(header, body, 3);
}

/** The lowest and highest value over the rounds, per server: how noisy each median is. */
export function rangeTable(rows: readonly SummaryRow[], servers: readonly ServerName[]): string {
  const header = ['job', 'transport', 'unit', ...servers];
  const body = rows.map((r) => [
    r.job,
    r.transport,
    r.unit,
    ...servers.map((s) =>
      r.min[s] === undefined
        ? 'fail'
        : `${fmtValue(r.min[s], r.unit)}-${fmtValue(r.max[s], r.unit)}`,
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
    for (const transport of transports) cols.push({ server, transport });
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
