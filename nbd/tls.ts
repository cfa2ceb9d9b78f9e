// TLS for NBD (STARTTLS): credentials, and turning a plain socket into a TLS
// one after the handshake state machine has said yes. Node's `tls` does the
// cryptography; this module decides what the peer proved about itself.
//
// Two kinds of credentials, as nbdkit and QEMU have them:
//   X.509  the server's certificate and key; with a CA, every client must show a
//          certificate that CA signed, and its subject CN names the client.
//   PSK    a keys file of `username:hexkey` lines; the username names the client.

import type net from 'node:net';
import tls from 'node:tls';

export type TlsMode = 'off' | 'allow' | 'require';

export class TlsConfigError extends Error {
  readonly code = 'NBD_TLS_CONFIG';
  constructor(message: string) {
    super(message);
    this.name = 'TlsConfigError';
  }
}

export interface TlsCredentialOptions {
  /** PEM: the server certificate (chain) and its private key. */
  cert?: string | Buffer;
  key?: string | Buffer;
  /** PEM: the CA(s) that sign client certificates. Given → client certificates are required. */
  ca?: string | Buffer;
  /** PSK username → key. */
  psk?: Map<string, Buffer>;
}

/** Parses a PSK keys file (`username:hexkey` per line, as psktool writes it). */
export function parsePskFile(text: string, source = 'PSK file'): Map<string, Buffer> {
  const keys = new Map<string, Buffer>();
  const lines = text.split('\n');
  for (let i = 0; i < lines.length; i++) {
    const line = lines[i]!.replace(/\r$/, '');
    if (line.trim() === '' || line.startsWith('#')) continue;
    const colon = line.lastIndexOf(':');
    const where = `${source} line ${i + 1}`;
    if (colon <= 0) throw new TlsConfigError(`${where}: expected username:hexkey`);
    const user = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (!/^(?:[0-9a-fA-F]{2})+$/.test(hex)) {
      throw new TlsConfigError(`${where}: the key is not an even number of hex digits`);
    }
    if (hex.length < 32) throw new TlsConfigError(`${where}: the key is shorter than 128 bits`);
    if (keys.has(user)) {
      throw new TlsConfigError(`${where}: username ${JSON.stringify(user)} given twice`);
    }
    keys.set(user, Buffer.from(hex, 'hex'));
  }
  if (keys.size === 0) throw new TlsConfigError(`${source}: no keys`);
  return keys;
}

/** How the peer was identified on a TLS connection. */
export interface TlsPeer {
  /** Certificate subject CN or PSK username; null when the peer proved nothing. */
  identity: string | null;
  method: 'x509' | 'psk' | 'none';
  protocol: string | null;
}

// TLS 1.2 suites for PSK clients that do not do TLS 1.3 (TLS 1.3 suites serve both).
const PSK_CIPHERS = [
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
].join(':');

/** Server-side TLS credentials, loaded once and shared by every connection. */
export class TlsCredentials {
  readonly x509: boolean;
  readonly verifyClients: boolean;
  private readonly context: tls.SecureContext;
  readonly psk: Map<string, Buffer> | null;
  /** What these were made from (a worker thread makes its own from it). */
  readonly source: TlsCredentialOptions;

  constructor(opts: TlsCredentialOptions) {
    this.source = opts;
    const haveCert = opts.cert !== undefined || opts.key !== undefined;
    if (haveCert && (opts.cert === undefined || opts.key === undefined)) {
      throw new TlsConfigError('a TLS certificate needs both the certificate and its key');
    }
    if (!haveCert && !opts.psk) {
      throw new TlsConfigError('TLS needs a certificate and key, or a PSK file');
    }
    if (opts.ca !== undefined && !haveCert) {
      throw new TlsConfigError('a CA for client certificates needs a server certificate too');
    }
    this.x509 = haveCert;
    this.verifyClients = opts.ca !== undefined;
    this.psk = opts.psk ?? null;
    let ciphers = tls.DEFAULT_CIPHERS;
    if (this.psk) ciphers = haveCert ? `${ciphers}:${PSK_CIPHERS}` : PSK_CIPHERS;
    try {
      this.context = tls.createSecureContext({
        cert: opts.cert,
        key: opts.key,
        ca: opts.ca,
        ciphers,
        minVersion: 'TLSv1.2',
      });
    } catch (e) {
      throw new TlsConfigError(`cannot load the TLS credentials: ${(e as Error).message}`);
    }
  }

  /**
   * Starts the server side of TLS on `raw`. `onSecure` runs once the peer is
   * authenticated (or would be refused: then `onError` runs instead).
   */
  upgrade(
    raw: net.Socket,
    onSecure: (sock: tls.TLSSocket, peer: TlsPeer) => void,
    onError: (message: string) => void,
  ): tls.TLSSocket {
    let pskUser: string | null = null;
    const psk = this.psk;
    const sock = new tls.TLSSocket(raw, {
      isServer: true,
      secureContext: this.context,
      requestCert: this.verifyClients,
      rejectUnauthorized: this.verifyClients,
      pskCallback: psk
        ? (_s: tls.TLSSocket, identity: string): Buffer | null => {
            const key = psk.get(identity);
            if (!key) return null;
            pskUser = identity;
            return key;
          }
        : undefined,
    } as tls.TLSSocketOptions);
    sock.once('secure', () => {
      const refusal = this.verify(sock, pskUser);
      if (refusal) {
        onError(refusal);
        return;
      }
      const cert = pskUser === null ? sock.getPeerCertificate() : null;
      const cn = cert?.subject?.CN;
      const identity = pskUser ?? (typeof cn === 'string' && cn !== '' ? cn : null);
      onSecure(sock, {
        identity,
        method: pskUser !== null ? 'psk' : identity !== null ? 'x509' : 'none',
        protocol: sock.getProtocol(),
      });
    });
    return sock;
  }

  /** Whether a finished handshake may be used; a message when it must be refused. */
  private verify(sock: tls.TLSSocket, pskUser: string | null): string | null {
    if (pskUser !== null || !this.verifyClients) return null;
    // A server-side TLSSocket built by hand gets OpenSSL's verdict on the client
    // chain but is not acted on (tls.Server does this in its own 'secure'
    // handler, with the same call). Without that verdict: refuse.
    const handle = (sock as unknown as { _handle?: { verifyError?: () => Error | null } })._handle;
    if (typeof handle?.verifyError !== 'function') {
      return 'cannot verify the client certificate';
    }
    const err = handle.verifyError() as (Error & { code?: string }) | null;
    if (err) return `client certificate refused: ${err.code ?? err.message}`;
    if (!sock.getPeerX509Certificate()) return 'no client certificate';
    return null;
  }
}

interface StreamInternals {
  _handle?: { useUserBuffer?: (buf: Uint8Array) => void } | null;
}

/**
 * Makes a TLS socket read its decrypted bytes into buffers `target` chooses,
 * passing each read to `onRead` instead of a 'data' event, as net.Socket's
 * `onread` does. Node offers `onread` only to TLS sockets it connects itself,
 * not to one wrapping an accepted socket; the socket's own fields for it are
 * set here, found by name. Without them (another Node), returns false and the
 * socket stays as it was ('data' events).
 */
export function tlsReadsInto(
  sock: tls.TLSSocket,
  target: () => Buffer,
  onRead: (n: number, buf: Buffer) => void,
): boolean {
  const symbols = Object.getOwnPropertySymbols(sock);
  const field = (name: string): symbol | undefined => symbols.find((s) => s.description === name);
  const kBuffer = field('kBuffer');
  const kBufferCb = field('kBufferCb');
  const kBufferGen = field('kBufferGen');
  const handle = (sock as unknown as StreamInternals)._handle;
  if (!kBuffer || !kBufferCb || !kBufferGen || typeof handle?.useUserBuffer !== 'function') {
    return false;
  }
  const fields = sock as unknown as Record<symbol, unknown>;
  const first = target();
  fields[kBuffer] = first;
  fields[kBufferGen] = target;
  fields[kBufferCb] = (n: number, buf: Uint8Array): boolean => {
    onRead(n, buf as Buffer);
    return true;
  };
  handle.useUserBuffer(first);
  return true;
}
