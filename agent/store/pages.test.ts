import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { decodeToken, encodeToken, pageLimit, readAll, readPage } from './pages.js';
import { SqliteStore } from './sqlite-store.js';

const dirs: string[] = [];
afterEach(() => {
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function store(keys: string[]): Promise<SqliteStore> {
  const d = mkdtempSync(path.join(os.tmpdir(), 'ballast-pages-'));
  dirs.push(d);
  const s = await SqliteStore.open(path.join(d, 'state.db'));
  for (const k of keys) await s.put(k, k);
  return s;
}

const codeOf = (f: () => unknown) => {
  try {
    f();
  } catch (e) {
    return (e as { code?: string }).code;
  }
  return undefined;
};

describe('listings in pages', () => {
  it('gives out tokens it takes back, and refuses anything else', () => {
    const t = encodeToken(42, 'devices/b\0');
    expect(decodeToken(t, 'devices/')).toEqual({ r: 42, k: 'devices/b\0' });
    expect(codeOf(() => decodeToken(t, 'hosts/'))).toBe('BALLAST_BAD_REQUEST');
    for (const bad of ['', 'garbage', encodeToken(0, 'devices/a'), 'eyJyIjoxfQ']) {
      expect(
        codeOf(() => decodeToken(bad, 'devices/')),
        bad,
      ).toBe('BALLAST_BAD_REQUEST');
    }
  });

  it('takes a page size of 1 to 10000', () => {
    expect(pageLimit('1')).toBe(1);
    expect(pageLimit(10_000)).toBe(10_000);
    for (const bad of ['0', '10001', '-1', '1.5', 'x', '', 0, null]) {
      expect(
        codeOf(() => pageLimit(bad)),
        String(bad),
      ).toBe('BALLAST_BAD_REQUEST');
    }
  });

  it('reads every key once, at the first page revision, whatever changes between pages', async () => {
    const s = await store(['d/a', 'd/b', 'd/c', 'd/d', 'd/e', 'e/x']);
    const first = await readPage(s, 'd/', 2);
    expect(first.kvs.map((k) => k.key)).toEqual(['d/a', 'd/b']);
    await s.put('d/bb', 'new');
    await s.delete('d/c');
    const keys = first.kvs.map((k) => k.key);
    for (let p = first; p.continue !== undefined; ) {
      p = await readPage(s, 'd/', 2, p.continue);
      expect(p.revision).toBe(first.revision);
      keys.push(...p.kvs.map((k) => k.key));
    }
    expect(keys).toEqual(['d/a', 'd/b', 'd/c', 'd/d', 'd/e']);
    expect((await readAll(s, 'd/')).kvs.map((k) => k.key)).toEqual([
      'd/a',
      'd/b',
      'd/bb',
      'd/d',
      'd/e',
    ]);
    const last = await readPage(s, 'd/', 10);
    expect(last.continue).toBeUndefined();
  });

  it('refuses a page whose revision was compacted: list again', async () => {
    const s = await store(['d/a', 'd/b', 'd/c']);
    const first = await readPage(s, 'd/', 1);
    await s.put('d/a', 'changed');
    await s.compact(await s.revision());
    await expect(readPage(s, 'd/', 1, first.continue)).rejects.toMatchObject({
      code: 'BALLAST_LIST_EXPIRED',
    });
  });
});
