// `ballast memory status|set`: the memory part of the guest daemon (guestd/memory), over
// the daemon's listener (--dumpd, BALLAST_DUMPD, default 127.0.0.1:9411).

import type { Command } from 'commander';
import { formatSize } from '../agent/units.js';
import { DEFAULT_LISTEN, DEFAULT_RUN_DIR } from '../dumpd/config.js';
import { tokenPath } from '../dumpd/daemon.js';
import type { MemoryStatus } from '../guestd/memory/controller.js';
import { coded, dumpdRequest, dumpdToken } from './dump.js';
import { table } from './manage.js';

function mib(n: number | null | undefined): string {
  if (n === null || n === undefined) return '-';
  return `${Math.round(n / (1024 * 1024))}M`;
}

function rate(n: number): string {
  if (n < 1024) return n > 0 ? `${Math.round(n)}B/s` : '0';
  return `${formatSize(Math.round(n / 1024) * 1024).replace(/ |iB/g, '')}/s`;
}

/** The status as a table a person reads at a glance. */
export function statusTable(s: MemoryStatus): string {
  const head = `pool ${mib(s.pool)}  budget ${mib(s.budget)}  held ${mib(s.charged)}${s.exceeded ? '  EXCEEDED' : ''}  interval ${s.intervalMs / 1000}s  at ${s.at ?? '-'}`;
  const rows = s.guests.map((g) => [
    g.name,
    g.mode === 'managed' ? g.klass : g.mode,
    mib(g.target),
    mib(g.actual),
    mib(g.resident),
    mib(g.entitlement),
    mib(g.max),
    String(g.weight),
    rate(g.swapInBps),
    g.paging === null ? '-' : g.paging,
    g.reason,
  ]);
  return `${head}\n${table(
    [
      'GUEST',
      'STATE',
      'TARGET',
      'ACTUAL',
      'RESIDENT',
      'ENTITLED',
      'MAX',
      'WEIGHT',
      'SWAP-IN',
      'PAGING',
      'WHY',
    ],
    rows,
  )}\n`;
}

function action<A extends unknown[]>(f: (...a: A) => Promise<void>): (...a: A) => Promise<void> {
  return async (...a: A) => {
    try {
      await f(...a);
    } catch (e) {
      throw coded(e);
    }
  };
}

export function registerMemory(program: Command): void {
  const memory = program
    .command('memory')
    .summary("the host's shared memory pool: status, set")
    .description(
      "The memory part of the guest daemon (`ballast dumpd` with a memory: section) shares a pool of the host's memory among its guests with balloon targets: memory goes to the guests that page, by weight, and comes from the idle ones, never below their entitlement.",
    );
  const where = (c: Command) =>
    c
      .option(
        '--dumpd <ADDR>',
        `the guest daemon's listener (default BALLAST_DUMPD or ${DEFAULT_LISTEN})`,
      )
      .option(
        '--dumpd-token-file <FILE>',
        `its bearer token, for a TCP listener (default BALLAST_DUMPD_TOKEN, else ${tokenPath(DEFAULT_RUN_DIR)})`,
      );
  where(
    memory
      .command('status')
      .description('the pool and every guest: state, target, actual, pressure'),
  )
    .option('--json', 'print the status as JSON')
    .action(
      action(async (o: { dumpd?: string; json?: boolean }) => {
        const at = o.dumpd ?? process.env.BALLAST_DUMPD ?? DEFAULT_LISTEN;
        const s = (await dumpdRequest(at, 'GET', '/v1/memory')) as MemoryStatus;
        process.stdout.write(o.json ? `${JSON.stringify(s, null, 2)}\n` : statusTable(s));
      }),
    );
  where(
    memory
      .command('set')
      .description(
        "change a guest's entitlement, weight or max from the next interval; refused when the entitlements would not fit the pool",
      )
      .argument('<GUEST>'),
  )
    .option('--entitlement <SIZE>', 'never ballooned below this (e.g. 128M)')
    .option('--weight <N>', 'share of contended memory, 1 to 255')
    .option('--max <SIZE>', 'never given more than this')
    .action(
      action(
        async (
          guest: string,
          o: {
            dumpd?: string;
            dumpdTokenFile?: string;
            entitlement?: string;
            weight?: string;
            max?: string;
          },
        ) => {
          const at = o.dumpd ?? process.env.BALLAST_DUMPD ?? DEFAULT_LISTEN;
          const q = new URLSearchParams();
          if (o.entitlement !== undefined) q.set('entitlement', o.entitlement);
          if (o.weight !== undefined) q.set('weight', o.weight);
          if (o.max !== undefined) q.set('max', o.max);
          const r = (await dumpdRequest(
            at,
            'POST',
            `/v1/memory/guests/${encodeURIComponent(guest)}?${q}`,
            dumpdToken(o.dumpdTokenFile),
          )) as { name: string; entitlement: number; weight: number; max?: number };
          process.stdout.write(
            `${r.name}: entitlement ${mib(r.entitlement)}, weight ${r.weight}, max ${r.max !== undefined ? mib(r.max) : 'its RAM'}\n`,
          );
        },
      ),
    );
}
