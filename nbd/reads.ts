// Reading an accepted socket into buffers the reader chooses (`onread`).
import net from 'node:net';

interface AcceptedSocketInternals {
  _handle?: unknown;
  _server?: net.Server | null;
  server?: net.Server | null;
}

/**
 * Node reads a socket into a fresh 64 KiB buffer per read: a large payload
 * costs allocations, their garbage and a copy into the buffer it belongs in.
 * `onread` lets the reader choose the buffer of every read (`target`, asked
 * before each read; `onRead` gets how many bytes landed in it), but
 * net.Server offers it only to sockets it creates itself; so the accepted
 * socket's handle, not yet reading (pauseOnConnect), moves to a new Socket
 * that has it. Null if the handle is not where Node keeps it: the caller then
 * uses the accepted socket as it is ('data' events).
 */
export function acceptedReadsInto(
  sock: net.Socket,
  target: () => Buffer,
  onRead: (n: number, buf: Buffer) => void,
): net.Socket | null {
  const old = sock as unknown as AcceptedSocketInternals;
  const handle = old._handle;
  if (!handle) return null;
  old._handle = null;
  // `handle` is what net.Server itself passes; the public typings leave it out.
  const opts: net.SocketConstructorOpts & { handle: unknown; onread: net.OnReadOpts } = {
    handle,
    allowHalfOpen: true,
    readable: true,
    writable: true,
    onread: {
      buffer: target,
      callback: (n: number, buf: Uint8Array) => {
        onRead(n, buf as Buffer);
        return true;
      },
    },
  };
  const socket = new net.Socket(opts);
  // A server counts its connections and waits for them on close(): the new
  // socket answers for the one it replaces.
  const fresh = socket as unknown as AcceptedSocketInternals;
  fresh._server = old._server ?? null;
  fresh.server = old.server ?? null;
  old._server = null;
  old.server = null;
  return socket;
}
