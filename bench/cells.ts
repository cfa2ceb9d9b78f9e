// The cells of the many-connections issue, each at its own connection count and
// queue depth, against the three servers of bench/matrix.ts (ballast = --workers
// auto, ballast-1 = --workers 1, nbdkit's file plugin) alternating in one run.
// Two cells read a file that is never written (truncated only), so every server
// is started once per file and round.
//
//   npm run bench -- --suite cells [--rounds 3] [--runtime 4] [--ramp 1]
//                    [--tls off|on|both] [--workers N] [--size-mib 1024] [--out FILE]

import type { FioRw } from './fio.js';
import { type CellSpec, type FileKind, parseMatrixOptions, runMatrix } from './matrix.js';

function cell(
  job: string,
  rw: FioRw,
  bs: string,
  conns: number,
  iodepth: number,
  file: FileKind,
  rwmixread?: number,
): CellSpec {
  const shape = `${conns}x${iodepth}`;
  const label = file === 'sparse' ? `${job} sparse` : job;
  return {
    id: `${label.replace(/[^A-Za-z0-9]+/g, '-')}-${shape}`,
    name: `${label} ${shape}`,
    key: { cell: label, conns, qd: iodepth, file },
    label: [label, `${conns} x ${iodepth}`],
    rw,
    bs,
    conns,
    iodepth,
    ...(rwmixread === undefined ? {} : { rwmixread }),
    metric: rw === 'read' || rw === 'write' ? 'mibps' : 'iops',
    file,
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

export const CELLS_USAGE = `Usage: npm run bench -- --suite cells [options]

The cells of the many-connections issue, each at its own connections (fio numjobs,
one NBD connection per job) x queue depth (iodepth per connection), fio's nbd
engine over the Unix socket, against Ballast (--workers N, default auto: the cores
available), Ballast on one event loop (--workers 1) and nbdkit's file plugin,
alternating in every round with the order rotated:

${CELLS.map((c) => `  ${c.label[0]!.padEnd(24)} ${c.label[1]}`).join('\n')}

rand-rw is 50% reads (rwmixread=50), counted as reads + writes. 'sparse' cells
read a second file that is truncated to size and never written; the others use
one pre-filled file. Each server is started once per file and round.

Options:
  --rounds N          rounds (default 3)
  --runtime S         measured seconds per fio run (default 4)
  --ramp S            warm-up seconds per fio run (default 1)
  --tls off|on|both   (default off)
  --workers N         Ballast's --workers for the 'ballast' column (default: auto)
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
  return runMatrix({
    suite: 'cells',
    opts,
    root,
    cells: CELLS,
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
        cells: CELLS.map(({ id, rw, bs, conns, iodepth, rwmixread, metric, file }) => ({
          id,
          rw,
          bs,
          conns,
          iodepth,
          rwmixread,
          metric,
          file,
        })),
      },
    },
  });
}
