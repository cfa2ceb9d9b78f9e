// TLS credentials and client names from the command line or the agent's
// configuration: files read here, mistakes reported with stable codes.

import { readFileSync } from 'node:fs';
import type net from 'node:net';
import { parsePskFile, TlsConfigError, TlsCredentials, type TlsMode } from '../nbd/tls.js';
import { BallastError } from './errors.js';
import { loadNative } from './native.js';

export interface TlsSettings {
  mode: TlsMode;
  cert?: string;
  key?: string;
  ca?: string;
  pskFile?: string;
}

function read(path: string, what: string): Buffer {
  try {
    return readFileSync(path);
  } catch (e) {
    const code = (e as NodeJS.ErrnoException).code ?? 'error';
    throw new BallastError('BALLAST_TLS_CONFIG', `cannot read the ${what} ${path}: ${code}`, {
      cause: e,
    });
  }
}

export function parseTlsMode(v: string): TlsMode {
  if (v === 'off' || v === 'allow' || v === 'require') return v;
  throw new BallastError(
    'BALLAST_TLS_CONFIG',
    `--tls takes off, allow or require, not ${JSON.stringify(v)}`,
  );
}

/** The credentials for a TLS mode other than off; null when TLS is off. */
export function loadTls(s: TlsSettings): TlsCredentials | null {
  const given = s.cert ?? s.key ?? s.ca ?? s.pskFile;
  if (s.mode === 'off') {
    if (given !== undefined) {
      throw new BallastError(
        'BALLAST_TLS_CONFIG',
        'TLS files were given but --tls is off: add --tls allow or --tls require',
      );
    }
    return null;
  }
  try {
    return new TlsCredentials({
      cert: s.cert === undefined ? undefined : read(s.cert, 'TLS certificate'),
      key: s.key === undefined ? undefined : read(s.key, 'TLS key'),
      ca: s.ca === undefined ? undefined : read(s.ca, 'TLS CA certificate'),
      psk:
        s.pskFile === undefined
          ? undefined
          : parsePskFile(read(s.pskFile, 'PSK file').toString('utf8'), s.pskFile),
    });
  } catch (e) {
    if (e instanceof TlsConfigError) throw new BallastError('BALLAST_TLS_CONFIG', e.message);
    throw e;
  }
}

/**
 * Names for clients that TLS does not name: `ADDRESS=NAME` for a TCP source
 * address, `uid:N=NAME` for the user of a Unix socket peer.
 */
export class IdentityMap {
  private readonly byAddress = new Map<string, string>();
  private readonly byUid = new Map<number, string>();

  constructor(specs: readonly string[]) {
    for (const spec of specs) {
      const eq = spec.lastIndexOf('=');
      const who = eq < 0 ? '' : spec.slice(0, eq);
      const name = eq < 0 ? '' : spec.slice(eq + 1);
      if (!who || !name || !/^[\x21-\x7e]+$/.test(name)) {
        throw new BallastError(
          'BALLAST_BAD_IDENTITY',
          `--identity ${JSON.stringify(spec)}: expected ADDRESS=NAME or uid:N=NAME (NAME printable, no spaces)`,
        );
      }
      if (who.startsWith('uid:')) {
        const uid = Number(who.slice(4));
        if (!/^\d+$/.test(who.slice(4)) || !Number.isSafeInteger(uid)) {
          throw new BallastError(
            'BALLAST_BAD_IDENTITY',
            `--identity ${JSON.stringify(spec)}: uid must be a number`,
          );
        }
        this.byUid.set(uid, name);
      } else {
        this.byAddress.set(normalizeAddress(who), name);
      }
    }
  }

  get size(): number {
    return this.byAddress.size + this.byUid.size;
  }

  /** The name of a client by its socket; `peerUid` finds a Unix peer's uid. */
  lookup(sock: net.Socket, peerUid: (sock: net.Socket) => number | null): string | null {
    if (sock.remoteAddress) return this.byAddress.get(normalizeAddress(sock.remoteAddress)) ?? null;
    if (this.byUid.size === 0) return null;
    const uid = peerUid(sock);
    return uid === null ? null : (this.byUid.get(uid) ?? null);
  }
}

function normalizeAddress(a: string): string {
  const s = a.toLowerCase();
  return s.startsWith('::ffff:') && s.includes('.') ? s.slice(7) : s;
}

/** The uid of a Unix socket client (SO_PEERCRED), or null. */
export function peerUid(sock: net.Socket): number | null {
  const fd = (sock as unknown as { _handle?: { fd?: number } })._handle?.fd;
  if (typeof fd !== 'number' || fd < 0) return null;
  const uid = loadNative().peerUid(fd);
  return uid < 0 ? null : uid;
}

/** What a connection counts against for a per-source limit: its address, or its uid on a Unix socket. */
export function sourceKey(sock: net.Socket): string {
  if (sock.remoteAddress) return normalizeAddress(sock.remoteAddress);
  const uid = peerUid(sock);
  return uid === null ? 'unix' : `uid:${uid}`;
}
