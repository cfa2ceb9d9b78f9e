// The raw results a cluster benchmark writes: the machine it ran on, and the JSON file.

import { mkdir, writeFile } from 'node:fs/promises';
import os from 'node:os';
import { dirname } from 'node:path';

/** The machine, and its load average when the run started and ended. */
function hostInfo(loadStart: number[], loadEnd: number[]): Record<string, unknown> {
  return {
    cpus: os.cpus().length,
    cpuModel: os.cpus()[0]?.model ?? '',
    memGiB: Math.round(os.totalmem() / 2 ** 30),
    kernel: os.release(),
    node: process.version,
    loadavgStart: loadStart,
    loadavgEnd: loadEnd,
  };
}

/**
 * Writes a run's raw results as indented JSON (its directory made; NaN and Infinity,
 * which JSON lacks, as null): when it ran, on what, with which options, then `body`.
 */
export async function writeResults(
  path: string,
  run: { startedAt: string; loadStart: number[]; options: unknown },
  body: Record<string, unknown>,
): Promise<void> {
  const value = {
    version: 1,
    startedAt: run.startedAt,
    finishedAt: new Date().toISOString(),
    host: hostInfo(run.loadStart, os.loadavg()),
    options: run.options,
    ...body,
  };
  await mkdir(dirname(path), { recursive: true });
  await writeFile(
    path,
    `${JSON.stringify(value, (_k, v) => (typeof v === 'number' && !Number.isFinite(v) ? null : v), 2)}\n`,
  );
}
