import { defineConfig } from 'vitest/config';

export default defineConfig({
  test: {
    include: [
      'nbd/**/*.test.ts',
      'agent/**/*.test.ts',
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
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: 'forks',
    fileParallelism: true,
    maxWorkers: 2,
  },
});
