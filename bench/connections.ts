// The connections axis: Ballast with its worker threads (default --workers auto,
// the cores available), Ballast on one event loop (--workers 1), nbdkit (file
// plugin) and qemu-nbd, plain and TLS, under 1, N (the cores), 4 and 16 connections
// (fio numjobs, one NBD connection per job) of the four jobs, on the pre-filled file
// and/or paged files. Alternating in one run, server order rotated per round; per
// cell the median of the rounds, the ratios to nbdkit, each server's CPU seconds per
// GiB moved, and each server process's peak RSS (bench/matrix.ts runs it).
//
//   npm run bench -- --suite connections [--rounds 3] [--runtime 4] [--ramp 1]
//                    [--connections 1,2,4,16] [--jobs ...] [--tls both|on|off]
//                    [--workers N] [--servers LIST] [--files data,paged] [--paged 30,80]
//                    [--size-mib 1024] [--out FILE]

import { JOBS, type JobSpec } from './fio.js';
import {
  type CellSpec,
  defaultConnections,
  type FileKind,
  fileLabel,
  parseMatrixOptions,
  runMatrix,
} from './matrix.js';
import { JOB_NAMES, type JobName } from './options.js';

export const CONNECTIONS_USAGE = `Usage: npm run bench -- --suite connections [options]

Many connections at once: Ballast (--workers N, default auto: the cores available),
Ballast on one event loop (--workers 1), nbdkit's file plugin and qemu-nbd, plain
and TLS, over the Unix socket, under 1, as many as the cores, 4 and 16 connections
(fio numjobs: one NBD connection per job). Per-connection queue depth: the job's own
with one connection, else max(4, depth / connections). On the pre-filled file, and
with --files paged on files with P% of their 4 KiB pages written in random order
(a fresh copy for every server session; each job and count that writes has its own).

Options:
  --rounds N          rounds (default 3)
  --runtime S         measured seconds per fio run (default 4)
  --ramp S            warm-up seconds per fio run (default 1)
  --connections LIST  comma list (default 1, the cores, 4, 16: here ${defaultConnections().join(',')})
  --jobs LIST         comma list of ${JOB_NAMES.join(', ')} (default all)
  --tls both|on|off   (default both)
  --workers N         Ballast's --workers for the 'ballast' column (default: auto)
  --servers LIST      comma list of ballast, ballast-1, nbdkit, qemu-nbd (default all)
  --files LIST        comma list of data, paged (default data)
  --paged LIST        percentages of pages written for the paged state (default 30,80)
  --size-mib N        served file (default 1024)
  --out FILE          raw results (default bench-results/connections.json)
`;

function depth(job: JobSpec, conns: number): number {
  return conns === 1 ? job.iodepth : Math.max(4, Math.round(job.iodepth / conns));
}

/**
 * Every job under every connection count, in that order, on the pre-filled file,
 * then on each paged file (read jobs first there; each cell that writes runs on a
 * fresh copy of its own).
 */
export function connectionsCells(
  jobs: readonly JobName[],
  connList: readonly number[],
  files: readonly FileKind[] = ['data'],
  paged: readonly number[] = [],
) {
  const states: { file: FileKind; pagedPct?: number }[] = [
    ...(files.includes('data') ? [{ file: 'data' as const }] : []),
    ...(files.includes('paged')
      ? paged.map((pagedPct) => ({ file: 'paged' as const, pagedPct }))
      : []),
  ];
  return states.flatMap((st) => {
    const ordered =
      st.file === 'data'
        ? jobs
        : [...jobs].sort(
            (a, b) => Number(JOBS[a].rw.includes('write')) - Number(JOBS[b].rw.includes('write')),
          );
    return ordered.flatMap((job) =>
      connList.map((conns): CellSpec => {
        const spec = JOBS[job];
        const label = st.file === 'data' ? job : `${job} ${fileLabel(st)}`;
        return {
          id: job,
          name: `${label} x${conns}`,
          key:
            st.file === 'data'
              ? { job, conns }
              : { job, conns, file: st.file, pagedPct: st.pagedPct ?? 0 },
          label: [label, String(conns)],
          rw: spec.rw,
          bs: spec.bs,
          conns,
          iodepth: depth(spec, conns),
          metric: spec.metric,
          file: st.file,
          ...(st.pagedPct === undefined ? {} : { pagedPct: st.pagedPct }),
        };
      }),
    );
  });
}

export async function connectionsMain(argv: string[], root: string): Promise<number> {
  let opts: ReturnType<typeof parseMatrixOptions>;
  try {
    opts = parseMatrixOptions('connections', argv);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${CONNECTIONS_USAGE}`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(CONNECTIONS_USAGE);
    return 0;
  }
  return runMatrix({
    suite: 'connections',
    opts,
    root,
    cells: connectionsCells(opts.jobs, opts.connections, opts.files, opts.paged),
    labelHeader: ['job', 'conns'],
    rssScope: 'all jobs and connection counts',
  });
}
