// QEMU's side of a move, over QMP: capabilities, the migration's status and progress
// (query-migrate), and waiting for a status with progress reported as it goes.

import { QmpClient, QmpError } from '../dumpd/qmp.js';
import { MigrateError } from './handoff.js';

/** query-migrate, the fields used here. */
export interface MigrationInfo {
  status?: string;
  'total-time'?: number;
  'setup-time'?: number;
  downtime?: number;
  'expected-downtime'?: number;
  ram?: {
    transferred: number;
    remaining: number;
    total: number;
    'dirty-pages-rate': number;
    mbps: number;
    'dirty-sync-count': number;
    'page-size'?: number;
  };
}

export interface Progress {
  status: string;
  /** Bytes of RAM sent so far, and left to send. */
  transferred: number;
  remaining: number;
  total: number;
  /** Pages dirtied per second in the last pass. */
  dirtyRate: number;
  mbps: number;
  passes: number;
  elapsedMs: number;
}

export function progressOf(i: MigrationInfo, elapsedMs: number): Progress {
  return {
    status: i.status ?? 'none',
    transferred: i.ram?.transferred ?? 0,
    remaining: i.ram?.remaining ?? 0,
    total: i.ram?.total ?? 0,
    dirtyRate: i.ram?.['dirty-pages-rate'] ?? 0,
    mbps: i.ram?.mbps ?? 0,
    passes: i.ram?.['dirty-sync-count'] ?? 0,
    elapsedMs,
  };
}

/** Connects to a QMP socket, with a stable error naming which side it is. */
export async function connectQmp(addr: string, side: string): Promise<QmpClient> {
  try {
    return await QmpClient.connect(addr);
  } catch (e) {
    throw new MigrateError(
      'MIGRATE_QMP',
      `cannot reach the ${side} QEMU at ${addr}: ${(e as Error).message}`,
      { cause: e, step: 'connect' },
    );
  }
}

export async function runState(q: QmpClient): Promise<string> {
  return ((await q.execute('query-status')) as { status: string }).status;
}

export async function setCapabilities(q: QmpClient, caps: Record<string, boolean>): Promise<void> {
  await q.execute('migrate-set-capabilities', {
    capabilities: Object.entries(caps).map(([capability, state]) => ({ capability, state })),
  });
}

export async function queryMigrate(q: QmpClient): Promise<MigrationInfo> {
  return (await q.execute('query-migrate')) as MigrationInfo;
}

const FAILED = new Set(['failed', 'cancelled', 'cancelling']);

/**
 * Waits until the migration reaches one of `want`, polling query-migrate (and woken by
 * MIGRATION events); reports progress; a failed or cancelled migration throws.
 */
export async function waitMigration(
  q: QmpClient,
  want: string[],
  opts: {
    timeoutMs: number;
    step: string;
    t0: number;
    onProgress?: ((p: Progress) => void) | undefined;
    pollMs?: number;
  },
): Promise<MigrationInfo> {
  const deadline = performance.now() + opts.timeoutMs;
  let wake: (() => void) | null = null;
  const onEvent = () => wake?.();
  q.on('MIGRATION', onEvent);
  try {
    for (;;) {
      let info: MigrationInfo;
      try {
        info = await queryMigrate(q);
      } catch (e) {
        throw new MigrateError(
          'MIGRATE_QMP',
          `${opts.step}: the QEMU monitor failed: ${(e as Error).message}`,
          { cause: e, step: opts.step },
        );
      }
      const st = info.status ?? 'none';
      opts.onProgress?.(progressOf(info, performance.now() - opts.t0));
      if (want.includes(st)) return info;
      if (FAILED.has(st)) {
        throw new MigrateError(
          'MIGRATE_FAILED',
          `${opts.step}: the migration ${st}${(info as { 'error-desc'?: string })['error-desc'] ? `: ${(info as { 'error-desc'?: string })['error-desc']}` : ''}`,
          { step: opts.step },
        );
      }
      if (performance.now() > deadline) {
        throw new MigrateError(
          'MIGRATE_TIMEOUT',
          `${opts.step}: the migration is still ${st} after ${opts.timeoutMs} ms`,
          { step: opts.step },
        );
      }
      await new Promise<void>((resolve) => {
        const t = setTimeout(resolve, opts.pollMs ?? 250);
        wake = () => {
          clearTimeout(t);
          resolve();
        };
      });
      wake = null;
    }
  } finally {
    q.off('MIGRATION', onEvent);
  }
}

/** Runs a command, ignoring the answer and any error (best effort during a rollback). */
export async function tryExecute(
  q: QmpClient | null,
  command: string,
  args?: Record<string, unknown>,
): Promise<void> {
  if (!q || q.isClosed) return;
  try {
    await q.execute(command, args, { timeoutMs: 10_000 });
  } catch (e) {
    if (!(e instanceof QmpError)) throw e;
  }
}

/** The QEMU version as "major.minor.micro" and the machine's QOM type. */
export async function qemuIdentity(q: QmpClient): Promise<{ version: string; machine: string }> {
  const v = (await q.execute('query-version')) as {
    qemu: { major: number; minor: number; micro: number };
  };
  const machine = (await q.execute('qom-get', { path: '/machine', property: 'type' })) as string;
  return { version: `${v.qemu.major}.${v.qemu.minor}.${v.qemu.micro}`, machine };
}
