import { mkdtempSync, rmSync, statSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openMemoryStore } from '../../test/helpers/memory-store.js';
import { SqliteStore } from './sqlite-store.js';
import { cmp, isStoreError, op, type Store, type WatchEvent } from './store.js';

const dirs: string[] = [];
const stores: Store[] = [];

afterEach(async () => {
  for (const s of stores.splice(0)) await s.close();
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

function tmpFile(): string {
  const d = mkdtempSync(path.join(os.tmpdir(), 'ballast-store-'));
  dirs.push(d);
  return path.join(d, 'state.db');
}

async function mem(): Promise<Store> {
  const s = await openMemoryStore();
  stores.push(s);
  return s;
}

async function rejectsWith(p: Promise<unknown>, code: string): Promise<void> {
  try {
    await p;
  } catch (e) {
    expect(isStoreError(e) ? e.code : e).toBe(code);
    return;
  }
  throw new Error(`expected ${code}`);
}

describe('SqliteStore', () => {
  it('counts revisions as etcd does: one per changing transaction, none for reads or no-ops', async () => {
    const s = await mem();
    expect(await s.revision()).toBe(1);
    const a = await s.put('a', '1');
    expect(a.revision).toBe(2);
    await s.get('a');
    await s.delete('missing');
    expect(await s.revision()).toBe(2);
    const t = await s.txn({ compare: [], success: [op.put('b', '1'), op.put('c', '1')] });
    expect(t.revision).toBe(3);
    const kv = await s.get('a');
    expect(kv).toMatchObject({ value: '1', createRevision: 2, modRevision: 2, version: 1 });
    await s.put('a', '2');
    expect(await s.get('a')).toMatchObject({ createRevision: 2, modRevision: 4, version: 2 });
  });

  it('compare-and-swap: createIfAbsent, updateIf and deleteIf fail on a stale view', async () => {
    const s = await mem();
    const c = await s.createIfAbsent('dev/x', 'v1');
    expect(c.succeeded).toBe(true);
    expect((await s.createIfAbsent('dev/x', 'other')).succeeded).toBe(false);
    const rev = c.kv!.modRevision;
    expect((await s.updateIf('dev/x', 'v2', rev)).succeeded).toBe(true);
    const stale = await s.updateIf('dev/x', 'v3', rev);
    expect(stale.succeeded).toBe(false);
    expect(stale.kv?.value).toBe('v2');
    expect((await s.deleteIf('dev/x', rev)).succeeded).toBe(false);
    const cur = (await s.get('dev/x'))!.modRevision;
    expect((await s.deleteIf('dev/x', cur)).succeeded).toBe(true);
    expect(await s.get('dev/x')).toBeUndefined();
  });

  it('a txn runs its failure branch when a compare fails, atomically', async () => {
    const s = await mem();
    await s.put('k', 'a');
    const r = await s.txn({
      compare: [cmp.value('k', '=', 'b')],
      success: [op.put('k', 'c')],
      failure: [op.get('k'), op.put('miss', '1')],
    });
    expect(r.succeeded).toBe(false);
    expect(r.responses[0]).toMatchObject({ type: 'get', kv: { value: 'a' } });
    expect((await s.get('miss'))?.value).toBe('1');
    await rejectsWith(
      s.txn({ compare: [], success: [op.put('d', '1'), op.put('d', '2')] }),
      'STORE_INVALID_ARGUMENT',
    );
  });

  it('watch from a revision replays history, then delivers live events, none twice', async () => {
    const s = await mem();
    await s.put('devices/a', '1'); // rev 2
    await s.put('other', 'x'); // rev 3
    await s.put('devices/b', '1'); // rev 4
    const seen: WatchEvent[] = [];
    const w = await s.watch('devices/', { fromRevision: 2, onEvent: (e) => seen.push(e) });
    await s.delete('devices/a'); // rev 5
    await new Promise((r) => setTimeout(r, 10));
    await w.cancel();
    await s.put('devices/c', '1');
    await new Promise((r) => setTimeout(r, 10));
    expect(seen.map((e) => [e.type, e.kv.key, e.revision])).toEqual([
      ['put', 'devices/a', 2],
      ['put', 'devices/b', 4],
      ['delete', 'devices/a', 5],
    ]);
    expect(seen[2]!.prevKv?.value).toBe('1');
  });

  it('refuses a watch below the compaction point', async () => {
    const s = await mem();
    for (let i = 0; i < 5; i++) await s.put('k', String(i));
    await s.compact(4);
    await rejectsWith(s.watch('', { fromRevision: 2, onEvent: () => {} }), 'STORE_COMPACTED');
  });

  it('leases: revoking one deletes its keys in one revision', async () => {
    const s = await mem();
    const l = await s.grantLease(60);
    await s.put('a', '1', { lease: l });
    await s.put('b', '1', { lease: l });
    const before = await s.revision();
    await s.revokeLease(l);
    expect(await s.revision()).toBe(before + 1);
    expect((await s.range('')).kvs).toEqual([]);
    await rejectsWith(s.keepAlive(l), 'STORE_LEASE_NOT_FOUND');
  });

  it('is durable across close and reopen, private (0600), and held by one opener', async () => {
    const file = tmpFile();
    const s = await SqliteStore.open(file);
    await s.put('devices/x', '{"size":1}');
    await s.put('devices/y', '{"size":2}');
    expect(statSync(file).mode & 0o777).toBe(0o600);
    await rejectsWith(SqliteStore.open(file), 'STORE_LOCKED');
    await s.close();
    const again = await SqliteStore.open(file);
    stores.push(again);
    expect(await again.revision()).toBe(3);
    expect((await again.range('devices/')).kvs.map((k) => k.key)).toEqual([
      'devices/x',
      'devices/y',
    ]);
    await rejectsWith(s.get('devices/x'), 'STORE_CLOSED');
  });

  it('refuses a file that is not a Ballast store', async () => {
    const file = tmpFile();
    const Database = (await import('better-sqlite3')).default;
    const db = new Database(file);
    db.exec('CREATE TABLE t (x)');
    db.close();
    await rejectsWith(SqliteStore.open(file), 'STORE_SCHEMA');
  });
});
