import net from 'node:net';
import { afterEach, beforeEach, describe, expect, it } from 'vitest';
import { FaultProxy } from './fault-proxy.js';

/** A TCP echo server on loopback, counting the connections it accepted. */
let echo: net.Server;
let echoPort: number;
let accepted = 0;
const proxies: FaultProxy[] = [];
const sockets: net.Socket[] = [];

beforeEach(async () => {
  accepted = 0;
  echo = net.createServer((s) => {
    accepted++;
    s.on('error', () => {});
    s.pipe(s);
  });
  await new Promise<void>((r) => echo.listen(0, '127.0.0.1', () => r()));
  echoPort = (echo.address() as net.AddressInfo).port;
});

afterEach(async () => {
  for (const s of sockets.splice(0)) s.destroy();
  for (const p of proxies.splice(0)) await p.close();
  await new Promise<void>((r) => echo.close(() => r()));
});

async function proxy(): Promise<FaultProxy> {
  const p = await FaultProxy.start(`127.0.0.1:${echoPort}`);
  proxies.push(p);
  return p;
}

/** A client socket that records what it receives and how it ended. */
async function client(port: number) {
  const s = net.connect({ host: '127.0.0.1', port });
  sockets.push(s);
  const got: Buffer[] = [];
  const ended: string[] = [];
  s.on('data', (b) => got.push(b));
  s.on('error', (e: NodeJS.ErrnoException) => ended.push(e.code ?? e.message));
  s.on('close', () => ended.push('close'));
  await new Promise<void>((r) => s.once('connect', () => r()));
  return { s, text: () => Buffer.concat(got).toString(), ended };
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function until(cond: () => boolean, ms = 2000): Promise<void> {
  const end = performance.now() + ms;
  while (!cond()) {
    if (performance.now() > end) throw new Error('timed out');
    await sleep(10);
  }
}

describe('FaultProxy', () => {
  it('forwards both ways', async () => {
    const p = await proxy();
    const c = await client(p.port);
    c.s.write('hello');
    await until(() => c.text() === 'hello');
    expect(p.connections).toBe(1);
  });

  it('a partition holds the connection silent both ways; heal delivers what was sent meanwhile', async () => {
    const p = await proxy();
    const c = await client(p.port);
    c.s.write('a');
    await until(() => c.text() === 'a');
    p.partition();
    c.s.write('b');
    await sleep(300);
    // Nothing came back, and the client saw neither FIN nor RST.
    expect(c.text()).toBe('a');
    expect(c.ended).toEqual([]);
    p.heal();
    await until(() => c.text() === 'ab');
    expect(c.ended).toEqual([]);
  });

  it('a connection made during a partition reaches the target only once healed', async () => {
    const p = await proxy();
    p.partition();
    const c = await client(p.port);
    c.s.write('x');
    await sleep(200);
    expect(accepted).toBe(0);
    expect(c.text()).toBe('');
    p.heal();
    await until(() => c.text() === 'x');
    expect(accepted).toBe(1);
  });

  it('reset sends an RST to current connections; new ones work', async () => {
    const p = await proxy();
    const c = await client(p.port);
    c.s.write('1');
    await until(() => c.text() === '1');
    p.reset();
    await until(() => c.ended.includes('close'));
    expect(c.ended[0]).toBe('ECONNRESET');
    expect(p.connections).toBe(0);
    const d = await client(p.port);
    d.s.write('2');
    await until(() => d.text() === '2');
  });

  it('close resets connections and stops listening', async () => {
    const p = await proxy();
    const c = await client(p.port);
    await p.close();
    await until(() => c.ended.includes('close'));
    const refused = await new Promise<string>((resolve) => {
      const s = net.connect({ host: '127.0.0.1', port: p.port });
      s.on('error', (e: NodeJS.ErrnoException) => resolve(e.code ?? ''));
      s.on('connect', () => {
        s.destroy();
        resolve('connected');
      });
    });
    expect(refused).toBe('ECONNREFUSED');
  });
});
