// The memory controller against real QEMUs that run no guest OS (-S): a balloon
// device with no driver behind it is a guest that ignores its targets, and a QEMU
// without one is a guest with no balloon. The controller is ticked by the test, so
// nothing here depends on how fast the machine is.

import { afterAll, beforeAll, expect, it } from 'vitest';
import { type QmpClient, QmpMonitor } from '../../dumpd/qmp.js';
import { memoryConfig } from '../../guestd/memory/config.js';
import { MemoryController } from '../../guestd/memory/controller.js';
import type { RebalanceEvent } from '../../guestd/memory/policy.js';
import { guestRamResident, pidOfUnixListener, readHost } from '../../guestd/memory/sources.js';
import { type QemuHandle, startQemu } from '../helpers/qemu.js';
import { describeWithTools } from '../helpers/tools.js';

const MiB = 1024 * 1024;

function qemuArgs(balloon: boolean): string[] {
  return [
    '-machine',
    'pc,accel=tcg,memory-backend=ram',
    '-m',
    '128',
    '-object',
    'memory-backend-memfd,id=ram,size=128M',
    ...(balloon ? ['-device', 'virtio-balloon-pci,id=balloon0'] : []),
    '-S',
  ];
}

describeWithTools(['qemu-system-x86_64'], 'memory controller against QEMU', () => {
  const q: Record<string, QemuHandle> = {};
  const monitors = new Map<string, QmpMonitor>();
  /** Every balloon command sent to each QEMU, in order (bytes). */
  const sent = new Map<string, number[]>();

  beforeAll(async () => {
    for (const [name, balloon] of [
      ['a', true],
      ['b', true],
      ['c', false],
    ] as const) {
      q[name] = await startQemu(qemuArgs(balloon));
      const m = new QmpMonitor(q[name].qmp, { retryMs: 50, maxRetryMs: 500 });
      sent.set(name, []);
      const connected = new Promise<void>((resolve) =>
        m.once('connected', (c: QmpClient) => {
          // Record what reaches QEMU: the test's window on the controller's commands.
          const exec = c.execute.bind(c);
          c.execute = ((
            cmd: string,
            args?: Record<string, unknown>,
            o?: { timeoutMs?: number },
          ) => {
            if (cmd === 'balloon') sent.get(name)!.push(args?.value as number);
            return exec(cmd, args, o);
          }) as QmpClient['execute'];
          resolve();
        }),
      );
      m.start();
      await connected;
      monitors.set(name, m);
    }
  });
  afterAll(() => {
    for (const m of monitors.values()) m.stop();
  });

  it('finds the QEMU process behind a QMP socket, and the resident size of its guest RAM', () => {
    const pid = pidOfUnixListener(q.a!.qmp);
    expect(pid).toBe(q.a!.child.pid);
    const rss = guestRamResident(pid!, 128 * MiB);
    expect(rss).not.toBeNull();
    expect(rss!).toBeLessThanOrEqual(128 * MiB);
  });

  function controller(events: RebalanceEvent[], log: string[]) {
    const cfg = memoryConfig(
      {
        pool: '320M',
        interval: 1,
        followIntervals: 3,
        guests: ['a', 'b', 'c'].map((name) => ({
          name,
          qmp: q[name]!.qmp,
          entitlement: '64M',
          max: '128M',
        })),
      },
      readHost().memTotal,
    );
    let now = 0;
    return new MemoryController(cfg, {
      monitor: (name) => monitors.get(name),
      // the test's clock: one interval per tick, however long a tick took
      now: () => (now += 1000),
      host: () => ({ memAvailable: 64 * 1024 * MiB, psiFullAvg10: 0 }),
      onEvent: (e) => events.push(e),
      log: (l) => log.push(l),
    });
  }

  it('observes first, then balloons within the pool; a guest that ignores its target is left at its size', async () => {
    const events: RebalanceEvent[] = [];
    const log: string[] = [];
    const ctl = controller(events, log);
    const d1 = await ctl.tick();
    expect(d1.guests.map((g) => [g.name, g.mode, g.target])).toEqual([
      ['a', 'observing', null],
      ['b', 'observing', null],
      ['c', 'no-balloon', null],
    ]);
    expect([...sent.values()].flat()).toEqual([]);
    // the guest without a balloon holds its 128 MiB; a and b share 192 MiB: 96 each
    const d2 = await ctl.tick();
    expect(d2.budget).toBe(192 * MiB);
    expect(sent.get('a')).toEqual([96 * MiB]);
    expect(sent.get('b')).toEqual([96 * MiB]);
    expect(sent.get('c')).toEqual([]);
    expect(events).toHaveLength(1);
    expect(events[0]!.data.moves.map((m) => [m.guest, m.from, m.to])).toEqual([
      ['a', 128 * MiB, 96 * MiB],
      ['b', 128 * MiB, 96 * MiB],
    ]);
    // no driver: the balloons stay at 128 MiB; after followIntervals the request is withdrawn
    let d = d2;
    for (let i = 0; i < 3 && d.guests[0]!.mode !== 'ignoring'; i++) d = await ctl.tick();
    expect(d.guests.map((g) => g.mode)).toEqual(['ignoring', 'ignoring', 'no-balloon']);
    expect(sent.get('a')).toEqual([96 * MiB, 128 * MiB]);
    expect(sent.get('b')).toEqual([96 * MiB, 128 * MiB]);
    const st = ctl.status();
    expect(st.guests.map((g) => [g.name, g.actual, g.reason.split(':')[0]])).toEqual([
      ['a', 128 * MiB, 'ignoring its target'],
      ['b', 128 * MiB, 'ignoring its target'],
      ['c', null, 'no balloon device'],
    ]);
    // left alone afterwards
    await ctl.tick();
    await ctl.tick();
    expect(sent.get('a')).toHaveLength(2);
    const metrics = await ctl.registry.metrics();
    expect(metrics).toMatch(
      /ballast_memory_guest_state\{guest="a",mode="ignoring",class="idle"\} 1/,
    );
    expect(metrics).toMatch(/ballast_memory_guest_actual_bytes\{guest="b"\} 134217728/);
    expect(metrics).toMatch(/ballast_memory_pool_bytes 335544320/);
    expect(metrics).toMatch(/ballast_memory_guest_resident_bytes\{guest="a"\} \d+/);
  });

  it('a new controller on the same guests (a restart) sends nothing before it has observed them', async () => {
    for (const s of sent.values()) s.length = 0;
    const ctl = controller([], []);
    const d = await ctl.tick();
    expect(d.guests.map((g) => g.target)).toEqual([null, null, null]);
    expect([...sent.values()].flat()).toEqual([]);
    expect(d.guests.map((g) => g.holds)).toEqual([128 * MiB, 128 * MiB, null]);
  });

  it('a guest whose monitor is gone is counted at its last size, and nothing is sent to it', async () => {
    const ctl = controller([], []);
    await ctl.tick();
    monitors.get('b')!.stop();
    const d = await ctl.tick();
    const b = d.guests.find((g) => g.name === 'b')!;
    expect(b.mode).toBe('absent');
    expect(b.charge).toBe(128 * MiB);
    expect(b.target).toBeNull();
  });

  it('refuses a change that would not fit the pool, with the numbers, and keeps the old one', () => {
    const ctl = controller([], []);
    expect(() => ctl.set('a', { entitlement: 200 * MiB })).toThrow(
      /entitlement 200 MiB is above max 128 MiB/,
    );
    expect(() => ctl.set('a', { entitlement: 128 * MiB, max: 128 * MiB })).not.toThrow();
    expect(() => ctl.set('b', { entitlement: 128 * MiB })).not.toThrow();
    expect(() => ctl.set('c', { entitlement: 128 * MiB })).toThrow(
      /entitlements add up to 384 MiB \(a 128 MiB \+ b 128 MiB \+ c 128 MiB\), more than the pool of 320 MiB by 64 MiB/,
    );
    expect(ctl.config.guests.map((g) => g.entitlement / MiB)).toEqual([128, 128, 64]);
    expect(() => ctl.set('x', { weight: 1 })).toThrow(/no guest named "x"/);
  });
});
