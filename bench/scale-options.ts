// Command-line options of the scale benchmark (`npm run bench -- --suite scale`).

import { parseArgs } from 'node:util';
import { int, list } from './cluster-options.js';

export const SCALE_PARTS = ['latency', 'join', 'churn', 'failover'] as const;
export type ScalePart = (typeof SCALE_PARTS)[number];

export interface ScaleOptions {
  /** Hollow members beside the 3 real agents, one cluster per count (ascending). */
  members: number[];
  /** Devices in the cluster, measured in turn on each cluster (ascending). */
  devices: number[];
  /** Timed changes per kind and configuration. */
  ops: number;
  /** cluster.leaseTtl of every member, seconds. */
  ttl: number;
  /** Hollow members per process. */
  group: number;
  /** Hollow members killed at once, and joined at once (at most the members). */
  churn: number;
  /** Devices in the pool that agents B and C and the joining agent serve. */
  serve: number;
  /** Creates in flight while seeding the cluster. */
  seedParallel: number;
  parts: ScalePart[];
  dir: string | undefined;
  out: string;
  ballast: string;
  help: boolean;
}

export const SCALE_USAGE = `Usage: npm run bench -- --suite scale [options]

How a cluster's costs grow with its hosts and devices. For each member count: a
fresh real 3-member etcd on loopback, 3 real agents (bin/ballast agent: A, B, C)
and that many hollow members (ballast agent --hollow: the real membership, watches,
acks, fencing, device and reservation managers, no files and no NBD), --group of
them per process (bench/hollow.ts). Then, for each device count in turn, the
cluster is seeded up to it and measured.

Layout: every hollow member declares 2-4 of the hollow pools (one pool per member;
pool k is served by 2 + k mod 3 members), so each seeded device is served by 2-4
hosts; the seeded devices are made through the hollow members' own create path,
--seed-parallel at a time (no records are written behind the agents' backs). The
timed changes go through agent A to devices in pool m, which A, B and C serve (3
hosts at every size). B and C also serve pool r with --serve devices.

Parts:
  latency    create, resize, PR (register + unregister) and delete latency through A;
             etcd key writes, write requests, watch events and CPU per change (etcd's
             /metrics and /proc); etcd's db size, keys, watchers and watch streams;
             RSS of the real agents and of the hollow processes per member
  join       a real agent joining with pool r: time to /healthz and until it serves
             all --serve devices (an NBD read of each), and its RSS
  churn      (after the last device count) --churn hollow members killed at once
             while each holds a Write Exclusive reservation on a device C serves: time
             until C has preempted them all; then as many new hollow members joining
             at once: time until all are healthy and serve their devices; A's PR
             latency meanwhile
  failover   (last) kill -9 of A while it holds a reservation: time until B's
             preempt answers and B's first write is acknowledged

The goals of issue 27 are printed as met or not met at the end.

Options:
  --members LIST        hollow members beside the 3 real agents (default 0,10,100,1000;
                        0 or at least 4 each)
  --devices LIST        devices in the cluster (default 1000,10000,100000)
  --ops N               timed changes per kind and configuration (default 100)
  --ttl S               lease TTL of every member, seconds (default 5)
  --group N             hollow members per process (default 100)
  --churn N             hollow members killed, then joined, at once (default 100)
  --serve N             devices of pool r (default 100)
  --seed-parallel N     creates in flight while seeding (default 32)
  --parts LIST          comma list of ${SCALE_PARTS.join(', ')} (default all)
  --quick               a small run to see it work: --members 0,10 --devices 500 --ops 20
                        --churn 10 --serve 20 (other flags given still apply)
  --dir DIR             where to make the temporary directory (default the OS temp dir)
  --out FILE            raw results as JSON (default bench-results/scale.json)
  --ballast PATH        the ballast launcher (default bin/ballast)
  -h, --help            this text
`;

function numbers(flag: string, raw: string, check: (n: number) => boolean, what: string): number[] {
  const xs = raw
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== '')
    .map(Number);
  if (xs.length === 0) throw new Error(`${flag}: empty list`);
  for (const n of xs) {
    if (!Number.isInteger(n) || !check(n)) throw new Error(`${flag}: expected ${what}`);
  }
  return [...new Set(xs)].sort((a, b) => a - b);
}

export function parseScaleOptions(argv: string[]): ScaleOptions {
  const { values } = parseArgs({
    args: argv,
    strict: true,
    allowPositionals: false,
    options: {
      members: { type: 'string' },
      devices: { type: 'string' },
      ops: { type: 'string' },
      ttl: { type: 'string' },
      group: { type: 'string' },
      churn: { type: 'string' },
      serve: { type: 'string' },
      'seed-parallel': { type: 'string' },
      parts: { type: 'string' },
      quick: { type: 'boolean' },
      dir: { type: 'string' },
      out: { type: 'string' },
      ballast: { type: 'string' },
      help: { type: 'boolean', short: 'h' },
    },
  });
  const quick = values.quick === true;
  const ttl = int('--ttl', values.ttl, 5, 2);
  // cluster.leaseTtl accepts 2 to 300
  if (ttl > 300) throw new Error('--ttl: expected whole seconds from 2 to 300');
  return {
    members: numbers(
      '--members',
      values.members ?? (quick ? '0,10' : '0,10,100,1000'),
      (n) => n === 0 || n >= 4,
      'whole numbers, each 0 or at least 4',
    ),
    devices: numbers(
      '--devices',
      values.devices ?? (quick ? '500' : '1000,10000,100000'),
      (n) => n >= 1,
      'whole numbers >= 1',
    ),
    ops: int('--ops', values.ops, quick ? 20 : 100, 1),
    ttl,
    group: int('--group', values.group, 100, 1),
    churn: int('--churn', values.churn, quick ? 10 : 100, 1),
    serve: int('--serve', values.serve, quick ? 20 : 100, 1),
    seedParallel: int('--seed-parallel', values['seed-parallel'], 32, 1),
    parts:
      values.parts === undefined ? [...SCALE_PARTS] : list('--parts', values.parts, SCALE_PARTS),
    dir: values.dir,
    out: values.out ?? 'bench-results/scale.json',
    ballast: values.ballast ?? 'bin/ballast',
    help: values.help === true,
  };
}
