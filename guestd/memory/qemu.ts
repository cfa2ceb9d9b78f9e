// One guest's memory over its QEMU monitor: the balloon's size and statistics, the
// guest's RAM size and resident RAM, and balloon targets. It borrows the QMP client of
// whoever holds the guest's monitor connection (the guest daemon keeps one per guest).

import type { QmpClient } from '../../dumpd/qmp.js';
import type { GuestStats } from './policy.js';
import { guestRamResident, parseGuestStats, pidOfUnixListener } from './sources.js';

const QMP_TIMEOUT_MS = 10_000;

export interface QemuMemorySample {
  /** null: QEMU has no balloon device. */
  actual: number | null;
  ramSize: number | undefined;
  stats: GuestStats | undefined;
  resident: number | undefined;
}

/** The QOM path of the guest's balloon device, or null when it has none. */
export async function findBalloon(c: QmpClient): Promise<string | null> {
  for (const base of ['/machine/peripheral', '/machine/peripheral-anon']) {
    let props: { name: string; type: string }[];
    try {
      props = await c.execute('qom-list', { path: base }, { timeoutMs: QMP_TIMEOUT_MS });
    } catch {
      continue;
    }
    const b = props.find((p) => /^child<virtio-balloon/.test(p.type));
    if (b) return `${base}/${b.name}`;
  }
  return null;
}

export class QemuMemory {
  private balloonPath: string | null | undefined;
  private pollingSet = false;
  private ramSize: number | undefined;
  private pid: number | null | undefined;

  /**
   * @param qmpPath the QMP Unix socket (to find QEMU's process for its resident RAM),
   *   or a `pid` when known.
   */
  constructor(
    readonly client: QmpClient,
    private readonly opts: { qmpPath?: string; pid?: number; pollSeconds: number },
  ) {}

  /** One sample. A QMP failure rejects (the controller counts the guest as not reached). */
  async sample(): Promise<QemuMemorySample> {
    const c = this.client;
    let actual: number | null;
    try {
      actual = (
        await c.execute<{ actual: number }>('query-balloon', undefined, {
          timeoutMs: QMP_TIMEOUT_MS,
        })
      ).actual;
    } catch (e) {
      // DeviceNotActive: no balloon device (or no driver bound yet on some QEMUs)
      if ((e as { code?: string }).code === 'QMP_DEVICE_NOT_ACTIVE') actual = null;
      else throw e;
    }
    if (this.ramSize === undefined) {
      const m = await c.execute<{ 'base-memory': number; 'plugged-memory'?: number }>(
        'query-memory-size-summary',
        undefined,
        { timeoutMs: QMP_TIMEOUT_MS },
      );
      this.ramSize = m['base-memory'] + (m['plugged-memory'] ?? 0);
    }
    let stats: GuestStats | undefined;
    if (actual !== null) {
      if (this.balloonPath === undefined) this.balloonPath = await findBalloon(c);
      if (this.balloonPath !== null) {
        if (!this.pollingSet) {
          await c.execute(
            'qom-set',
            {
              path: this.balloonPath,
              property: 'guest-stats-polling-interval',
              value: Math.max(1, Math.round(this.opts.pollSeconds)),
            },
            { timeoutMs: QMP_TIMEOUT_MS },
          );
          this.pollingSet = true;
        }
        const r = await c.execute(
          'qom-get',
          { path: this.balloonPath, property: 'guest-stats' },
          { timeoutMs: QMP_TIMEOUT_MS },
        );
        stats = parseGuestStats(r) ?? undefined;
      }
    }
    if (this.pid === undefined)
      this.pid = this.opts.pid ?? (this.opts.qmpPath ? pidOfUnixListener(this.opts.qmpPath) : null);
    const resident =
      this.pid !== null && this.ramSize !== undefined
        ? (guestRamResident(this.pid, this.ramSize) ?? undefined)
        : undefined;
    return { actual, ramSize: this.ramSize, stats, resident };
  }

  /** Sets the balloon target (QMP `balloon`, bytes). */
  async setTarget(bytes: number): Promise<void> {
    await this.client.execute('balloon', { value: bytes }, { timeoutMs: QMP_TIMEOUT_MS });
  }
}
