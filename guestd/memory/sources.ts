// Where the memory controller's inputs come from on the host: /proc/meminfo,
// /proc/pressure/memory, a QEMU process's guest-RAM mapping in /proc/PID/smaps, the
// process behind a QMP Unix socket, QEMU's guest-stats, and an agent's per-device
// counters. The parsers are pure; the readers are thin.

import { readdirSync, readFileSync, readlinkSync } from 'node:fs';
import type { GuestStats, HostSample } from './policy.js';

/** Field of /proc/meminfo in bytes (its values are in kB). */
export function meminfoField(text: string, field: string): number | null {
  const m = new RegExp(`^${field}:\\s+(\\d+) kB`, 'm').exec(text);
  return m ? Number(m[1]) * 1024 : null;
}

/** `full avg10` (or `some avg10`) of /proc/pressure/memory, percent; 0 when absent. */
export function psiAvg10(text: string, line: 'some' | 'full' = 'full'): number {
  const m = new RegExp(`^${line} avg10=([\\d.]+)`, 'm').exec(text);
  return m ? Number(m[1]) : 0;
}

export function readHost(): HostSample & { memTotal: number } {
  const mi = readFileSync('/proc/meminfo', 'utf8');
  let psi = '';
  try {
    psi = readFileSync('/proc/pressure/memory', 'utf8');
  } catch {
    // no PSI in this kernel: no host pressure signal, MemAvailable still counts
  }
  return {
    memAvailable: meminfoField(mi, 'MemAvailable') ?? 0,
    memTotal: meminfoField(mi, 'MemTotal') ?? 0,
    psiFullAvg10: psiAvg10(psi, 'full'),
  };
}

export interface Mapping {
  start: string;
  perms: string;
  name: string;
  size: number;
  rss: number;
}

/** The mappings of /proc/PID/smaps with their Size and Rss in bytes. */
export function parseSmaps(text: string): Mapping[] {
  const out: Mapping[] = [];
  let cur: Mapping | null = null;
  for (const line of text.split('\n')) {
    const head = /^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$/.exec(line);
    if (head) {
      cur = {
        start: head[1] as string,
        perms: head[3] as string,
        name: head[4] ?? '',
        size: 0,
        rss: 0,
      };
      out.push(cur);
      continue;
    }
    const kv = /^(Size|Rss):\s+(\d+) kB/.exec(line);
    if (kv && cur) {
      if (kv[1] === 'Size') cur.size = Number(kv[2]) * 1024;
      else cur.rss = Number(kv[2]) * 1024;
    }
  }
  return out;
}

/**
 * The guest's RAM among a QEMU process's mappings: a writable, non-executable mapping
 * of the RAM's size (QEMU may add up to a huge page of alignment), a memory backend's
 * file mapping first. Null when none fits.
 */
export function guestRamMapping(maps: readonly Mapping[], ramSize: number): Mapping | null {
  const fits = maps.filter(
    (m) =>
      m.perms.startsWith('rw') &&
      !m.perms.includes('x') &&
      m.size >= ramSize &&
      m.size <= ramSize + 4 * 1024 * 1024,
  );
  if (fits.length === 0) return null;
  const named = fits.filter((m) => /memory-backend|\/dev\/hugepages|memfd:/.test(m.name));
  const pool = named.length ? named : fits;
  return pool.reduce((a, b) => (b.rss > a.rss ? b : a));
}

/** The resident size of the guest-RAM mapping of QEMU process `pid`, or null. */
export function guestRamResident(pid: number, ramSize: number): number | null {
  try {
    return (
      guestRamMapping(parseSmaps(readFileSync(`/proc/${pid}/smaps`, 'utf8')), ramSize)?.rss ?? null
    );
  } catch {
    return null;
  }
}

/** The inode of the listening Unix socket bound to `path`, from /proc/net/unix. */
export function listenerInode(netUnix: string, path: string): number | null {
  for (const line of netUnix.split('\n')) {
    const f = line.trim().split(/\s+/);
    // Num RefCount Protocol Flags Type St Inode Path; flag 00010000 is __SO_ACCEPTCON
    if (f.length >= 8 && f[7] === path && f[3] === '00010000') return Number(f[6]);
  }
  return null;
}

/**
 * The process that listens on Unix socket `path` (QEMU behind its QMP socket), found
 * by the socket's inode among the open files in /proc; null when not visible to us.
 */
export function pidOfUnixListener(path: string): number | null {
  let inode: number | null;
  try {
    inode = listenerInode(readFileSync('/proc/net/unix', 'utf8'), path);
  } catch {
    return null;
  }
  if (inode === null) return null;
  const want = `socket:[${inode}]`;
  for (const p of readdirSync('/proc')) {
    if (!/^\d+$/.test(p)) continue;
    let fds: string[];
    try {
      fds = readdirSync(`/proc/${p}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      try {
        if (readlinkSync(`/proc/${p}/fd/${fd}`) === want) return Number(p);
      } catch {}
    }
  }
  return null;
}

/** A guest-stats value: QEMU reports one the guest did not give as 2^64-1. */
function stat(v: unknown): number | undefined {
  return typeof v === 'number' && v >= 0 && v < 2 ** 53 ? v : undefined;
}

/**
 * `qom-get guest-stats` as GuestStats; null while the guest has sent none
 * (`last-update` 0: no balloon driver, or polling not enabled yet).
 */
export function parseGuestStats(r: unknown): GuestStats | null {
  const o = r as { stats?: Record<string, unknown>; 'last-update'?: unknown } | null;
  const at = o?.['last-update'];
  if (typeof at !== 'number' || at <= 0 || !o?.stats) return null;
  const s = o.stats;
  const out: GuestStats = { updatedAt: at };
  const put = (k: keyof Omit<GuestStats, 'updatedAt'>, v: unknown) => {
    const n = stat(v);
    if (n !== undefined) out[k] = n;
  };
  put('swapIn', s['stat-swap-in']);
  put('swapOut', s['stat-swap-out']);
  put('majorFaults', s['stat-major-faults']);
  put('available', s['stat-available-memory']);
  put('total', s['stat-total-memory']);
  return out;
}

/** Sums of `ballast_nbd_bytes_total{device=…,op=…}` in an agent's /metrics text. */
export function deviceBytes(metrics: string, device: string): { read: number; write: number } {
  const out = { read: 0, write: 0 };
  for (const line of metrics.split('\n')) {
    if (!line.startsWith('ballast_nbd_bytes_total{')) continue;
    const m = /^ballast_nbd_bytes_total\{([^}]*)\}\s+(\S+)/.exec(line);
    if (!m) continue;
    const labels = Object.fromEntries(
      [...(m[1] as string).matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)].map((x) => [x[1], x[2]]),
    );
    if (labels.device !== device) continue;
    if (labels.op === 'read') out.read += Number(m[2]);
    else if (labels.op === 'write') out.write += Number(m[2]);
  }
  return out;
}
