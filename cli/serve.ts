// `ballast serve`: serve files over NBD the way qemu-nbd or nbdkit's file
// plugin do, on the same server the agent uses.

import fs from 'node:fs';
import { BallastError } from '../agent/errors.js';
import { describeTarget, listenError, MOVE_LISTENER, prepareSocketPath } from '../agent/listen.js';
import { loadNative } from '../agent/native.js';
import { CACHE_MODES, type CacheMode, SparseFileBackend } from '../agent/sparse-file.js';
import { IdentityMap, loadTls, peerUid, sourceKey, type TlsSettings } from '../agent/tls-config.js';
import { formatSize, parseSize } from '../agent/units.js';
import type { Export } from '../nbd/export.js';
import { StaticCatalog } from '../nbd/export.js';
import { type ListenTarget, NbdServer } from '../nbd/server.js';
import { defaultWorkers } from '../nbd/workers.js';
import { parseHostPort } from './address.js';

export interface ExportSpec {
  name: string;
  file: string;
  size?: number;
  readOnly: boolean;
  description: string;
  /** Host page cache for writes (SparseFileOptions.cache); default writeback. */
  cache?: CacheMode;
}

/** A safety switch: anything unrecognised is an error, never "writable". */
function parseBool(value: string | undefined, spec: string): boolean {
  if (value === undefined) return true;
  const v = value.toLowerCase();
  if (['true', 'yes', '1', 'on', 'y'].includes(v)) return true;
  if (['false', 'no', '0', 'off', 'n'].includes(v)) return false;
  throw new BallastError(
    'BALLAST_BAD_EXPORT',
    `--export ${JSON.stringify(spec)}: read-only takes true or false, not ${JSON.stringify(value)}`,
  );
}

/** `name=N,file=F[,size=S][,read-only][,cache=MODE][,description=D]` */
export function parseExportSpec(text: string): ExportSpec {
  const spec: Partial<ExportSpec> = { readOnly: false, description: '' };
  for (const part of text.split(',')) {
    const eq = part.indexOf('=');
    const key = eq < 0 ? part : part.slice(0, eq);
    const value = eq < 0 ? undefined : part.slice(eq + 1);
    switch (key) {
      case 'name':
        spec.name = value ?? '';
        break;
      case 'file':
        spec.file = value;
        break;
      case 'size':
        spec.size = parseSize(value ?? '', `size in --export ${JSON.stringify(text)}`);
        break;
      case 'read-only':
      case 'readonly':
      case 'ro':
        spec.readOnly = parseBool(value, text);
        break;
      case 'description':
        spec.description = value ?? '';
        break;
      case 'cache':
        if (!CACHE_MODES.includes(value as CacheMode))
          throw new BallastError(
            'BALLAST_BAD_EXPORT',
            `--export ${JSON.stringify(text)}: cache takes ${CACHE_MODES.join(' or ')}, not ${JSON.stringify(value ?? '')}`,
          );
        spec.cache = value as CacheMode;
        break;
      default:
        throw new BallastError(
          'BALLAST_BAD_EXPORT',
          `--export ${JSON.stringify(text)}: unknown key ${JSON.stringify(key)} (expected name, file, size, read-only, cache, description)`,
        );
    }
  }
  if (spec.name === undefined || !spec.file) {
    throw new BallastError(
      'BALLAST_BAD_EXPORT',
      `--export ${JSON.stringify(text)}: needs name=NAME and file=PATH`,
    );
  }
  return spec as ExportSpec;
}

export interface ServeOptions {
  exports: ExportSpec[];
  listen: string[];
  socket: string[];
  maxConnections: number;
  /** 0: no deadline. */
  handshakeTimeoutMs: number;
  maxHandshakes?: number;
  maxPerSource?: number;
  /** Threads serving established connections; default: the cores available. */
  workers?: number;
  /** Data buffers held by the connections of one thread (default 16 MiB). */
  threadBufferedBytes?: number;
  verbose: boolean;
  tls?: TlsSettings;
  /** ADDRESS=NAME / uid:N=NAME: names for clients TLS does not name. */
  identities?: string[];
}

function log(msg: string): void {
  process.stderr.write(`ballast: ${msg}\n`);
}

export async function serve(opts: ServeOptions): Promise<never> {
  if (opts.exports.length === 0) {
    throw new BallastError('BALLAST_USAGE', 'nothing to serve: give FILE or --export');
  }
  const names = new Set<string>();
  for (const e of opts.exports) {
    if (names.has(e.name)) {
      throw new BallastError(
        'BALLAST_BAD_EXPORT',
        `export name ${JSON.stringify(e.name)} given twice`,
      );
    }
    names.add(e.name);
  }

  const tlsSettings = opts.tls ?? { mode: 'off' };
  const credentials = loadTls(tlsSettings);
  const identities = new IdentityMap(opts.identities ?? []);

  const targets: ListenTarget[] = [];
  for (const l of opts.listen) targets.push(parseHostPort(l));
  for (const p of opts.socket) targets.push({ path: p });
  if (targets.length === 0) targets.push({ host: '127.0.0.1', port: 10809 });

  const exports: Export[] = [];
  const closeAll = async (): Promise<void> => {
    for (const e of exports) await e.backend.close().catch(() => {});
  };
  try {
    for (const spec of opts.exports) {
      const backend = await SparseFileBackend.open(spec.file, {
        size: spec.size,
        readOnly: spec.readOnly,
        cache: spec.cache,
      });
      exports.push({
        name: spec.name,
        description: spec.description,
        backend,
        readOnly: spec.readOnly,
      });
    }
  } catch (e) {
    await closeAll();
    throw e;
  }

  const server = new NbdServer({
    catalog: new StaticCatalog(exports),
    maxConnections: opts.maxConnections,
    handshakeTimeoutMs: opts.handshakeTimeoutMs,
    maxHandshakes: opts.maxHandshakes,
    maxPerSource: opts.maxPerSource,
    workers: opts.workers ?? defaultWorkers(),
    threadBufferedBytes: opts.threadBufferedBytes,
    dupFd: (fd) => loadNative().dup(fd),
    sourceOf: sourceKey,
    tls: credentials ? { mode: tlsSettings.mode, credentials } : undefined,
    identify: identities.size > 0 ? (c) => identities.lookup(c.raw, peerUid) : undefined,
    log: (level, msg) => {
      if (level !== 'debug' || opts.verbose) log(msg);
    },
  });

  const sockets: string[] = [];
  try {
    for (const t of targets) {
      if ('path' in t) await prepareSocketPath(t.path, MOVE_LISTENER.serveSocket);
      try {
        await server.listen(t);
      } catch (e) {
        throw listenError(t, e, MOVE_LISTENER.serve);
      }
      if ('path' in t) sockets.push(t.path);
    }
  } catch (e) {
    await server.close(0);
    await closeAll();
    for (const p of sockets) fs.rmSync(p, { force: true });
    throw e;
  }

  for (const e of exports) {
    const ro = e.readOnly ? ', read-only' : '';
    const cache =
      e.backend instanceof SparseFileBackend && e.backend.cacheMode === 'none'
        ? ', cache none (O_DIRECT)'
        : '';
    log(
      `export ${JSON.stringify(e.name)}: ${e.backend.size} bytes (${formatSize(e.backend.size)})${ro}${cache}`,
    );
  }
  log(`listening on ${targets.map(describeTarget).join(', ')}`);
  if (credentials) {
    const kinds = [credentials.x509 ? 'X.509' : '', credentials.psk ? 'PSK' : '']
      .filter(Boolean)
      .join(' and ');
    const verify = credentials.verifyClients ? ', client certificates required' : '';
    log(`TLS ${tlsSettings.mode}: ${kinds}${verify}`);
  }

  let stopping = false;
  const stop = async (signal: string): Promise<void> => {
    if (stopping) {
      log(`${signal} again: exiting now`);
      process.exit(1);
    }
    stopping = true;
    log(`${signal}: finishing requests in flight`);
    await server.close();
    let failed = false;
    for (const e of exports) {
      await new Promise<void>((resolve) => {
        if (!e.backend.caps.flush) return resolve();
        e.backend.flush({
          offset: 0,
          length: 0,
          buf: Buffer.alloc(0),
          bufOffset: 0,
          done: (errno) => {
            if (errno) {
              failed = true;
              log(`flush of export ${JSON.stringify(e.name)} failed: errno ${errno}`);
            }
            resolve();
          },
        });
      });
    }
    await closeAll();
    for (const p of sockets) fs.rmSync(p, { force: true });
    log('stopped');
    process.exit(failed ? 1 : 0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));
  return new Promise<never>(() => {});
}
