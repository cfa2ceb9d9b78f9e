// Throw-away TLS credentials for tests, made with openssl: a CA, a server
// certificate for localhost/127.0.0.1, client certificates whose CN names the
// client, a second CA that the server does not trust, and PSK keys files.
// Client credentials are laid out as libnbd (tls-certificates=DIR) and QEMU
// (tls-creds-x509,dir=DIR) expect: ca-cert.pem, client-cert.pem, client-key.pem.

import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, readFileSync, writeFileSync } from 'node:fs';
import path from 'node:path';
import { runOk } from './tools.js';

export interface Pki {
  dir: string;
  caCert: string;
  serverCert: string;
  serverKey: string;
  /** name → a client directory for libnbd and QEMU. */
  clients: Map<string, string>;
  /** A directory for a client whose certificate another CA signed (it trusts both CAs). */
  foreign: string;
  /** All PSK users (`username:hexkey` lines). */
  pskFile: string;
  /** name → a PSK file holding only that user's key; also a dir with it as keys.psk (QEMU). */
  psk: Map<string, { file: string; dir: string }>;
  /** A PSK file with the right username and a wrong key. */
  wrongPsk: { file: string; dir: string; user: string };
}

const EXT = {
  ca: ['basicConstraints=critical,CA:TRUE', 'keyUsage=critical,keyCertSign,cRLSign'],
  server: [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    'extendedKeyUsage=serverAuth',
    'subjectAltName=DNS:localhost,IP:127.0.0.1',
  ],
  client: [
    'basicConstraints=critical,CA:FALSE',
    'keyUsage=critical,digitalSignature,keyEncipherment',
    'extendedKeyUsage=clientAuth',
  ],
};

async function key(file: string): Promise<void> {
  await runOk('openssl', [
    'genpkey',
    '-algorithm',
    'EC',
    '-pkeyopt',
    'ec_paramgen_curve:P-256',
    '-out',
    file,
  ]);
}

async function selfSigned(dir: string, name: string, cn: string): Promise<void> {
  const keyFile = path.join(dir, `${name}-key.pem`);
  await key(keyFile);
  const args = [
    'req',
    '-x509',
    '-new',
    '-key',
    keyFile,
    '-out',
    path.join(dir, `${name}-cert.pem`),
  ];
  args.push('-days', '2', '-subj', `/CN=${cn}`);
  for (const e of EXT.ca) args.push('-addext', e);
  await runOk('openssl', args);
}

async function signed(
  dir: string,
  ca: string,
  name: string,
  cn: string,
  kind: 'server' | 'client',
): Promise<void> {
  const keyFile = path.join(dir, `${name}-key.pem`);
  const csr = path.join(dir, `${name}.csr`);
  const ext = path.join(dir, `${name}.ext`);
  await key(keyFile);
  await runOk('openssl', ['req', '-new', '-key', keyFile, '-out', csr, '-subj', `/CN=${cn}`]);
  writeFileSync(ext, `${EXT[kind].join('\n')}\n`);
  await runOk('openssl', [
    'x509',
    '-req',
    '-in',
    csr,
    '-CA',
    path.join(dir, `${ca}-cert.pem`),
    '-CAkey',
    path.join(dir, `${ca}-key.pem`),
    '-CAcreateserial',
    '-days',
    '2',
    '-extfile',
    ext,
    '-out',
    path.join(dir, `${name}-cert.pem`),
  ]);
}

function clientDir(dir: string, name: string, cert: string, caFiles: string[]): string {
  const d = path.join(dir, `client-${name}`);
  mkdirSync(d, { recursive: true });
  writeFileSync(
    path.join(d, 'ca-cert.pem'),
    caFiles.map((f) => readFileSync(path.join(dir, f), 'utf8')).join(''),
  );
  copyFileSync(path.join(dir, `${cert}-cert.pem`), path.join(d, 'client-cert.pem'));
  copyFileSync(path.join(dir, `${cert}-key.pem`), path.join(d, 'client-key.pem'));
  return d;
}

function pskFiles(dir: string, tag: string, line: string): { file: string; dir: string } {
  const d = path.join(dir, `psk-${tag}`);
  mkdirSync(d, { recursive: true });
  const file = path.join(d, 'keys.psk');
  writeFileSync(file, `${line}\n`, { mode: 0o600 });
  return { file, dir: d };
}

/** Makes everything in `dir` (about a second of openssl runs). */
export async function makePki(dir: string, names: readonly string[]): Promise<Pki> {
  mkdirSync(dir, { recursive: true });
  await selfSigned(dir, 'ca', 'Ballast test CA');
  await selfSigned(dir, 'other-ca', 'Some other CA');
  await signed(dir, 'ca', 'server', 'localhost', 'server');
  const clients = new Map<string, string>();
  for (const n of names) {
    await signed(dir, 'ca', n, n, 'client');
    clients.set(n, clientDir(dir, n, n, ['ca-cert.pem']));
  }
  // Same CN as the first client, but from a CA the server does not know.
  const impostor = names[0] ?? 'mallory';
  await signed(dir, 'other-ca', 'foreign', impostor, 'client');
  const foreign = clientDir(dir, 'foreign', 'foreign', ['ca-cert.pem', 'other-ca-cert.pem']);

  const lines = names.map((n) => `${n}:${randomBytes(32).toString('hex')}`);
  const pskFile = path.join(dir, 'server.psk');
  writeFileSync(pskFile, `${lines.join('\n')}\n`, { mode: 0o600 });
  const psk = new Map<string, { file: string; dir: string }>();
  for (const [i, n] of names.entries()) psk.set(n, pskFiles(dir, n, lines[i]!));
  const wrongUser = names[0] ?? 'nobody';
  const wrong = pskFiles(dir, 'wrong', `${wrongUser}:${randomBytes(32).toString('hex')}`);

  return {
    dir,
    caCert: path.join(dir, 'ca-cert.pem'),
    serverCert: path.join(dir, 'server-cert.pem'),
    serverKey: path.join(dir, 'server-key.pem'),
    clients,
    foreign,
    pskFile,
    psk,
    wrongPsk: { ...wrong, user: wrongUser },
  };
}

/** `ballast serve` arguments for X.509 with client certificates. */
export function x509Args(pki: Pki, mode: 'allow' | 'require'): string[] {
  return [
    '--tls',
    mode,
    '--tls-cert',
    pki.serverCert,
    '--tls-key',
    pki.serverKey,
    '--tls-ca',
    pki.caCert,
  ];
}

/** QEMU's --object for a client's X.509 credentials (id tls0). */
export function qemuX509(dir: string): string {
  return `tls-creds-x509,id=tls0,dir=${dir},endpoint=client`;
}

/** QEMU's --object for PSK credentials (id tls0); the dir holds keys.psk. */
export function qemuPsk(dir: string, user: string): string {
  return `tls-creds-psk,id=tls0,dir=${dir},endpoint=client,username=${user}`;
}
