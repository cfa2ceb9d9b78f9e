// The Store contract against the single-host SqliteStore (in memory: same code
// as on disk, see agent/store/memory-store.ts).
import { openMemoryStore } from '../agent/store/memory-store.js';
import { storeContract } from './store-contract.js';

storeContract('SqliteStore', {
  open: () => openMemoryStore({ leaseCheckIntervalMs: 100 }),
  noDisconnectReason: 'SqliteStore runs in process: it has no connection to cut',
  leaseSlackMs: 1000,
});
