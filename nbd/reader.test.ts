// The codec "with every message split at every byte": the same stream of
// requests (and of handshake options) is fed whole, split in two and in three
// at every position, one byte at a time and in random chunkings, and the
// parsers must hand the sink exactly the same sequence every time.

import { describe, expect, it } from 'vitest';
import { CMD, CMD_FLAG, IHAVEOPT, OPT, REQUEST_HEADER_SIZE, REQUEST_MAGIC } from './protocol.js';
import {
  Decision,
  HandshakeReader,
  type HandshakeSink,
  newRequestHeader,
  parseRequestHeader,
  type RequestHeader,
  TransmissionReader,
  type TransmissionSink,
} from './reader.js';

const EMPTY = Buffer.alloc(0);
const TWO_32 = 0x100000000;
/** Marks the WRITE the sink wants discarded. */
const DISCARD_COOKIE = 0xd15c;

// ---- helpers ---------------------------------------------------------------

/** A deterministic PRNG (mulberry32) so random chunkings are reproducible. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function pattern(len: number, seed: number): Buffer {
  const b = Buffer.alloc(len);
  for (let i = 0; i < len; i++) b[i] = (i * 31 + seed * 17 + 7) & 0xff;
  return b;
}

/** Copies of `buf` cut at the given (sorted) positions. */
function splitAt(buf: Buffer, cuts: number[]): Buffer[] {
  const out: Buffer[] = [];
  let prev = 0;
  for (const c of [...cuts, buf.length]) {
    out.push(Buffer.from(buf.subarray(prev, c)));
    prev = c;
  }
  return out;
}

function randomChunks(buf: Buffer, rnd: () => number, maxChunk: number): Buffer[] {
  const cuts: number[] = [];
  let p = 0;
  for (;;) {
    p += 1 + Math.floor(rnd() * maxChunk);
    if (p >= buf.length) break;
    cuts.push(p);
  }
  return splitAt(buf, cuts);
}

function oneByteChunks(buf: Buffer): Buffer[] {
  return splitAt(
    buf,
    Array.from({ length: buf.length - 1 }, (_, i) => i + 1),
  );
}

// ---- the transmission stream ----------------------------------------------

interface Req {
  magic?: number;
  flags: number;
  type: number;
  cookieHi: number;
  cookieLo: number;
  offsetHi: number;
  offsetLo: number;
  length: number;
  /** Bytes following the header (WRITE payloads). */
  payload?: Buffer;
}

function encodeRequest(r: Req): Buffer {
  const h = Buffer.alloc(REQUEST_HEADER_SIZE);
  h.writeUInt32BE(r.magic ?? REQUEST_MAGIC, 0);
  h.writeUInt16BE(r.flags, 4);
  h.writeUInt16BE(r.type, 6);
  h.writeUInt32BE(r.cookieHi, 8);
  h.writeUInt32BE(r.cookieLo, 12);
  h.writeUInt32BE(r.offsetHi, 16);
  h.writeUInt32BE(r.offsetLo, 20);
  h.writeUInt32BE(r.length, 24);
  return r.payload ? Buffer.concat([h, r.payload]) : h;
}

function write(cookieLo: number, offsetHi: number, offsetLo: number, payload: Buffer): Req {
  return {
    flags: CMD_FLAG.FUA,
    type: CMD.WRITE,
    cookieHi: 0x01020304,
    cookieLo,
    offsetHi,
    offsetLo,
    length: payload.length,
    payload,
  };
}

/** READ, WRITEs of 0/1/5/100 bytes, FLUSH, a WRITE to discard, more READs, DISC. */
const REQUESTS: Req[] = [
  // 2^40 + 3
  {
    flags: 0,
    type: CMD.READ,
    cookieHi: 0xdeadbeef,
    cookieLo: 0xcafef00d,
    offsetHi: 0x100,
    offsetLo: 3,
    length: 4096,
  },
  write(1, 0, 0, EMPTY),
  write(2, 0x1fffff, 0xffffffff, pattern(1, 2)), // 2^53 - 1
  write(3, 0, 512, pattern(5, 3)),
  {
    flags: 0,
    type: CMD.FLUSH,
    cookieHi: 0,
    cookieLo: 0,
    offsetHi: 0,
    offsetLo: 0,
    length: 0,
  },
  write(4, 0x100, 3, pattern(100, 4)),
  write(DISCARD_COOKIE, 0, 4096, pattern(37, 5)),
  // A discarded WRITE without payload bytes.
  write(DISCARD_COOKIE, 0, 8192, EMPTY),
  // 2^64 - 1 offset, maximum length: parsed, not judged.
  {
    flags: CMD_FLAG.DF,
    type: CMD.READ,
    cookieHi: 0xffffffff,
    cookieLo: 0xffffffff,
    offsetHi: 0xffffffff,
    offsetLo: 0xffffffff,
    length: 0xffffffff,
  },
  {
    flags: CMD_FLAG.REQ_ONE,
    type: CMD.BLOCK_STATUS,
    cookieHi: 7,
    cookieLo: 8,
    offsetHi: 1,
    offsetLo: 0,
    length: 1 << 30,
  },
  {
    flags: 0,
    type: CMD.DISC,
    cookieHi: 9,
    cookieLo: 10,
    offsetHi: 0,
    offsetLo: 0,
    length: 0,
  },
];
/** Bytes after DISC that must never be consumed. */
const TRAILER = Buffer.from('not for the server');
const STREAM_BODY = Buffer.concat(REQUESTS.map(encodeRequest));
const STREAM = Buffer.concat([STREAM_BODY, TRAILER]);

type Event =
  | { kind: 'header'; h: RequestHeader }
  | { kind: 'payload'; bytes: string }
  | { kind: 'discarded' };

function headerOf(r: Req): RequestHeader {
  return {
    magic: r.magic ?? REQUEST_MAGIC,
    flags: r.flags,
    type: r.type,
    cookieHi: r.cookieHi,
    cookieLo: r.cookieLo,
    offset: r.offsetHi * TWO_32 + r.offsetLo,
    length: r.length,
  };
}

function decide(h: RequestHeader): Decision {
  if (h.type === CMD.DISC) return Decision.Stop;
  if (h.type === CMD.WRITE)
    return h.cookieLo === DISCARD_COOKIE ? Decision.Discard : Decision.Payload;
  return Decision.None;
}

/** What any chunking of the stream must produce, up to `stopAt` (a request index). */
function expectedEvents(reqs: Req[]): Event[] {
  const out: Event[] = [];
  for (const r of reqs) {
    const h = headerOf(r);
    out.push({ kind: 'header', h });
    const d = decide(h);
    if (d === Decision.Payload)
      out.push({ kind: 'payload', bytes: (r.payload ?? EMPTY).toString('hex') });
    if (d === Decision.Discard) out.push({ kind: 'discarded' });
  }
  return out;
}

const TARGET_PREFIX = 3;
const GUARD = 0xee;

/**
 * Records what the reader hands over. Payload targets are offset by a few
 * guard bytes to check that payloadTargetOffset is honoured and nothing is
 * written outside [offset, offset + length).
 */
class RecordingSink implements TransmissionSink {
  events: Event[] = [];
  views = 0;
  copies = 0;
  requestCalls = 0;
  /** The end of the bytes offered by the current feed (views must not reach past it). */
  limit = Number.POSITIVE_INFINITY;
  private target: Buffer | null = null;
  private expecting: RequestHeader | null = null;
  /** How many times each header (by index) is stalled before being accepted. */
  constructor(
    private readonly reader: () => TransmissionReader,
    private readonly stallsFor: (index: number) => number = () => 0,
    private readonly decideFn: (h: RequestHeader) => Decision = decide,
  ) {}
  private index = 0;
  private stalledSoFar = 0;
  stalls = 0;

  request(h: RequestHeader): Decision {
    this.requestCalls++;
    // The reader hands over its own reused header object.
    if (h !== this.reader().header) throw new Error('not the reader header object');
    if (this.expecting !== null) throw new Error('header while a payload was pending');
    if (this.stalledSoFar < this.stallsFor(this.index)) {
      this.stalledSoFar++;
      this.stalls++;
      return Decision.Stall;
    }
    this.stalledSoFar = 0;
    this.index++;
    const copy = { ...h };
    this.events.push({ kind: 'header', h: copy });
    const d = this.decideFn(h);
    if (d === Decision.Payload || d === Decision.Discard) this.expecting = copy;
    return d;
  }

  payloadView(chunk: Buffer, start: number): void {
    const h = this.expecting!;
    if (start < 0 || start + h.length > chunk.length || start + h.length > this.limit) {
      throw new Error(`view [${start}, ${start + h.length}) outside the bytes offered`);
    }
    this.views++;
    this.events.push({ kind: 'payload', bytes: chunk.toString('hex', start, start + h.length) });
    this.expecting = null;
  }

  payloadTarget(): Buffer {
    const h = this.expecting!;
    if (this.target !== null) throw new Error('payloadTarget twice for one request');
    this.target = Buffer.alloc(TARGET_PREFIX + h.length + 2, GUARD);
    return this.target;
  }

  payloadTargetOffset(): number {
    return TARGET_PREFIX;
  }

  payloadFilled(): void {
    const h = this.expecting!;
    const t = this.target!;
    const guards = [...t.subarray(0, TARGET_PREFIX), ...t.subarray(TARGET_PREFIX + h.length)];
    if (!guards.every((b) => b === GUARD)) throw new Error('copy wrote outside the target range');
    this.copies++;
    this.events.push({
      kind: 'payload',
      bytes: t.toString('hex', TARGET_PREFIX, TARGET_PREFIX + h.length),
    });
    this.target = null;
    this.expecting = null;
  }

  discardDone(): void {
    if (this.expecting === null) throw new Error('discardDone without a discarded request');
    this.events.push({ kind: 'discarded' });
    this.expecting = null;
  }
}

interface RunResult {
  sink: RecordingSink;
  reader: TransmissionReader;
  consumed: number;
}

/**
 * Feeds chunks the way the server does: after a stall, offer the rest of the
 * chunk again from the consumed count, or an empty buffer when only a staged
 * header is waiting. With `embed`, each chunk sits inside a larger buffer with
 * junk around it and is fed through start/end.
 */
function run(
  chunks: Buffer[],
  opts: {
    stallsFor?: (index: number) => number;
    decideFn?: (h: RequestHeader) => Decision;
    embed?: boolean;
    /** After a stall on a staged header at the end of a chunk, go on with the next chunk instead of an empty feed. */
    resumeWithNext?: boolean;
  } = {},
): RunResult {
  let reader: TransmissionReader | null = null;
  const sink = new RecordingSink(() => reader!, opts.stallsFor, opts.decideFn);
  reader = new TransmissionReader(sink);
  const r = reader;
  let consumed = 0;
  chunks.forEach((chunk, ci) => {
    let buf = chunk;
    let start = 0;
    if (opts.embed) {
      buf = Buffer.concat([Buffer.from([0xab, 0xcd, 0xef]), chunk, Buffer.from([0x55, 0xaa])]);
      start = 3;
    }
    const end = start + chunk.length;
    let pos = start;
    let guard = 0;
    const last = ci === chunks.length - 1;
    while (!r.stopped) {
      if (++guard > 1000) throw new Error('reader makes no progress');
      if (pos < end) {
        sink.limit = end;
        const n = r.feed(buf, pos, end);
        if (n < 0 || n > end - pos) throw new Error(`feed returned ${n} of ${end - pos}`);
        pos += n;
        consumed += n;
        continue;
      }
      if (r.hasStagedHeader && (last || !opts.resumeWithNext)) {
        sink.limit = 0;
        if (r.feed(EMPTY) !== 0) throw new Error('an empty feed consumed bytes');
        continue;
      }
      break;
    }
    if (r.stopped && r.feed(buf, pos, end) !== 0) throw new Error('consumed after Stop');
  });
  return { sink, reader: r, consumed };
}

const EXPECTED = expectedEvents(REQUESTS);
const HEADERS = REQUESTS.length;

function check(res: RunResult, stalls = 0): void {
  expect(res.sink.events).toEqual(EXPECTED);
  expect(res.consumed).toBe(STREAM_BODY.length);
  expect(res.reader.stopped).toBe(true);
  expect(res.sink.stalls).toBe(stalls);
  expect(res.sink.requestCalls).toBe(HEADERS + stalls);
}

// ---- tests -----------------------------------------------------------------

describe('parseRequestHeader', () => {
  it('reads every field, including 64-bit offsets and both cookie halves', () => {
    const buf = Buffer.concat([Buffer.from([1, 2, 3]), encodeRequest(REQUESTS[0]!)]);
    const h = newRequestHeader();
    parseRequestHeader(buf, 3, h);
    expect(h).toEqual({
      magic: REQUEST_MAGIC,
      flags: 0,
      type: CMD.READ,
      cookieHi: 0xdeadbeef,
      cookieLo: 0xcafef00d,
      offset: 2 ** 40 + 3,
      length: 4096,
    });
  });

  it('keeps 2^53 - 1 exact and turns 2^64 - 1 into something out of any range', () => {
    const h = newRequestHeader();
    parseRequestHeader(encodeRequest(REQUESTS[2]!), 0, h);
    expect(h.offset).toBe(Number.MAX_SAFE_INTEGER);
    parseRequestHeader(encodeRequest(REQUESTS[8]!), 0, h);
    expect(h.offset).toBeGreaterThanOrEqual(2 ** 64 - 4096);
    expect(h.length).toBe(0xffffffff);
  });
});

describe('TransmissionReader: every chunking yields the same requests', () => {
  it('whole stream in one chunk: payloads as views, nothing copied', () => {
    const res = run([Buffer.from(STREAM)]);
    check(res);
    expect(res.sink.copies).toBe(0);
    // WRITEs of 0, 1, 5 and 100 bytes.
    expect(res.sink.views).toBe(4);
  });

  it('whole stream fed through start/end inside a larger buffer', () => {
    check(run([Buffer.from(STREAM)], { embed: true }));
  });

  it('split in two at every byte position', () => {
    for (let cut = 0; cut <= STREAM.length; cut++) {
      const res = run(splitAt(STREAM, [cut]));
      check(res);
      expect(res.sink.views + res.sink.copies).toBe(4);
    }
  });

  it('split in three: every first cut with second cuts 1, 2, 7, 27, 28, 29 and 100 bytes later', () => {
    for (let a = 1; a < STREAM_BODY.length; a++) {
      for (const d of [1, 2, 7, 27, 28, 29, 100]) {
        if (a + d < STREAM.length) check(run(splitAt(STREAM, [a, a + d])));
      }
    }
  });

  it('one byte at a time: every non-empty payload is copied into the target', () => {
    const res = run(oneByteChunks(STREAM));
    check(res);
    // Only the 0-byte payload is a view (of nothing).
    expect(res.sink.views).toBe(1);
    expect(res.sink.copies).toBe(3);
  });

  it('random chunkings (deterministic seeds), also fed through start/end', () => {
    const rnd = prng(0x5eed);
    for (let i = 0; i < 300; i++) {
      const max = [2, 7, 29, 64, 200][i % 5]!;
      check(run(randomChunks(STREAM, rnd, max), { embed: i % 2 === 1 }));
    }
  });

  it('empty chunks in between change nothing', () => {
    const chunks = splitAt(STREAM, [10, 10, 40, 40, 40, 200]);
    check(run(chunks));
  });
});

describe('TransmissionReader: stalls', () => {
  const once = (): number => 1;
  const varied = (i: number): number => i % 3;

  it('a stall consumes nothing of a header that is whole in the chunk', () => {
    let stall = true;
    const sink: TransmissionSink = {
      request: () => (stall ? Decision.Stall : Decision.None),
      payloadView: () => {},
      payloadTarget: () => Buffer.alloc(0),
      payloadTargetOffset: () => 0,
      payloadFilled: () => {},
      discardDone: () => {},
    };
    const r = new TransmissionReader(sink);
    const two = Buffer.concat([encodeRequest(REQUESTS[0]!), encodeRequest(REQUESTS[4]!)]);
    expect(r.feed(two)).toBe(0);
    expect(r.hasStagedHeader).toBe(false);
    stall = false;
    expect(r.feed(two, 0)).toBe(two.length);
  });

  it('a header completed from staging and stalled stays staged; an empty feed offers it again', () => {
    const seen: RequestHeader[] = [];
    let stall = true;
    const sink: TransmissionSink = {
      request: (h) => {
        seen.push({ ...h });
        return stall ? Decision.Stall : Decision.None;
      },
      payloadView: () => {},
      payloadTarget: () => Buffer.alloc(0),
      payloadTargetOffset: () => 0,
      payloadFilled: () => {},
      discardDone: () => {},
    };
    const r = new TransmissionReader(sink);
    const h = encodeRequest(REQUESTS[0]!);
    expect(r.feed(h.subarray(0, 10))).toBe(10);
    expect(r.hasStagedHeader).toBe(false);
    // The staged bytes are accounted for as consumed, even though the sink stalls.
    expect(r.feed(h.subarray(10))).toBe(18);
    expect(r.hasStagedHeader).toBe(true);
    expect(r.feed(EMPTY)).toBe(0);
    expect(r.hasStagedHeader).toBe(true);
    stall = false;
    expect(r.feed(EMPTY)).toBe(0);
    expect(r.hasStagedHeader).toBe(false);
    expect(seen).toHaveLength(3);
    for (const s of seen) expect(s).toEqual(headerOf(REQUESTS[0]!));
  });

  it('every header stalled once, whole stream', () => {
    check(run([Buffer.from(STREAM)], { stallsFor: once }), HEADERS);
  });

  it('every header stalled once, split in two at every byte position', () => {
    for (let cut = 0; cut <= STREAM.length; cut++) {
      check(run(splitAt(STREAM, [cut]), { stallsFor: once }), HEADERS);
    }
  });

  it('stalled 0, 1 or 2 times, one byte at a time', () => {
    const stalls = REQUESTS.reduce((n, _, i) => n + varied(i), 0);
    check(run(oneByteChunks(STREAM), { stallsFor: varied }), stalls);
  });

  it('stalled 0, 1 or 2 times, random chunkings, through start/end', () => {
    const rnd = prng(42);
    const stalls = REQUESTS.reduce((n, _, i) => n + varied(i), 0);
    for (let i = 0; i < 200; i++) {
      check(
        run(randomChunks(STREAM, rnd, 1 + (i % 50)), { stallsFor: varied, embed: true }),
        stalls,
      );
    }
  });

  it('a staged, stalled header is also offered again by the next chunk', () => {
    for (let cut = 1; cut < STREAM_BODY.length; cut++) {
      check(run(splitAt(STREAM, [cut]), { stallsFor: once, resumeWithNext: true }), HEADERS);
    }
    const rnd = prng(7);
    for (let i = 0; i < 100; i++) {
      check(run(randomChunks(STREAM, rnd, 40), { stallsFor: once, resumeWithNext: true }), HEADERS);
    }
  });
});

describe('TransmissionReader: stop, discard, pending', () => {
  const stopAtFlush = (h: RequestHeader): Decision =>
    h.type === CMD.FLUSH ? Decision.Stop : decide(h);
  const flushIndex = REQUESTS.findIndex((r) => r.type === CMD.FLUSH);
  const upToFlush = REQUESTS.slice(0, flushIndex + 1);
  const upToFlushBytes = Buffer.concat(upToFlush.map(encodeRequest)).length;

  it('Stop stops at that header at every split position; nothing after it is consumed', () => {
    const want = expectedEvents(upToFlush);
    for (let cut = 0; cut <= STREAM.length; cut++) {
      const res = run(splitAt(STREAM, [cut]), { decideFn: stopAtFlush });
      expect(res.sink.events).toEqual(want);
      expect(res.consumed).toBe(upToFlushBytes);
      expect(res.reader.stopped).toBe(true);
      const calls = res.sink.requestCalls;
      expect(res.reader.feed(Buffer.from(STREAM))).toBe(0);
      expect(res.reader.feed(EMPTY)).toBe(0);
      expect(res.sink.requestCalls).toBe(calls);
    }
  });

  it('Stop one byte at a time', () => {
    const res = run(oneByteChunks(STREAM), { decideFn: stopAtFlush });
    expect(res.sink.events).toEqual(expectedEvents(upToFlush));
    expect(res.consumed).toBe(upToFlushBytes);
  });

  it('a bad magic reaches the sink, which may stop', () => {
    const bad = encodeRequest({ ...REQUESTS[0]!, magic: 0x12345678 });
    const seen: number[] = [];
    const r = new TransmissionReader({
      request: (h) => {
        seen.push(h.magic);
        return h.magic === REQUEST_MAGIC ? Decision.None : Decision.Stop;
      },
      payloadView: () => {},
      payloadTarget: () => Buffer.alloc(0),
      payloadTargetOffset: () => 0,
      payloadFilled: () => {},
      discardDone: () => {},
    });
    const buf = Buffer.concat([encodeRequest(REQUESTS[0]!), bad, encodeRequest(REQUESTS[4]!)]);
    expect(r.feed(buf)).toBe(2 * REQUEST_HEADER_SIZE);
    expect(seen).toEqual([REQUEST_MAGIC, 0x12345678]);
    expect(r.stopped).toBe(true);
  });

  it('discards exactly the payload length and parses the next header', () => {
    const events: string[] = [];
    const r = new TransmissionReader({
      request: (h) => {
        events.push(`h${h.type}:${h.length}`);
        return h.type === CMD.WRITE ? Decision.Discard : Decision.None;
      },
      payloadView: () => events.push('view'),
      payloadTarget: () => Buffer.alloc(0),
      payloadTargetOffset: () => 0,
      payloadFilled: () => events.push('filled'),
      discardDone: () => events.push('discarded'),
    });
    const w = encodeRequest(write(1, 0, 0, pattern(50, 1)));
    const f = encodeRequest(REQUESTS[4]!);
    expect(r.feed(w.subarray(0, 40))).toBe(40);
    expect(r.pending).toBe(38);
    expect(r.feed(w.subarray(40))).toBe(38);
    expect(r.pending).toBe(0);
    expect(r.feed(f)).toBe(REQUEST_HEADER_SIZE);
    expect(events).toEqual(['h1:50', 'discarded', 'h3:0']);
  });

  it('pending counts the payload bytes still expected while copying', () => {
    const target = Buffer.alloc(100);
    let filled = 0;
    const r = new TransmissionReader({
      request: () => Decision.Payload,
      payloadView: () => {
        throw new Error('payload is split: no view expected');
      },
      payloadTarget: () => target,
      payloadTargetOffset: () => 0,
      payloadFilled: () => {
        filled++;
      },
      discardDone: () => {},
    });
    const w = encodeRequest(write(1, 0, 0, pattern(100, 9)));
    expect(r.feed(w.subarray(0, REQUEST_HEADER_SIZE + 30))).toBe(REQUEST_HEADER_SIZE + 30);
    expect(r.pending).toBe(70);
    expect(r.feed(w.subarray(REQUEST_HEADER_SIZE + 30, REQUEST_HEADER_SIZE + 99))).toBe(69);
    expect(r.pending).toBe(1);
    expect(filled).toBe(0);
    expect(r.feed(w.subarray(REQUEST_HEADER_SIZE + 99))).toBe(1);
    expect(r.pending).toBe(0);
    expect(filled).toBe(1);
    expect(target.equals(pattern(100, 9))).toBe(true);
  });
});

// ---- the handshake stream --------------------------------------------------

interface Opt {
  opt: number;
  data: Buffer;
}

function encodeOption(o: Opt, magic: bigint = IHAVEOPT): Buffer {
  const h = Buffer.alloc(16);
  h.writeBigUInt64BE(magic, 0);
  h.writeUInt32BE(o.opt, 8);
  h.writeUInt32BE(o.data.length, 12);
  return Buffer.concat([h, o.data]);
}

function clientFlagsBytes(flags: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(flags >>> 0, 0);
  return b;
}

type HEvent =
  | { kind: 'flags'; flags: number }
  | { kind: 'option'; opt: number; data: string | null }
  | { kind: 'badMagic' };

class HandshakeRecorder implements HandshakeSink {
  events: HEvent[] = [];
  constructor(private readonly acceptFlags = true) {}
  clientFlags(flags: number): boolean {
    this.events.push({ kind: 'flags', flags });
    return this.acceptFlags;
  }
  badMagic(): void {
    this.events.push({ kind: 'badMagic' });
  }
  option(opt: number, data: Buffer | null): boolean {
    this.events.push({ kind: 'option', opt, data: data === null ? null : data.toString('hex') });
    return opt !== OPT.GO && opt !== OPT.ABORT && opt !== OPT.EXPORT_NAME;
  }
}

function runHandshake(
  chunks: Buffer[],
  max?: number,
  acceptFlags = true,
): { events: HEvent[]; consumed: number; reader: HandshakeReader } {
  const sink = new HandshakeRecorder(acceptFlags);
  const reader = max === undefined ? new HandshakeReader(sink) : new HandshakeReader(sink, max);
  let consumed = 0;
  for (const c of chunks) {
    const n = reader.feed(c);
    consumed += n;
    if (!reader.stopped) expect(n).toBe(c.length);
  }
  return { events: sink.events, consumed, reader };
}

describe('HandshakeReader', () => {
  const goData = Buffer.concat([
    Buffer.from([0, 0, 0, 4]),
    Buffer.from('disk'),
    Buffer.from([0, 1, 0, 3]),
  ]);
  const options: Opt[] = [
    { opt: OPT.STRUCTURED_REPLY, data: EMPTY },
    { opt: OPT.INFO, data: pattern(10, 1) },
    { opt: 99, data: pattern(1, 2) },
    { opt: OPT.LIST, data: EMPTY },
    { opt: OPT.SET_META_CONTEXT, data: pattern(300, 3) },
    { opt: OPT.GO, data: goData },
  ];
  const after = encodeRequest(REQUESTS[0]!); // transmission bytes after GO
  const body = Buffer.concat([clientFlagsBytes(3), ...options.map((o) => encodeOption(o))]);
  const stream = Buffer.concat([body, after]);
  const want: HEvent[] = [
    { kind: 'flags', flags: 3 },
    ...options.map((o): HEvent => ({ kind: 'option', opt: o.opt, data: o.data.toString('hex') })),
  ];

  it('whole: client flags, options with payloads, stops after GO leaving the rest', () => {
    const res = runHandshake([Buffer.from(stream)]);
    expect(res.events).toEqual(want);
    expect(res.consumed).toBe(body.length);
    expect(res.reader.stopped).toBe(true);
  });

  it('split in two at every byte position', () => {
    for (let cut = 0; cut <= stream.length; cut++) {
      const res = runHandshake(splitAt(stream, [cut]));
      expect(res.events).toEqual(want);
      expect(res.consumed).toBe(body.length);
    }
  });

  it('one byte at a time and random chunkings', () => {
    const res = runHandshake(oneByteChunks(stream));
    expect(res.events).toEqual(want);
    expect(res.consumed).toBe(body.length);
    const rnd = prng(99);
    for (let i = 0; i < 200; i++) {
      const r = runHandshake(randomChunks(stream, rnd, 1 + (i % 40)));
      expect(r.events).toEqual(want);
      expect(r.consumed).toBe(body.length);
    }
  });

  it('feeds through start/end', () => {
    const sink = new HandshakeRecorder();
    const reader = new HandshakeReader(sink);
    const buf = Buffer.concat([Buffer.from([9, 9]), stream, Buffer.from([7])]);
    expect(reader.feed(buf, 2, 2 + stream.length)).toBe(body.length);
    expect(sink.events).toEqual(want);
  });

  it('option data is a copy: later changes to the chunk do not leak into it', () => {
    let got: Buffer | null = null;
    const reader = new HandshakeReader({
      clientFlags: () => true,
      badMagic: () => {},
      option: (_o, d) => {
        got = d;
        return true;
      },
    });
    const chunk = Buffer.concat([
      clientFlagsBytes(1),
      encodeOption({ opt: OPT.INFO, data: pattern(8, 4) }),
    ]);
    reader.feed(chunk);
    chunk.fill(0);
    expect(got).not.toBeNull();
    expect((got as unknown as Buffer).equals(pattern(8, 4))).toBe(true);
  });

  describe('oversize options', () => {
    const max = 8;
    const opts: Opt[] = [
      { opt: OPT.INFO, data: pattern(8, 1) }, // exactly the limit: kept
      { opt: 99, data: pattern(9, 2) }, // one over: skipped
      { opt: OPT.LIST, data: EMPTY },
      { opt: OPT.SET_META_CONTEXT, data: pattern(1000, 3) },
      { opt: OPT.STRUCTURED_REPLY, data: EMPTY },
      { opt: OPT.ABORT, data: pattern(3, 5) },
    ];
    const obody = Buffer.concat([clientFlagsBytes(1), ...opts.map((o) => encodeOption(o))]);
    const ostream = Buffer.concat([obody, Buffer.from('trailing')]);
    const owant: HEvent[] = [
      { kind: 'flags', flags: 1 },
      ...opts.map(
        (o): HEvent => ({
          kind: 'option',
          opt: o.opt,
          data: o.data.length > max ? null : o.data.toString('hex'),
        }),
      ),
    ];

    it('are delivered as null after skipping exactly their bytes, at every split', () => {
      for (let cut = 0; cut <= ostream.length; cut++) {
        const res = runHandshake(splitAt(ostream, [cut]), max);
        expect(res.events).toEqual(owant);
        expect(res.consumed).toBe(obody.length);
      }
    });

    it('one byte at a time and random chunkings', () => {
      const res = runHandshake(oneByteChunks(ostream), max);
      expect(res.events).toEqual(owant);
      const rnd = prng(3);
      for (let i = 0; i < 100; i++) {
        const r = runHandshake(randomChunks(ostream, rnd, 1 + (i % 60)), max);
        expect(r.events).toEqual(owant);
        expect(r.consumed).toBe(obody.length);
      }
    });

    it('the default limit is 64 KiB', () => {
      const big = Buffer.concat([
        clientFlagsBytes(1),
        encodeOption({ opt: OPT.INFO, data: Buffer.alloc(65536, 1) }),
        encodeOption({ opt: OPT.INFO, data: Buffer.alloc(65537, 2) }),
        encodeOption({ opt: OPT.LIST, data: EMPTY }),
      ]);
      const res = runHandshake([big]);
      expect(
        res.events.map((e) => (e.kind === 'option' ? (e.data?.length ?? null) : e.kind)),
      ).toEqual(['flags', 65536 * 2, null, 0]);
    });
  });

  it('bad option magic: badMagic, stop, nothing after it', () => {
    const bad = Buffer.concat([
      clientFlagsBytes(1),
      encodeOption({ opt: OPT.LIST, data: EMPTY }),
      encodeOption({ opt: OPT.LIST, data: pattern(4, 1) }, 0x1122334455667788n),
      encodeOption({ opt: OPT.LIST, data: EMPTY }),
    ]);
    const badEnd = 4 + 16 + 16;
    for (let cut = 0; cut <= bad.length; cut++) {
      const res = runHandshake(splitAt(bad, [cut]));
      expect(res.events).toEqual([
        { kind: 'flags', flags: 1 },
        { kind: 'option', opt: OPT.LIST, data: '' },
        { kind: 'badMagic' },
      ]);
      expect(res.consumed).toBe(badEnd);
      expect(res.reader.stopped).toBe(true);
      expect(res.reader.feed(bad)).toBe(0);
    }
  });

  it('client flags refused: stop after the 4 flag bytes', () => {
    const s = Buffer.concat([clientFlagsBytes(0xff), encodeOption({ opt: OPT.LIST, data: EMPTY })]);
    for (let cut = 0; cut <= s.length; cut++) {
      const res = runHandshake(splitAt(s, [cut]), undefined, false);
      expect(res.events).toEqual([{ kind: 'flags', flags: 0xff }]);
      expect(res.consumed).toBe(4);
      expect(res.reader.stopped).toBe(true);
    }
  });

  it('client flags are read as an unsigned 32-bit value', () => {
    const res = runHandshake([clientFlagsBytes(0x80000001)]);
    expect(res.events).toEqual([{ kind: 'flags', flags: 0x80000001 }]);
  });

  it('stop() stops reading', () => {
    const sink = new HandshakeRecorder();
    const reader = new HandshakeReader(sink);
    expect(reader.feed(clientFlagsBytes(1))).toBe(4);
    reader.stop();
    expect(reader.stopped).toBe(true);
    expect(reader.feed(encodeOption({ opt: OPT.LIST, data: EMPTY }))).toBe(0);
    expect(sink.events).toEqual([{ kind: 'flags', flags: 1 }]);
  });

  it('EXPORT_NAME and ABORT stop too (the sink says so)', () => {
    for (const opt of [OPT.EXPORT_NAME, OPT.ABORT]) {
      const s = Buffer.concat([
        clientFlagsBytes(1),
        encodeOption({ opt, data: Buffer.from('x') }),
        encodeOption({ opt: OPT.LIST, data: EMPTY }),
      ]);
      const res = runHandshake(oneByteChunks(s));
      expect(res.events).toEqual([
        { kind: 'flags', flags: 1 },
        { kind: 'option', opt, data: '78' },
      ]);
      expect(res.consumed).toBe(4 + 17);
    }
  });
});
