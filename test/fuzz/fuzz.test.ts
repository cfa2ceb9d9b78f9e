// Runs every fuzz target (targets.ts) for FUZZ_SECONDS each (default 2: the
// bounded run of the normal suite; `npm run fuzz -- --seconds N` runs longer),
// after replaying its seed corpus and its regression inputs. An input that
// breaks a target is written to regressions/<target>/ for a regression test.

import { createHash } from 'node:crypto';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import fc from 'fast-check';
import { describe, expect, it } from 'vitest';
import { TARGETS } from './targets.js';

const HERE = import.meta.dirname;
const SECONDS = Number(process.env.FUZZ_SECONDS ?? 2);
const ONLY = process.env.FUZZ_TARGET;
/** An input a parser takes this long on is a hang. */
const HANG_MS = 5000;

function files(dir: string): { name: string; data: Buffer }[] {
  try {
    return readdirSync(dir)
      .filter((f) => !f.startsWith('.'))
      .sort()
      .map((f) => ({ name: f, data: readFileSync(path.join(dir, f)) }));
  } catch {
    return [];
  }
}

async function runOnce(run: (b: Buffer) => void | Promise<void>, input: Buffer): Promise<void> {
  const t0 = performance.now();
  await run(input);
  const ms = performance.now() - t0;
  if (ms > HANG_MS) throw new Error(`took ${ms.toFixed(0)} ms on a ${input.length}-byte input`);
}

function save(target: string, input: Buffer): string {
  const dir = path.join(HERE, 'regressions', target);
  mkdirSync(dir, { recursive: true });
  const file = path.join(
    dir,
    `${createHash('sha256').update(input).digest('hex').slice(0, 16)}.bin`,
  );
  writeFileSync(file, input);
  return file;
}

describe('fuzz targets', () => {
  for (const t of TARGETS) {
    const skip = ONLY !== undefined && !ONLY.split(',').includes(t.name);
    describe.skipIf(skip)(t.name, () => {
      const seeds = files(path.join(HERE, 'corpus', t.name));
      const regressions = files(path.join(HERE, 'regressions', t.name));

      it('has a seed corpus', () => {
        expect(seeds.length).toBeGreaterThan(0);
      });

      it('replays its seeds and regression inputs', async () => {
        for (const f of [...seeds, ...regressions]) {
          try {
            await runOnce(t.run, f.data);
          } catch (e) {
            throw new Error(`${t.name}: ${f.name}: ${(e as Error).message}`);
          }
        }
      });

      it(
        `runs ${SECONDS} s without a crash or a hang`,
        async () => {
          let runs = 0;
          const started = performance.now();
          let yielded = started;
          const result = await fc.check(
            fc.asyncProperty(t.arbitrary(seeds.map((s) => s.data)), async (input) => {
              runs++;
              await runOnce(t.run, input);
              // A synchronous parser never leaves the microtask queue: let timers
              // and the test runner's own messages through now and then.
              if (performance.now() - yielded > 100) {
                await new Promise((r) => setImmediate(r));
                yielded = performance.now();
              }
            }),
            {
              numRuns: Number.MAX_SAFE_INTEGER,
              interruptAfterTimeLimit: SECONDS * 1000,
              endOnFailure: true,
            },
          );
          const secs = (performance.now() - started) / 1000;
          if (process.env.FUZZ_REPORT)
            console.log(
              `fuzz ${t.name}: ${runs} inputs in ${secs.toFixed(1)} s, ${result.failed ? 'FAILED' : 'no failure'}`,
            );
          if (result.failed) {
            const input = result.counterexample?.[0] as Buffer | undefined;
            const where = input ? save(t.name, input) : '(no input)';
            throw new Error(
              `${t.name} broke on an input, saved as ${where}:\n${String(result.errorInstance)}`,
            );
          }
          expect(runs).toBeGreaterThan(0);
        },
        (SECONDS + 60) * 1000,
      );
    });
  }
});
