import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { CMD } from '../nbd/protocol.js';
import type { Connection } from '../nbd/server.js';
import { READ_COMMANDS, ReservationManager, WRITE_COMMANDS } from './reservations.js';
import { SqliteStore } from './store/sqlite-store.js';
import type { Store } from './store/store.js';

const dirs: string[] = [];
const stores: Store[] = [];

afterEach(async () => {
  for (const s of stores.splice(0)) await s.close().catch(() => {});
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function open(dir?: string): Promise<{ dir: string; store: Store; res: ReservationManager }> {
  const d = dir ?? mkdtempSync(path.join(os.tmpdir(), 'ballast-pr-'));
  if (!dir) dirs.push(d);
  const store = await SqliteStore.open(path.join(d, 'state.db'));
  stores.push(store);
  const res = new ReservationManager(
    store,
    () => null,
    (n) => n === 'disk' || n === 'other',
    () => {},
  );
  await res.load();
  return { dir: d, store, res };
}

const conn = (identity: string) => ({ identity }) as Connection;
const can = (mask: number, cmd: number) => (mask & (1 << cmd)) !== 0;

describe('ReservationManager', () => {
  it('the access mask follows the reservation, and its generation moves with every change', async () => {
    const { res } = await open();
    const acc = res.access('disk');
    expect(acc.mask('anyone') & (READ_COMMANDS | WRITE_COMMANDS)).toBe(
      READ_COMMANDS | WRITE_COMMANDS,
    );
    const g0 = acc.generation;
    await res.apply('disk', { action: 'register', as: 'a', key: 0n, saKey: 0xan });
    await res.apply('disk', { action: 'reserve', as: 'a', key: 0xan, type: 1 });
    expect(acc.generation).toBe(g0 + 2);
    expect(can(acc.mask('a'), CMD.WRITE)).toBe(true);
    for (const cmd of [CMD.WRITE, CMD.TRIM, CMD.WRITE_ZEROES, CMD.FLUSH]) {
      expect(can(acc.mask('b'), cmd)).toBe(false);
    }
    for (const cmd of [CMD.READ, CMD.CACHE, CMD.BLOCK_STATUS]) {
      expect(can(acc.mask('b'), cmd)).toBe(true);
    }
    // A no-op leaves the generation alone: connections keep their cached answer.
    const g = acc.generation;
    await res.apply('disk', { action: 'reserve', as: 'a', key: 0xan, type: 1 });
    expect(acc.generation).toBe(g);
  });

  it('refusals carry the PR code and reason, change nothing, and are audited', async () => {
    const { res } = await open();
    await expect(
      res.apply('disk', { action: 'reserve', as: 'x', key: 1n, type: 1 }),
    ).rejects.toMatchObject({
      code: 'PR_CONFLICT',
      message: expect.stringContaining('not-registered'),
    });
    expect(res.show('disk')).toMatchObject({ generation: 0, reservation: null, registrations: [] });
    const audit = await res.audit('disk');
    expect(audit).toHaveLength(1);
    expect(audit[0]).toMatchObject({
      initiator: 'x',
      action: 'reserve',
      outcome: 'refused',
      code: 'PR_CONFLICT',
      reason: 'not-registered',
    });
  });

  it('state, access lists and the audit trail survive closing and reopening the store', async () => {
    const first = await open();
    await first.res.apply('disk', { action: 'register', as: 'a', key: 0n, saKey: 0xan });
    await first.res.apply('disk', { action: 'reserve', as: 'a', key: 0xan, type: 3 });
    await first.res.setAcl('disk', [
      { identity: 'a', access: 'rw' },
      { identity: 'b', access: 'ro' },
    ]);
    const shown = first.res.show('disk');
    await first.store.close();
    const again = await open(first.dir);
    expect(again.res.show('disk')).toEqual(shown);
    expect(again.res.authorize('disk', conn('c'))).toMatch(/may not open/);
    expect(again.res.authorize('disk', conn('b'))).toBeNull();
    expect(again.res.readOnlyFor('disk', conn('b'))).toBe(true);
    // Under EA, b (on the list, not registered) may do nothing at all.
    expect(again.res.access('disk').mask('b') & (READ_COMMANDS | WRITE_COMMANDS)).toBe(0);
    expect((await again.res.audit('disk')).map((e) => e.action)).toEqual(['register', 'reserve']);
    // The audit numbering continues where it was.
    await again.res.apply('disk', { action: 'release', as: 'a', key: 0xan, type: 3 });
    expect((await again.res.audit('disk')).map((e) => e.seq)).toEqual([0, 1, 2]);
  });

  it('an identity off the access list gets an empty mask; "ro" ones lose the write side', async () => {
    const { res } = await open();
    await res.setAcl('disk', [{ identity: 'r', access: 'ro' }]);
    const acc = res.access('disk');
    expect(acc.mask('nobody')).toBe(0);
    expect(acc.mask('r') & WRITE_COMMANDS).toBe(0);
    expect(acc.mask('r') & READ_COMMANDS).toBe(READ_COMMANDS);
    await res.setAcl('disk', null);
    expect(acc.mask('nobody') & WRITE_COMMANDS).toBe(WRITE_COMMANDS);
  });

  it('bad access lists and identities are refused', async () => {
    const { res } = await open();
    await expect(
      res.setAcl('disk', [{ identity: 'a', access: 'rwx' as 'rw' }]),
    ).rejects.toMatchObject({ code: 'BALLAST_BAD_ACL' });
    await expect(
      res.setAcl('disk', [
        { identity: 'a', access: 'rw' },
        { identity: 'a', access: 'ro' },
      ]),
    ).rejects.toMatchObject({ code: 'BALLAST_BAD_ACL' });
    await expect(
      res.apply('disk', { action: 'register', as: 'has space', key: 0n, saKey: 1n }),
    ).rejects.toMatchObject({ code: 'BALLAST_BAD_REQUEST' });
    await expect(res.apply('nosuch', { action: 'clear', as: 'a', key: 0n })).rejects.toMatchObject({
      code: 'BALLAST_DEVICE_NOT_FOUND',
    });
  });

  it('forget drops everything kept about a deleted device', async () => {
    const { res } = await open();
    await res.apply('disk', { action: 'register', as: 'a', key: 0n, saKey: 1n });
    await res.setAcl('disk', [{ identity: 'a', access: 'rw' }]);
    await res.forget('disk');
    expect(res.show('disk')).toMatchObject({ generation: 0, registrations: [] });
    expect(res.acl('disk').entries).toBeNull();
    expect(await res.audit('disk')).toEqual([]);
  });

  it('a re-listed record holds the device to the states its writer knew were not everywhere yet, each until its marker', async () => {
    const { store, res: writer } = await open();
    writer.settle = async () => ({ waitedMs: 0, hosts: [] });
    await writer.apply('disk', { action: 'register', as: 'a', key: 0n, saKey: 0xan });
    await writer.apply('disk', { action: 'reserve', as: 'a', key: 0xan, type: 5 }); // WERO
    // another agent's view, caught up to here; it hears of nothing settling by itself
    const reader = new ReservationManager(
      store,
      () => null,
      (n) => n === 'disk',
      () => {},
    );
    reader.settle = () => new Promise(() => {});
    await reader.load();
    const acc = reader.access('disk');
    const writes = (who: string) => can(acc.mask(who), CMD.WRITE);
    expect([writes('a'), writes('b'), writes('c')]).toEqual([true, false, false]);
    // two changes that not every agent confirmed (the writer is cut off from the rest)
    writer.settle = () => Promise.reject(new Error('cut off'));
    await expect(
      writer.apply('disk', { action: 'register', as: 'b', key: 0n, saKey: 0xbn }),
    ).rejects.toThrow('cut off');
    const k = (await store.range('pr/disk')).kvs[0]!.modRevision;
    await expect(
      writer.apply('disk', { action: 'register', as: 'c', key: 0n, saKey: 0xcn }),
    ).rejects.toThrow('cut off');
    // the reader skipped the first (a re-listing after a compaction) and sees the last
    const last = (await store.range('pr/disk')).kvs[0]!;
    await reader.applyRemote('disk', 'pr', last);
    expect(reader.show('disk')).toMatchObject({ generation: 3 });
    // b's registration is not everywhere yet: an agent without it still refuses b
    expect([writes('a'), writes('b'), writes('c')]).toEqual([true, false, false]);
    // it is now; c's is not (its own marker is still to come)
    await reader.applyRemote('disk', 'settled', { ...last, value: String(k) });
    expect([writes('a'), writes('b'), writes('c')]).toEqual([true, true, false]);
    await reader.applyRemote('disk', 'settled', { ...last, value: String(last.modRevision) });
    expect([writes('a'), writes('b'), writes('c')]).toEqual([true, true, true]);
  });
});
