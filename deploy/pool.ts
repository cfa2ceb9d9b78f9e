// Runs a task per host, at most `parallel` at a time, in inventory order.

export type Outcome<T> =
  | { host: string; status: 'ok'; value: T }
  | { host: string; status: 'failed'; error: unknown }
  | { host: string; status: 'skipped'; reason: string };

export interface PoolOptions {
  parallel: number;
  /** Start no new host after one fails (rolling updates). */
  stopOnFailure: boolean;
  signal?: AbortSignal;
}

export async function forEachHost<H extends { name: string }, T>(
  hosts: readonly H[],
  opts: PoolOptions,
  task: (host: H) => Promise<T>,
): Promise<Outcome<T>[]> {
  const out: Outcome<T>[] = new Array(hosts.length);
  let next = 0;
  let failed = false;
  const worker = async () => {
    for (;;) {
      const i = next++;
      const host = hosts[i];
      if (!host) return;
      if (opts.signal?.aborted) {
        out[i] = { host: host.name, status: 'skipped', reason: 'interrupted' };
        continue;
      }
      if (failed && opts.stopOnFailure) {
        out[i] = { host: host.name, status: 'skipped', reason: 'an earlier host failed' };
        continue;
      }
      try {
        out[i] = { host: host.name, status: 'ok', value: await task(host) };
      } catch (error) {
        failed = true;
        out[i] = { host: host.name, status: 'failed', error };
      }
    }
  };
  const n = Math.max(1, Math.min(opts.parallel, hosts.length));
  await Promise.all(Array.from({ length: n }, worker));
  return out;
}
