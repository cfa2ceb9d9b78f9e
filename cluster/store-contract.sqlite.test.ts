// The Store contract against the single-host SqliteStore (in memory: same code
// as on disk, see test/helpers/memory-store.ts).
import { openMemoryStore } from '../test/helpers/memory-store.js';
import { storeContract } from '../test/helpers/store-contract.js';

storeContract('SqliteStore', {
  open: () => openMemoryStore({ leaseCheckIntervalMs: 100 }),
  noDisconnectReason: 'SqliteStore runs in process: it has no connection to cut',
  leaseSlackMs: 1000,
});
