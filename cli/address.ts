import { BallastError } from '../agent/errors.js';

export interface HostPort {
  host: string;
  port: number;
}

/** HOST:PORT, [IPv6]:PORT, or a bare :PORT / PORT (loopback). */
export function parseHostPort(text: string, defaultPort = 10809): HostPort {
  let host: string;
  let port: string | undefined;
  const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(text);
  if (v6) {
    host = v6[1]!;
    port = v6[2];
  } else if (/^\d+$/.test(text)) {
    host = '127.0.0.1';
    port = text;
  } else {
    const i = text.lastIndexOf(':');
    host = i < 0 ? text : text.slice(0, i);
    port = i < 0 ? undefined : text.slice(i + 1);
    if (host === '') host = '127.0.0.1';
  }
  const p =
    port === undefined || port === '' ? defaultPort : /^\d+$/.test(port) ? Number(port) : -1;
  if (p < 0 || p > 65535 || host === '' || host.includes(':') !== Boolean(v6)) {
    throw new BallastError(
      'BALLAST_BAD_ADDRESS',
      `bad listen address ${JSON.stringify(text)}: expected HOST:PORT (e.g. 127.0.0.1:10809 or [::1]:10809)`,
    );
  }
  return { host, port: p };
}
