// Command-line options of the benchmark harness (node:util parseArgs, no dependencies).

import { parseArgs } from 'node:util';

export const SERVER_NAMES = [
  'ballast',
  'nbdkit',
  'qemu-nbd',
  'ballast-tls',
  'nbdkit-tls',
  'ballast-agent',
  'ballast-pr',
  'ballast-pr-tls',
] as const;
export type ServerName = (typeof SERVER_NAMES)[number];

/** The plain file servers: what a run without --servers compares. */
export const BASE_SERVERS: readonly ServerName[] = ['ballast', 'nbdkit', 'qemu-nbd'];

/**
 * Kinds that answer the TLS and reservation questions. Unless --transports is
 * given they run over the Unix socket only: TCP adds nothing to those questions.
 */
export const EXTRA_SERVERS: readonly ServerName[] = SERVER_NAMES.filter(
  (s) => !BASE_SERVERS.includes(s),
);

/** Names --servers accepts for a set of servers. */
export const SERVER_PRESETS: Record<string, readonly ServerName[]> = {
  default: BASE_SERVERS,
  'tls-pr': [
    'ballast',
    'nbdkit',
    'ballast-tls',
    'nbdkit-tls',
    'ballast-agent',
    'ballast-pr',
    'ballast-pr-tls',
  ],
  all: SERVER_NAMES,
};

export const TRANSPORTS = ['unix', 'tcp'] as const;
export type Transport = (typeof TRANSPORTS)[number];

export const JOB_NAMES = ['seq-read', 'seq-write', 'rand-read', 'rand-write'] as const;
export type JobName = (typeof JOB_NAMES)[number];

export interface Options {
  rounds: number;
  /** Measured seconds per fio run. */
  runtime: number;
  /** Warm-up seconds per fio run, not measured. */
  ramp: number;
  jobs: JobName[];
  servers: ServerName[];
  /** True when --servers was given (a missing bin/ballast is then an error, not a skip). */
  serversExplicit: boolean;
  transports: Transport[];
  /** True when --transports was given (the extra server kinds then follow it too). */
  transportsExplicit: boolean;
  sizeMiB: number;
  /** Parent directory of the temporary directory that holds the image and sockets. */
  dir: string | undefined;
  /** Where the raw results go (relative to the repository root unless absolute). */
  out: string;
  /** Path of the ballast launcher (relative to the repository root unless absolute). */
  ballast: string;
  help: boolean;
}

export const USAGE = `Usage: npm run bench -- [options]

Benchmarks Ballast against nbdkit (file plugin) and qemu-nbd with fio's nbd engine
(libnbd), over a Unix socket and over TCP on 127.0.0.1, serving one 1 GiB file; on
request also with TLS, and through the agent with and without a reservation.

Options:
  --rounds N            rounds; each runs every server once per transport (default 3)
  --runtime S           measured seconds per fio run (default 5)
  --ramp S              unmeasured warm-up seconds per fio run (default 1)
  --jobs LIST           comma list of ${JOB_NAMES.join(', ')} (default all)
  --servers LIST        comma list of servers and presets (default: ${BASE_SERVERS.join(',')};
                        ballast is then skipped with a warning when bin/ballast does not exist)
                          ballast, nbdkit, qemu-nbd   the plain file servers
                          ballast-tls, nbdkit-tls     the same with TLS required (X.509)
                          ballast-agent               ballast agent, the image as a device
                          ballast-pr                  the same, a Write Exclusive reservation
                                                      held by fio's identity
                          ballast-pr-tls              ballast-pr with TLS required
                          presets: default; tls-pr (ballast, nbdkit and the five
                          above); all
                        The five TLS/agent kinds use the Unix socket only unless
                        --transports is given.
  --transports LIST     comma list of ${TRANSPORTS.join(', ')} (default both)
  --size-mib N          size of the served file in MiB (default 1024)
  --dir DIR             where to make the temporary directory (default the OS temp dir)
  --out FILE            raw results as JSON (default bench-results/latest.json)
  --ballast PATH        the ballast launcher (default bin/ballast)
  --suite cluster       run the cluster benchmarks instead (etcd and agents; see
                        npm run bench -- --suite cluster --help)
  --suite events        event delivery (--suite events --help)
  --suite connections   ballast (--workers auto and 1) and nbdkit under 1, the cores, 4 and 16
                        connections, plain and TLS (--suite connections --help)
  --suite cells         the same three servers, each cell at its own connections x
                        queue depth, incl. reads of a never-written file
                        (--suite cells --help)
  --suite scale         a cluster of 3 real agents and up to 1,000 hollow members
                        with up to 100,000 devices (--suite scale --help)
  -h, --help            this text
`;

function parseList<T extends string>(
  flag: string,
  raw: string,
  allowed: readonly T[],
  presets: Record<string, readonly T[]> = {},
): T[] {
  const out: T[] = [];
  for (const part of raw.split(',')) {
    const name = part.trim();
    if (name === '') continue;
    const preset = Object.hasOwn(presets, name) ? presets[name] : undefined;
    if (preset !== undefined) {
      for (const p of preset) if (!out.includes(p)) out.push(p);
      continue;
    }
    if (!(allowed as readonly string[]).includes(name)) {
      const names = [...allowed, ...Object.keys(presets)];
      throw new Error(`${flag}: unknown '${name}' (expected one of ${names.join(', ')})`);
    }
    if (!out.includes(name as T)) out.push(name as T);
  }
  if (out.length === 0) throw new Error(`${flag}: empty list`);
  // Keep the canonical order whatever order they were given in.
  return allowed.filter((a) => out.includes(a));
}

function parseNumber(flag: string, raw: string | undefined, dflt: number, min: number): number {
  if (raw === undefined) return dflt;
  const n = Number(raw);
  if (!Number.isFinite(n) || n < min) throw new Error(`${flag}: expected a number >= ${min}`);
  return n;
}

export function parseOptions(argv: string[]): Options {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      rounds: { type: 'string' },
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      jobs: { type: 'string' },
      servers: { type: 'string' },
      transports: { type: 'string' },
      'size-mib': { type: 'string' },
      dir: { type: 'string' },
      out: { type: 'string' },
      ballast: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const rounds = parseNumber('--rounds', values.rounds, 3, 1);
  if (!Number.isInteger(rounds)) throw new Error('--rounds: expected an integer');
  const sizeMiB = parseNumber('--size-mib', values['size-mib'], 1024, 16);
  if (!Number.isInteger(sizeMiB)) throw new Error('--size-mib: expected an integer');
  return {
    rounds,
    runtime: parseNumber('--runtime', values.runtime, 5, 1),
    ramp: parseNumber('--ramp', values.ramp, 1, 0),
    jobs: values.jobs === undefined ? [...JOB_NAMES] : parseList('--jobs', values.jobs, JOB_NAMES),
    servers:
      values.servers === undefined
        ? [...BASE_SERVERS]
        : parseList('--servers', values.servers, SERVER_NAMES, SERVER_PRESETS),
    serversExplicit: values.servers !== undefined,
    transports:
      values.transports === undefined
        ? [...TRANSPORTS]
        : parseList('--transports', values.transports, TRANSPORTS),
    transportsExplicit: values.transports !== undefined,
    sizeMiB,
    dir: values.dir,
    out: values.out ?? 'bench-results/latest.json',
    ballast: values.ballast ?? 'bin/ballast',
    help: values.help === true,
  };
}
