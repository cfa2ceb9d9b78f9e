import type { Backend } from './backend.js';
import type { ExportStats } from './stats.js';

/**
 * Who may send which commands to an export, decided by its owner (for example
 * from reservations). The server asks `mask` when a connection starts serving
 * the export and again whenever `generation` has changed, so the check on the
 * data path is one comparison and one AND. Bump `generation` before
 * acknowledging a change: requests read after that see the new answer.
 */
export interface AccessControl {
  readonly generation: number;
  /** The commands (bit `1 << CMD.*`) a client of this identity may send now. */
  mask(identity: string): number;
  /**
   * Whether requests may reach the backend now, asked on every request and again
   * just before a write's payload goes to the backend (so it must be cheap):
   * 'hold' stalls the connection until a waker given to `onOpen` is called, 'fail'
   * answers EIO. For an owner that cannot vouch for its right to write at this
   * moment (a cluster member whose lease may have lapsed). Absent: always open.
   */
  gate?(): 'open' | 'hold' | 'fail';
  /** Registers a waker for a held connection: called once when it should ask again. */
  onOpen?(wake: () => void): void;
  /**
   * False when `gate` can only answer 'open' now (no fence). A connection whose
   * export has a `gate` that may hold stays on the main thread.
   */
  readonly gated?: boolean;
  /**
   * Calls `onChange` synchronously after every bump of `generation`, until the
   * returned function is called. Lets the server copy the new answers to the
   * worker threads before the change is acknowledged (nbd/WORKERS.md); without
   * it, connections to the export stay on the main thread.
   */
  subscribe?(onChange: () => void): () => void;
}

/** A named export as the protocol sees it. */
export interface Export {
  readonly name: string;
  readonly description: string;
  readonly backend: Backend;
  /** Served read-only even if the backend could write. */
  readonly readOnly: boolean;
  /** Counters the server keeps for this export, if the owner wants them. */
  readonly stats?: ExportStats;
  /** Per-request access control; none means every valid request is served. */
  readonly access?: AccessControl;
}

/** Where the server finds exports. The agent's catalogue changes at run time. */
export interface ExportCatalog {
  /** Every export, for NBD_OPT_LIST. */
  list(): Iterable<Export>;
  /** The export a client asked for by name; '' may resolve to a default. */
  lookup(name: string): Export | undefined;
}

/** A fixed set of exports; with exactly one, the empty name reaches it too. */
export class StaticCatalog implements ExportCatalog {
  private readonly byName = new Map<string, Export>();
  constructor(exports: Export[]) {
    for (const e of exports) this.byName.set(e.name, e);
  }
  list(): Iterable<Export> {
    return this.byName.values();
  }
  lookup(name: string): Export | undefined {
    const e = this.byName.get(name);
    if (e || name !== '' || this.byName.size !== 1) return e;
    return this.byName.values().next().value;
  }
}
