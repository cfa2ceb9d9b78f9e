// Long listings read in pages, as the Kubernetes API does: a page is at most
// `limit` keys, and the token that asks for the next one carries the revision
// the first page was read at and the key to go on from. Every page of one
// listing is read at that revision, so the pages together are the prefix as it
// was at one moment: no key twice, none missed, whatever changes meanwhile. A
// token whose revision has been compacted away is refused (list again).

import { BallastError } from '../errors.js';
import { isStoreError, type KeyValue, type Store, StoreError } from './store.js';

/** The most keys one page may hold. */
export const MAX_PAGE = 10_000;
/** The page size of a listing read whole (an API call without `limit`). */
export const WHOLE_PAGE = 1_000;

export interface Page {
  kvs: KeyValue[];
  /** The revision every page of this listing is read at. */
  revision: number;
  /** Asks for the next page; absent on the last. */
  continue?: string;
}

interface Token {
  /** The revision of the listing. */
  r: number;
  /** The key to go on from (inclusive). */
  k: string;
}

export function encodeToken(revision: number, from: string): string {
  const t: Token = { r: revision, k: from };
  return Buffer.from(JSON.stringify(t), 'utf8').toString('base64url');
}

export function decodeToken(token: string, prefix: string): Token {
  let t: Partial<Token> | undefined;
  try {
    t = JSON.parse(Buffer.from(token, 'base64url').toString('utf8')) as Partial<Token>;
  } catch {
    t = undefined;
  }
  if (
    !t ||
    !Number.isSafeInteger(t.r) ||
    (t.r ?? 0) < 1 ||
    typeof t.k !== 'string' ||
    !t.k.startsWith(prefix)
  ) {
    throw new BallastError(
      'BALLAST_BAD_REQUEST',
      'continue is not a token this listing gave out: pass the `continue` of the previous page as it is, or list from the start without it',
    );
  }
  return t as Token;
}

/** A page size from a request: 1 to MAX_PAGE. */
export function pageLimit(limit: unknown): number {
  const n = typeof limit === 'string' && /^[0-9]+$/.test(limit) ? Number(limit) : limit;
  if (typeof n !== 'number' || !Number.isSafeInteger(n) || n < 1 || n > MAX_PAGE) {
    throw new BallastError(
      'BALLAST_BAD_REQUEST',
      `limit must be a whole number from 1 to ${MAX_PAGE}, got ${JSON.stringify(limit)}`,
    );
  }
  return n;
}

/** One page of the keys under `prefix`: the first, or the one `token` asks for. */
export async function readPage(
  store: Store,
  prefix: string,
  limit: number,
  token?: string,
): Promise<Page> {
  const t = token === undefined ? undefined : decodeToken(token, prefix);
  let r: Awaited<ReturnType<Store['range']>>;
  try {
    r = await store.range(prefix, t ? { limit, revision: t.r, from: t.k } : { limit });
  } catch (e) {
    if (t && isStoreError(e, 'STORE_COMPACTED')) {
      throw new BallastError(
        'BALLAST_LIST_EXPIRED',
        `this listing was read at revision ${t.r}, which the cluster database has since compacted: list again from the start`,
        { cause: e },
      );
    }
    throw e;
  }
  // The first page is read at the store's revision of that moment; the rest at it.
  const revision = t ? t.r : r.revision;
  const last = r.kvs.at(-1);
  return {
    kvs: r.kvs,
    revision,
    ...(r.more && last ? { continue: encodeToken(revision, `${last.key}\0`) } : {}),
  };
}

/** Every key under `prefix` at one revision, read in pages of `WHOLE_PAGE`. */
export async function readAll(store: Store, prefix: string): Promise<Page> {
  const kvs: KeyValue[] = [];
  let page = await readPage(store, prefix, WHOLE_PAGE);
  kvs.push(...page.kvs);
  const revision = page.revision;
  while (page.continue !== undefined) {
    page = await readPage(store, prefix, WHOLE_PAGE, page.continue);
    kvs.push(...page.kvs);
  }
  return { kvs, revision };
}

/**
 * A listing read from the store, or, in a cluster, what the agent keeps, whole and
 * marked stale: at once while it is cut off (`stale`), or when etcd does not answer
 * the first page (before its keepalive has even failed). A page after the first
 * cannot fall back: the pages would not be one moment.
 */
export async function listOrCache<T extends object>(
  read: () => Promise<T>,
  cached: (stale: { since: string; reason: string }) => T,
  inCluster: boolean,
  token: string | null,
  stale: { since: string; reason: string } | null = null,
): Promise<T> {
  if (stale) {
    if (token !== null) {
      throw new StoreError(
        'STORE_UNAVAILABLE',
        `this agent is cut off from etcd (${stale.reason}): the listing cannot go on; list again without continue for what this agent keeps (marked stale)`,
      );
    }
    return cached(stale);
  }
  try {
    return await read();
  } catch (e) {
    if (!inCluster || token !== null || !(e instanceof StoreError) || !e.retryable) throw e;
    return cached({
      since: new Date().toISOString(),
      reason: `etcd did not answer the listing (${e.message})`,
    });
  }
}
