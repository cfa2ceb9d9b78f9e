// Crash points for tests of crash safety: BALLAST_FAILPOINTS=name[,name...]
// makes the agent kill itself with SIGKILL when it reaches a named point, so a
// test can stop it between two steps that a real crash could separate. Unset
// (always, in production) a failpoint is one Set lookup.
//
// One failpoint slows instead: `slow-writes` sends every write to a fenced
// (cluster-shared) file through the thread pool, where the native addon sleeps
// 1 s before each one's fence check, so that a test freezing the agent
// certainly has writes queued (test/cluster/fence-queued.test.ts). Another,
// `pr-settle-delay`, holds a grant's second round before its marker is written,
// so that a test can cut the agent off from etcd in between
// (test/cluster/cut-off.test.ts). `device-delete-apply-delay` holds the watch
// for 20 s before it applies another agent's delete of a device served here
// (its first step, the record marked deleting), so
// that the agent's cache lags the store as after a freeze
// (test/cluster/lagging-cache.test.ts). `join-delay` holds the start for 5 s
// with the API listening, before the agent joins the cluster
// (test/cluster/join-failed.test.ts). `delete-record-lost` fails the removal of a deleted
// device's record once and holds its retry while DEVICEFILE.hold exists
// (test/cluster/lagging-cache.test.ts). `watch-start-hold` holds the start between the first
// listing of the cluster and its watch while DATADIR/watch-start.hold exists
// (test/cluster/join-failed.test.ts). `ack-hold` holds the agent's acks (`acks/<host>`)
// while DATADIR/ack.hold exists, as if it died before acking a change it made
// (test/cluster/catching-up.test.ts). `register-lost` loses the answer of the agent's
// first re-registration after its lease ran out, before it is sent
// (test/cluster/catching-up.test.ts). `create-ready-lost` loses the answer of a create's
// ready record after etcd took it (test/cluster/lagging-cache.test.ts). In dumpd, `early-reboot-hold` keeps an
// early-reboot dump `streaming` after its stream has ended, while RUNDIR/GUEST.hold
// exists, so that a test sees the guest's second boot before the dump completes
// however slow the boot (test/e2e/early-reboot.test.ts).

import { existsSync } from 'node:fs';

const armed = new Set(
  (process.env.BALLAST_FAILPOINTS ?? '')
    .split(',')
    .map((s) => s.trim())
    .filter((s) => s !== ''),
);

/** Dies here, as if the machine lost power or the process was killed, if `name` is armed. */
export function failpoint(name: string): void {
  if (armed.size !== 0 && armed.has(name)) {
    process.stderr.write(`ballast: failpoint ${name}: SIGKILL\n`);
    process.kill(process.pid, 'SIGKILL');
  }
}

/** Whether `name` is armed (a failpoint that changes behaviour rather than crashing). */
export function failpointArmed(name: string): boolean {
  return armed.size !== 0 && armed.has(name);
}

/** Waits `ms` here, saying so on stderr, if `name` is armed (a test acts meanwhile). */
export async function failpointPause(name: string, ms: number): Promise<void> {
  if (armed.size === 0 || !armed.has(name)) return;
  process.stderr.write(`ballast: failpoint ${name}: waiting ${ms} ms\n`);
  await new Promise((r) => setTimeout(r, ms));
}

/** Waits while `file` exists, saying so on stderr, if `name` is armed (the test removes it). */
export async function failpointHold(name: string, file: string): Promise<void> {
  if (armed.size === 0 || !armed.has(name) || !existsSync(file)) return;
  process.stderr.write(`ballast: failpoint ${name}: waiting for ${file} to go\n`);
  while (existsSync(file)) await new Promise((r) => setTimeout(r, 100));
}
