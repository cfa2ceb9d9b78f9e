// Memory sharing (issue 25): the rotating working set on three real TCG guests of
// 256 MiB sharing a pool of 448 MiB, three ways in one run (bench/memory-rig.ts):
//   controller  Ballast's memory part (`ballast dumpd` with a memory: section)
//   static      each balloon set once to pool / 3 (149 MiB)
//   none        no balloon targets: each guest at 256 MiB, the pool exceeded
//
//   npm run bench:memory -- [--rounds 3] [--phase 40] [--ways controller,static,none]
//
// Each guest runs memwork over a 112 MiB working set with swap on its Ballast paging
// device; one guest at a time is hot (checked page ops on random pages) for --phase
// seconds, then the next, three phases a round. Per way, medians over rounds of:
// checked page ops/s summed over the guests, MiB swapped in (read back from the paging
// devices, as the agent served it), guest RAM resident on the host (mean and peak of the
// three guests' RAM mappings, sampled every second), the seconds from a rotation until
// the hot guest's balloon holds 240 MiB, and the seconds until its swap-ins stopped (the
// last sample in which its pswpin rose). The ways run in a different order each round.
// Results go to stdout and bench-results/memory.json.

import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { repoRoot } from './memory-guest.js';
import { type GuestSnapshot, MemoryRig, type Way } from './memory-rig.js';

const MiB = 1024 * 1024;
const log = (m: string) => process.stderr.write(`[bench:memory] ${m}\n`);
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? (process.argv[i + 1] ?? def) : def;
}

function median(xs: number[]): number {
  const s = xs.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (s.length === 0) return Number.NaN;
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

interface RoundFigures {
  way: Way;
  opsPerSecond: number;
  swapInMiB: number;
  residentMeanMiB: number;
  residentPeakMiB: number;
  /** Per phase; NaN when it never happened within the phase. */
  followSeconds: number[];
  recoverSeconds: number[];
  badPages: number;
  oomKills: number;
  load: number;
}

const HOT_SHARE_MIB = 240;

async function oneRound(way: Way, phaseS: number, dir: string): Promise<RoundFigures> {
  const rig = new MemoryRig({ dir, way, interval: 1, log: (l) => log(`${way}: ${l}`) });
  try {
    await rig.start();
    if (way === 'controller')
      await rig.until(async () => {
        const s = await rig.status();
        return (
          // every guest in the status: before its first interval the list is empty
          s?.guests.length === rig.guests.length &&
          !s.exceeded &&
          s.guests.every(
            (g) => g.mode === 'managed' && Math.abs((g.actual ?? 0) - (g.target ?? 0)) < 4 * MiB,
          )
        );
      }, 'the controller settled');
    else await sleep(5000); // the static balloons inflate
    const ops = (s: GuestSnapshot[]) => s.reduce((a, g) => a + (g.stat?.ops ?? 0), 0);
    const reads = (s: GuestSnapshot[]) => s.reduce((a, g) => a + g.pagingRead, 0);
    const resident: number[] = [];
    const follow: number[] = [];
    const recover: number[] = [];
    const t0 = performance.now();
    const s0 = await rig.snapshot();
    for (let k = 0; k < rig.guests.length; k++) {
      rig.rotateTo(k);
      const start = performance.now();
      let followed = Number.NaN;
      let lastIn = 0;
      let prevIn: number | null = null;
      while (performance.now() - start < phaseS * 1000) {
        await sleep(1000);
        const t = (performance.now() - start) / 1000;
        const snap = await rig.snapshot();
        resident.push(snap.reduce((a, g) => a + (g.resident ?? 0), 0));
        const hot = snap[k]?.stat;
        if (hot?.mode === 'hot') {
          if (prevIn !== null && hot.pswpin > prevIn) lastIn = t;
          prevIn = hot.pswpin;
        }
        if (Number.isNaN(followed)) {
          if (way === 'none') followed = 0;
          else if (way === 'controller') {
            const st = await rig.status();
            if ((st?.guests[k]?.actual ?? 0) >= HOT_SHARE_MIB * MiB) followed = t;
          }
        }
      }
      follow.push(followed);
      // swap-ins still rising in the phase's last seconds: the working set never came back
      recover.push(lastIn >= phaseS - 3 ? Number.NaN : lastIn);
      log(
        `${way}: phase ${k + 1}: ${rig.guests[k]!.name} hot, memory followed ${followed} s, swap-ins stopped ${recover.at(-1)} s`,
      );
    }
    const s1 = await rig.snapshot();
    const seconds = (performance.now() - t0) / 1000;
    const v = await rig.verify();
    return {
      way,
      opsPerSecond: (ops(s1) - ops(s0)) / seconds,
      swapInMiB: (reads(s1) - reads(s0)) / MiB,
      residentMeanMiB: resident.reduce((a, b) => a + b, 0) / resident.length / MiB,
      residentPeakMiB: Math.max(...resident) / MiB,
      followSeconds: follow,
      recoverSeconds: recover,
      badPages: v.reduce(
        (a, g) => a + Number(/bad=(\d+)$/.exec(g.line)?.[1] ?? 1) + (g.stat?.bad ?? 0),
        0,
      ),
      oomKills: v.reduce((a, g) => a + (g.stat?.oomkill ?? 0) + (g.alive ? 0 : 1), 0),
      load: os.loadavg()[0] ?? 0,
    };
  } finally {
    await rig.close();
  }
}

function fmt(x: number, digits = 0): string {
  return Number.isFinite(x) ? x.toFixed(digits) : 'never';
}

async function main(): Promise<void> {
  const rounds = Number(arg('rounds', '3'));
  const phaseS = Number(arg('phase', '40'));
  const ways = arg('ways', 'controller,static,none').split(',') as Way[];
  const root = repoRoot();
  const base = mkdtempSync(path.join(os.tmpdir(), 'ballast-bench-memory-'));
  const results: RoundFigures[] = [];
  const loadStart = os.loadavg()[0] ?? 0;
  try {
    for (let r = 0; r < rounds; r++) {
      const order = ways.map((_, i) => ways[(i + r) % ways.length] as Way);
      for (const way of order) {
        const dir = path.join(base, `r${r}-${way}`);
        mkdirSync(dir);
        log(`round ${r + 1}/${rounds}: ${way}`);
        const f = await oneRound(way, phaseS, dir);
        log(
          `round ${r + 1} ${way}: ${fmt(f.opsPerSecond)} ops/s, ${fmt(f.swapInMiB)} MiB swapped in, resident mean ${fmt(f.residentMeanMiB)} peak ${fmt(f.residentPeakMiB)} MiB, follow ${f.followSeconds.map((x) => fmt(x)).join('/')} s, recover ${f.recoverSeconds.map((x) => fmt(x)).join('/')} s, load ${f.load.toFixed(1)}`,
        );
        results.push(f);
        rmSync(dir, { recursive: true, force: true });
      }
    }
  } finally {
    rmSync(base, { recursive: true, force: true });
  }
  const by = (w: Way) => results.filter((x) => x.way === w);
  const rows = ways.map((w) => {
    const xs = by(w);
    return {
      way: w,
      rounds: xs.length,
      opsPerSecond: median(xs.map((x) => x.opsPerSecond)),
      swapInMiB: median(xs.map((x) => x.swapInMiB)),
      residentMeanMiB: median(xs.map((x) => x.residentMeanMiB)),
      residentPeakMiB: median(xs.map((x) => x.residentPeakMiB)),
      followSeconds: median(xs.flatMap((x) => x.followSeconds)),
      followedPhases: xs.flatMap((x) => x.followSeconds).filter(Number.isFinite).length,
      recoverSeconds: median(xs.flatMap((x) => x.recoverSeconds)),
      recoveredPhases: xs.flatMap((x) => x.recoverSeconds).filter(Number.isFinite).length,
      phases: xs.length * 3,
      badPages: xs.reduce((a, x) => a + x.badPages, 0),
      oomKills: xs.reduce((a, x) => a + x.oomKills, 0),
    };
  });
  const ref = (w: Way) => rows.find((x) => x.way === w)?.opsPerSecond ?? Number.NaN;
  const lines = [
    `| way | checked page ops/s (sum) | × static | of none | MiB swapped in | guest RAM resident, mean / peak (MiB) | memory follows the hot guest (s) | swap-ins stop (s) | bad pages | OOM kills |`,
    '| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |',
    ...rows.map(
      (x) =>
        `| ${x.way} | ${fmt(x.opsPerSecond)} | ${fmt(x.opsPerSecond / ref('static'), 1)} | ${fmt((100 * x.opsPerSecond) / ref('none'))} % | ${fmt(x.swapInMiB)} | ${fmt(x.residentMeanMiB)} / ${fmt(x.residentPeakMiB)} | ${fmt(x.followSeconds)} (${x.followedPhases}/${x.phases}) | ${fmt(x.recoverSeconds)} (${x.recoveredPhases}/${x.phases}) | ${x.badPages} | ${x.oomKills} |`,
    ),
  ];
  const summary = {
    rounds,
    phaseSeconds: phaseS,
    loadStart,
    loadEnd: os.loadavg()[0] ?? 0,
    cores: os.cpus().length,
    rows,
    results,
  };
  mkdirSync(path.join(root, 'bench-results'), { recursive: true });
  writeFileSync(path.join(root, 'bench-results', 'memory.json'), JSON.stringify(summary, null, 2));
  process.stdout.write(
    `${lines.join('\n')}\n\n${rounds} rounds, phases of ${phaseS} s, ${os.cpus().length} cores, load ${loadStart.toFixed(1)} at start, ${(os.loadavg()[0] ?? 0).toFixed(1)} at end\n`,
  );
}

main().catch((e) => {
  process.stderr.write(`bench:memory: ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
