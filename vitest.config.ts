import os from 'node:os';
import { defineConfig } from 'vitest/config';

// A test's timeout guards against a hang; it never judges speed. Tests spawn real
// processes (the CLI, agents, QEMU), and on a machine loaded to 10 times its cores a
// CLI run takes seconds: the guard is 3 minutes, more when the machine is already
// loaded past 3 times its cores when the run starts.
const load = os.loadavg()[0] ?? 0;
const guardMs = Math.round(60_000 * Math.max(3, Math.min(10, load / os.cpus().length)));

export default defineConfig({
  test: {
    include: [
      'nbd/**/*.test.ts',
      'agent/**/*.test.ts',
      'agentd/**/*.test.ts',
      'cli/**/*.test.ts',
      'dumpd/**/*.test.ts',
      'deploy/**/*.test.ts',
      'cluster/**/*.test.ts',
      'migrate/**/*.test.ts',
      'notify/**/*.test.ts',
      'guestd/**/*.test.ts',
      'test/**/*.test.ts',
      'bench/**/*.test.ts',
      'nemesis/**/*.test.ts',
    ],
    testTimeout: guardMs,
    hookTimeout: guardMs,
    pool: 'forks',
    fileParallelism: true,
    maxWorkers: 2,
  },
});
