// The QMP client against a real QEMU (-machine none: no guest, starts at once).

import { rmSync } from 'node:fs';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { QmpClient, QmpError, type QmpEvent, QmpMonitor } from '../../dumpd/qmp.js';
import { type QemuHandle, startQemu, stopQemu } from '../helpers/qemu.js';
import { describeWithTools } from '../helpers/tools.js';

describeWithTools(['qemu-system-x86_64'], 'QMP client against QEMU', () => {
  let q: QemuHandle;
  let c: QmpClient;
  beforeAll(async () => {
    q = await startQemu(['-machine', 'none', '-S']);
    c = await QmpClient.connect(q.qmp);
  });
  afterAll(() => c?.close());

  it('reads the greeting and negotiates capabilities', async () => {
    expect(c.greeting?.version.qemu.major).toBeGreaterThanOrEqual(7);
    const st = await c.execute<{ status: string; running: boolean }>('query-status');
    expect(st.status).toBe('prelaunch');
    expect(st.running).toBe(false);
  });

  it('matches many concurrent commands to their responses by id', async () => {
    const names = ['query-status', 'query-version', 'query-dump', 'query-name', 'query-kvm'];
    const all = await Promise.all(names.flatMap((n) => [c.execute(n), c.execute(n)]));
    expect(all).toHaveLength(10);
    expect((all[0] as { status: string }).status).toBe('prelaunch');
    expect((all[4] as { status: string }).status).toBe('none');
    expect((all[5] as { status: string }).status).toBe('none');
    const caps = await c.execute<{ formats: string[] }>('query-dump-guest-memory-capability');
    expect(caps.formats).toContain('elf');
  });

  it('turns QEMU errors into typed QMP_* errors and stays usable', async () => {
    const e = await c.execute('no-such-command').catch((x: unknown) => x);
    expect(e).toBeInstanceOf(QmpError);
    expect((e as QmpError).code).toBe('QMP_COMMAND_NOT_FOUND');
    expect((e as QmpError).errorClass).toBe('CommandNotFound');
    const g = await c.execute('dump-guest-memory', { paging: 1 }).catch((x: unknown) => x);
    expect((g as QmpError).code).toBe('QMP_GENERIC_ERROR');
    await expect(c.execute('query-status')).resolves.toBeTruthy();
  });

  it('delivers asynchronous events', async () => {
    const resumed = c.waitEvent('RESUME', 10_000);
    const seen: string[] = [];
    c.on('event', (ev: QmpEvent) => seen.push(ev.event));
    await c.execute('cont');
    const ev = await resumed;
    expect(ev.event).toBe('RESUME');
    expect(ev.timestamp?.seconds).toBeGreaterThan(0);
    const stopped = c.waitEvent('STOP', 10_000);
    await c.execute('stop');
    await stopped;
    expect(seen).toEqual(expect.arrayContaining(['RESUME', 'STOP']));
  });

  it('a monitor reconnects when QEMU restarts on the same socket', async () => {
    const first = await startQemu(['-machine', 'none']);
    const m = new QmpMonitor(first.qmp, { retryMs: 50, maxRetryMs: 200 });
    const connected: QmpClient[] = [];
    const wait = () =>
      new Promise<QmpClient>((resolve) => m.once('connected', (cl: QmpClient) => resolve(cl)));
    let next = wait();
    m.on('connected', (cl: QmpClient) => connected.push(cl));
    m.start();
    await next;
    next = wait();
    const lost = new Promise((r) => m.once('disconnected', r));
    await stopQemu(first.child);
    await lost;
    rmSync(first.qmp, { force: true });
    const second = await startQemu(['-machine', 'none', '-name', 'again'], {
      dir: first.dir,
      qmp: first.qmp,
    });
    const cl = await next;
    expect(await cl.execute('query-name')).toEqual({ name: 'again' });
    expect(connected).toHaveLength(2);
    m.stop();
    await stopQemu(second.child);
  });

  it('connecting to nothing is QMP_CONNECT_FAILED; a closed client rejects', async () => {
    const e = await QmpClient.connect(`${q.dir}/none.sock`).catch((x: unknown) => x);
    expect((e as QmpError).code).toBe('QMP_CONNECT_FAILED');
    const d = await QmpClient.connect(q.qmp, { timeoutMs: 500 }).catch((x: unknown) => x);
    // QEMU serves one QMP client per socket at a time: the second waits for a greeting.
    expect((d as QmpError).code).toBe('QMP_TIMEOUT');
  });
});
