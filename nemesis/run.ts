// npm run nemesis -- [--minutes N] [--seed N] [--faults kill,freeze,...] [--history FILE]
// A randomized fault campaign against a real etcd and three agents; exits 1
// with the seed, the anomalies and the fault schedule when a checker fails.

import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { FAULT_KINDS, type FaultKind, runCampaign } from './campaign.js';
import { checkAll, report } from './checkers.js';
import type { History } from './history.js';

const program = new Command('nemesis')
  .description('a randomized fault campaign against a real 3-member etcd and three agents')
  .option('--minutes <n>', 'how long clients and faults run', '3')
  .option('--seed <n>', 'the seed of the schedule and the clients (default: random)')
  .option(
    '--faults <kinds>',
    `fault kinds, comma-separated (${FAULT_KINDS.join(', ')})`,
    FAULT_KINDS.join(','),
  )
  .option('--history <file>', 'write the recorded history here as JSON')
  .option('--check <file>', 'only check a history written by --history')
  .option('--keep', "keep the work directory: the agents' data and logs (agent.log)")
  .option(
    '--without <parts>',
    'leave out client work: acl, malformed, catalog, events (comma-separated)',
    '',
  )
  .parse();

const o = program.opts<{
  minutes: string;
  seed?: string;
  faults: string;
  history?: string;
  check?: string;
  without: string;
  keep?: boolean;
}>();
const without = new Set(o.without.split(',').filter((x) => x !== ''));
if (o.check) {
  const h = JSON.parse(readFileSync(o.check, 'utf8')) as History;
  const anomalies = checkAll(h);
  console.log(
    anomalies.length ? report(h, anomalies) : `nemesis: seed ${h.seed}: every check passed`,
  );
  process.exit(anomalies.length ? 1 : 0);
}
const seed = o.seed === undefined ? Math.floor(Math.random() * 2 ** 31) : Number(o.seed);
const faults = o.faults.split(',').filter((k) => k !== '') as FaultKind[];
for (const k of faults) {
  if (!(FAULT_KINDS as readonly string[]).includes(k)) {
    console.error(`nemesis: unknown fault kind ${k} (${FAULT_KINDS.join(', ')})`);
    process.exit(2);
  }
}
// Ctrl-C or a SIGTERM mid-run: exit through process.exit, so the 'exit' hooks kill the
// etcd members and agents the run started (a signal's default death left them running).
for (const sig of ['SIGINT', 'SIGTERM'] as const)
  process.once(sig, () => {
    console.error(`nemesis: ${sig}: stopping the run (etcd and agents with it)`);
    process.exit(130);
  });

const r = await runCampaign({
  seed,
  seconds: Number(o.minutes) * 60,
  faults,
  workload: {
    acl: !without.has('acl'),
    malformed: !without.has('malformed'),
    catalog: !without.has('catalog'),
    events: !without.has('events'),
  },
  log: (l) => console.error(l),
  ...(o.history ? { historyFile: o.history } : {}),
  ...(o.keep ? { keep: true } : {}),
});
const ops = Object.entries(r.stats.ops)
  .map(([k, v]) => `${k} ${v}`)
  .join(', ');
const f = Object.entries(r.stats.faults)
  .map(([k, v]) => `${k} ${v}`)
  .join(', ');
console.log(
  `nemesis: seed ${seed}: ${r.history.ops.length} operations (${ops}); faults: ${f || 'none'}; ${r.stats.seconds.toFixed(0)} s`,
);
if (r.anomalies.length > 0) {
  console.log(report(r.history, r.anomalies));
  process.exit(1);
}
console.log(`nemesis: seed ${seed}: every check passed`);
// a client's socket or timer left behind must not keep the run alive
process.exit(0);
