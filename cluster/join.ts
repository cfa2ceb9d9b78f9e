// `ballast cluster join`: a host that ran alone brings its devices (and their
// reservations and access lists) into the cluster. Explicit, all or nothing
// per name: a name the cluster already has stops the import before anything
// is written. The local store is then set aside (state.db.joined), never deleted.

import { existsSync, renameSync } from 'node:fs';
import { dirname, join } from 'node:path';
import type { AgentConfig } from '../agent/config.js';
import { parseRecord } from '../agent/devices.js';
import { BallastError } from '../agent/errors.js';
import { SqliteStore } from '../agent/store/sqlite-store.js';
import { cmp, type KeyValue, type Op, op } from '../agent/store/store.js';
import { openClusterStore } from './node.js';

/** Keys a single host keeps that move into the cluster. */
const MOVED = ['devices/', 'pr/', 'acl/', 'pr-audit/'];
/** etcd refuses transactions of more than 128 operations by default. */
const CHUNK = 100;

export interface JoinResult {
  cluster: string;
  host: string;
  devices: string[];
  keys: number;
  setAside?: string;
}

export async function joinCluster(config: AgentConfig): Promise<JoinResult> {
  const cc = config.cluster;
  if (!cc) {
    throw new BallastError(
      'BALLAST_CONFIG_INVALID',
      `${config.source}: no cluster: section; add one (etcd endpoints, host) to join a cluster`,
    );
  }
  const file = join(config.dataDir, 'state.db');
  const out: JoinResult = { cluster: cc.name, host: cc.host, devices: [], keys: 0 };
  if (!existsSync(file)) return out;
  // Opening it also proves the agent is stopped (it holds the store's lock).
  const local = await SqliteStore.open(file);
  let kvs: KeyValue[];
  try {
    kvs = (await local.range('')).kvs.filter((kv) => MOVED.some((p) => kv.key.startsWith(p)));
  } finally {
    await local.close();
  }
  const shared = new Map(config.pools.map((p) => [p.name, p]));
  const puts: Op[] = [];
  const names: string[] = [];
  for (const kv of kvs) {
    let value = kv.value;
    if (kv.key.startsWith('devices/')) {
      const rec = parseRecord(kv.value);
      if (!rec)
        throw new BallastError('BALLAST_STORE_RECORD', `${kv.key} is unreadable; not joined`);
      if (rec.state !== 'ready') {
        throw new BallastError(
          'BALLAST_CONFLICT',
          `device ${rec.name} is ${rec.state}: start the agent alone once to finish it, then join`,
        );
      }
      const allShared = rec.extents.every((e) => {
        const p = shared.get(e.pool);
        return p?.shared === true && dirname(e.file) === p.path;
      });
      rec.host = allShared ? null : cc.host;
      rec.by = cc.host;
      value = JSON.stringify(rec);
      names.push(rec.name);
    }
    puts.push(op.put(kv.key, value));
  }
  const store = await openClusterStore(cc);
  try {
    const clashes: string[] = [];
    for (const n of names) if (await store.get(`devices/${n}`)) clashes.push(n);
    if (clashes.length > 0) {
      throw new BallastError(
        'BALLAST_DEVICE_EXISTS',
        `the cluster already has device(s) named ${clashes.join(', ')}; rename or remove them on one side, then join again (nothing was imported)`,
      );
    }
    for (let i = 0; i < puts.length; i += CHUNK) {
      const chunk = puts.slice(i, i + CHUNK);
      const guards = chunk
        .filter((o) => o.type === 'put' && o.key.startsWith('devices/'))
        .map((o) => cmp.version((o as { key: string }).key, '=', 0));
      const r = await store.txn({ compare: guards, success: chunk });
      if (!r.succeeded) {
        throw new BallastError(
          'BALLAST_DEVICE_EXISTS',
          `a device was created in the cluster under one of these names meanwhile; ${i} of ${puts.length} keys were imported, run join again`,
        );
      }
    }
  } finally {
    await store.close();
  }
  out.devices = names;
  out.keys = puts.length;
  const aside = `${file}.joined`;
  for (const ext of ['', '-wal', '-shm']) {
    if (existsSync(file + ext)) renameSync(file + ext, aside + ext);
  }
  out.setAside = aside;
  return out;
}
