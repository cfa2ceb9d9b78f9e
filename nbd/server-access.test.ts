// The per-export access hook and Connection.abort(), on a real socket with a
// memory backend: a request the owner's mask forbids gets EPERM and never
// reaches the backend; a new generation is seen by the next request; abort()
// resolves only once the backend has finished what it had.

import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import {
  CMD_READ,
  CMD_WRITE,
  EPERM,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  RawClient,
} from '../test/helpers/nbd-raw.js';
import type { Backend, BackendCaps, IoRequest } from './backend.js';
import { type AccessControl, StaticCatalog } from './export.js';
import { CMD } from './protocol.js';
import { type Connection, NbdServer } from './server.js';
import { ExportStats } from './stats.js';

const CAPS: BackendCaps = {
  write: true,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: false,
  cache: true,
  extents: false,
  multiConn: true,
  rotational: false,
};

class MemoryBackend implements Backend {
  readonly size = 1024 * 1024;
  readonly caps = CAPS;
  readonly data = Buffer.alloc(this.size);
  writes = 0;
  /** When set, writes wait here until released. */
  held: (() => void)[] | null = null;

  read(req: IoRequest): void {
    this.data.copy(req.buf, req.bufOffset, req.offset, req.offset + req.length);
    req.done(0);
  }
  write(req: IoRequest): void {
    const finish = () => {
      req.buf.copy(this.data, req.offset, req.bufOffset, req.bufOffset + req.length);
      this.writes++;
      req.done(0);
    };
    if (this.held) this.held.push(finish);
    else finish();
  }
  flush(req: IoRequest): void {
    req.done(0);
  }
  trim(req: IoRequest): void {
    req.done(0);
  }
  zero(req: IoRequest): void {
    req.done(0);
  }
  cache(req: IoRequest): void {
    req.done(0);
  }
  extents(): number {
    return 95;
  }
  async close(): Promise<void> {}
}

class Switch implements AccessControl {
  generation = 0;
  asked = 0;
  writable = new Set<string>();
  mask(identity: string): number {
    this.asked++;
    return this.writable.has(identity) ? 0xffff : 0xffff & ~(1 << CMD.WRITE);
  }
}

const dirs: string[] = [];
const servers: NbdServer[] = [];
afterEach(async () => {
  for (const s of servers.splice(0)) await s.close(1000);
  for (const d of dirs.splice(0)) rmSync(d, { recursive: true, force: true });
});

async function setup(identity: string | null) {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-acc-'));
  dirs.push(dir);
  const backend = new MemoryBackend();
  const access = new Switch();
  const stats = new ExportStats();
  const server = new NbdServer({
    catalog: new StaticCatalog([
      { name: 'disk', description: '', backend, readOnly: false, stats, access },
    ]),
    identify: () => identity,
  });
  servers.push(server);
  const socket = path.join(dir, 's');
  await server.listen({ path: socket });
  const c = await RawClient.connect(socket);
  await c.greeting();
  await c.sendClientFlags(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
  await c.sendOption(1, Buffer.from('disk')); // EXPORT_NAME
  await c.read(10);
  return { backend, access, stats, server, c };
}

const write = (c: RawClient, handle: number, byte: number) =>
  c.write(
    Buffer.concat([
      RawClient.request({ type: CMD_WRITE, handle, offset: 0, length: 512 }),
      Buffer.alloc(512, byte),
    ]),
  );

describe('per-export access control', () => {
  it('a forbidden write gets EPERM, is counted, and never reaches the backend', async () => {
    const { backend, access, stats, server, c } = await setup('alice');
    await write(c, 1, 0x11);
    expect(await c.readSimpleReply()).toEqual({ error: EPERM, handle: 1n });
    expect(backend.writes).toBe(0);
    expect(stats.denied[CMD.WRITE]).toBe(1);
    expect(server.stats.denied).toBe(1);
    // Reads are allowed by the mask.
    await c.write(RawClient.request({ type: CMD_READ, handle: 2, offset: 0, length: 512 }));
    expect(await c.readSimpleReply()).toEqual({ error: 0, handle: 2n });
    await c.read(512);
    expect(access.asked).toBe(1);
    // A new generation is seen by the next request.
    access.writable.add('alice');
    access.generation++;
    await write(c, 3, 0x22);
    expect(await c.readSimpleReply()).toEqual({ error: 0, handle: 3n });
    expect(backend.data[0]).toBe(0x22);
    expect(access.asked).toBe(2);
    c.destroy();
  });

  it('the identity the owner sees comes from identify() without TLS', async () => {
    const { backend, access, c } = await setup(null);
    access.writable.add('anonymous');
    access.generation++;
    await write(c, 1, 0x33);
    expect(await c.readSimpleReply()).toEqual({ error: 0, handle: 1n });
    expect(backend.data[0]).toBe(0x33);
    c.destroy();
  });

  it('abort() closes the connection and resolves once the backend has finished', async () => {
    const { backend, access, server, c } = await setup('bob');
    access.writable.add('bob');
    access.generation++;
    backend.held = [];
    await write(c, 1, 0x44);
    while (backend.held.length === 0) await new Promise((r) => setTimeout(r, 5));
    const conn = [...server.connections][0] as Connection;
    let done = false;
    const aborted = conn.abort().then(() => {
      done = true;
    });
    await new Promise((r) => setTimeout(r, 20));
    expect(done).toBe(false);
    for (const f of backend.held.splice(0)) f();
    await aborted;
    expect(done).toBe(true);
    expect(await c.waitClose(5000)).toBe('closed');
  });
});
