// Waiting in tests: on what happened, never on how fast. A deadline is only
// the point where a test gives up on an event that is not coming; on a busy
// machine (load 20 on 2 cores) everything is slower, so deadlines stretch with
// the load seen when the wait starts.
import os from 'node:os';
import { setTimeout as sleep } from 'node:timers/promises';

/** How many times busier than its cores the machine is now (≥ 1, at most 10). */
export function loadFactor(): number {
  const perCore = (os.loadavg()[0] ?? 0) / Math.max(1, os.cpus().length);
  return Math.min(10, Math.max(1, perCore));
}

/** `ms` stretched by the machine's load. */
export function scaled(ms: number): number {
  return Math.round(ms * loadFactor());
}

/**
 * Polls `pred` every `everyMs` until it holds; throws "timed out waiting for
 * WHAT" once `ms` (scaled by the load) has passed without it.
 */
export async function until(
  what: string,
  pred: () => boolean | Promise<boolean>,
  ms = 60_000,
  everyMs = 100,
): Promise<void> {
  const deadline = Date.now() + scaled(ms);
  while (!(await pred())) {
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(everyMs);
  }
}
