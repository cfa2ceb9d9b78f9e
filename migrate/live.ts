// Live migration of a running guest between two hosts whose agents serve its devices,
// with the reservation hand-off at the one safe moment.
//
// The order (docs in README "Moving guests"):
//   prepare    source identity holds every device (Write Exclusive); destination identity
//              registered; the PRgeneration of each device noted
//   start      destination (started with -incoming defer -S): late-block-activate, so its
//              images stay inactive until `cont`; source: pause-before-switchover
//   precopy    RAM copied while the guest runs
//   paused     the source stopped the guest, drained and flushed every device, and waits
//              (status pre-switchover): it writes nothing from here on
//   hand-off   destination preempts-and-aborts the source on every device, only if the
//              generation is unchanged; returns once every agent closed the source's
//              connections
//   switchover migrate-continue: device state sent; source done
//   resume     `cont` on the destination: it activates its images and writes from now on
//
// A failure before the hand-off cancels the migration: the source resumes with its
// reservation. A failure after it re-takes the reservation for the source first (the
// source's QEMU reconnects to its agent: `reconnect-delay`), and a source that resumed
// before that gets EPERM on a write, which `werror=stop` turns into a pause that is
// continued once the reservation is back.

import { performance } from 'node:perf_hooks';
import { BallastError } from '../agent/errors.js';
import type { QmpClient, QmpEvent } from '../dumpd/qmp.js';
import {
  type AgentApi,
  agentHost,
  ensureHeld,
  guestDevices,
  handOff,
  MigrateError,
  registerHost,
} from './handoff.js';
import {
  connectQmp,
  type MigrationInfo,
  type Progress,
  queryMigrate,
  runState,
  setCapabilities,
  tryExecute,
  waitMigration,
} from './qemu.js';

export interface Side {
  /** QMP address of this side's QEMU. */
  qmp: string;
  /** This host's agent. */
  api: AgentApi;
  /** The host name (its agent's cluster.host); asked from the agent when absent. */
  host?: string | undefined;
}

export interface LiveOptions {
  guest: string;
  from: Side;
  to: Side;
  /** Where the destination listens for the stream (default unix:/tmp/ballast-migrate-GUEST.sock). */
  uri?: string | undefined;
  /** Name the devices instead of taking every device of the guest. */
  devices?: string[] | undefined;
  /** Bytes per second (default: unlimited, QEMU's own default is 128 MiB/s). */
  maxBandwidth?: number | undefined;
  /** QEMU's downtime-limit in ms (default 300). */
  downtimeLimitMs?: number | undefined;
  /** Give up on the precopy after this long (default 10 min). */
  timeoutMs?: number | undefined;
  /** Quit the source QEMU once the destination runs (default true). */
  quitSource?: boolean | undefined;
  onProgress?: ((p: Progress) => void) | undefined;
  onStep?: ((step: string, ms: number) => void) | undefined;
  /** For tests: called at each named point; may throw or break things. */
  hooks?: Partial<Record<'paused' | 'handedOff', () => Promise<void>>>;
}

export interface LiveReport {
  guest: string;
  from: string;
  to: string;
  devices: string[];
  /** Milliseconds: whole run, RAM copy while running, hand-off, switchover, resume. */
  totalMs: number;
  precopyMs: number;
  handoffMs: number;
  switchoverMs: number;
  /** QEMU's downtime (source stop → last byte sent), and the guest's: STOP → RESUME events. */
  qemuDowntimeMs: number;
  downtimeMs: number;
  ramTransferred: number;
  ramTotal: number;
  passes: number;
  mbps: number;
}

function eventTime(e: QmpEvent | undefined): number | null {
  return e?.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : null;
}

export async function migrateLive(o: LiveOptions): Promise<LiveReport> {
  const t0 = performance.now();
  const step = (name: string) => o.onStep?.(name, performance.now() - t0);
  const fromHost = o.from.host ?? (await agentHost(o.from.api));
  const toHost = o.to.host ?? (await agentHost(o.to.api));
  if (fromHost === toHost) {
    throw new MigrateError('MIGRATE_SAME_HOST', `source and destination are both host ${toHost}`);
  }
  const devices = (await guestDevices(o.from.api, o.guest, o.devices)).map((d) => d.name);
  let src: QmpClient | null = null;
  let dst: QmpClient | null = null;
  let movedAny = false;
  let handedOff = false;
  const generations = new Map<string, number>();

  /** Puts the guest back on the source, with its reservation, as far as it can. */
  const rollback = async (): Promise<string[]> => {
    const notes: string[] = [];
    if (!handedOff) await tryExecute(src, 'migrate_cancel');
    if (movedAny) {
      for (const d of devices) {
        try {
          await ensureHeld(o.from.api, d, fromHost);
        } catch (e) {
          notes.push(`re-taking ${d} for ${fromHost} failed: ${(e as Error).message}`);
        }
      }
    }
    await tryExecute(dst, 'quit');
    if (src && !src.isClosed) {
      // The source resumes by itself once the migration failed or was cancelled; a write
      // it made while it did not hold the reservation paused it (werror=stop).
      const until = performance.now() + 30_000;
      for (;;) {
        const st = await runState(src).catch(() => 'unknown');
        if (st === 'running') break;
        if (st === 'io-error' || st === 'paused' || st === 'postmigrate') {
          await tryExecute(src, 'cont');
        }
        if (performance.now() > until) {
          notes.push(`the source QEMU is ${st}`);
          break;
        }
        await new Promise((r) => setTimeout(r, 100));
      }
    }
    return notes;
  };

  const fail = async (e: unknown, at: string): Promise<never> => {
    const notes = await rollback().catch((r: Error) => [r.message]);
    const code = e instanceof BallastError ? e.code : 'MIGRATE_FAILED';
    const msg = `${at}: ${(e as Error).message}; the guest keeps running on ${fromHost}${
      notes.length ? ` (${notes.join('; ')})` : ' with its reservation'
    }`;
    throw new MigrateError(code, msg, { cause: e, step: at });
  };

  try {
    src = await connectQmp(o.from.qmp, 'source');
    dst = await connectQmp(o.to.qmp, 'destination');
    const srcState = await runState(src);
    if (srcState !== 'running') {
      throw new MigrateError('MIGRATE_NOT_RUNNING', `the source guest is ${srcState}`);
    }
    const dstState = await runState(dst);
    if (dstState !== 'inmigrate') {
      throw new MigrateError(
        'MIGRATE_DESTINATION_STATE',
        `the destination QEMU is ${dstState}; start it with -incoming defer -S`,
      );
    }
  } catch (e) {
    src?.close();
    dst?.close();
    throw e;
  }
  const srcQ = src;
  const dstQ = dst;
  try {
    // prepare
    try {
      for (const d of devices) {
        const did = await ensureHeld(o.from.api, d, fromHost);
        if (did === 'taken') movedAny = true;
        generations.set(d, await registerHost(o.to.api, d, toHost));
      }
    } catch (e) {
      return await fail(e, 'prepare');
    }
    step('prepared');

    // start
    const uri = o.uri ?? `unix:/tmp/ballast-migrate-${o.guest.replace(/[^\w.-]/g, '_')}.sock`;
    try {
      // events: MIGRATION events wake the waits at once (else they poll)
      await setCapabilities(dstQ, { 'late-block-activate': true, events: true });
      await setCapabilities(srcQ, { 'pause-before-switchover': true, events: true });
      await srcQ.execute('migrate-set-parameters', {
        'max-bandwidth': o.maxBandwidth ?? 64 * 1024 ** 3,
        'downtime-limit': o.downtimeLimitMs ?? 300,
      });
      await dstQ.execute('migrate-incoming', { uri });
      await srcQ.execute('migrate', { uri });
    } catch (e) {
      return await fail(e, 'start');
    }
    step('started');

    // precopy, until the source has stopped the guest and waits for us
    let stopEvent: QmpEvent | undefined;
    srcQ.once('STOP', (e: QmpEvent) => {
      stopEvent = e;
    });
    const tPre = performance.now();
    try {
      await waitMigration(srcQ, ['pre-switchover'], {
        timeoutMs: o.timeoutMs ?? 600_000,
        step: 'precopy',
        t0,
        onProgress: o.onProgress,
      });
      await o.hooks?.paused?.();
    } catch (e) {
      return await fail(e, 'precopy');
    }
    const precopyMs = performance.now() - tPre;
    step('paused');

    // hand-off
    const tHand = performance.now();
    try {
      movedAny = true;
      // all devices at once: the guest is stopped while this runs
      // every one settled before a rollback looks at who holds what
      const done = await Promise.allSettled(
        devices.map((d) => handOff(o.to.api, d, fromHost, toHost, generations.get(d) ?? 0)),
      );
      const refused = done.find((r) => r.status === 'rejected');
      if (refused) throw refused.reason;
      handedOff = true;
      await o.hooks?.handedOff?.();
    } catch (e) {
      return await fail(e, 'hand-off');
    }
    const handoffMs = performance.now() - tHand;
    step('handed-off');

    // switchover
    const tSw = performance.now();
    let resumeEvent: QmpEvent | undefined;
    dstQ.once('RESUME', (e: QmpEvent) => {
      resumeEvent = e;
    });
    let done: MigrationInfo;
    try {
      await srcQ.execute('migrate-continue', { state: 'pre-switchover' });
      // Both ends completed (the source too: one that failed at the end restarts its
      // guest, and the rollback then takes its reservations back), then at once `cont`:
      // the guest is stopped until then, so nothing else waits in between.
      const [s, d] = await Promise.allSettled([
        waitMigration(srcQ, ['completed'], {
          timeoutMs: 120_000,
          step: 'switchover',
          t0,
          onProgress: o.onProgress,
          pollMs: 20,
        }),
        waitMigration(dstQ, ['completed'], {
          timeoutMs: 120_000,
          step: 'switchover (destination)',
          t0,
          pollMs: 20,
        }),
      ]);
      // the source's account first: a destination that died is a failed migration there
      if (s.status === 'rejected') throw s.reason;
      if (d.status === 'rejected') throw d.reason;
      done = s.value;
      await dstQ.execute('cont');
    } catch (e) {
      return await fail(e, 'switchover');
    }
    const switchoverMs = performance.now() - tSw;
    // QEMU reports `completed` (downtime 0 or absent) a moment before it fills it in
    for (let i = 0; i < 50 && !done.downtime; i++) {
      await new Promise((r) => setTimeout(r, 10));
      const again = await queryMigrate(srcQ).catch(() => null);
      if (!again) break;
      done = again;
    }
    // The RESUME event can trail cont's answer by a moment.
    for (let i = 0; i < 50 && !resumeEvent; i++) await new Promise((r) => setTimeout(r, 10));
    step('resumed');
    if (o.quitSource !== false) await tryExecute(srcQ, 'quit');
    const stopAt = eventTime(stopEvent);
    const resumeAt = eventTime(resumeEvent);
    return {
      guest: o.guest,
      from: fromHost,
      to: toHost,
      devices,
      totalMs: performance.now() - t0,
      precopyMs,
      handoffMs,
      switchoverMs,
      qemuDowntimeMs: done.downtime ?? 0,
      downtimeMs: stopAt !== null && resumeAt !== null ? resumeAt - stopAt : Number.NaN,
      ramTransferred: done.ram?.transferred ?? 0,
      ramTotal: done.ram?.total ?? 0,
      passes: done.ram?.['dirty-sync-count'] ?? 0,
      mbps: done.ram?.mbps ?? 0,
    };
  } finally {
    srcQ.close();
    dstQ.close();
  }
}
