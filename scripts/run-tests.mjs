// Runs the Vitest suite and ends with a plain summary line that CI can count:
//   tests: N passed, N failed, N skipped
import { spawnSync } from 'node:child_process';
import { existsSync, readFileSync, rmSync } from 'node:fs';

const report = '.vitest-report.json';
rmSync(report, { force: true });
const args = [
  'vitest',
  'run',
  '--reporter=default',
  '--reporter=json',
  `--outputFile.json=${report}`,
  ...process.argv.slice(2),
];
const r = spawnSync('npx', args, { stdio: 'inherit' });

let passed = 0;
let failed = 0;
let skipped = 0;
if (existsSync(report)) {
  const j = JSON.parse(readFileSync(report, 'utf8'));
  passed = j.numPassedTests ?? 0;
  // failed tests, plus files that failed without a failed test (they did not load, or a
  // beforeAll/afterAll hook failed)
  const brokenFiles = (j.testResults ?? []).filter(
    (f) => f.status === 'failed' && !(f.assertionResults ?? []).some((a) => a.status === 'failed'),
  ).length;
  failed = (j.numFailedTests ?? 0) + brokenFiles;
  skipped = (j.numPendingTests ?? 0) + (j.numTodoTests ?? 0);
} else {
  failed = 1;
}
console.log(`\ntests: ${passed} passed, ${failed} failed, ${skipped} skipped`);
if (process.env.CI && passed === 0) {
  console.error('run-tests: no test ran');
  process.exit(1);
}
process.exit(r.status === 0 && failed === 0 ? 0 : 1);
