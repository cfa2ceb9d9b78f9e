// Pure helpers of the cluster benchmarks: percentiles of latency samples and
// Markdown tables (the tables go into BENCHMARKING.md as printed).

export interface Percentiles {
  n: number;
  p50: number;
  p90: number;
  p99: number;
  max: number;
}

/**
 * The nearest-rank percentile (the smallest sample with at least p % of the
 * samples at or below it): always a value that was measured, never an
 * interpolation. NaN for no samples.
 */
export function percentile(samples: readonly number[], p: number): number {
  if (samples.length === 0) return Number.NaN;
  if (p < 0 || p > 100) throw new RangeError(`percentile ${p} is outside 0-100`);
  const sorted = [...samples].sort((a, b) => a - b);
  const rank = Math.max(1, Math.ceil((p / 100) * sorted.length));
  return sorted[rank - 1]!;
}

export function percentiles(samples: readonly number[]): Percentiles {
  return {
    n: samples.length,
    p50: percentile(samples, 50),
    p90: percentile(samples, 90),
    p99: percentile(samples, 99),
    max: percentile(samples, 100),
  };
}

/** The median (mean of the two middle samples for an even count); NaN for none. */
export function median(samples: readonly number[]): number {
  const xs = samples.filter((x) => Number.isFinite(x)).sort((a, b) => a - b);
  if (xs.length === 0) return Number.NaN;
  const mid = Math.floor(xs.length / 2);
  return xs.length % 2 === 1 ? xs[mid]! : (xs[mid - 1]! + xs[mid]!) / 2;
}

/** Milliseconds with a precision that suits their size: 0.42, 4.2, 42, 420. */
export function fmtMs(ms: number): string {
  if (!Number.isFinite(ms)) return '-';
  if (ms < 1) return ms.toFixed(2);
  if (ms < 10) return ms.toFixed(1);
  return ms.toFixed(0);
}

/** A Markdown table; columns from `leftCols` on are right-aligned. */
export function markdownTable(header: string[], rows: string[][], leftCols = 1): string {
  const widths = header.map((h, i) =>
    Math.max(3, h.length, ...rows.map((r) => (r[i] ?? '').length)),
  );
  const line = (cells: string[]): string =>
    `| ${cells.map((c, i) => (i < leftCols ? c.padEnd(widths[i]!) : c.padStart(widths[i]!))).join(' | ')} |`;
  const sep = `| ${widths.map((w, i) => (i < leftCols ? '-'.repeat(w) : `${'-'.repeat(w - 1)}:`)).join(' | ')} |`;
  return [line(header), sep, ...rows.map((r) => line(header.map((_, i) => r[i] ?? '')))].join('\n');
}

export interface HistogramSums {
  count: number;
  /** Seconds. */
  sum: number;
}

/**
 * The `_sum` and `_count` of one Prometheus histogram (text exposition format)
 * by label set (`op="txn"`, or '' without labels).
 */
export function histogramSums(text: string, metric: string): Map<string, HistogramSums> {
  const out = new Map<string, HistogramSums>();
  const re = new RegExp(`^${metric}_(sum|count)(?:\\{([^}]*)\\})? (\\S+)$`, 'gm');
  for (const m of text.matchAll(re)) {
    const labels = m[2] ?? '';
    const v = Number(m[3]);
    const e = out.get(labels) ?? { count: 0, sum: 0 };
    if (m[1] === 'sum') e.sum = v;
    else e.count = v;
    out.set(labels, e);
  }
  return out;
}

/** `after` minus `before`, label by label (labels absent before count from zero). */
export function histogramDelta(
  before: Map<string, HistogramSums>,
  after: Map<string, HistogramSums>,
): Map<string, HistogramSums> {
  const out = new Map<string, HistogramSums>();
  for (const [k, a] of after) {
    const b = before.get(k) ?? { count: 0, sum: 0 };
    if (a.count - b.count > 0) out.set(k, { count: a.count - b.count, sum: a.sum - b.sum });
  }
  return out;
}

/**
 * The sum of every series of one Prometheus counter or gauge (text exposition
 * format), whatever its labels; 0 when the metric is absent.
 */
export function metricSum(text: string, metric: string): number {
  let sum = 0;
  const re = new RegExp(`^${metric}(?:\\{[^}]*\\})? (\\S+)$`, 'gm');
  for (const m of text.matchAll(re)) sum += Number(m[1]);
  return sum;
}
