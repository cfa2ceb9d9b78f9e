// GET /v1/events: the event log as a Server-Sent Events stream. History from
// `since` (or the Last-Event-ID header a reconnecting client sends) onwards,
// then, with follow, live events as they happen. A `since` older than the
// store's history gets one `resync` event first (the state at the oldest revision
// kept), then every event after it: never a silent gap.

import type http from 'node:http';
import { BallastError } from '../agent/errors.js';
import { failpointArmed } from '../agent/failpoints.js';
import { isStoreError, type Store, type Watcher } from '../agent/store/store.js';
import {
  afterId,
  type BallastEvent,
  cloudEvent,
  parseEventId,
  parseTypes,
  previousLost,
  resyncAfterCompaction,
  stampTimes,
  Translator,
} from './events.js';

/** event-drop (injected): the one event this process has dropped. */
let droppedOne = false;

export interface SseOptions {
  cluster: string;
  host: string;
  /** Keepalive comments this often on an idle stream (ms). */
  heartbeatMs?: number;
  /** Ends the stream (the agent stops): a following client reconnects from its last id. */
  signal?: AbortSignal;
}

export async function serveEvents(
  store: Store,
  req: http.IncomingMessage,
  res: http.ServerResponse,
  url: URL,
  opts: SseOptions,
): Promise<void> {
  const sinceText =
    (req.headers['last-event-id'] as string | undefined) ?? url.searchParams.get('since');
  let cursor = { revision: 0, n: 0 };
  if (sinceText !== null && sinceText !== undefined && sinceText !== '') {
    const c = parseEventId(sinceText);
    if (!c)
      throw new BallastError(
        'BALLAST_BAD_REQUEST',
        `since must be an event id, not ${JSON.stringify(sinceText)}`,
      );
    cursor = c;
  }
  let filter: (k: string) => boolean;
  try {
    filter = parseTypes(url.searchParams.get('types') ?? undefined);
  } catch (e) {
    throw new BallastError('NOTIFY_BAD_TYPES', (e as Error).message);
  }
  const follow = ['1', 'true', ''].includes(url.searchParams.get('follow') ?? 'x');
  const end = await store.revision();
  res.writeHead(200, {
    'content-type': 'text/event-stream; charset=utf-8',
    'cache-control': 'no-cache',
    'x-accel-buffering': 'no',
  });
  const send = (e: BallastEvent) => {
    if (e.kind === 'acl.changed' && failpointArmed('event-drop') && !droppedOne) {
      droppedOne = true; // the nemesis's injected bug: one event lost on a stream
      return;
    }
    const ce = cloudEvent(e, opts.cluster, opts.host);
    res.write(`id: ${e.id}\nevent: io.ballast.${e.kind}\ndata: ${JSON.stringify(ce)}\n\n`);
  };
  // How long a client waits before reconnecting (EventSource's `retry`), and, for a
  // stream of what happens from now on, where "now" is: a client that loses the
  // connection before the first event resumes from there, missing nothing.
  const fromNow = follow && (sinceText === null || sinceText === undefined || sinceText === '');
  res.write(`retry: 1000\n${fromNow ? `id: ${end}\n` : ''}\n`);
  let watcher: Watcher | undefined;
  let closed = false;
  let finish: () => void = () => {};
  const done = new Promise<void>((r) => {
    finish = r;
  });
  const close = () => {
    if (closed) return;
    closed = true;
    void watcher?.cancel();
    clearInterval(beat);
    res.end();
    finish();
  };
  const beat = setInterval(() => res.write(': keepalive\n\n'), opts.heartbeatMs ?? 15_000);
  req.on('close', close);
  if (opts.signal?.aborted) close();
  opts.signal?.addEventListener('abort', close, { once: true });
  res.once('close', () => opts.signal?.removeEventListener('abort', close));
  // Events go out one at a time, in order, each with its stored time (stampTimes:
  // the same id carries the same time on every stream and webhook).
  let queue: Promise<void> = Promise.resolve();
  const enqueue = (e: BallastEvent) => {
    queue = queue.then(async () => {
      if (closed) return;
      try {
        await stampTimes(store, [e]);
      } catch {
        close();
        return;
      }
      if (!closed) send(e);
    });
  };
  let idle: NodeJS.Timeout | undefined;
  const closeWhenSent = () => void queue.then(close);
  const maybeEnd = (rev: number) => {
    if (follow) return;
    clearTimeout(idle);
    if (rev >= end) idle = setTimeout(closeWhenSent, 50);
    else idle = setTimeout(closeWhenSent, 300);
  };
  let tr = new Translator();
  // Each watch feeds the stream only until a resync replaces it (its cancel is not instant).
  let generation = 0;
  const start = async (from: number): Promise<void> => {
    const mine = ++generation;
    try {
      watcher = await store.watch('', {
        fromRevision: Math.max(1, from),
        onEvent: (ev) => {
          if (closed || mine !== generation) return;
          if (previousLost(ev, cursor)) {
            // Compacted under the watch: what it would translate from here is wrong.
            void resync(0);
            return;
          }
          for (const e of tr.translate(ev)) {
            if (afterId(e, cursor) && filter(e.kind)) enqueue(e);
          }
          maybeEnd(ev.revision);
        },
        onError: (err) => {
          if (mine !== generation) return;
          if (!closed && isStoreError(err, 'STORE_COMPACTED'))
            void resync(err.compactRevision ?? 0);
          else close();
        },
      });
      if (from > end) maybeEnd(end);
      else maybeEnd(from - 1);
    } catch (e) {
      if (isStoreError(e, 'STORE_COMPACTED')) await resync(e.compactRevision ?? 0);
      else close();
    }
  };
  // The history before the cursor is gone: the state at the oldest revision kept
  // (as a webhook recipient gets it), then every event after it.
  const resync = async (compacted: number): Promise<void> => {
    if (closed) return;
    generation++;
    void watcher?.cancel();
    let e: BallastEvent;
    try {
      e = await resyncAfterCompaction(store, compacted, opts.host);
    } catch {
      close();
      return;
    }
    if (afterId(e, cursor)) {
      enqueue(e);
      cursor = { revision: e.revision, n: e.n };
    }
    tr = new Translator({ hostsLeft: (e.data.hostsLeft as string[] | undefined) ?? [] });
    await start(e.revision);
  };
  if (sinceText === null || sinceText === undefined || sinceText === '') {
    // No cursor: with follow, what happens from now on; without, the whole history kept.
    if (follow) cursor = { revision: end, n: Number.MAX_SAFE_INTEGER };
  }
  await start(
    cursor.revision === 0
      ? 1
      : follow && cursor.n === Number.MAX_SAFE_INTEGER
        ? end + 1
        : cursor.revision,
  );
  await done;
}
