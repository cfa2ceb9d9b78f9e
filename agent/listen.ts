import fs from 'node:fs';
import net from 'node:net';
import type { ListenTarget } from '../nbd/server.js';
import { BallastError } from './errors.js';

/** Is something accepting connections on this Unix socket path? */
function socketAlive(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = net.connect(path);
    s.once('connect', () => {
      s.destroy();
      resolve(true);
    });
    s.once('error', () => resolve(false));
  });
}

/**
 * Make a Unix socket path ready to bind: a stale socket left by a crash is
 * removed; a live one, or a file that is not a socket, is an error.
 */
export async function prepareSocketPath(path: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  if (!st.isSocket()) {
    throw new BallastError('BALLAST_ADDRESS_IN_USE', `${path} exists and is not a socket`);
  }
  if (await socketAlive(path)) {
    throw new BallastError('BALLAST_ADDRESS_IN_USE', `${path}: another server is listening there`);
  }
  fs.unlinkSync(path);
}

export function describeTarget(t: ListenTarget): string {
  if ('path' in t) return `unix:${t.path}`;
  return t.host.includes(':') ? `[${t.host}]:${t.port}` : `${t.host}:${t.port}`;
}

/** Turn listen errors into stable codes. */
export function listenError(t: ListenTarget, e: unknown): BallastError {
  const err = e as NodeJS.ErrnoException;
  const where = describeTarget(t);
  if (err.code === 'EADDRINUSE') {
    return new BallastError('BALLAST_ADDRESS_IN_USE', `${where} is already in use`, { cause: e });
  }
  if (err.code === 'EACCES' || err.code === 'EPERM') {
    return new BallastError('BALLAST_ADDRESS_DENIED', `${where}: permission denied`, { cause: e });
  }
  if (err.code === 'EADDRNOTAVAIL' || err.code === 'ENOTFOUND') {
    return new BallastError('BALLAST_BAD_ADDRESS', `${where}: no such local address`, { cause: e });
  }
  return new BallastError('BALLAST_LISTEN_FAILED', `${where}: ${err.message}`, { cause: e });
}
