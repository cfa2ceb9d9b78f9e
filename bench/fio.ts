// The fio jobs and how to read fio's JSON.

import { readFile, rm } from 'node:fs/promises';
import type { JobName } from './options.js';
import { run } from './proc.js';

/** fio's --rw modes the benchmarks use; randrw mixes reads and writes (see --rwmixread). */
export type FioRw = 'read' | 'write' | 'randread' | 'randwrite' | 'randrw';

export interface JobSpec {
  name: JobName;
  rw: Exclude<FioRw, 'randrw'>;
  bs: string;
  iodepth: number;
  /** The figure that is compared: bandwidth for sequential jobs, IOPS for random ones. */
  metric: 'mibps' | 'iops';
  description: string;
}

export const JOBS: Record<JobName, JobSpec> = {
  'seq-read': {
    name: 'seq-read',
    rw: 'read',
    bs: '1M',
    iodepth: 8,
    metric: 'mibps',
    description: 'sequential 1 MiB reads, 8 in flight',
  },
  'seq-write': {
    name: 'seq-write',
    rw: 'write',
    bs: '1M',
    iodepth: 8,
    metric: 'mibps',
    description: 'sequential 1 MiB writes, 8 in flight',
  },
  'rand-read': {
    name: 'rand-read',
    rw: 'randread',
    bs: '4k',
    iodepth: 32,
    metric: 'iops',
    description: 'random 4 KiB reads, 32 in flight',
  },
  'rand-write': {
    name: 'rand-write',
    rw: 'randwrite',
    bs: '4k',
    iodepth: 32,
    metric: 'iops',
    description: 'random 4 KiB writes, 32 in flight',
  },
};

export interface FioResult {
  ok: boolean;
  error?: string;
  /** Mebibytes (2^20) per second over the measured part. */
  mibps: number;
  iops: number;
  /** Mean completion latency, microseconds. */
  clatMeanUs: number;
  /** 99th percentile completion latency, microseconds. */
  clatP99Us: number;
  /** Seconds actually measured, as fio reports it. */
  runtimeS: number;
  /** Client CPU (fio), percent of one core, user + system. */
  clientCpuPct: number;
}

function num(v: unknown): number {
  return typeof v === 'number' && Number.isFinite(v) ? v : Number.NaN;
}

function obj(v: unknown): Record<string, unknown> {
  return typeof v === 'object' && v !== null ? (v as Record<string, unknown>) : {};
}

/** The figures of one direction (fio's "read" or "write" object of a job). */
function direction(v: unknown) {
  const dir = obj(v);
  const clat = obj(dir.clat_ns);
  return {
    bytes: num(dir.bw_bytes),
    iops: num(dir.iops),
    clatMeanUs: num(clat.mean) / 1000,
    clatP99Us: num(obj(clat.percentile)['99.000000']) / 1000,
    runtimeS: num(dir.runtime) / 1000,
  };
}

/**
 * Extracts the figures of the one job in a fio --output-format=json document.
 * For randrw both directions count: bandwidth and IOPS are their sums, the mean
 * latency their IOPS-weighted mean, p99 the worse of the two.
 */
export function parseFioJson(text: string, rw: FioRw): FioResult {
  // fio may print warnings before the JSON document.
  const start = text.indexOf('{');
  if (start < 0) throw new Error('no JSON in fio output');
  const doc = obj(JSON.parse(text.slice(start)));
  const jobs = Array.isArray(doc.jobs) ? doc.jobs : [];
  const job = obj(jobs[0]);
  const err = num(job.error);
  const clientCpuPct = num(job.usr_cpu) + num(job.sys_cpu);
  let d: ReturnType<typeof direction>;
  if (rw === 'randrw') {
    const r = direction(job.read);
    const w = direction(job.write);
    const iops = r.iops + w.iops;
    d = {
      bytes: r.bytes + w.bytes,
      iops,
      clatMeanUs: (r.clatMeanUs * r.iops + w.clatMeanUs * w.iops) / iops,
      clatP99Us: Math.max(r.clatP99Us, w.clatP99Us),
      runtimeS: Math.max(r.runtimeS, w.runtimeS),
    };
  } else {
    d = direction(job[rw === 'read' || rw === 'randread' ? 'read' : 'write']);
  }
  const res: FioResult = {
    ok: err === 0 && d.bytes > 0,
    mibps: d.bytes / 2 ** 20,
    iops: d.iops,
    clatMeanUs: d.clatMeanUs,
    clatP99Us: d.clatP99Us,
    runtimeS: d.runtimeS,
    clientCpuPct,
  };
  if (!res.ok) res.error = err !== 0 ? `fio job error ${err}` : 'no I/O completed';
  return res;
}

export interface FioRun {
  uri: string;
  job: JobSpec;
  runtime: number;
  ramp: number;
  /** Scratch path for fio's JSON output. */
  outFile: string;
}

export function fioArgs(r: FioRun): string[] {
  return [
    `--name=${r.job.name}`,
    '--ioengine=nbd',
    `--uri=${r.uri}`,
    `--rw=${r.job.rw}`,
    `--bs=${r.job.bs}`,
    `--iodepth=${r.job.iodepth}`,
    '--numjobs=1',
    '--time_based=1',
    `--runtime=${r.runtime}`,
    `--ramp_time=${r.ramp}`,
    '--output-format=json',
    `--output=${r.outFile}`,
  ];
}

/** A result with no figures: the job did not run, or its output could not be read. */
export function failedFio(error: string): FioResult {
  return {
    ok: false,
    error,
    mibps: Number.NaN,
    iops: Number.NaN,
    clatMeanUs: Number.NaN,
    clatP99Us: Number.NaN,
    runtimeS: Number.NaN,
    clientCpuPct: Number.NaN,
  };
}

export async function runFio(r: FioRun): Promise<FioResult> {
  await rm(r.outFile, { force: true });
  const timeoutMs = (r.runtime + r.ramp + 60) * 1000;
  const res = await run('fio', fioArgs(r), timeoutMs);
  if (res.timedOut) return failedFio(`fio timed out after ${timeoutMs / 1000} s`);
  let text: string;
  try {
    text = await readFile(r.outFile, 'utf8');
  } catch {
    return failedFio(`fio exited ${res.code} without output: ${res.output.trim()}`);
  }
  try {
    const parsed = parseFioJson(text, r.job.rw);
    if (res.code !== 0 && parsed.ok) {
      parsed.ok = false;
      parsed.error = `fio exited ${res.code}: ${res.output.trim()}`;
    } else if (!parsed.ok && res.output.trim() !== '') {
      parsed.error = `${parsed.error}: ${res.output.trim()}`;
    }
    return parsed;
  } catch (e) {
    return failedFio(`unreadable fio output (exit ${res.code}): ${(e as Error).message}`);
  }
}

/** Fills `file` (already created sparse) with data, writing every byte once, then fsyncs. */
export async function prefill(file: string, sizeMiB: number): Promise<void> {
  const res = await run(
    'fio',
    [
      '--name=prefill',
      '--ioengine=psync',
      '--rw=write',
      '--bs=1M',
      `--size=${sizeMiB}M`,
      `--filename=${file}`,
      '--end_fsync=1',
      '--output-format=terse',
    ],
    600_000,
  );
  if (res.code !== 0) throw new Error(`prefill with fio failed (exit ${res.code}): ${res.output}`);
}
