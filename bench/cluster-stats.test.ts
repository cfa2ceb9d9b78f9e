import { describe, expect, it } from 'vitest';
import { parseClusterOptions, splitSuite } from './cluster-options.js';
import {
  fmtMs,
  histogramDelta,
  histogramSums,
  markdownTable,
  median,
  metricSum,
  percentile,
  percentiles,
} from './cluster-stats.js';
import { parseScaleOptions } from './scale-options.js';

describe('percentiles (nearest rank)', () => {
  const xs = Array.from({ length: 100 }, (_, i) => 100 - i); // 100..1, unsorted

  it('returns measured samples, never interpolations', () => {
    expect(percentile(xs, 50)).toBe(50);
    expect(percentile(xs, 99)).toBe(99);
    expect(percentile(xs, 100)).toBe(100);
    expect(percentile(xs, 0)).toBe(1);
    expect(percentile([3, 1, 2], 50)).toBe(2);
    expect(percentile([1, 2], 99)).toBe(2);
    expect(percentiles([5])).toEqual({ n: 1, p50: 5, p90: 5, p99: 5, max: 5 });
  });

  it('NaN for no samples; out-of-range percentiles refused', () => {
    expect(percentile([], 50)).toBeNaN();
    expect(() => percentile(xs, 101)).toThrow(RangeError);
  });

  it('median of an even count is the mean of the middle two; NaN ignored', () => {
    expect(median([4, 1, 3, 2])).toBe(2.5);
    expect(median([Number.NaN, 7])).toBe(7);
    expect(median([])).toBeNaN();
  });

  it('formats milliseconds by size', () => {
    expect(fmtMs(0.4234)).toBe('0.42');
    expect(fmtMs(4.26)).toBe('4.3');
    expect(fmtMs(42.6)).toBe('43');
    expect(fmtMs(Number.NaN)).toBe('-');
  });
});

describe('markdown tables', () => {
  it('aligns columns, text left and figures right', () => {
    expect(
      markdownTable(
        ['op', 'ms'],
        [
          ['create', '12'],
          ['ls', '3.5'],
        ],
      ),
    ).toBe(
      ['| op     |  ms |', '| ------ | --: |', '| create |  12 |', '| ls     | 3.5 |'].join('\n'),
    );
  });
});

describe('cluster bench options', () => {
  it('--suite is split off; nbd is the default; unknown suites refused', () => {
    expect(splitSuite(['--rounds', '1'])).toEqual({ suite: 'nbd', rest: ['--rounds', '1'] });
    expect(splitSuite(['--suite', 'cluster', '--ops', '5'])).toEqual({
      suite: 'cluster',
      rest: ['--ops', '5'],
    });
    expect(splitSuite(['--suite=cluster'])).toEqual({ suite: 'cluster', rest: [] });
    expect(splitSuite(['--suite', 'events'])).toEqual({ suite: 'events', rest: [] });
    expect(splitSuite(['--suite=cells', '--rounds', '1'])).toEqual({
      suite: 'cells',
      rest: ['--rounds', '1'],
    });
    expect(() => splitSuite(['--suite', 'disk'])).toThrow(/unknown 'disk'/);
    expect(() => splitSuite(['--suite'])).toThrow(
      /expected nbd, cluster, events, connections, cells or scale/,
    );
  });

  it('defaults and lists', () => {
    const d = parseClusterOptions([]);
    expect(d.parts).toHaveLength(6);
    expect(d.ttls).toEqual([2, 5, 10]);
    expect(d.devices).toBe(2000);
    const o = parseClusterOptions(['--parts', 'pr,catalog', '--ttls', '5', '--ops', '10']);
    expect(o.parts).toEqual(['catalog', 'pr']);
    expect(o.ttls).toEqual([5]);
    expect(o.ops).toBe(10);
  });

  it('bad values refused', () => {
    expect(() => parseClusterOptions(['--parts', 'x'])).toThrow(/unknown 'x'/);
    expect(() => parseClusterOptions(['--ttls', '1'])).toThrow(/2 to 300/);
    expect(() => parseClusterOptions(['--ops', '0'])).toThrow(/>= 1/);
    expect(() => parseClusterOptions(['--nope'])).toThrow();
  });
});

describe('Prometheus histogram sums', () => {
  const before = [
    '# HELP ballast_store_round_trip_seconds Round trips',
    'ballast_store_round_trip_seconds_bucket{le="0.001",op="txn"} 1',
    'ballast_store_round_trip_seconds_sum{op="txn"} 0.5',
    'ballast_store_round_trip_seconds_count{op="txn"} 10',
    'etcd_disk_wal_fsync_duration_seconds_sum 2',
    'etcd_disk_wal_fsync_duration_seconds_count 100',
  ].join('\n');
  const after = before
    .replace('_sum{op="txn"} 0.5', '_sum{op="txn"} 0.9')
    .replace('_count{op="txn"} 10', '_count{op="txn"} 20')
    .concat('\nballast_store_round_trip_seconds_sum{op="get"} 0.01')
    .concat('\nballast_store_round_trip_seconds_count{op="get"} 2');

  it('reads _sum and _count by label set; deltas skip labels that did not move', () => {
    const b = histogramSums(before, 'ballast_store_round_trip_seconds');
    expect(b.get('op="txn"')).toEqual({ count: 10, sum: 0.5 });
    expect(histogramSums(before, 'etcd_disk_wal_fsync_duration_seconds').get('')).toEqual({
      count: 100,
      sum: 2,
    });
    const d = histogramDelta(b, histogramSums(after, 'ballast_store_round_trip_seconds'));
    expect([...d.keys()]).toEqual(['op="txn"', 'op="get"']);
    expect(d.get('op="txn"')?.count).toBe(10);
    expect(d.get('op="txn"')?.sum).toBeCloseTo(0.4);
    expect(d.get('op="get"')).toEqual({ count: 2, sum: 0.01 });
  });
});

describe('Prometheus counters', () => {
  it('sums every series of a metric, whatever its labels; 0 when absent', () => {
    const text = [
      '# TYPE grpc_server_msg_received_total counter',
      'grpc_server_msg_received_total{grpc_method="Range"} 12',
      'grpc_server_msg_received_total{grpc_method="Txn"} 3',
      'grpc_server_msg_received_totally 100',
      'etcd_mvcc_put_total 7',
    ].join('\n');
    expect(metricSum(text, 'grpc_server_msg_received_total')).toBe(15);
    expect(metricSum(text, 'etcd_mvcc_put_total')).toBe(7);
    expect(metricSum(text, 'etcd_mvcc_delete_total')).toBe(0);
  });
});

describe('scale bench options', () => {
  it('defaults, --quick, and lists sorted without repeats', () => {
    const d = parseScaleOptions([]);
    expect([d.members, d.devices, d.ops, d.ttl, d.churn, d.serve]).toEqual([
      [0, 10, 100, 1000],
      [1000, 10000, 100000],
      100,
      5,
      100,
      100,
    ]);
    expect(d.parts).toEqual(['latency', 'join', 'churn', 'failover']);
    const q = parseScaleOptions(['--quick', '--ops', '7']);
    expect([q.members, q.devices, q.ops, q.churn, q.serve]).toEqual([[0, 10], [500], 7, 10, 20]);
    const o = parseScaleOptions(['--members', '100,10,10', '--parts', 'churn,latency']);
    expect(o.members).toEqual([10, 100]);
    expect(o.parts).toEqual(['latency', 'churn']);
  });

  it('bad values refused', () => {
    expect(() => parseScaleOptions(['--members', '2'])).toThrow(/0 or at least 4/);
    expect(() => parseScaleOptions(['--devices', '0'])).toThrow(/>= 1/);
    expect(() => parseScaleOptions(['--ttl', '1'])).toThrow(/>= 2/);
    expect(() => parseScaleOptions(['--parts', 'x'])).toThrow(/unknown 'x'/);
  });
});
