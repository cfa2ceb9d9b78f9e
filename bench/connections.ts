// The connections axis: Ballast with its worker threads (default --workers auto,
// the cores available), Ballast on one event loop (--workers 1) and nbdkit (file
// plugin), plain and TLS, under 1, N (the cores), 4 and 16 connections (fio numjobs, one NBD
// connection per job) of the four jobs. Alternating in one run, server order
// rotated per round; per cell the median of the rounds, the ratios to nbdkit,
// each server's CPU seconds per GiB moved, and each server process's peak RSS
// (bench/matrix.ts runs it).
//
//   npm run bench -- --suite connections [--rounds 3] [--runtime 4] [--ramp 1]
//                    [--connections 1,2,4,16] [--jobs ...] [--tls both|on|off]
//                    [--workers N] [--size-mib 1024] [--out FILE]

import { JOBS, type JobSpec } from './fio.js';
import { type CellSpec, defaultConnections, parseMatrixOptions, runMatrix } from './matrix.js';
import { JOB_NAMES, type JobName } from './options.js';

export const CONNECTIONS_USAGE = `Usage: npm run bench -- --suite connections [options]

Many connections at once: Ballast (--workers N, default auto: the cores available),
Ballast on one event loop (--workers 1) and nbdkit's file plugin, plain and TLS,
over the Unix socket, under 1, as many as the cores, 4 and 16 connections (fio
numjobs: one NBD connection per job). Per-connection queue depth: the job's own with one
connection, else max(4, depth / connections).

Options:
  --rounds N          rounds (default 3)
  --runtime S         measured seconds per fio run (default 4)
  --ramp S            warm-up seconds per fio run (default 1)
  --connections LIST  comma list (default 1, the cores, 4, 16: here ${defaultConnections().join(',')})
  --jobs LIST         comma list of ${JOB_NAMES.join(', ')} (default all)
  --tls both|on|off   (default both)
  --workers N         Ballast's --workers for the 'ballast' column (default: auto)
  --size-mib N        served file (default 1024)
  --out FILE          raw results (default bench-results/connections.json)
`;

function depth(job: JobSpec, conns: number): number {
  return conns === 1 ? job.iodepth : Math.max(4, Math.round(job.iodepth / conns));
}

/** Every job under every connection count, in that order, on the pre-filled file. */
export function connectionsCells(jobs: readonly JobName[], connList: readonly number[]) {
  return jobs.flatMap((job) =>
    connList.map((conns): CellSpec => {
      const spec = JOBS[job];
      return {
        id: job,
        name: `${job} x${conns}`,
        key: { job, conns },
        label: [job, String(conns)],
        rw: spec.rw,
        bs: spec.bs,
        conns,
        iodepth: depth(spec, conns),
        metric: spec.metric,
        file: 'data',
      };
    }),
  );
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
    cells: connectionsCells(opts.jobs, opts.connections),
    labelHeader: ['job', 'conns'],
    rssScope: 'all jobs and connection counts',
  });
}
