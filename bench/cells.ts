// The cells of the many-connections issue, each at its own connection count and
// queue depth, and the paging cells (a guest swapping in and out of a paged file),
// against the servers of bench/matrix.ts (ballast = --workers auto, ballast-1 =
// --workers 1, nbdkit's file plugin, qemu-nbd) alternating in one run. Cells read
// a pre-filled file, one never written (truncated only), or paged files (random
// 4 KiB pages written to a share of the file), so every server is started once per
// file and round.
//
//   npm run bench -- --suite cells [--rounds 3] [--runtime 4] [--ramp 1]
//                    [--tls off|on|both] [--workers N] [--servers LIST]
//                    [--files data,sparse,paged] [--paged 30,80] [--size-mib 1024] [--out FILE]

import type { FioRw } from './fio.js';
import {
  type CellSpec,
  type FileKind,
  fileLabel,
  parseMatrixOptions,
  runMatrix,
} from './matrix.js';

function cell(
  job: string,
  rw: FioRw,
  bs: string,
  conns: number,
  iodepth: number,
  file: FileKind,
  rwmixread?: number,
  pagedPct?: number,
): CellSpec {
  const shape = `${conns}x${iodepth}`;
  const label = file === 'data' ? job : `${job} ${fileLabel({ file, pagedPct })}`;
  return {
    id: `${label.replace(/[^A-Za-z0-9]+/g, '-')}-${shape}`,
    name: `${label} ${shape}`,
    key: { cell: label, conns, qd: iodepth, file, ...(pagedPct === undefined ? {} : { pagedPct }) },
    label: [label, `${conns} x ${iodepth}`],
    rw,
    bs,
    conns,
    iodepth,
    ...(rwmixread === undefined ? {} : { rwmixread }),
    metric: rw === 'read' || rw === 'write' ? 'mibps' : 'iops',
    file,
    ...(pagedPct === undefined ? {} : { pagedPct }),
  };
}

/** The cells, in the issue's order: connections (fio numjobs) x QD (iodepth per job). */
export const CELLS: readonly CellSpec[] = [
  cell('rand-write 4k', 'randwrite', '4k', 4, 16, 'data'),
  cell('rand-write 4k', 'randwrite', '4k', 8, 8, 'data'),
  cell('rand-write 64k', 'randwrite', '64k', 8, 8, 'data'),
  cell('rand-rw 4k 50/50', 'randrw', '4k', 8, 8, 'data', 50),
  cell('rand-read 4k', 'randread', '4k', 4, 16, 'data'),
  cell('seq-read 1M', 'read', '1M', 4, 8, 'data'),
  cell('seq-read 1M', 'read', '1M', 4, 8, 'sparse'),
  cell('seq-read 1M', 'read', '1M', 1, 8, 'sparse'),
];

/**
 * The paging cells on a file paged to `pct` percent, as guests page: swap-in is 4 KiB
 * random reads at 1, 4 and 16 connections; swap-out 4 KiB random writes, most of them
 * into holes (100 - pct percent of the file); mixed both at once. The reads share one
 * server session on one copy of the paged file; each cell that writes has a session
 * and a fresh copy of its own.
 */
export function pagedCells(pct: number): CellSpec[] {
  return [
    cell('swap-in 4k', 'randread', '4k', 1, 32, 'paged', undefined, pct),
    cell('swap-in 4k', 'randread', '4k', 4, 16, 'paged', undefined, pct),
    cell('swap-in 4k', 'randread', '4k', 16, 4, 'paged', undefined, pct),
    cell('swap-out 4k', 'randwrite', '4k', 4, 16, 'paged', undefined, pct),
    cell('mixed 4k 50/50', 'randrw', '4k', 8, 8, 'paged', 50, pct),
  ];
}

/** The cells of --files and --paged: the fixed ones on their files, then the paging cells. */
export function cellsFor(files: readonly FileKind[], paged: readonly number[]): CellSpec[] {
  return [
    ...CELLS.filter((c) => files.includes(c.file)),
    ...(files.includes('paged') ? paged.flatMap(pagedCells) : []),
  ];
}

export const CELLS_USAGE = `Usage: npm run bench -- --suite cells [options]

The cells of the many-connections issue, each at its own connections (fio numjobs,
one NBD connection per job) x queue depth (iodepth per connection), fio's nbd
engine over the Unix socket, against Ballast (--workers N, default auto: the cores
available), Ballast on one event loop (--workers 1), nbdkit's file plugin and
qemu-nbd, alternating in every round with the order rotated:

${CELLS.map((c) => `  ${c.label[0]!.padEnd(24)} ${c.label[1]}`).join('\n')}

${pagedCells(30)
  .map((c) => `  ${c.label[0]!.replace(/ paged 30%$/, ' paged P%').padEnd(24)} ${c.label[1]}`)
  .join('\n')}

rand-rw and mixed are 50% reads (rwmixread=50), counted as reads + writes. 'sparse'
cells read a second file that is truncated to size and never written; the first
eight use one pre-filled file. 'paged P%' cells use a file with P% of its 4 KiB
pages written by random 4 KiB writes (fio, fixed seed: the same layout each time),
made once; every server session serves a fresh sparse copy of it, and each cell
that writes has a session of its own, so each server and cell starts from the same
file; the table gives its data runs. Each
server is started once per file and round.

Options:
  --rounds N          rounds (default 3)
  --runtime S         measured seconds per fio run (default 4)
  --ramp S            warm-up seconds per fio run (default 1)
  --tls off|on|both   (default off)
  --workers N         Ballast's --workers for the 'ballast' column (default: auto)
  --servers LIST      comma list of ballast, ballast-1, nbdkit, qemu-nbd (default all;
                      nbdkit is required: the ratios are to it)
  --files LIST        comma list of the file states whose cells run: data, sparse,
                      paged (default all)
  --paged LIST        percentages of pages written for the paged state (default 30,80)
  --size-mib N        size of each file (default 1024)
  --out FILE          raw results (default bench-results/cells.json)
`;

export async function cellsMain(argv: string[], root: string): Promise<number> {
  let opts: ReturnType<typeof parseMatrixOptions>;
  try {
    opts = parseMatrixOptions('cells', argv);
  } catch (e) {
    process.stderr.write(`${(e as Error).message}\n\n${CELLS_USAGE}`);
    return 2;
  }
  if (opts.help) {
    process.stdout.write(CELLS_USAGE);
    return 0;
  }
  const cells = cellsFor(opts.files, opts.paged);
  return runMatrix({
    suite: 'cells',
    opts,
    root,
    cells,
    labelHeader: ['cell', 'conns x QD'],
    rssScope: 'all cells on its file',
    extra: {
      config: {
        rounds: opts.rounds,
        runtimeS: opts.runtime,
        rampS: opts.ramp,
        sizeMiB: opts.sizeMiB,
        workers: opts.workers ?? 'auto',
        tls: opts.tls,
        cells: cells.map(({ id, rw, bs, conns, iodepth, rwmixread, metric, file, pagedPct }) => ({
          id,
          rw,
          bs,
          conns,
          iodepth,
          rwmixread,
          metric,
          file,
          pagedPct,
        })),
      },
    },
  });
}
