// Fuzz targets: every parser of bytes that come from outside, fed generated
// and mutated inputs (fast-check). A target fails when its parser throws
// anything but its own documented error, hangs, or breaks an invariant that
// must hold for any input: the incremental parsers must see the same thing
// however the bytes are split into chunks, and decoded catalogs must encode
// back to themselves. Seeds live in corpus/<target>/, inputs that once broke
// a target in regressions/<target>/; both are replayed on every run.

import { createHash } from 'node:crypto';
import { mkdtempSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import fc from 'fast-check';
import { parse as parseYaml } from 'yaml';
import { createApiServer } from '../../agent/api.js';
import { DynamicCatalog } from '../../agent/catalog.js';
import { validateConfig } from '../../agent/config.js';
import { DeviceManager } from '../../agent/devices.js';
import { BallastError } from '../../agent/errors.js';
import { createMetrics } from '../../agent/metrics.js';
import { Pool } from '../../agent/pools.js';
import { ReservationManager } from '../../agent/reservations.js';
import { SqliteStore } from '../../agent/store/sqlite-store.js';
import { DeployError } from '../../deploy/errors.js';
import { parseInventory } from '../../deploy/inventory.js';
import { KnownHosts, parseKnownHosts, verifyHostKey } from '../../deploy/known-hosts.js';
import { chooseCatalog, DumpError, decodeSlot, encodeSlot } from '../../dumpd/catalog.js';
import { parseConfig as parseDumpdConfig } from '../../dumpd/config.js';
import { FLAT_HEADER_SIZE, FlattenedReader } from '../../dumpd/flattened.js';
import { QmpError, QmpLineDecoder } from '../../dumpd/qmp.js';
import { decodeHeader, encodeHeader, HEADER_BYTES, HeaderError } from '../../migrate/image.js';
import type { Backend, BackendCaps, IoRequest } from '../../nbd/backend.js';
import {
  type ExportInfo,
  NbdClientError,
  parseInfo,
  parseOptionReplyHeader,
  ReplyReader,
  type ReplySink,
} from '../../nbd/client-codec.js';
import { StaticCatalog } from '../../nbd/export.js';
import { Negotiation } from '../../nbd/negotiation.js';
import {
  Decision,
  HandshakeReader,
  type HandshakeSink,
  type RequestHeader,
  TransmissionReader,
  type TransmissionSink,
} from '../../nbd/reader.js';
import { validateRequest } from '../../nbd/validate.js';
import { notifyRoutes } from '../../notify/api.js';
import { Notifier } from '../../notify/notifier.js';
import { FULL_CAPS } from '../helpers/caps.js';

export interface Target {
  name: string;
  /** Inputs: generated with the format's structure, plus raw bytes and mutated seeds. */
  arbitrary: (seeds: Buffer[]) => fc.Arbitrary<Buffer>;
  /** Throws (or rejects) when the input broke the parser. */
  run: (input: Buffer) => void | Promise<void>;
}

/** An error the parser may throw for bad input (anything else is a bug). */
function expected(e: unknown, ...kinds: (new (...a: never[]) => Error)[]): void {
  if (kinds.some((k) => e instanceof k)) return;
  throw e;
}

/** Raw bytes, a mutated seed, or `structured`: a third each. */
function inputs(seeds: Buffer[], structured: fc.Arbitrary<Buffer>, max = 4096) {
  const raw = fc.uint8Array({ maxLength: max }).map((a) => Buffer.from(a));
  const arbs: fc.Arbitrary<Buffer>[] = [raw, structured];
  if (seeds.length > 0) arbs.push(mutated(seeds));
  return fc.oneof(...arbs);
}

/** A seed with bytes flipped, inserted, removed or cut. */
function mutated(seeds: Buffer[]): fc.Arbitrary<Buffer> {
  const edit = fc.record({
    kind: fc.constantFrom('set', 'insert', 'delete', 'cut'),
    at: fc.nat(),
    byte: fc.integer({ min: 0, max: 255 }),
    n: fc.integer({ min: 1, max: 16 }),
  });
  return fc
    .tuple(fc.constantFrom(...seeds), fc.array(edit, { maxLength: 8 }))
    .map(([seed, edits]) => {
      let b = Buffer.from(seed);
      for (const e of edits) {
        const at = b.length === 0 ? 0 : e.at % (b.length + 1);
        if (e.kind === 'set' && at < b.length) b[at] = e.byte;
        else if (e.kind === 'insert')
          b = Buffer.concat([b.subarray(0, at), Buffer.alloc(e.n, e.byte), b.subarray(at)]);
        else if (e.kind === 'delete') b = Buffer.concat([b.subarray(0, at), b.subarray(at + e.n)]);
        else if (e.kind === 'cut') b = b.subarray(0, at);
      }
      return b;
    });
}

/** The input split at pseudo-random points taken from its own bytes (deterministic). */
function splits(b: Buffer): Buffer[] {
  const out: Buffer[] = [];
  let pos = 0;
  let i = 0;
  while (pos < b.length) {
    const n = 1 + ((b[i % b.length] ?? 0) % 23);
    out.push(b.subarray(pos, pos + n));
    pos += n;
    i++;
  }
  return out;
}

const u32 = (n: number) => {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(n >>> 0);
  return b;
};
const u16 = (n: number) => {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(n & 0xffff);
  return b;
};
const u64 = (n: bigint) => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(BigInt.asUintN(64, n));
  return b;
};
const IHAVEOPT = Buffer.from('IHAVEOPT', 'latin1');

// ---------------------------------------------------------------- NBD server

/** A real but tiny backend: memory, every capability. */
class MemBackend implements Backend {
  readonly caps: BackendCaps = FULL_CAPS;
  constructor(readonly size: number) {}
  read(r: IoRequest) {
    r.done(0);
  }
  write(r: IoRequest) {
    r.done(0);
  }
  flush(r: IoRequest) {
    r.done(0);
  }
  trim(r: IoRequest) {
    r.done(0);
  }
  zero(r: IoRequest) {
    r.done(0);
  }
  cache(r: IoRequest) {
    r.done(0);
  }
  extents() {
    return 0;
  }
  async close() {}
}

const catalog = new StaticCatalog([
  { name: 'disk', description: 'fuzz', backend: new MemBackend(1 << 20), readOnly: false },
  { name: 'ro', description: '', backend: new MemBackend(4096), readOnly: true },
]);

/** Runs a handshake through HandshakeReader + Negotiation; returns what happened, in order. */
function handshake(chunks: Buffer[]): string[] {
  const log: string[] = [];
  const neg = new Negotiation(catalog, {
    tls: 'allow',
    authorize: (exp) => (exp.name === 'ro' ? 'no' : null),
  });
  let stop = false;
  const sink: HandshakeSink = {
    clientFlags(flags) {
      const err = neg.clientFlags(flags);
      log.push(`flags ${flags} ${err ?? 'ok'}`);
      if (err) stop = true;
      return !err;
    },
    badMagic() {
      log.push('bad magic');
      stop = true;
    },
    option(opt, data) {
      const step = neg.option(opt, data);
      log.push(
        `opt ${opt} ${data?.length ?? 'skipped'} → ${step.verdict} ${step.replies.map((r) => r.toString('hex')).join(',')}`,
      );
      if (step.verdict === 'continue') return true;
      stop = true;
      return false;
    },
  };
  const r = new HandshakeReader(sink);
  for (const c of chunks) {
    if (stop) break;
    r.feed(c, 0);
  }
  return log;
}

const optionArb = fc
  .tuple(
    fc.oneof(fc.integer({ min: 0, max: 12 }), fc.integer({ min: 0, max: 0xffffffff })),
    fc.oneof(
      fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
      // A GO/INFO payload: name length, name, info requests.
      fc
        .tuple(
          fc.constantFrom('disk', 'ro', '', 'nope'),
          fc.array(fc.integer({ min: 0, max: 5 }), { maxLength: 4 }),
          fc.integer({ min: -2, max: 2 }),
        )
        .map(([name, infos, skew]) =>
          Buffer.concat([
            u32(name.length + skew),
            Buffer.from(name),
            u16(infos.length),
            ...infos.map(u16),
          ]),
        ),
      // A meta context payload: name, count, queries.
      fc
        .tuple(
          fc.constantFrom('disk', ''),
          fc.array(fc.constantFrom('base:allocation', 'base:', 'qemu:dirty-bitmap:x', ''), {
            maxLength: 3,
          }),
        )
        .map(([name, qs]) =>
          Buffer.concat([
            u32(name.length),
            Buffer.from(name),
            u32(qs.length),
            ...qs.flatMap((q) => [u32(q.length), Buffer.from(q)]),
          ]),
        ),
    ),
    fc.integer({ min: -3, max: 3 }),
  )
  .map(([opt, data, skew]) =>
    Buffer.concat([IHAVEOPT, u32(opt), u32(Math.max(0, data.length + skew)), data]),
  );

const handshakeArb = fc
  .tuple(fc.constantFrom(3, 1, 2, 0, 0x200), fc.array(optionArb, { maxLength: 6 }))
  .map(([flags, opts]) => Buffer.concat([u32(flags), ...opts]));

// ---------------------------------------------------------------- NBD transmission

const vctx = { flags: 0xffff, size: 1 << 20, structured: true, allocationContext: true };

function transmission(chunks: Buffer[]): string[] {
  const log: string[] = [];
  let payload: Buffer | null = null;
  const sink: TransmissionSink = {
    request(h: RequestHeader) {
      const err = validateRequest(h, vctx);
      log.push(`req ${h.magic} ${h.type} ${h.flags} ${h.offset} ${h.length} → ${err}`);
      if (h.magic !== 0x25609513) return Decision.Stop;
      if (h.type === 2) return Decision.Stop;
      if (h.type !== 1) return Decision.None;
      if (err) return Decision.Discard;
      payload = Buffer.alloc(h.length);
      return Decision.Payload;
    },
    payloadView(chunk, start) {
      log.push(`payload ${chunk.length - start}`);
    },
    payloadTarget: () => payload!,
    payloadTargetOffset: () => 0,
    payloadFilled() {
      log.push('filled');
    },
    discardDone() {
      log.push('discarded');
    },
  };
  const r = new TransmissionReader(sink);
  for (const c of chunks) {
    if (r.stopped) break;
    const used = r.feed(c, 0);
    if (used > c.length) throw new Error(`feed used ${used} of ${c.length}`);
    if (used < c.length && !r.stopped) throw new Error('feed stalled with no stall');
  }
  // payloadView sees a view whose size depends on the chunk: keep only the event.
  return log.map((l) => (l.startsWith('payload ') ? 'payload' : l));
}

const requestArb = fc
  .record({
    magic: fc.oneof(fc.constant(0x25609513), fc.integer({ min: 0, max: 0xffffffff })),
    flags: fc.integer({ min: 0, max: 0xffff }),
    type: fc.oneof(fc.integer({ min: 0, max: 9 }), fc.integer({ min: 0, max: 0xffff })),
    offset: fc.oneof(
      fc.bigInt({ min: 0n, max: 1n << 21n }),
      fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
    ),
    length: fc.oneof(fc.integer({ min: 0, max: 8192 }), fc.integer({ min: 0, max: 0xffffffff })),
  })
  .map((r) => {
    const h = Buffer.concat([
      u32(r.magic),
      u16(r.flags),
      u16(r.type),
      u64(7n),
      u64(r.offset),
      u32(r.length),
    ]);
    // A write carries its payload, up to what fits.
    return r.type === 1 ? Buffer.concat([h, Buffer.alloc(Math.min(r.length, 8192), 0x5a)]) : h;
  });

// ---------------------------------------------------------------- NBD client

function replies(chunks: Buffer[]): string[] {
  const log: string[] = [];
  const buf = Buffer.alloc(1 << 16);
  const sink: ReplySink = {
    readTarget: (cookie, offset, length) =>
      cookie === 1 && offset >= 0 && offset + length <= buf.length ? { buf, pos: offset } : null,
    simpleReadLength: (cookie) => (cookie === 1 ? 512 : cookie === 2 ? 0 : null),
    hole: (c, o, l) => log.push(`hole ${c} ${o} ${l}`),
    blockStatus: (c, ctx, ext) => log.push(`bs ${c} ${ctx} ${[...ext].join(',')}`),
    error: (c, e, m) => log.push(`err ${c} ${e} ${m}`),
    done: (c) => log.push(`done ${c}`),
  };
  const r = new ReplyReader(sink);
  try {
    for (const c of chunks) r.feed(c);
  } catch (e) {
    expected(e, NbdClientError);
    log.push(`throws ${(e as NbdClientError).code}`);
  }
  return log;
}

const replyArb = fc
  .oneof(
    // simple reply
    fc
      .tuple(fc.integer({ min: 0, max: 3 }), fc.integer({ min: 0, max: 200 }))
      .map(([cookie, err]) =>
        Buffer.concat([
          u32(0x67446698),
          u32(err % 3 === 0 ? 0 : err),
          u64(BigInt(cookie)),
          ...(cookie === 1 && err % 3 === 0 ? [Buffer.alloc(512, 1)] : []),
        ]),
      ),
    // structured chunk
    fc
      .tuple(
        fc.integer({ min: 0, max: 3 }),
        fc.constantFrom(0, 1),
        fc.constantFrom(0, 1, 2, 5, 32769, 32770, 7),
        fc.uint8Array({ maxLength: 64 }).map((a) => Buffer.from(a)),
        fc.integer({ min: -2, max: 2 }),
      )
      .map(([cookie, done, type, payload, skew]) =>
        Buffer.concat([
          u32(0x668e33ef),
          u16(done),
          u16(type),
          u64(BigInt(cookie)),
          u32(Math.max(0, payload.length + skew)),
          payload,
        ]),
      ),
  )
  .chain((first) => fc.array(fc.constant(first), { minLength: 1, maxLength: 3 }))
  .map((l) => Buffer.concat(l));

/** Option replies and NBD_REP_INFO payloads, as the client reads them during GO. */
function optionReplies(b: Buffer): void {
  let pos = 0;
  while (pos + 20 <= b.length) {
    let h: { type: number; length: number } | undefined;
    try {
      h = parseOptionReplyHeader(b.subarray(pos, pos + 20));
    } catch (e) {
      expected(e, NbdClientError);
      return;
    }
    pos += 20;
    const data = b.subarray(pos, pos + h.length);
    pos += h.length;
    const info: ExportInfo = { size: 0, flags: 0 } as ExportInfo;
    try {
      parseInfo(data, info);
    } catch (e) {
      expected(e, NbdClientError);
    }
  }
}

// ---------------------------------------------------------------- dumpd

async function flattened(chunks: Buffer[]): Promise<string[]> {
  const log: string[] = [];
  let at = -1;
  let len = 0;
  const r = new FlattenedReader((offset, data) => {
    // Coalesce: a record split over chunks arrives as consecutive writes.
    if (offset === at + len && at >= 0) len += data.length;
    else {
      if (at >= 0) log.push(`w ${at} ${len}`);
      at = offset;
      len = data.length;
    }
  });
  try {
    for (const c of chunks) await r.push(c);
    r.finish();
    log.push('end');
  } catch (e) {
    expected(e, DumpError);
    log.push(`throws ${(e as DumpError).code}`);
  }
  if (at >= 0) log.splice(log.length - 1, 0, `w ${at} ${len}`);
  return log;
}

const flatArb = fc
  .tuple(
    fc.array(
      fc.tuple(
        fc.oneof(fc.bigInt({ min: 0n, max: 1n << 20n }), fc.bigInt({ min: -2n, max: 1n << 62n })),
        fc.integer({ min: 0, max: 300 }),
      ),
      { maxLength: 5 },
    ),
    fc.boolean(),
    fc.boolean(),
  )
  .map(([recs, end, goodHeader]) => {
    const head = Buffer.alloc(FLAT_HEADER_SIZE);
    if (goodHeader) {
      head.write('makedumpfile', 0, 'latin1');
      head.writeBigInt64BE(1n, 16);
    }
    return Buffer.concat([
      head,
      ...recs.flatMap(([off, n]) => [
        Buffer.concat([u64(off), u64(BigInt(n))]),
        Buffer.alloc(n, 0x11),
      ]),
      ...(end ? [Buffer.concat([u64(-1n), u64(-1n)])] : []),
    ]);
  });

function qmp(chunks: Buffer[]): string[] {
  const log: string[] = [];
  const d = new QmpLineDecoder();
  try {
    for (const c of chunks)
      for (const m of d.push(c.toString('latin1'))) log.push(JSON.stringify(m));
  } catch (e) {
    expected(e, QmpError);
    log.push('throws');
  }
  return log;
}

const qmpArb = fc
  .array(
    fc.oneof(
      fc.jsonValue().map((v) => `${JSON.stringify(v)}\n`),
      fc.constantFrom(
        '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\n',
        '{"return": {}}\n',
        '{"event": "GUEST_PANICKED", "data": {"action": "pause"}, "timestamp": {"seconds": 1, "microseconds": 2}}\n',
        '{"error": {"class": "GenericError", "desc": "x"}}\n',
        '\n',
        '{"return": ',
      ),
      fc.string({ maxLength: 40 }),
    ),
    { maxLength: 8 },
  )
  .map((l) => Buffer.from(l.join(''), 'latin1'));

// ---------------------------------------------------------------- configs

/** YAML documents shaped like a config, with values of every kind in every place. */
function yamlLike(keys: string[][], scalars: string[] = []): fc.Arbitrary<Buffer> {
  const scalar = fc.oneof(
    fc.string({ maxLength: 12 }),
    fc.integer(),
    fc.double(),
    fc.boolean(),
    fc.constant(null),
    fc.constantFrom(
      '127.0.0.1:0',
      '/abs/path',
      'rel',
      '4G',
      '-1',
      '0x10',
      '{guest}',
      '[::1]:1',
      ...scalars,
    ),
  );
  const value: fc.Arbitrary<unknown> = fc.letrec((tie) => ({
    v: fc.oneof(
      { depthSize: 'small', withCrossShrink: true },
      scalar,
      fc.array(tie('v'), { maxLength: 3 }),
      fc.dictionary(fc.constantFrom(...keys.flat(), 'x'), tie('v'), { maxKeys: 4 }),
    ),
  })).v;
  const top = fc.dictionary(fc.constantFrom(...(keys[0] ?? ['x'])), value, { maxKeys: 5 });
  return top.map((o) => Buffer.from(JSON.stringify(o)));
}

const tmp = mkdtempSync(path.join(os.tmpdir(), 'ballast-fuzz-'));

// ---------------------------------------------------------------- the API

/** A real API over a real store and pool (small quota), on a Unix socket. */
let api: Promise<string> | null = null;

function startApi(): Promise<string> {
  api ??= (async () => {
    const dir = mkdtempSync(path.join(tmp, 'api-'));
    const store = await SqliteStore.open(path.join(dir, 'state.db'));
    const pools = new Map<string, Pool>();
    pools.set(
      'default',
      await Pool.open({
        name: 'default',
        path: path.join(dir, 'pool'),
        quota: 64 << 20,
        overcommit: 1,
      }),
    );
    const catalog = new DynamicCatalog();
    let devices: DeviceManager | null = null;
    const reservations = new ReservationManager(
      store,
      () => null,
      (n) => devices?.liveNames().includes(n) ?? false,
      () => {},
    );
    devices = new DeviceManager(
      store,
      pools,
      catalog,
      () => null,
      () => {},
    );
    devices.exportAccess = (n) => reservations.access(n);
    devices.onRemoved = (n) => reservations.forget(n);
    await reservations.load();
    await devices.reconcile();
    // The notification routes over the same store. Stopped before any request:
    // recipients are validated and stored but nothing is ever delivered (the
    // fuzzed URLs are never contacted), and posted events are parsed only.
    const notifier = new Notifier({ store, cluster: 'fuzz', host: 'fuzz', log: () => {} });
    await notifier.stop();
    const srv = createApiServer(
      {
        devices,
        metrics: createMetrics(devices, () => null),
        endpoint: () => ({ socket: '/run/ballast/nbd.sock' }),
        status: async () => ({}),
        version: 'fuzz',
        reservations,
        extraRoutes: [notifyRoutes(notifier)],
      },
      { log: () => {} },
    );
    const sock = path.join(dir, 'api.sock');
    await new Promise<void>((r) => srv.listen(sock, r));
    srv.unref();
    return sock;
  })();
  return api;
}

const ROUTES: [string, string][] = [
  ['POST', '/v1/devices'],
  ['POST', '/v1/devices/d1/resize'],
  ['POST', '/v1/devices/d1/extend'],
  ['DELETE', '/v1/devices/d1?force=1'],
  ['POST', '/v1/devices/d1/pr'],
  ['PUT', '/v1/devices/d1/acl'],
  ['GET', '/v1/devices/d1/attach?format=qemu'],
  ['GET', '/v1/devices/%ZZ'],
  // The notification routes (16 routes in all, so that a route byte saved in a
  // regression input before they came still picks the same route).
  ['POST', '/v1/notify'],
  ['POST', '/v1/events'],
  ['DELETE', '/v1/notify/n1'],
  ['GET', '/v1/notify'],
  ['POST', '/v1/notify'],
  ['POST', '/v1/events'],
  ['DELETE', '/v1/notify/%ZZ'],
  ['PUT', '/v1/notify'],
];

function request(sock: string, method: string, p: string, body: Buffer) {
  return new Promise<{ status: number; text: string }>((resolve, reject) => {
    const req = http.request(
      { socketPath: sock, method, path: p, headers: { 'content-length': body.length } },
      (res) => {
        let text = '';
        res.on('data', (c) => {
          text += c;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

const bodyArb = fc
  .tuple(
    fc.integer({ min: 0, max: ROUTES.length - 1 }),
    fc.oneof(
      fc
        .record(
          {
            name: fc.oneof(
              fc.constantFrom('d1', 'd2', 'n1', '', '../x', 'A'),
              fc.string({ maxLength: 70 }),
            ),
            size: fc.oneof(
              fc.constantFrom('1M', '4M', '0', '-1', '1e3', '0x10', '64M', '1P'),
              fc.integer(),
              fc.double(),
              fc.jsonValue(),
            ),
            pool: fc.oneof(fc.constant('default'), fc.jsonValue()),
            role: fc.constantFrom('paging', 'dump', 'data', 'x', 7),
            guest: fc.oneof(fc.constant('vm1'), fc.jsonValue()),
            action: fc.constantFrom('register', 'reserve', 'release', 'clear', 'preempt', 'x'),
            as: fc.oneof(fc.constantFrom('host-a', '', 'a b'), fc.jsonValue()),
            key: fc.oneof(
              fc.constantFrom('0', '0xa', 'zz', '0x1ffffffffffffffff', -1),
              fc.jsonValue(),
            ),
            saKey: fc.oneof(fc.constantFrom('0xa', '18446744073709551615'), fc.jsonValue()),
            type: fc.oneof(fc.constantFrom('WE', 1, 2, '9', 'EAAR'), fc.jsonValue()),
            entries: fc.oneof(
              fc.constant(null),
              fc.array(
                fc.record({ identity: fc.jsonValue(), access: fc.constantFrom('ro', 'rw', 'x') }),
              ),
              fc.jsonValue(),
            ),
            force: fc.jsonValue(),
            // POST /v1/notify: a recipient.
            url: fc.oneof(
              fc.constantFrom(
                'http://127.0.0.1:9/hook',
                'https://[::1]:1/x?y=1',
                'ftp://127.0.0.1/',
                'http://',
                'not a url',
                '',
              ),
              fc.jsonValue(),
            ),
            types: fc.oneof(
              fc.constantFrom(
                '',
                '*',
                'device.*',
                'device.created,dump.completed',
                'dump.',
                ',',
                'x',
              ),
              fc.jsonValue(),
            ),
            secret: fc.oneof(fc.constantFrom('short', 'sixteen-chars-ok'), fc.jsonValue()),
            // POST /v1/events: an event dumpd records.
            kind: fc.oneof(
              fc.constantFrom('dump.completed', 'dump.failed', 'device.created', ''),
              fc.jsonValue(),
            ),
            subject: fc.oneof(fc.constantFrom('vm1', ''), fc.jsonValue()),
            data: fc.jsonValue(),
          },
          { requiredKeys: [] },
        )
        .map((o) => Buffer.from(JSON.stringify(o))),
      fc.jsonValue().map((v) => Buffer.from(JSON.stringify(v) ?? '')),
      fc.uint8Array({ maxLength: 200 }).map((a) => Buffer.from(a)),
    ),
  )
  .map(([route, body]) => Buffer.concat([Buffer.from([route]), body]));

// ---------------------------------------------------------------- the targets

/** A suspend header whose JSON has random bytes written over it, checksummed again. */
const suspendHeaderArb = fc
  .tuple(fc.uint8Array({ maxLength: 64 }), fc.nat({ max: 400 }))
  .map(([a, at]) => {
    const b = encodeHeader({
      format: 1,
      guest: 'vm1',
      offset: 368050176,
      length: 110190592,
      checksum: 'crc32:03fe2e67',
      qemu: '7.2.22',
      machine: 'pc-i440fx-7.2-machine',
      ramBytes: 134217728,
      createdAt: '2026-11-29T19:00:00.000Z',
    });
    Buffer.from(a).copy(b, Math.min(20 + at, HEADER_BYTES - 32 - a.length));
    createHash('sha256')
      .update(b.subarray(0, HEADER_BYTES - 32))
      .digest()
      .copy(b, HEADER_BYTES - 32);
    return b;
  });

export const TARGETS: Target[] = [
  {
    name: 'nbd-handshake',
    arbitrary: (seeds) => inputs(seeds, handshakeArb),
    run: (b) => {
      const whole = handshake([b]);
      const split = handshake(splits(b));
      if (JSON.stringify(whole) !== JSON.stringify(split))
        throw new Error(
          `split changed the handshake:\n${whole.join('\n')}\n---\n${split.join('\n')}`,
        );
    },
  },
  {
    name: 'nbd-transmission',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        fc.array(requestArb, { maxLength: 6 }).map((l) => Buffer.concat(l)),
        32768,
      ),
    run: (b) => {
      const whole = transmission([b]);
      const split = transmission(splits(b));
      if (JSON.stringify(whole) !== JSON.stringify(split))
        throw new Error(
          `split changed the requests:\n${whole.join('\n')}\n---\n${split.join('\n')}`,
        );
    },
  },
  {
    name: 'nbd-client-replies',
    arbitrary: (seeds) => inputs(seeds, replyArb),
    run: (b) => {
      const whole = replies([b]);
      const split = replies(splits(b));
      if (JSON.stringify(whole) !== JSON.stringify(split))
        throw new Error(
          `split changed the replies:\n${whole.join('\n')}\n---\n${split.join('\n')}`,
        );
    },
  },
  {
    name: 'nbd-structured-and-option-replies',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        fc
          .array(
            fc
              .tuple(
                fc.integer({ min: 0, max: 0xffffffff }),
                fc.constantFrom(3, 1, 0x80000001, 0x80000006),
                fc.oneof(
                  fc.uint8Array({ maxLength: 20 }).map((a) => Buffer.from(a)),
                  fc
                    .tuple(fc.integer({ min: 0, max: 5 }), fc.uint8Array({ maxLength: 14 }))
                    .map(([t, a]) => Buffer.concat([u16(t), Buffer.from(a)])),
                ),
              )
              .map(([opt, type, data]) =>
                Buffer.concat([u64(0x3e889045565a9n), u32(opt), u32(type), u32(data.length), data]),
              ),
            { maxLength: 5 },
          )
          .map((l) => Buffer.concat(l)),
      ),
    run: (b) => optionReplies(b),
  },
  {
    name: 'dump-flattened',
    arbitrary: (seeds) => inputs(seeds, flatArb, 8192),
    run: async (b) => {
      const whole = await flattened([b]);
      const split = await flattened(splits(b));
      if (JSON.stringify(whole) !== JSON.stringify(split))
        throw new Error(
          `split changed the records:\n${whole.join('\n')}\n---\n${split.join('\n')}`,
        );
    },
  },
  {
    name: 'dump-catalog',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        fc.uint8Array({ maxLength: 2048 }).map((a) => {
          // A real slot with random bytes written over part of it.
          const slot = encodeSlot({ generation: 3, nextId: 2, entries: [] });
          Buffer.from(a).copy(slot, 64 + (a[0] ?? 0));
          return slot;
        }),
        2048,
      ),
    run: (b) => {
      const slot = Buffer.alloc(64 * 1024);
      b.copy(slot);
      const cat = decodeSlot(slot);
      if (cat) {
        const again = decodeSlot(encodeSlot(cat));
        if (JSON.stringify(again) !== JSON.stringify(cat))
          throw new Error('a decoded catalog does not encode back to itself');
      }
      try {
        chooseCatalog(slot, b);
      } catch (e) {
        expected(e, DumpError);
      }
    },
  },
  {
    name: 'qmp-reader',
    arbitrary: (seeds) => inputs(seeds, qmpArb),
    run: (b) => {
      const whole = qmp([b]);
      const split = qmp(splits(b));
      // A bad line throws from the push that holds it, losing the messages
      // that came with it in that chunk (the connection is dropped anyway):
      // so with an error, only "both throw, whole's messages a prefix" holds.
      const threw = (l: string[]) => l[l.length - 1] === 'throws';
      const same =
        threw(whole) === threw(split) &&
        (threw(whole)
          ? whole.slice(0, -1).every((m, i) => split[i] === m)
          : JSON.stringify(whole) === JSON.stringify(split));
      if (!same)
        throw new Error(
          `split changed the messages:\n${whole.join('\n')}\n---\n${split.join('\n')}`,
        );
    },
  },
  {
    name: 'agent-api-bodies',
    arbitrary: (seeds) => inputs(seeds, bodyArb, 400),
    run: async (b) => {
      const sock = await startApi();
      const [method, p] = ROUTES[(b[0] ?? 0) % ROUTES.length]!;
      const r = await request(sock, method, p, b.subarray(1));
      // Bad input is the caller's: 4xx with a code (or 507, the pool is full),
      // never a 500 from the agent.
      if (r.status >= 500 && r.status !== 507)
        throw new Error(`${method} ${p} answered ${r.status}: ${r.text}`);
      if (r.status >= 400 && !/"code": "[A-Z_]+"/.test(r.text))
        throw new Error(`${method} ${p} answered ${r.status} without a code: ${r.text}`);
    },
  },
  {
    name: 'agent-config',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        yamlLike(
          [
            ['dataDir', 'nbd', 'api', 'pools', 'limits', 'cluster', 'events'],
            ['listen', 'socket', 'maxConnections', 'handshakeLimit', 'maxHandshakes', 'anonymous'],
            ['tls', 'mode', 'cert', 'identities', 'token', 'requireToken', 'name', 'path', 'quota'],
            [
              'overcommit',
              'media',
              'maxInFlight',
              'maxBufferedBytes',
              'threadBufferedBytes',
              'socketGroup',
              'headersTimeout',
              'shared',
            ],
            // cluster:
            ['etcd', 'host', 'leaseTtl', 'timeout', 'holdTimeout', 'fenceMargin', 'watchdog'],
            ['ca', 'key'],
            // events:
            ['rescanInterval', 'poolFull', 'deliveryTimeout', 'retryCap'],
          ],
          [
            'http://127.0.0.1:2379',
            'https://[::1]:2379',
            'https://10.0.0.1:2379/',
            'http://h:0',
            'unix:///x',
            'host-a',
            '/dev/watchdog',
            '0.5',
          ],
        ),
      ),
    run: (b) => {
      let doc: unknown;
      try {
        doc = parseYaml(b.toString('utf8'));
      } catch {
        return; // loadConfig reports YAML errors itself, as BALLAST_CONFIG_INVALID
      }
      try {
        validateConfig(doc, 'fuzz.yaml', tmp);
      } catch (e) {
        expected(e, BallastError);
        if ((e as BallastError).code !== 'BALLAST_CONFIG_INVALID') throw e;
      }
    },
  },
  {
    name: 'dumpd-config',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        yamlLike([
          ['listen', 'runDir', 'defaults', 'guests', 'watch', 'dumpTimeoutSeconds'],
          ['name', 'qmp', 'device', 'agent', 'agentDevice', 'tokenFile', 'tlsCerts'],
          ['format', 'after', 'keep', 'loopLimit', 'dumps', 'minutes', 'dir', 'suffix'],
        ]),
      ),
    run: (b) => {
      try {
        parseDumpdConfig(b.toString('utf8'), 'fuzz.yaml');
      } catch (e) {
        expected(e, DumpError);
      }
    },
  },
  {
    name: 'deploy-inventory',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        yamlLike([
          ['defaults', 'groups', 'hosts'],
          ['kvm1', 'kvm2', 'east', 'address', 'port', 'user', 'key', 'sshAgent', 'jump'],
          ['prefix', 'agent', 'service', 'timeouts', 'groups', 'command', 'unit', 'env'],
          ['connect', 'step', 'health', 'api', 'listen', 'token', 'nbd', 'socket'],
        ]),
      ),
    run: (b) => {
      let doc: unknown;
      try {
        doc = parseYaml(b.toString('utf8'));
      } catch {
        return;
      }
      try {
        parseInventory(doc, 'fuzz.yaml', tmp);
      } catch (e) {
        expected(e, DeployError);
      }
    },
  },
  {
    name: 'deploy-known-hosts',
    arbitrary: (seeds) =>
      inputs(
        seeds,
        fc
          .array(
            fc
              .tuple(
                fc.constantFrom('', '@revoked ', '@cert-authority ', '@x ', '# '),
                fc.constantFrom('host', '[127.0.0.1]:2222', '|1|AAAA|BBBB', '*.example', '!h,h2'),
                fc.constantFrom('ssh-ed25519', 'ssh-rsa', 'ecdsa-sha2-nistp256', 'x'),
                fc.uint8Array({ maxLength: 60 }).map((a) => {
                  const t = Buffer.from('ssh-ed25519');
                  return Buffer.concat([
                    u32(a[0] === 1 ? 999 : t.length),
                    t,
                    Buffer.from(a),
                  ]).toString('base64');
                }),
              )
              .map((f) => f.join(' ').replace('  ', ' ')),
            { maxLength: 5 },
          )
          .map((l) => Buffer.from(l.join('\n'))),
      ),
    run: (b) => {
      const text = b.toString('utf8');
      const entries = parseKnownHosts(text);
      const key = entries[0]?.key ?? b.subarray(0, 40);
      verifyHostKey(entries, 'host', 22, key);
      verifyHostKey(entries, '127.0.0.1', 2222, key);
      const file = path.join(tmp, 'known_hosts');
      writeFileSync(file, text);
      try {
        const kh = new KnownHosts(file, false);
        kh.check('h', 'host', 22, key);
      } catch (e) {
        expected(e, DeployError);
      }
    },
  },
  {
    name: 'suspend-header',
    arbitrary: (seeds) => inputs(seeds, suspendHeaderArb, HEADER_BYTES),
    run: (b) => {
      const h = Buffer.alloc(HEADER_BYTES);
      b.copy(h);
      try {
        const got = decodeHeader(h);
        if (got && JSON.stringify(decodeHeader(encodeHeader(got))) !== JSON.stringify(got))
          throw new Error('a decoded suspend header does not encode back to itself');
      } catch (e) {
        expected(e, HeaderError);
      }
    },
  },
];
