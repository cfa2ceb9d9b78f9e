import {
  closeSync,
  existsSync,
  mkdtempSync,
  openSync,
  readdirSync,
  readFileSync,
  readlinkSync,
  rmSync,
  statSync,
  truncateSync,
  writeSync,
} from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { openMemoryStore } from '../test/helpers/memory-store.js';
import { DynamicCatalog } from './catalog.js';
import { cacheFor, DeviceManager, type DeviceRecord, validateName } from './devices.js';
import { BallastError } from './errors.js';
import { Pool } from './pools.js';

const MiB = 1024 * 1024;
const cleanup: (() => Promise<void> | void)[] = [];

afterEach(async () => {
  for (const f of cleanup.splice(0).reverse()) await f();
});

async function setup(pools: { name: string; quota: number; overcommit?: number }[]) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-dev-'));
  cleanup.push(() => rmSync(dir, { recursive: true, force: true }));
  const store = await openMemoryStore();
  cleanup.push(() => store.close());
  const map = new Map<string, Pool>();
  for (const p of pools) {
    map.set(
      p.name,
      await Pool.open({
        name: p.name,
        path: path.join(dir, p.name),
        media: 'ssd',
        quota: p.quota,
        overcommit: p.overcommit ?? 1,
      }),
    );
  }
  const catalog = new DynamicCatalog();
  const logs: string[] = [];
  const make = () =>
    new DeviceManager(
      store,
      map,
      catalog,
      () => null,
      (m) => logs.push(m),
    );
  const devices = make();
  cleanup.push(() => devices.close());
  return { dir, store, pools: map, catalog, devices, logs, make };
}

async function code(p: Promise<unknown>): Promise<string> {
  try {
    await p;
  } catch (e) {
    expect(e).toBeInstanceOf(BallastError);
    return (e as BallastError).code;
  }
  throw new Error('expected an error');
}

describe('device names', () => {
  it('accept what a file name may safely carry, nothing else', () => {
    for (const ok of ['swap-vm1', 'a', '0', 'vm.dump_2', 'x'.repeat(63)]) {
      expect(validateName(ok)).toBe(ok);
    }
    for (const bad of [
      '',
      '..',
      '../x',
      'a/b',
      '.x',
      '-x',
      'A',
      'a b',
      'x'.repeat(64),
      'a..b',
      7,
    ]) {
      expect(() => validateName(bad)).toThrow(/BALLAST_BAD_NAME|bad device name/);
    }
  });
});

describe('DeviceManager', () => {
  it('creates a sparse extent, exports it, and counts it against the pool', async () => {
    const t = await setup([{ name: 'p', quota: 64 * MiB }]);
    const v = await t.devices.create({ name: 'd', size: 8 * MiB, role: 'paging', guest: 'vm1' });
    expect(v).toMatchObject({
      name: 'd',
      size: 8 * MiB,
      role: 'paging',
      guest: 'vm1',
      state: 'ready',
    });
    const file = v.extents[0]!.file;
    expect(statSync(file).size).toBe(8 * MiB);
    expect(statSync(file).blocks).toBe(0);
    expect(t.catalog.lookup('d')?.backend.size).toBe(8 * MiB);
    expect(t.devices.usage().get('p')).toEqual({ provisioned: 8 * MiB, allocated: 0 });
    const rec = JSON.parse((await t.store.get('devices/d'))!.value) as DeviceRecord;
    expect(rec.state).toBe('ready');
  });

  it('serves dump devices past the page cache (O_DIRECT), others through it', async () => {
    const t = await setup([{ name: 'p', quota: 64 * MiB }]);
    const dump = await t.devices.create({ name: 'k', size: 8 * MiB, role: 'dump', guest: 'vm1' });
    const swap = await t.devices.create({ name: 's', size: 8 * MiB, role: 'paging' });
    expect(cacheFor('dump')).toBe('none');
    expect(cacheFor('paging')).toBe('writeback');
    // The open descriptors of a file, with their flags (octal in fdinfo).
    const O_DIRECT = 0o40000;
    const flagsOf = (file: string) =>
      readdirSync('/proc/self/fd')
        .filter((fd) => {
          try {
            return readlinkSync(`/proc/self/fd/${fd}`) === file;
          } catch {
            return false;
          }
        })
        .map((fd) => {
          const m = /flags:\s+([0-7]+)/.exec(readFileSync(`/proc/self/fdinfo/${fd}`, 'utf8'));
          return Number.parseInt(m?.[1] ?? '0', 8);
        });
    const dumpFlags = flagsOf(dump.extents[0]!.file);
    const swapFlags = flagsOf(swap.extents[0]!.file);
    expect(dumpFlags.some((f) => (f & O_DIRECT) !== 0)).toBe(true);
    expect(swapFlags.length).toBeGreaterThan(0);
    expect(swapFlags.every((f) => (f & O_DIRECT) === 0)).toBe(true);
  });

  it('refuses what breaks the overcommit limit, and places in the pool with most room', async () => {
    const t = await setup([
      { name: 'small', quota: 16 * MiB, overcommit: 2 },
      { name: 'big', quota: 64 * MiB },
    ]);
    await t.devices.create({ name: 'a', size: 32 * MiB, pool: 'small' });
    expect(await code(t.devices.create({ name: 'b', size: 512, pool: 'small' }))).toBe(
      'BALLAST_POOL_FULL',
    );
    expect((await t.devices.create({ name: 'c', size: 8 * MiB })).extents[0]!.pool).toBe('big');
    expect(await code(t.devices.create({ name: 'd', size: 64 * MiB }))).toBe('BALLAST_POOL_FULL');
    expect(await code(t.devices.create({ name: 'e', size: 512, pool: 'nope' }))).toBe(
      'BALLAST_POOL_NOT_FOUND',
    );
    // ...and the refusal names the pools there are, so the user can pick one.
    await expect(t.devices.create({ name: 'e', size: 512, pool: 'nope' })).rejects.toThrow(
      /no pool named "nope"; this agent has small, big \(pools are declared in the agent's config file/,
    );
    expect(await code(t.devices.create({ name: 'a', size: 512 }))).toBe('BALLAST_DEVICE_EXISTS');
    expect(await code(t.devices.create({ name: 'f', size: 0 }))).toBe('BALLAST_BAD_SIZE');
    expect(await code(t.devices.create({ name: 'f', size: 512, role: 'swap' as never }))).toBe(
      'BALLAST_BAD_ROLE',
    );
    // Nothing of the refused creates is left: no records, no files.
    expect((await t.store.range('devices/')).kvs.map((k) => k.key)).toEqual([
      'devices/a',
      'devices/c',
    ]);
    expect(readdirSync(path.join(t.dir, 'small'))).toHaveLength(1);
  });

  it('extends across pools, and a forced shrink drops whole extents', async () => {
    const t = await setup([
      { name: 'p', quota: 64 * MiB },
      { name: 'q', quota: 64 * MiB },
    ]);
    await t.devices.create({ name: 'd', size: 4 * MiB, pool: 'p' });
    const e = await t.devices.extend('d', 'q', 4 * MiB);
    expect(e.extents.map((x) => [x.pool, x.size])).toEqual([
      ['p', 4 * MiB],
      ['q', 4 * MiB],
    ]);
    expect(t.catalog.lookup('d')?.backend.size).toBe(8 * MiB);
    const grown = await t.devices.resize('d', 10 * MiB);
    expect(grown.extents.map((x) => x.size)).toEqual([4 * MiB, 6 * MiB]);
    expect(await code(t.devices.resize('d', 2 * MiB))).toBe('BALLAST_SHRINK_REFUSED');
    const dropped = e.extents[1]!.file;
    const shrunk = await t.devices.resize('d', 2 * MiB, true);
    expect(shrunk.extents).toEqual([{ pool: 'p', file: e.extents[0]!.file, size: 2 * MiB }]);
    expect(existsSync(dropped)).toBe(false);
    expect(t.catalog.lookup('d')?.backend.size).toBe(2 * MiB);
    // A size that is not whole sectors is refused, saying which size would do; nothing changes.
    await expect(t.devices.resize('d', 2 * MiB + 1)).rejects.toThrow(
      /bad size 2097153: a device is a whole number of 512-byte sectors .*use 2097664/,
    );
    await expect(t.devices.extend('d', 'q', 1)).rejects.toThrow(/bad growth \+1: .*use \+512/);
    expect(await code(t.devices.create({ name: 'odd', size: 1000 }))).toBe('BALLAST_BAD_SIZE');
    expect(t.catalog.lookup('d')?.backend.size).toBe(2 * MiB);
  });

  it('a grow never shortens the file: a larger file (grown further elsewhere) keeps its bytes', async () => {
    const t = await setup([{ name: 'p', quota: 64 * MiB }]);
    const d = await t.devices.create({ name: 'g', size: 1 * MiB, pool: 'p' });
    const file = d.extents[0]!.file;
    // As another agent's later grow of a shared file leaves it, with data written there.
    truncateSync(file, 3 * MiB);
    const fd = openSync(file, 'r+');
    writeSync(fd, Buffer.from('LATER-GROW'), 0, 10, 2.5 * MiB);
    closeSync(fd);
    const grown = await t.devices.resize('g', 2 * MiB);
    expect(grown.size).toBe(2 * MiB);
    expect(t.catalog.lookup('g')?.backend.size).toBe(2 * MiB);
    expect(statSync(file).size).toBe(3 * MiB);
    expect(
      readFileSync(file)
        .subarray(2.5 * MiB, 2.5 * MiB + 10)
        .toString(),
    ).toBe('LATER-GROW');
  });

  it('removing a broken device removes only the record found broken, never one made since', async () => {
    const t = await setup([{ name: 'p', quota: 64 * MiB }]);
    const x = await t.devices.create({ name: 'x', size: MiB });
    const y = await t.devices.create({ name: 'y', size: MiB });
    await t.devices.close();
    rmSync(x.extents[0]!.file);
    rmSync(y.extents[0]!.file);
    const again = t.make();
    cleanup.push(() => again.close());
    await again.reconcile();
    expect(again.problems.map((p) => p.message).join('\n')).toMatch(/\bx\b[\s\S]*\by\b/);
    // x deleted and made again meanwhile (as through another agent): a new record.
    const old = JSON.parse((await t.store.get('devices/x'))!.value) as DeviceRecord;
    const remade = {
      ...old,
      createdAt: new Date(Date.now() + 1000).toISOString(),
      extents: [{ ...old.extents[0]!, file: path.join(t.dir, 'p', 'x.1.img') }],
    };
    await t.store.put('devices/x', JSON.stringify(remade));
    expect(await code(again.remove('x'))).toBe('BALLAST_CONFLICT');
    expect(JSON.parse((await t.store.get('devices/x'))!.value)).toEqual(remade);
    // y is as it was found: its record goes.
    await again.remove('y');
    expect(await t.store.get('devices/y')).toBeUndefined();
  });

  it('reconciles at start: rolls back a create in flight, finishes a delete, reports the rest', async () => {
    const t = await setup([{ name: 'p', quota: 64 * MiB }]);
    await t.devices.create({ name: 'keep', size: MiB });
    const gone = await t.devices.create({ name: 'gone', size: MiB });
    await t.devices.close();
    // A create that died after its intent (its file may or may not exist) and
    // a delete that died after its intent.
    const now = new Date().toISOString();
    const creating: DeviceRecord = {
      name: 'half',
      size: MiB,
      role: 'data',
      guest: null,
      extents: [{ pool: 'p', file: path.join(t.dir, 'p', 'half.0.img'), size: MiB }],
      state: 'creating',
      createdAt: now,
      updatedAt: now,
    };
    await t.store.put('devices/half', JSON.stringify(creating));
    const goneRec = JSON.parse((await t.store.get('devices/gone'))!.value) as DeviceRecord;
    await t.store.put('devices/gone', JSON.stringify({ ...goneRec, state: 'deleting' }));
    // A file nobody owns.
    const stray = path.join(t.dir, 'p', 'stray.img');
    (await import('node:fs')).writeFileSync(stray, '');

    const again = t.make();
    cleanup.push(() => again.close());
    await again.reconcile();
    expect(again.list().map((d) => d.name)).toEqual(['keep']);
    expect(again.recovered.sort()).toEqual([
      'device gone: interrupted delete finished',
      'device half: interrupted create rolled back',
    ]);
    expect(existsSync(gone.extents[0]!.file)).toBe(false);
    expect(again.problems).toEqual([expect.objectContaining({ kind: 'orphan-file', path: stray })]);
    expect(existsSync(stray)).toBe(true);
    expect(await t.store.get('devices/half')).toBeUndefined();
  });
});
