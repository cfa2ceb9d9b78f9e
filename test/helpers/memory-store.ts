// An in-memory Store for unit tests of callers: the SQLite store on a private
// ':memory:' database, so it has exactly the same semantics (revisions,
// compares, watch replay, leases, compaction) and nothing is written to disk.
import { SqliteStore, type SqliteStoreOptions } from '../../agent/store/sqlite-store.js';
import type { Store } from '../../agent/store/store.js';

/** A fresh, empty in-memory store. Close it when done (it runs a lease timer, unref'd). */
export function openMemoryStore(
  opts: Omit<SqliteStoreOptions, 'integrityCheck'> = {},
): Promise<Store> {
  return SqliteStore.open(':memory:', { ...opts, integrityCheck: 'none' });
}
