// What the NBD server (server.ts) and its worker pool (workers.ts) share about a
// connection handed over to a worker thread (nbd/WORKERS.md). The server imports
// the pool; the pool sees the server and its connections only through the
// interfaces it declares (PoolServer, PooledConnection) and the types here.

import type { Session } from './negotiation.js';

/** How a connection's identity was established. */
export type IdentityMethod = 'x509' | 'psk' | 'mapped' | 'anonymous';

/** The main thread's answer to a relayed option. */
export interface RelayAnswer {
  replies: Buffer[];
  verdict: 'continue' | 'close' | 'transmission';
  reason?: string;
  /** With 'transmission': the session, its export built on this thread. */
  session?: Session;
}

/** The worker thread serving a connection that was handed over (see WorkerPool). */
export interface RemoteLink {
  shutdown(): void;
  kill(): void;
  abort(): Promise<void>;
}
