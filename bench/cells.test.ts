import { mkdtemp, open, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { describe, expect, it } from 'vitest';
import { describeWithTools } from '../test/helpers/tools.js';
import { CELLS, cellsFor, pagedCells } from './cells.js';
import { connectionsCells } from './connections.js';
import { parseFioJson } from './fio.js';
import {
  cellFioArgs,
  dataRuns,
  defaultConnections,
  fileKey,
  pageFile,
  parseMatrixOptions,
  serverOrder,
  writes,
} from './matrix.js';

/** A fio --output-format=json document with one job, as fio writes it (the fields read). */
function fioDoc(read: { bytes: number; iops: number; mean: number; p99: number }, write = read) {
  const dir = (d: typeof read) => ({
    bw_bytes: d.bytes,
    iops: d.iops,
    runtime: 4000,
    clat_ns: { mean: d.mean, percentile: { '99.000000': d.p99 } },
  });
  return `note: both iodepth >= 1 and synchronous I/O engine are selected\n${JSON.stringify({
    'fio version': 'fio-3.33',
    jobs: [{ jobname: 'x', error: 0, usr_cpu: 10, sys_cpu: 5, read: dir(read), write: dir(write) }],
  })}`;
}

describe('the cells suite', () => {
  it("measures exactly the issue's cells, in its order", () => {
    expect(
      CELLS.map((c) => [c.rw, c.bs, c.conns, c.iodepth, c.rwmixread ?? '-', c.file, c.metric]),
    ).toEqual([
      ['randwrite', '4k', 4, 16, '-', 'data', 'iops'],
      ['randwrite', '4k', 8, 8, '-', 'data', 'iops'],
      ['randwrite', '64k', 8, 8, '-', 'data', 'iops'],
      ['randrw', '4k', 8, 8, 50, 'data', 'iops'],
      ['randread', '4k', 4, 16, '-', 'data', 'iops'],
      ['read', '1M', 4, 8, '-', 'data', 'mibps'],
      ['read', '1M', 4, 8, '-', 'sparse', 'mibps'],
      ['read', '1M', 1, 8, '-', 'sparse', 'mibps'],
    ]);
    expect(new Set(CELLS.map((c) => c.id)).size).toBe(CELLS.length);
    expect(CELLS.map((c) => c.label.join(' | '))).toContain('seq-read 1M sparse | 1 x 8');
  });

  it('fio gets numjobs (connections), iodepth per job, the mix and one grouped report', () => {
    const rw = CELLS[3]!;
    const args = cellFioArgs(rw, 'nbd+unix:///?socket=/t/s', 4, 1, '/t/fio.json');
    expect(args).toEqual([
      '--name=rand-rw-4k-50-50-8x8',
      '--ioengine=nbd',
      '--uri=nbd+unix:///?socket=/t/s',
      '--rw=randrw',
      '--rwmixread=50',
      '--bs=4k',
      '--iodepth=8',
      '--numjobs=8',
      '--group_reporting=1',
      '--time_based=1',
      '--runtime=4',
      '--ramp_time=1',
      '--output-format=json',
      '--output=/t/fio.json',
    ]);
    const single = cellFioArgs(CELLS[7]!, 'u', 1, 0, 'o');
    expect(single).toContain('--numjobs=1');
    expect(single).toContain('--iodepth=8');
    expect(single.some((a) => a.startsWith('--rwmixread'))).toBe(false);
  });

  it('options: TLS off, 3 rounds, own results file; connection options refused', () => {
    const o = parseMatrixOptions('cells', []);
    expect(o).toMatchObject({
      rounds: 3,
      runtime: 4,
      ramp: 1,
      tls: [false],
      workers: undefined,
      sizeMiB: 1024,
      out: 'bench-results/cells.json',
      help: false,
    });
    const s = parseMatrixOptions('cells', [
      '--rounds',
      '1',
      '--runtime',
      '1',
      '--ramp',
      '0',
      '--tls',
      'both',
      '--workers',
      '2',
    ]);
    expect(s).toMatchObject({ rounds: 1, runtime: 1, ramp: 0, tls: [false, true], workers: '2' });
    expect(parseMatrixOptions('cells', ['--tls', 'on']).tls).toEqual([true]);
    expect(() => parseMatrixOptions('cells', ['--connections', '4'])).toThrow(/not an option/);
    expect(() => parseMatrixOptions('cells', ['--jobs', 'seq-read'])).toThrow(/not an option/);
    expect(() => parseMatrixOptions('cells', ['--tls', 'yes'])).toThrow(/--tls/);
    expect(() => parseMatrixOptions('cells', ['--tls', 'constructor'])).toThrow(/--tls/);
    expect(() => parseMatrixOptions('cells', ['--rounds', '0'])).toThrow(/--rounds/);
    expect(() => parseMatrixOptions('cells', ['--rounds', '1.5'])).toThrow(/--rounds/);
    expect(() => parseMatrixOptions('cells', ['--runtime', '0'])).toThrow(/--runtime/);
    expect(() => parseMatrixOptions('cells', ['--ramp', 'x'])).toThrow(/--ramp/);
    expect(() => parseMatrixOptions('cells', ['--workers', '0'])).toThrow(/--workers/);
    expect(() => parseMatrixOptions('cells', ['--bogus'])).toThrow();
  });

  it('server order rotates per round', () => {
    expect(serverOrder(1)).toEqual(['ballast', 'ballast-1', 'nbdkit', 'qemu-nbd']);
    expect(serverOrder(2)).toEqual(['ballast-1', 'nbdkit', 'qemu-nbd', 'ballast']);
    expect(serverOrder(5)).toEqual(serverOrder(1));
    const three = ['ballast', 'nbdkit', 'qemu-nbd'] as const;
    expect(serverOrder(3, three)).toEqual(['qemu-nbd', 'ballast', 'nbdkit']);
    expect(serverOrder(4, three)).toEqual(serverOrder(1, three));
  });

  it('the paging cells: swap-in at 1/4/16 connections, swap-out, mixed, per percentage', () => {
    const p = pagedCells(30);
    expect(
      p.map((c) => [c.rw, c.bs, c.conns, c.iodepth, c.rwmixread ?? '-', c.file, c.pagedPct]),
    ).toEqual([
      ['randread', '4k', 1, 32, '-', 'paged', 30],
      ['randread', '4k', 4, 16, '-', 'paged', 30],
      ['randread', '4k', 16, 4, '-', 'paged', 30],
      ['randwrite', '4k', 4, 16, '-', 'paged', 30],
      ['randrw', '4k', 8, 8, 50, 'paged', 30],
    ]);
    // Reads first: only the last two leave the file changed.
    expect(p.map(writes)).toEqual([false, false, false, true, true]);
    expect(p.map((c) => c.label.join(' | '))).toContain('swap-in 4k paged 30% | 4 x 16');
    expect(fileKey(p[0]!)).toBe('paged30');
    expect(fileKey(CELLS[7]!)).toBe('sparse');
    const all = cellsFor(['data', 'sparse', 'paged'], [30, 80]);
    expect(all.length).toBe(CELLS.length + 10);
    expect(new Set(all.map((c) => c.id)).size).toBe(all.length);
    expect(new Set(all.map(fileKey)).size).toBe(2 + 2 * 3);
    // The reads share a session; each cell that writes starts from a copy of its own.
    expect(cellsFor(['paged'], [80]).map(fileKey)).toEqual([
      'paged80',
      'paged80',
      'paged80',
      'paged80-swap-out-4k-paged-80-4x16',
      'paged80-mixed-4k-50-50-paged-80-8x8',
    ]);
  });

  it('options: servers, file states and paged percentages', () => {
    const o = parseMatrixOptions('cells', []);
    expect(o).toMatchObject({
      servers: ['ballast', 'ballast-1', 'nbdkit', 'qemu-nbd'],
      files: ['data', 'sparse', 'paged'],
      paged: [30, 80],
    });
    const s = parseMatrixOptions('cells', [
      '--servers',
      'qemu-nbd,nbdkit,ballast',
      '--files',
      'paged',
      '--paged',
      '50',
    ]);
    expect(s).toMatchObject({
      servers: ['ballast', 'nbdkit', 'qemu-nbd'],
      files: ['paged'],
      paged: [50],
    });
    expect(() => parseMatrixOptions('cells', ['--servers', 'ballast'])).toThrow(/nbdkit/);
    expect(() => parseMatrixOptions('cells', ['--servers', 'nbd'])).toThrow(/unknown nbd/);
    expect(() => parseMatrixOptions('cells', ['--files', 'full'])).toThrow(/unknown full/);
    expect(() => parseMatrixOptions('cells', ['--paged', '100'])).toThrow(/--paged/);
    expect(() => parseMatrixOptions('cells', ['--paged', '0'])).toThrow(/--paged/);
    expect(parseMatrixOptions('connections', []).files).toEqual(['data']);
    expect(() => parseMatrixOptions('connections', ['--files', 'sparse'])).toThrow(/sparse/);
  });
});

describe('the connections suite on the same matrix', () => {
  it('keeps its defaults and per-connection depths', () => {
    const o = parseMatrixOptions('connections', []);
    expect(o).toMatchObject({
      tls: [false, true],
      connections: defaultConnections(),
      jobs: ['seq-read', 'seq-write', 'rand-read', 'rand-write'],
      out: 'bench-results/connections.json',
    });
    const cells = connectionsCells(['rand-read', 'seq-write'], [1, 4, 16]);
    expect(cells.map((c) => [c.id, c.conns, c.iodepth, c.file])).toEqual([
      ['rand-read', 1, 32, 'data'],
      ['rand-read', 4, 8, 'data'],
      ['rand-read', 16, 4, 'data'],
      ['seq-write', 1, 8, 'data'],
      ['seq-write', 4, 4, 'data'],
      ['seq-write', 16, 4, 'data'],
    ]);
    expect(cells[1]!.key).toEqual({ job: 'rand-read', conns: 4 });
    // Paged files: reads before writes, each job at each count, labelled with the state.
    const paged = connectionsCells(['rand-write', 'rand-read'], [1, 4], ['data', 'paged'], [30]);
    expect(paged.map((c) => [c.label[0], c.conns, c.file, c.pagedPct])).toEqual([
      ['rand-write', 1, 'data', undefined],
      ['rand-write', 4, 'data', undefined],
      ['rand-read', 1, 'data', undefined],
      ['rand-read', 4, 'data', undefined],
      ['rand-read paged 30%', 1, 'paged', 30],
      ['rand-read paged 30%', 4, 'paged', 30],
      ['rand-write paged 30%', 1, 'paged', 30],
      ['rand-write paged 30%', 4, 'paged', 30],
    ]);
    expect(paged[4]!.key).toEqual({ job: 'rand-read', conns: 1, file: 'paged', pagedPct: 30 });
    expect(() => parseMatrixOptions('connections', ['--jobs', 'nope'])).toThrow(/unknown nope/);
    expect(() => parseMatrixOptions('connections', ['--connections', '1,,4'])).toThrow();
  });
});

describe('fio JSON', () => {
  const r = { bytes: 40 * 2 ** 20, iops: 10_240, mean: 100_000, p99: 300_000 };
  const w = { bytes: 20 * 2 ** 20, iops: 5_120, mean: 400_000, p99: 900_000 };

  it('randrw counts reads and writes', () => {
    const res = parseFioJson(fioDoc(r, w), 'randrw');
    expect(res.ok).toBe(true);
    expect(res.iops).toBe(15_360);
    expect(res.mibps).toBe(60);
    // IOPS-weighted: (100 us * 2 + 400 us * 1) / 3.
    expect(res.clatMeanUs).toBeCloseTo(200, 9);
    expect(res.clatP99Us).toBe(900);
    expect(res.clientCpuPct).toBe(15);
  });

  it('one-way jobs read their own direction only', () => {
    expect(parseFioJson(fioDoc(r, w), 'randread')).toMatchObject({
      iops: 10_240,
      mibps: 40,
      clatMeanUs: 100,
      clatP99Us: 300,
      runtimeS: 4,
    });
    expect(parseFioJson(fioDoc(r, w), 'write')).toMatchObject({ iops: 5_120, mibps: 20 });
    const none = parseFioJson(fioDoc(r, { bytes: 0, iops: 0, mean: 0, p99: 0 }), 'randwrite');
    expect(none).toMatchObject({ ok: false, error: 'no I/O completed' });
  });
});

describe('defaultConnections', () => {
  it('is 1, the cores, 4 and 16, each once, in order', () => {
    expect(defaultConnections(2)).toEqual([1, 2, 4, 16]);
    expect(defaultConnections(1)).toEqual([1, 4, 16]);
    expect(defaultConnections(4)).toEqual([1, 4, 16]);
    expect(defaultConnections(64)).toEqual([1, 4, 16, 64]);
  });
});

describeWithTools(['fio'], 'the paged file state', () => {
  it('pageFile writes the same share of pages in the same layout every time, in place', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'ballast-paged-bench-'));
    try {
      const file = join(dir, 'p.img');
      await writeFile(file, '');
      await truncate(file, 16 * 2 ** 20);
      await pageFile(file, 16, 30);
      const first = await readFile(file);
      const runs = dataRuns(file);
      // 4096 pages, 30% written at random: about 4096 * 0.3 * 0.7 runs.
      expect(runs).toBeGreaterThan(500);
      expect(runs).toBeLessThan(1300);
      let written = 0;
      for (let p = 0; p < 4096; p++)
        if (first.subarray(p * 4096, (p + 1) * 4096).some((b) => b !== 0)) written++;
      expect(written).toBe(Math.round(4096 * 0.3));
      // Written over (as a swap-out cell does), then paged again: the same file.
      const fd = await open(file, 'r+');
      await fd.write(Buffer.alloc(2 ** 20, 0x77), 0, 2 ** 20, 3 * 2 ** 20);
      await fd.close();
      await pageFile(file, 16, 30);
      expect((await readFile(file)).equals(first)).toBe(true);
      expect(dataRuns(file)).toBe(runs);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
