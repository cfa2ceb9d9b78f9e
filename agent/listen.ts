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
 * removed; a live one, or a file that is not a socket, is an error that says who
 * holds it and, given `move`, how to give this one another path.
 */
export async function prepareSocketPath(path: string, move?: string): Promise<void> {
  let st: fs.Stats;
  try {
    st = fs.lstatSync(path);
  } catch {
    return;
  }
  const hint = move ? `; give this one another socket (${move})` : '';
  if (!st.isSocket()) {
    throw new BallastError('BALLAST_ADDRESS_IN_USE', `${path} exists and is not a socket${hint}`);
  }
  if (await socketAlive(path)) {
    const who = unixHolder(path);
    throw new BallastError(
      'BALLAST_ADDRESS_IN_USE',
      `${path}: another server is listening there${who ? ` (${who})` : ''}; stop that${hint}`,
    );
  }
  fs.unlinkSync(path);
}

export function describeTarget(t: ListenTarget): string {
  if ('path' in t) return `unix:${t.path}`;
  return t.host.includes(':') ? `[${t.host}]:${t.port}` : `${t.host}:${t.port}`;
}

/** What moves a listener to another address, said when its address is taken. */
export const MOVE_LISTENER = {
  agentApi: '`ballast agent --api-listen HOST:PORT|none`, or api.listen in its config',
  agentNbd: 'nbd.listen in its config',
  serve: '`ballast serve --listen HOST:PORT`, or `--socket PATH` instead',
  agentApiSocket: 'api.socket in its config',
  agentNbdSocket: 'nbd.socket in its config',
  serveSocket: '`ballast serve --socket PATH`',
} as const;

/** Turn listen errors into stable codes; `move` says how to give it another address. */
export function listenError(t: ListenTarget, e: unknown, move: string): BallastError {
  const err = e as NodeJS.ErrnoException;
  const where = describeTarget(t);
  if (err.code === 'EADDRINUSE') {
    const who = 'port' in t ? tcpHolder(t.port) : null;
    return new BallastError(
      'BALLAST_ADDRESS_IN_USE',
      `${where} is already in use${who ? ` by ${who}` : ''}; stop that, or give this one another ` +
        `address (${move})`,
      { cause: e },
    );
  }
  if (err.code === 'EACCES' || err.code === 'EPERM') {
    return new BallastError('BALLAST_ADDRESS_DENIED', `${where}: permission denied`, { cause: e });
  }
  if (err.code === 'EADDRNOTAVAIL' || err.code === 'ENOTFOUND') {
    return new BallastError('BALLAST_BAD_ADDRESS', `${where}: no such local address`, { cause: e });
  }
  return new BallastError('BALLAST_LISTEN_FAILED', `${where}: ${err.message}`, { cause: e });
}

/**
 * The process listening on a local TCP port, as `pid N (command line)`, read from
 * /proc (a socket's inode, then the process holding it); null when it cannot be told
 * (another user's process seen without root, or not Linux).
 */
export function tcpHolder(port: number): string | null {
  const inodes = new Set<string>();
  for (const f of ['/proc/net/tcp', '/proc/net/tcp6']) {
    let text: string;
    try {
      text = fs.readFileSync(f, 'utf8');
    } catch {
      continue;
    }
    for (const line of text.split('\n').slice(1)) {
      const c = line.trim().split(/\s+/);
      // local_address is HEX_IP:HEX_PORT; state 0A is LISTEN; the inode is column 10.
      if (c[3] === '0A' && Number.parseInt(c[1]?.split(':')[1] ?? '', 16) === port && c[9]) {
        inodes.add(`socket:[${c[9]}]`);
      }
    }
  }
  return holderOf(inodes);
}

/**
 * The process listening on a Unix socket path, as `pid N (command line)`, read from
 * /proc/net/unix (the listening socket bound to that path, then the process holding
 * it); null when it cannot be told.
 */
export function unixHolder(path: string): string | null {
  const inodes = new Set<string>();
  let text: string;
  try {
    text = fs.readFileSync('/proc/net/unix', 'utf8');
  } catch {
    return null;
  }
  for (const line of text.split('\n').slice(1)) {
    // Num RefCount Protocol Flags Type St Inode Path; flags 00010000: listening
    const c = line.trim().split(/\s+/);
    if (c[7] === path && c[3] === '00010000' && c[6]) inodes.add(`socket:[${c[6]}]`);
  }
  return holderOf(inodes);
}

/** The first process holding one of these sockets (`socket:[INODE]`), as `pid N (command line)`. */
function holderOf(inodes: Set<string>): string | null {
  if (inodes.size === 0) return null;
  let pids: string[];
  try {
    pids = fs.readdirSync('/proc').filter((d) => /^\d+$/.test(d));
  } catch {
    return null;
  }
  for (const pid of pids) {
    let fds: string[];
    try {
      fds = fs.readdirSync(`/proc/${pid}/fd`);
    } catch {
      continue;
    }
    for (const fd of fds) {
      let link: string;
      try {
        link = fs.readlinkSync(`/proc/${pid}/fd/${fd}`);
      } catch {
        continue;
      }
      if (!inodes.has(link)) continue;
      let cmd = '';
      try {
        cmd = fs
          .readFileSync(`/proc/${pid}/cmdline`, 'utf8')
          .replace(/[\0\s]+/g, ' ')
          .trim();
      } catch {}
      return `pid ${pid}${cmd ? ` (${cmd.length > 160 ? `${cmd.slice(0, 157)}...` : cmd})` : ''}`;
    }
  }
  return null;
}
