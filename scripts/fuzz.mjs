#!/usr/bin/env node
// npm run fuzz -- [--seconds N] [--target NAME[,NAME...]]
// Runs each fuzz target (test/fuzz/targets.ts) for N seconds (default 60).
import { spawnSync } from 'node:child_process';

const args = process.argv.slice(2);
let seconds = '60';
let target;
for (let i = 0; i < args.length; i++) {
  if (args[i] === '--seconds') seconds = args[++i];
  else if (args[i] === '--target') target = args[++i];
  else {
    console.error(`usage: npm run fuzz -- [--seconds N] [--target NAME[,NAME...]]`);
    process.exit(2);
  }
}
if (!(Number(seconds) > 0)) {
  console.error('--seconds must be a positive number');
  process.exit(2);
}
// The YAML parser warns (process warnings) about every odd tag a fuzzed config has.
const env = {
  ...process.env,
  FUZZ_SECONDS: seconds,
  FUZZ_REPORT: '1',
  NODE_OPTIONS: `${process.env.NODE_OPTIONS ?? ''} --no-warnings`.trim(),
};
if (target) env.FUZZ_TARGET = target;
const r = spawnSync('npx', ['vitest', 'run', 'test/fuzz/fuzz.test.ts', '--reporter=verbose'], {
  stdio: 'inherit',
  env,
});
process.exit(r.status ?? 1);
