// The `memory:` section of the guest daemon's config (policy.md, "Configuration"),
// checked into typed settings. Pure code: the host's MemTotal comes in as an argument.

import { parse as parseYaml } from 'yaml';
import { formatSize, parseSize } from '../../agent/units.js';

export class MemoryError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'MemoryError';
    this.code = code;
  }
}

const MiB = 1024 * 1024;

/** The policy's knobs; policy.md names each one. Sizes in bytes, rates per second. */
export interface Tuning {
  intervalMs: number;
  maxStep: number;
  minChange: number;
  headroom: number;
  swapInHigh: number;
  swapInLow: number;
  majorFaultsHigh: number;
  majorFaultsLow: number;
  riseIntervals: number;
  fallIntervals: number;
  holdIntervals: number;
  followIntervals: number;
  retryIntervals: number;
  hostMinAvailable: number;
  hostPsiFullHigh: number;
}

export const DEFAULT_TUNING: Tuning = {
  intervalMs: 2000,
  maxStep: 64 * MiB,
  minChange: 4 * MiB,
  headroom: 32 * MiB,
  swapInHigh: 1 * MiB,
  swapInLow: 64 * 1024,
  majorFaultsHigh: 50,
  majorFaultsLow: 5,
  riseIntervals: 2,
  fallIntervals: 3,
  holdIntervals: 5,
  followIntervals: 10,
  retryIntervals: 30,
  hostMinAvailable: 128 * MiB,
  hostPsiFullHigh: 10,
};

/** What the policy knows of a guest from its configuration. */
export interface GuestShare {
  name: string;
  /** Never ballooned below this (bytes). */
  entitlement: number;
  /** 1..255: share of what is contended. */
  weight: number;
  /** Never given more (bytes); undefined until the guest's RAM size is known. */
  max?: number;
}

export interface MemoryGuestConfig extends GuestShare {
  /** QEMU's QMP socket; or `libvirt`; or neither when the dump part has the guest. */
  qmp?: string;
  libvirt?: string;
  /** The guest's Ballast paging device, a device of `agent`. */
  pagingDevice?: string;
  agent?: string;
  tokenFile?: string;
}

export type PoolSpec = { bytes: number } | { hostReserve: number };

export interface MemoryConfig {
  pool: PoolSpec;
  /** The pool in bytes (for hostReserve: MemTotal minus the reserve). */
  poolBytes: number;
  tuning: Tuning;
  guests: MemoryGuestConfig[];
}

export const DEFAULT_WEIGHT = 128;

function bad(msg: string): never {
  throw new MemoryError('MEMORY_BAD_CONFIG', msg);
}

function size(v: unknown, where: string): number {
  if (typeof v === 'number') {
    if (!Number.isSafeInteger(v) || v < 0) bad(`${where} must be a whole number of bytes`);
    return v;
  }
  if (typeof v !== 'string') bad(`${where} must be a size such as 256M`);
  try {
    return parseSize(v, where);
  } catch (e) {
    bad((e as Error).message);
  }
}

function known(o: Record<string, unknown>, where: string, keys: readonly string[]): void {
  for (const k of Object.keys(o))
    if (!keys.includes(k))
      bad(`${where}: unknown key "${k}" (expected one of: ${keys.join(', ')})`);
}

function mapping(v: unknown, where: string): Record<string, unknown> {
  if (v === null || typeof v !== 'object' || Array.isArray(v)) bad(`${where} must be a mapping`);
  return v as Record<string, unknown>;
}

function nonEmpty(o: Record<string, unknown>, key: string, where: string): string | undefined {
  const v = o[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'string' || v === '') bad(`${where}: "${key}" must be a non-empty string`);
  return v;
}

const SIZE_KNOBS = ['maxStep', 'minChange', 'headroom', 'swapInHigh', 'swapInLow'] as const;
const COUNT_KNOBS = [
  'riseIntervals',
  'fallIntervals',
  'holdIntervals',
  'followIntervals',
  'retryIntervals',
] as const;
const RATE_KNOBS = ['majorFaultsHigh', 'majorFaultsLow', 'hostPsiFullHigh'] as const;
const TOP_KEYS = [
  'pool',
  'interval',
  'guests',
  'hostMinAvailable',
  ...SIZE_KNOBS,
  ...COUNT_KNOBS,
  ...RATE_KNOBS,
];
const GUEST_KEYS = [
  'name',
  'qmp',
  'libvirt',
  'entitlement',
  'weight',
  'max',
  'pagingDevice',
  'agent',
  'tokenFile',
];

function tuning(o: Record<string, unknown>, where: string): Tuning {
  const t: Tuning = { ...DEFAULT_TUNING };
  if (o.interval !== undefined) {
    const s = o.interval;
    if (typeof s !== 'number' || !(s >= 0.1) || s > 3600)
      bad(`${where}: interval must be a number of seconds from 0.1 to 3600`);
    t.intervalMs = Math.round(s * 1000);
  }
  for (const k of SIZE_KNOBS) if (o[k] !== undefined) t[k] = size(o[k], `${where}: ${k}`);
  if (o.hostMinAvailable !== undefined)
    t.hostMinAvailable = size(o.hostMinAvailable, `${where}: hostMinAvailable`);
  for (const k of COUNT_KNOBS) {
    const v = o[k];
    if (v === undefined) continue;
    if (typeof v !== 'number' || !Number.isInteger(v) || v < 1 || v > 10_000)
      bad(`${where}: ${k} must be a whole number of intervals from 1 to 10000`);
    t[k] = v;
  }
  for (const k of RATE_KNOBS) {
    const v = o[k];
    if (v === undefined) continue;
    if (typeof v !== 'number' || !(v >= 0)) bad(`${where}: ${k} must be a number ≥ 0`);
    t[k] = v;
  }
  if (t.maxStep < MiB) bad(`${where}: maxStep must be at least 1M`);
  if (t.minChange > t.maxStep) bad(`${where}: minChange must not be above maxStep`);
  if (t.swapInLow > t.swapInHigh) bad(`${where}: swapInLow must not be above swapInHigh`);
  if (t.majorFaultsLow > t.majorFaultsHigh)
    bad(`${where}: majorFaultsLow must not be above majorFaultsHigh`);
  return t;
}

function pool(v: unknown, where: string): PoolSpec {
  if (v === undefined || v === null)
    bad(`${where}: "pool" is required (e.g. 448M, or { hostReserve: 2G })`);
  if (typeof v === 'object' && !Array.isArray(v)) {
    const o = v as Record<string, unknown>;
    known(o, `${where}: pool`, ['hostReserve']);
    if (o.hostReserve === undefined) bad(`${where}: pool: give "hostReserve" (e.g. 2G)`);
    return { hostReserve: size(o.hostReserve, `${where}: pool.hostReserve`) };
  }
  return { bytes: size(v, `${where}: pool`) };
}

export function poolBytes(p: PoolSpec, hostMemTotal: number): number {
  return 'bytes' in p ? p.bytes : Math.max(0, hostMemTotal - p.hostReserve);
}

function share(o: Record<string, unknown>, where: string): GuestShare & { name: string } {
  const name = nonEmpty(o, 'name', where);
  if (name === undefined) bad(`${where}: "name" is required`);
  if (!/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/.test(name)) bad(`${where}: bad guest name "${name}"`);
  if (o.entitlement === undefined) bad(`${where}: "entitlement" is required (e.g. 128M)`);
  const entitlement = size(o.entitlement, `${where}: entitlement`);
  const weight = o.weight ?? DEFAULT_WEIGHT;
  if (typeof weight !== 'number' || !Number.isInteger(weight) || weight < 1 || weight > 255)
    bad(`${where}: weight must be a whole number from 1 to 255`);
  const max = o.max === undefined ? undefined : size(o.max, `${where}: max`);
  const s: GuestShare = { name, entitlement, weight, ...(max !== undefined ? { max } : {}) };
  checkShare(s, where);
  return s;
}

/** A guest's own numbers agree with each other. */
export function checkShare(s: GuestShare, where = `guest ${s.name}`): void {
  if (s.max !== undefined && s.entitlement > s.max)
    bad(`${where}: entitlement ${formatSize(s.entitlement)} is above max ${formatSize(s.max)}`);
}

/**
 * The entitlements fit in the pool: refused with the numbers otherwise. Used when the
 * config is loaded and before `ballast memory set` changes a guest.
 */
export function checkPool(pool: number, guests: readonly GuestShare[]): void {
  const sum = guests.reduce((a, g) => a + g.entitlement, 0);
  if (sum <= pool) return;
  const parts = guests.map((g) => `${g.name} ${formatSize(g.entitlement)}`).join(' + ');
  throw new MemoryError(
    'MEMORY_POOL_TOO_SMALL',
    `the entitlements add up to ${formatSize(sum)} (${parts}), more than the pool of ${formatSize(pool)} by ${formatSize(sum - pool)}: lower an entitlement or grow the pool`,
  );
}

/** The `memory:` section (already parsed YAML/JSON), for a host with `hostMemTotal` bytes. */
export function memoryConfig(raw: unknown, hostMemTotal: number, where = 'memory'): MemoryConfig {
  const o = mapping(raw, where);
  known(o, where, TOP_KEYS);
  const p = pool(o.pool, where);
  const bytes = poolBytes(p, hostMemTotal);
  const list = o.guests ?? [];
  if (!Array.isArray(list)) bad(`${where}: guests must be a list`);
  const names = new Set<string>();
  const guests = list.map((g: unknown, i: number): MemoryGuestConfig => {
    const w = `${where}: guests[${i}]`;
    const go = mapping(g, w);
    known(go, w, GUEST_KEYS);
    const s = share(go, w);
    if (names.has(s.name)) bad(`${w}: guest "${s.name}" is listed twice`);
    names.add(s.name);
    const qmp = nonEmpty(go, 'qmp', w);
    const libvirt = nonEmpty(go, 'libvirt', w);
    if (qmp !== undefined && libvirt !== undefined) bad(`${w}: give "qmp" or "libvirt", not both`);
    const pagingDevice = nonEmpty(go, 'pagingDevice', w);
    const agent = nonEmpty(go, 'agent', w);
    const tokenFile = nonEmpty(go, 'tokenFile', w);
    if ((agent !== undefined || tokenFile !== undefined) && pagingDevice === undefined)
      bad(`${w}: "agent" and "tokenFile" go with "pagingDevice"`);
    return {
      ...s,
      ...(qmp !== undefined ? { qmp } : {}),
      ...(libvirt !== undefined ? { libvirt } : {}),
      ...(pagingDevice !== undefined ? { pagingDevice } : {}),
      ...(agent !== undefined ? { agent } : {}),
      ...(tokenFile !== undefined ? { tokenFile } : {}),
    };
  });
  checkPool(bytes, guests);
  return { pool: p, poolBytes: bytes, tuning: tuning(o, where), guests };
}

/** A config file's text whose top level has a `memory:` section (other sections ignored). */
export function parseMemoryConfig(
  text: string,
  hostMemTotal: number,
  source = 'config',
): MemoryConfig | null {
  let raw: unknown;
  try {
    raw = parseYaml(text);
  } catch (e) {
    bad(`${source}: not YAML/JSON: ${(e as Error).message}`);
  }
  const top = mapping(raw, source);
  if (top.memory === undefined) return null;
  return memoryConfig(top.memory, hostMemTotal, `${source}: memory`);
}
