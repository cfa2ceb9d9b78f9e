import http from 'node:http';
import net from 'node:net';
import { afterEach, describe, expect, it } from 'vitest';
import { createApiGuard } from './api-guard.js';

const servers: http.Server[] = [];
const sockets: net.Socket[] = [];

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const s of servers.splice(0)) {
    s.closeAllConnections();
    await new Promise((r) => s.close(r));
  }
});

/** A server whose /slow route answers only when told to. */
async function serve(limits: { maxConnections: number; headersMs: number; requestMs: number }) {
  let release: (() => void) | null = null;
  const srv = http.createServer((req, res) => {
    if (req.url === '/slow') {
      release = () => res.end('slow');
      return;
    }
    if (req.url === '/stream') {
      // As GET /v1/events: never reads the (empty) body, writes for as long as the client stays.
      res.writeHead(200, { 'content-type': 'text/event-stream' });
      const beat = setInterval(() => res.write(': keepalive\n\n'), 50);
      res.once('close', () => clearInterval(beat));
      return;
    }
    req.resume();
    req.on('end', () => res.end('ok'));
  });
  const guard = createApiGuard(srv, {
    maxConnections: limits.maxConnections,
    headersTimeoutMs: limits.headersMs,
    requestTimeoutMs: limits.requestMs,
    sweepMs: 50,
  });
  await new Promise<void>((r) => srv.listen(0, '127.0.0.1', r));
  servers.push(srv);
  const port = (srv.address() as net.AddressInfo).port;
  return { srv, guard, port, release: () => release?.() };
}

function raw(port: number, first: string): Promise<{ sock: net.Socket; closed: Promise<void> }> {
  return new Promise((resolve) => {
    const sock = net.connect(port, '127.0.0.1');
    sockets.push(sock);
    sock.on('error', () => {});
    sock.on('data', () => {});
    const closed = new Promise<void>((r) => sock.once('close', () => r()));
    sock.once('connect', () => {
      if (first) sock.write(first);
      resolve({ sock, closed });
    });
  });
}

function get(port: number, path = '/'): Promise<string> {
  return new Promise((resolve, reject) => {
    const req = http.get({ host: '127.0.0.1', port, path, agent: false }, (res) => {
      let body = '';
      res.on('data', (c) => {
        body += c;
      });
      res.on('end', () => resolve(body));
    });
    req.on('error', reject);
  });
}

const within = <T>(p: Promise<T>, ms: number) =>
  Promise.race([p, new Promise<'timeout'>((r) => setTimeout(() => r('timeout'), ms))]);

describe('API guard', () => {
  it('at the connection cap the oldest idle connection makes room for a new one', async () => {
    const s = await serve({ maxConnections: 8, headersMs: 60_000, requestMs: 60_000 });
    const slow = [];
    for (let i = 0; i < 20; i++) slow.push(await raw(s.port, 'GET / HTTP/1.1\r\nX-Slow: '));
    expect(await within(get(s.port), 2000)).toBe('ok');
    // The first twelve were closed to make room; at most the cap remain.
    expect(await within(Promise.all(slow.slice(0, 12).map((x) => x.closed)), 2000)).not.toBe(
      'timeout',
    );
    expect(s.guard.connections).toBeLessThanOrEqual(8);
  });

  it('a request being answered is never the one closed', async () => {
    const s = await serve({ maxConnections: 2, headersMs: 60_000, requestMs: 60_000 });
    const pending = get(s.port, '/slow');
    await new Promise((r) => setTimeout(r, 100));
    for (let i = 0; i < 5; i++) await raw(s.port, 'GET / HTTP/1.1\r\n');
    s.release();
    expect(await within(pending, 2000)).toBe('slow');
  });

  it('headers that trickle in are cut off at the headers deadline', async () => {
    const s = await serve({ maxConnections: 100, headersMs: 300, requestMs: 60_000 });
    const c = await raw(s.port, 'GET / HTTP/1.1\r\n');
    const drip = setInterval(() => c.sock.write('X-A: b\r\n'), 50);
    const r = await within(c.closed, 3000);
    clearInterval(drip);
    expect(r).not.toBe('timeout');
    // An idle connection that never sends a byte goes the same way.
    const idle = await raw(s.port, '');
    expect(await within(idle.closed, 3000)).not.toBe('timeout');
  });

  it('a body that stops coming is cut off at the request deadline', async () => {
    const s = await serve({ maxConnections: 100, headersMs: 60_000, requestMs: 300 });
    const c = await raw(
      s.port,
      'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789',
    );
    expect(await within(c.closed, 3000)).not.toBe('timeout');
    expect(s.guard.dropped).toBeGreaterThanOrEqual(1);
  });

  it('a stream lives past the request deadline; a body that stops coming beside it is still cut off', async () => {
    const s = await serve({ maxConnections: 100, headersMs: 300, requestMs: 300 });
    const started = performance.now();
    let beats = 0;
    let ended = false;
    const req = http.get({ host: '127.0.0.1', port: s.port, path: '/stream', agent: false });
    req.on('error', () => {
      ended = true;
    });
    req.on('response', (res) => {
      res.on('data', () => {
        beats++;
      });
      res.on('close', () => {
        ended = true;
      });
    });
    // A slow body on another connection meanwhile: the guard still acts on it.
    const c = await raw(s.port, 'POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123');
    expect(await within(c.closed, 5000)).not.toBe('timeout');
    // Ten request deadlines on the stream's clock, and it still gets its heartbeats.
    while (performance.now() - started < 10 * 300 && !ended) {
      await new Promise((r) => setTimeout(r, 100));
    }
    const seen = beats;
    while (beats === seen && !ended) await new Promise((r) => setTimeout(r, 20));
    expect(ended).toBe(false);
    expect(s.guard.dropped).toBe(1);
    req.destroy();
  });
});
