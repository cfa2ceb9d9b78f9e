// Command-line options of the cluster benchmarks (`npm run bench -- --suite cluster`).

import { parseArgs } from 'node:util';
import { JOB_NAMES, type JobName } from './options.js';

export const PARTS = ['catalog', 'propagation', 'start', 'pr', 'failover', 'datapath'] as const;
export type Part = (typeof PARTS)[number];

export interface ClusterBenchOptions {
  parts: Part[];
  /** Timed operations per kind and configuration (catalog, propagation, pr). */
  ops: number;
  /** Devices in the cluster for the start part. */
  devices: number;
  /** Timed agent starts per configuration. */
  startRounds: number;
  /** Lease TTLs (cluster.leaseTtl, seconds) of the fail-over part. */
  ttls: number[];
  /** Fail-overs per TTL. */
  failoverRounds: number;
  /** fio rounds of the data-path part. */
  rounds: number;
  runtime: number;
  ramp: number;
  jobs: JobName[];
  sizeMiB: number;
  dir: string | undefined;
  out: string;
  ballast: string;
  help: boolean;
}

export const CLUSTER_USAGE = `Usage: npm run bench -- --suite cluster [options]
       npm run bench:cluster -- [options]

Benchmarks the cluster: a real 3-member etcd on loopback ports and real agents
(bin/ballast agent), each with its own data dir and sockets. Parts:

  catalog       create/resize/list/delete latency: SQLite single host, etcd with 1 and 3 agents
  propagation   a change on agent A until agent B lists it
  start         agent start (until /healthz, until it lists every device) and RSS
                with --devices devices in the cluster
  pr            PR change (register/unregister) latency with 2 and 3 serving agents
  failover      kill -9 of the holder's agent to the new holder's first write, per TTL
  datapath      fio through an agent serving a shared device of a cluster vs the same
                agent on a single host (the fence gate on every request)

Options:
  --parts LIST          comma list of ${PARTS.join(', ')} (default all)
  --ops N               timed operations per kind and configuration (default 200)
  --devices N           devices in the cluster for the start part (default 2000)
  --start-rounds N      timed starts per configuration (default 3)
  --ttls LIST           lease TTLs in seconds for the fail-over part (default 2,5,10)
  --failover-rounds N   fail-overs per TTL (default 3)
  --rounds N            fio rounds of the data-path part (default 3)
  --runtime S           measured seconds per fio run (default 5)
  --ramp S              unmeasured warm-up seconds per fio run (default 1)
  --jobs LIST           fio jobs: ${JOB_NAMES.join(', ')} (default all)
  --size-mib N          size of the data-path device in MiB (default 1024)
  --dir DIR             where to make the temporary directory (default the OS temp dir)
  --out FILE            raw results as JSON (default bench-results/cluster.json)
  --ballast PATH        the ballast launcher (default bin/ballast)
  -h, --help            this text
`;

/** A comma list of names, each one of `allowed`; in `allowed`'s order. */
export function list<T extends string>(flag: string, raw: string, allowed: readonly T[]): T[] {
  const names = raw
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '');
  for (const n of names) {
    if (!(allowed as readonly string[]).includes(n)) {
      throw new Error(`${flag}: unknown '${n}' (expected one of ${allowed.join(', ')})`);
    }
  }
  if (names.length === 0) throw new Error(`${flag}: empty list`);
  return allowed.filter((a) => names.includes(a));
}

/** A whole number of at least `min`, or `dflt` when the flag is absent. */
export function int(flag: string, raw: string | undefined, dflt: number, min: number): number {
  if (raw === undefined) return dflt;
  const n = Number(raw);
  if (!Number.isInteger(n) || n < min)
    throw new Error(`${flag}: expected a whole number >= ${min}`);
  return n;
}

export function parseClusterOptions(argv: string[]): ClusterBenchOptions {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      parts: { type: 'string' },
      ops: { type: 'string' },
      devices: { type: 'string' },
      'start-rounds': { type: 'string' },
      ttls: { type: 'string' },
      'failover-rounds': { type: 'string' },
      rounds: { type: 'string' },
      runtime: { type: 'string' },
      ramp: { type: 'string' },
      jobs: { type: 'string' },
      'size-mib': { type: 'string' },
      dir: { type: 'string' },
      out: { type: 'string' },
      ballast: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const ttls =
    values.ttls === undefined
      ? [2, 5, 10]
      : values.ttls.split(',').map((s) => {
          const n = Number(s.trim());
          // cluster.leaseTtl accepts 2 to 300
          if (!Number.isInteger(n) || n < 2 || n > 300) {
            throw new Error('--ttls: expected whole seconds from 2 to 300');
          }
          return n;
        });
  return {
    parts: values.parts === undefined ? [...PARTS] : list('--parts', values.parts, PARTS),
    ops: int('--ops', values.ops, 200, 1),
    devices: int('--devices', values.devices, 2000, 1),
    startRounds: int('--start-rounds', values['start-rounds'], 3, 1),
    ttls,
    failoverRounds: int('--failover-rounds', values['failover-rounds'], 3, 1),
    rounds: int('--rounds', values.rounds, 3, 1),
    runtime: int('--runtime', values.runtime, 5, 1),
    ramp: int('--ramp', values.ramp, 1, 0),
    jobs: values.jobs === undefined ? [...JOB_NAMES] : list('--jobs', values.jobs, JOB_NAMES),
    sizeMiB: int('--size-mib', values['size-mib'], 1024, 16),
    dir: values.dir,
    out: values.out ?? 'bench-results/cluster.json',
    ballast: values.ballast ?? 'bin/ballast',
    help: values.help === true,
  };
}

/**
 * Splits `--suite NAME` (or `--suite=NAME`) off the harness's arguments:
 * `nbd` (the default) is the NBD server comparison, `cluster` this suite,
 * `events` the notification delivery benchmark (bench/events.ts), `connections` the NBD
 * comparison along a connections axis, `scale` the cluster with hollow members
 * (bench/scale.ts).
 */
const SUITES: readonly string[] = ['nbd', 'cluster', 'events', 'connections', 'cells', 'scale'];
const EXPECTED = 'expected nbd, cluster, events, connections, cells or scale';

export function splitSuite(argv: readonly string[]): { suite: string; rest: string[] } {
  const rest: string[] = [];
  let suite = 'nbd';
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i]!;
    if (a === '--suite') {
      const v = argv[i + 1];
      if (v === undefined) {
        throw new Error(`--suite: ${EXPECTED}`);
      }
      suite = v;
      i++;
    } else if (a.startsWith('--suite=')) {
      suite = a.slice('--suite='.length);
    } else {
      rest.push(a);
    }
  }
  if (!SUITES.includes(suite)) {
    throw new Error(`--suite: unknown '${suite}' (${EXPECTED})`);
  }
  return { suite, rest };
}
