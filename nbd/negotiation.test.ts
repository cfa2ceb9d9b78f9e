import { describe, expect, it } from 'vitest';
import { FULL_CAPS } from '../test/helpers/caps.js';
import type { Backend, BackendCaps } from './backend.js';
import { type Export, StaticCatalog } from './export.js';
import {
  greeting,
  Negotiation,
  type NegotiationOptions,
  optionReply,
  type Step,
  transmissionFlags,
} from './negotiation.js';
import {
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  BLOCK_SIZE_PREFERRED,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  IHAVEOPT,
  INFO,
  META_BASE_ALLOCATION,
  META_ID_BASE_ALLOCATION,
  NBDMAGIC,
  OPT,
  OPTION_REPLY_MAGIC,
  REP,
  TFLAG,
} from './protocol.js';

// ---- fakes and wire helpers ------------------------------------------------

function fakeBackend(size: number, caps: Partial<BackendCaps> = {}): Backend {
  const unused = (): never => {
    throw new Error('a backend method was called during negotiation');
  };
  return {
    size,
    caps: { ...FULL_CAPS, ...caps },
    read: unused,
    write: unused,
    flush: unused,
    trim: unused,
    zero: unused,
    cache: unused,
    extents: unused,
    close: async () => {},
  };
}

function exp(
  name: string,
  size: number,
  opts: { description?: string; readOnly?: boolean; caps?: Partial<BackendCaps> } = {},
): Export {
  return {
    name,
    description: opts.description ?? '',
    backend: fakeBackend(size, opts.caps),
    readOnly: opts.readOnly ?? false,
  };
}

const DISK = exp('disk', 2 ** 40 + 4096, { description: 'the main disk' });
const SWAP = exp('swap', 64 * 1024 * 1024, { caps: { extents: false } });
const DUMP = exp('dump', 1 << 20, { readOnly: true, description: 'crash dumps' });

const FIXED = FLAG_C_FIXED_NEWSTYLE;

function negotiation(
  exports: Export[] = [DISK, SWAP, DUMP],
  flags = FIXED,
  options?: NegotiationOptions,
): Negotiation {
  const n = new Negotiation(new StaticCatalog(exports), options);
  expect(n.clientFlags(flags)).toBeNull();
  return n;
}

interface Reply {
  opt: number;
  type: number;
  data: Buffer;
}

function parseReply(b: Buffer): Reply {
  expect(b.length).toBeGreaterThanOrEqual(20);
  expect(b.readBigUInt64BE(0)).toBe(OPTION_REPLY_MAGIC);
  const len = b.readUInt32BE(16);
  expect(b.length).toBe(20 + len);
  return { opt: b.readUInt32BE(8), type: b.readUInt32BE(12), data: b.subarray(20) };
}

function replies(step: Step): Reply[] {
  return step.replies.map(parseReply);
}

function types(step: Step): number[] {
  return replies(step).map((r) => r.type);
}

/** One error reply, with a human-readable message, and the negotiation goes on. */
function expectError(step: Step, opt: number, type: number): void {
  expect(step.verdict).toBe('continue');
  const rs = replies(step);
  expect(rs).toHaveLength(1);
  expect(rs[0]!.opt).toBe(opt);
  expect(rs[0]!.type).toBe(type);
  // Error replies carry a message: valid UTF-8, no NUL.
  expect(rs[0]!.data.length).toBeGreaterThan(0);
  expect(rs[0]!.data.includes(0)).toBe(false);
  expect(() => new TextDecoder('utf-8', { fatal: true }).decode(rs[0]!.data)).not.toThrow();
}

function u32(v: number): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(v >>> 0, 0);
  return b;
}

function u16(v: number): Buffer {
  const b = Buffer.alloc(2);
  b.writeUInt16BE(v, 0);
  return b;
}

/** NBD_OPT_INFO / NBD_OPT_GO payload. */
function infoPayload(name: string | Buffer, requests: number[] = []): Buffer {
  const n = typeof name === 'string' ? Buffer.from(name) : name;
  return Buffer.concat([u32(n.length), n, u16(requests.length), ...requests.map(u16)]);
}

/** NBD_OPT_{LIST,SET}_META_CONTEXT payload. */
function metaPayload(name: string | Buffer, queries: (string | Buffer)[]): Buffer {
  const n = typeof name === 'string' ? Buffer.from(name) : name;
  const qs = queries.map((q) => (typeof q === 'string' ? Buffer.from(q) : q));
  return Buffer.concat([
    u32(n.length),
    n,
    u32(qs.length),
    ...qs.flatMap((q) => [u32(q.length), q]),
  ]);
}

interface Info {
  export?: { size: bigint; flags: number };
  name?: string;
  description?: string;
  blockSize?: { min: number; preferred: number; max: number };
  types: number[];
}

/** Parses INFO/GO replies: every REP_INFO before one final ACK. */
function parseInfo(step: Step, opt: number): Info {
  const rs = replies(step);
  const last = rs[rs.length - 1]!;
  expect(last.type).toBe(REP.ACK);
  expect(last.data.length).toBe(0);
  const info: Info = { types: [] };
  for (const r of rs.slice(0, -1)) {
    expect(r.opt).toBe(opt);
    expect(r.type).toBe(REP.INFO);
    const t = r.data.readUInt16BE(0);
    info.types.push(t);
    const body = r.data.subarray(2);
    switch (t) {
      case INFO.EXPORT:
        expect(r.data.length).toBe(12);
        info.export = { size: body.readBigUInt64BE(0), flags: body.readUInt16BE(8) };
        break;
      case INFO.NAME:
        info.name = body.toString();
        break;
      case INFO.DESCRIPTION:
        info.description = body.toString();
        break;
      case INFO.BLOCK_SIZE:
        expect(r.data.length).toBe(14);
        info.blockSize = {
          min: body.readUInt32BE(0),
          preferred: body.readUInt32BE(4),
          max: body.readUInt32BE(8),
        };
        break;
      default:
        throw new Error(`unexpected info type ${t}`);
    }
  }
  // Each information type at most once.
  expect(new Set(info.types).size).toBe(info.types.length);
  return info;
}

function structured(n: Negotiation): void {
  const s = n.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0));
  expect(types(s)).toEqual([REP.ACK]);
  expect(s.verdict).toBe('continue');
}

// ---- greeting, flags, reply framing ------------------------------------------

describe('greeting and client flags', () => {
  it('greeting is NBDMAGIC, IHAVEOPT and FIXED_NEWSTYLE|NO_ZEROES', () => {
    const g = greeting();
    expect(g.length).toBe(18);
    expect(g.subarray(0, 8).toString('latin1')).toBe('NBDMAGIC');
    expect(g.subarray(8, 16).toString('latin1')).toBe('IHAVEOPT');
    expect(g.readBigUInt64BE(0)).toBe(NBDMAGIC);
    expect(g.readBigUInt64BE(8)).toBe(IHAVEOPT);
    expect(g.readUInt16BE(16)).toBe(0b11);
  });

  it('accepts FIXED_NEWSTYLE with or without NO_ZEROES', () => {
    const n = new Negotiation(new StaticCatalog([]));
    expect(n.clientFlags(FIXED)).toBeNull();
    expect(n.noZeroes).toBe(false);
    const m = new Negotiation(new StaticCatalog([]));
    expect(m.clientFlags(FIXED | FLAG_C_NO_ZEROES)).toBeNull();
    expect(m.noZeroes).toBe(true);
  });

  it.each([
    ['no flags at all', 0],
    ['NO_ZEROES without FIXED_NEWSTYLE', FLAG_C_NO_ZEROES],
    ['an unknown bit', FIXED | 4],
    ['the top bit', (FIXED | 0x80000000) >>> 0],
    ['every bit', 0xffffffff],
  ])('refuses %s', (_what, flags) => {
    const n = new Negotiation(new StaticCatalog([DISK]));
    const err = n.clientFlags(flags);
    expect(typeof err).toBe('string');
    expect(err!.length).toBeGreaterThan(0);
  });

  it('optionReply frames magic, option, type (error types unsigned), length and data', () => {
    const r = optionReply(OPT.GO, REP.ERR_UNKNOWN, Buffer.from('nope'));
    expect(r.length).toBe(24);
    expect(r.readBigUInt64BE(0)).toBe(OPTION_REPLY_MAGIC);
    expect(r.readUInt32BE(8)).toBe(OPT.GO);
    expect(r.readUInt32BE(12)).toBe(0x80000006);
    expect(r.readUInt32BE(16)).toBe(4);
    expect(r.subarray(20).toString()).toBe('nope');
    expect(optionReply(OPT.LIST, REP.ACK).length).toBe(20);
  });
});

// ---- EXPORT_NAME, ABORT, LIST ----------------------------------------------

describe('EXPORT_NAME', () => {
  it('replies size, flags and 124 zeroes (134 bytes) and enters transmission', () => {
    const n = negotiation();
    const s = n.option(OPT.EXPORT_NAME, Buffer.from('disk'));
    expect(s.verdict).toBe('transmission');
    expect(s.replies).toHaveLength(1);
    const b = s.replies[0]!;
    expect(b.length).toBe(134);
    expect(b.readBigUInt64BE(0)).toBe(BigInt(2 ** 40 + 4096));
    expect(b.readUInt16BE(8)).toBe(transmissionFlags(FULL_CAPS, false, false));
    expect(b.subarray(10).every((x) => x === 0)).toBe(true);
    expect(n.session).toEqual({
      export: DISK,
      flags: transmissionFlags(FULL_CAPS, false, false),
      structured: false,
      allocationContext: false,
    });
  });

  it('honours NO_ZEROES: 10 bytes', () => {
    const n = negotiation([DISK], FIXED | FLAG_C_NO_ZEROES);
    const s = n.option(OPT.EXPORT_NAME, Buffer.from('disk'));
    expect(s.verdict).toBe('transmission');
    expect(s.replies[0]!.length).toBe(10);
    expect(s.replies[0]!.readUInt16BE(8)).toBe(n.session!.flags);
  });

  it('read-only export: READ_ONLY in the flags', () => {
    const n = negotiation();
    const s = n.option(OPT.EXPORT_NAME, Buffer.from('dump'));
    expect(s.replies[0]!.readUInt16BE(8) & TFLAG.READ_ONLY).toBe(TFLAG.READ_ONLY);
  });

  it('structured replies negotiated before: SEND_DF and a structured session', () => {
    const n = negotiation();
    structured(n);
    const s = n.option(OPT.EXPORT_NAME, Buffer.from('disk'));
    expect(s.replies[0]!.readUInt16BE(8) & TFLAG.SEND_DF).toBe(TFLAG.SEND_DF);
    expect(n.session!.structured).toBe(true);
  });

  it.each([
    ['an unknown name', Buffer.from('nope')],
    ['invalid UTF-8', Buffer.from([0xff, 0xfe])],
    ['a NUL', Buffer.from('di\0sk')],
    ['more than 4096 bytes', Buffer.alloc(4097, 0x61)],
    ['the empty name with several exports', Buffer.alloc(0)],
  ])('%s: close without any reply (the option cannot fail)', (_what, name) => {
    const n = negotiation();
    const s = n.option(OPT.EXPORT_NAME, name);
    expect(s.verdict).toBe('close');
    expect(s.replies).toEqual([]);
    expect(typeof s.reason).toBe('string');
    expect(n.session).toBeNull();
  });

  it('the empty name reaches the single export', () => {
    const n = negotiation([DISK]);
    const s = n.option(OPT.EXPORT_NAME, Buffer.alloc(0));
    expect(s.verdict).toBe('transmission');
    expect(n.session!.export).toBe(DISK);
  });

  it('refused by authorize: close without reply', () => {
    const n = negotiation([DISK], FIXED, { authorize: () => 'not you' });
    const s = n.option(OPT.EXPORT_NAME, Buffer.from('disk'));
    expect(s).toEqual({ replies: [], verdict: 'close', reason: 'not you' });
  });

  // NBD_OPT_EXPORT_NAME has no option reply at all: a client waits for the
  // 134/10-byte export reply and would read an option reply header as export
  // size and flags. The spec: "If the server is unwilling to allow the export,
  // it MUST terminate the session."
  it('oversize (payload skipped, data null): close without any reply', () => {
    const n = negotiation();
    const s = n.option(OPT.EXPORT_NAME, null);
    expect(s.replies).toEqual([]);
    expect(s.verdict).toBe('close');
  });
});

describe('ABORT', () => {
  it('ACK, then close', () => {
    const n = negotiation();
    const s = n.option(OPT.ABORT, Buffer.alloc(0));
    expect(types(s)).toEqual([REP.ACK]);
    expect(replies(s)[0]!.opt).toBe(OPT.ABORT);
    expect(s.verdict).toBe('close');
  });

  it('ignores a payload (spec: the server SHOULD ignore it)', () => {
    const n = negotiation();
    const s = n.option(OPT.ABORT, Buffer.from('junk'));
    expect(types(s)).toEqual([REP.ACK]);
    expect(s.verdict).toBe('close');
  });
});

describe('LIST', () => {
  it('one SERVER reply per export with name and description, then ACK', () => {
    const n = negotiation();
    const s = n.option(OPT.LIST, Buffer.alloc(0));
    expect(s.verdict).toBe('continue');
    const rs = replies(s);
    expect(rs.map((r) => [r.opt, r.type])).toEqual([
      [OPT.LIST, REP.SERVER],
      [OPT.LIST, REP.SERVER],
      [OPT.LIST, REP.SERVER],
      [OPT.LIST, REP.ACK],
    ]);
    const listed = rs.slice(0, -1).map((r) => {
      const len = r.data.readUInt32BE(0);
      expect(len).toBeLessThanOrEqual(r.data.length - 4);
      return {
        name: r.data.subarray(4, 4 + len).toString(),
        description: r.data.subarray(4 + len).toString(),
      };
    });
    expect(listed).toEqual([
      { name: 'disk', description: 'the main disk' },
      { name: 'swap', description: '' },
      { name: 'dump', description: 'crash dumps' },
    ]);
  });

  it('multi-byte UTF-8 names are measured in bytes', () => {
    const n = negotiation([exp('dïsk→', 1024, { description: 'größe' })]);
    const r = replies(n.option(OPT.LIST, Buffer.alloc(0)))[0]!;
    const len = r.data.readUInt32BE(0);
    expect(len).toBe(Buffer.byteLength('dïsk→'));
    expect(r.data.subarray(4, 4 + len).toString()).toBe('dïsk→');
    expect(r.data.subarray(4 + len).toString()).toBe('größe');
  });

  it('no exports: just ACK', () => {
    const n = negotiation([]);
    expect(types(n.option(OPT.LIST, Buffer.alloc(0)))).toEqual([REP.ACK]);
  });

  it('with a payload: ERR_INVALID', () => {
    expectError(negotiation().option(OPT.LIST, Buffer.from([0])), OPT.LIST, REP.ERR_INVALID);
  });
});

// ---- INFO and GO -----------------------------------------------------------

describe.each([
  ['INFO', OPT.INFO, 'continue'],
  ['GO', OPT.GO, 'transmission'],
] as const)('%s', (_name, opt, verdict) => {
  it('NAME, DESCRIPTION and BLOCK_SIZE requested: INFO replies then ACK', () => {
    const n = negotiation();
    const s = n.option(opt, infoPayload('disk', [INFO.NAME, INFO.DESCRIPTION, INFO.BLOCK_SIZE]));
    expect(s.verdict).toBe(verdict);
    const info = parseInfo(s, opt);
    expect(info.export).toEqual({
      size: BigInt(2 ** 40 + 4096),
      flags: transmissionFlags(FULL_CAPS, false, false),
    });
    expect(info.name).toBe('disk');
    expect(info.description).toBe('the main disk');
    expect(info.blockSize).toEqual({ min: 1, preferred: 4096, max: 32 * 1024 * 1024 });
    expect([BLOCK_SIZE_MIN, BLOCK_SIZE_PREFERRED, BLOCK_SIZE_MAX]).toEqual([1, 4096, 33554432]);
    if (opt === OPT.INFO) expect(n.session).toBeNull();
    else expect(n.session!.flags).toBe(info.export!.flags);
  });

  it('nothing requested: EXPORT is always sent, NAME and DESCRIPTION are not', () => {
    const info = parseInfo(negotiation().option(opt, infoPayload('disk')), opt);
    expect(info.export).toBeDefined();
    expect(info.name).toBeUndefined();
    expect(info.description).toBeUndefined();
  });

  it('unknown information requests are ignored', () => {
    const s = negotiation().option(opt, infoPayload('disk', [999, 0xffff]));
    expect(s.verdict).toBe(verdict);
    expect(parseInfo(s, opt).export).toBeDefined();
  });

  it('DESCRIPTION requested for an export without one: no DESCRIPTION reply', () => {
    const info = parseInfo(negotiation().option(opt, infoPayload('swap', [INFO.DESCRIPTION])), opt);
    expect(info.description).toBeUndefined();
  });

  it('read-only export: READ_ONLY in INFO_EXPORT', () => {
    const info = parseInfo(negotiation().option(opt, infoPayload('dump')), opt);
    expect(info.export!.size).toBe(BigInt(1 << 20));
    expect(info.export!.flags & TFLAG.READ_ONLY).toBe(TFLAG.READ_ONLY);
  });

  it('unknown export: ERR_UNKNOWN and no INFO replies', () => {
    const n = negotiation();
    expectError(n.option(opt, infoPayload('nope', [INFO.NAME])), opt, REP.ERR_UNKNOWN);
    expect(n.session).toBeNull();
  });

  it("'' reaches the single export but not one of several", () => {
    const one = negotiation([DISK]);
    const s = one.option(opt, infoPayload('', [INFO.NAME]));
    expect(s.verdict).toBe(verdict);
    expect(parseInfo(s, opt).name).toBe('disk');
    expectError(negotiation([DISK, SWAP]).option(opt, infoPayload('')), opt, REP.ERR_UNKNOWN);
  });

  it('an export named "" is reached by the empty name among several', () => {
    const def = exp('', 4096);
    const s = negotiation([DISK, def]).option(opt, infoPayload(''));
    expect(parseInfo(s, opt).export!.size).toBe(4096n);
  });

  it.each([
    ['empty', Buffer.alloc(0)],
    ['only part of the name length', Buffer.from([0, 0])],
    ['name length past the end', Buffer.concat([u32(10), Buffer.from('disk'), u16(0)])],
    ['name length 2^32 - 1', Buffer.concat([u32(0xffffffff), Buffer.from('disk'), u16(0)])],
    ['no request count', Buffer.concat([u32(4), Buffer.from('disk')])],
    ['half a request count', Buffer.concat([u32(4), Buffer.from('disk'), Buffer.from([0])])],
    ['fewer requests than counted', Buffer.concat([u32(4), Buffer.from('disk'), u16(2), u16(1)])],
    ['half a request', Buffer.concat([u32(4), Buffer.from('disk'), u16(1), Buffer.from([0])])],
    ['a trailing byte', Buffer.concat([infoPayload('disk', [INFO.NAME]), Buffer.from([0])])],
    ['trailing bytes after an empty list', Buffer.concat([infoPayload('disk'), u32(0)])],
  ])('%s: ERR_INVALID', (_what, payload) => {
    const n = negotiation();
    expectError(n.option(opt, payload), opt, REP.ERR_INVALID);
    expect(n.session).toBeNull();
  });

  it.each([
    ['invalid UTF-8', Buffer.from([0x64, 0xc3, 0x28])],
    ['a lone continuation byte', Buffer.from([0x80])],
    ['a NUL', Buffer.from('di\0sk')],
    ['more than 4096 bytes', Buffer.alloc(4097, 0x61)],
  ])('name with %s: ERR_INVALID', (_what, name) => {
    expectError(negotiation().option(opt, infoPayload(name)), opt, REP.ERR_INVALID);
  });

  it('a 4096-byte name is valid (and unknown here)', () => {
    expectError(
      negotiation().option(opt, infoPayload(Buffer.alloc(4096, 0x61))),
      opt,
      REP.ERR_UNKNOWN,
    );
  });

  it('refused by authorize: ERR_POLICY with its message', () => {
    const seen: string[] = [];
    const n = negotiation([DISK], FIXED, {
      authorize: (e) => {
        seen.push(e.name);
        return 'no access to disk';
      },
    });
    const s = n.option(opt, infoPayload('disk'));
    expectError(s, opt, REP.ERR_POLICY);
    expect(replies(s)[0]!.data.toString()).toBe('no access to disk');
    expect(seen).toEqual(['disk']);
    expect(n.session).toBeNull();
  });

  it('authorize returning null allows', () => {
    const n = negotiation([DISK], FIXED, { authorize: () => null });
    expect(n.option(opt, infoPayload('disk')).verdict).toBe(verdict);
  });

  it('oversize (data null): ERR_TOO_BIG and the negotiation goes on', () => {
    const n = negotiation();
    expectError(n.option(opt, null), opt, REP.ERR_TOO_BIG);
    expect(n.option(opt, infoPayload('disk')).verdict).toBe(verdict);
  });
});

describe('INFO then GO', () => {
  it('GO after INFO with the same parameters gives the same information', () => {
    const n = negotiation();
    structured(n);
    const p = infoPayload('disk', [INFO.BLOCK_SIZE, INFO.NAME]);
    const info = n.option(OPT.INFO, p);
    const go = n.option(OPT.GO, p);
    expect(parseInfo(go, OPT.GO)).toEqual(parseInfo(info, OPT.INFO));
    expect(go.verdict).toBe('transmission');
    expect(n.session).toEqual({
      export: DISK,
      flags: transmissionFlags(FULL_CAPS, false, true),
      structured: true,
      allocationContext: false,
    });
  });

  it('an error leaves the negotiation open for another GO', () => {
    const n = negotiation();
    expectError(n.option(OPT.GO, infoPayload('nope')), OPT.GO, REP.ERR_UNKNOWN);
    expect(n.option(OPT.GO, infoPayload('swap')).verdict).toBe('transmission');
    expect(n.session!.export).toBe(SWAP);
  });
});

// ---- STRUCTURED_REPLY and meta contexts -----------------------------------------

describe('STRUCTURED_REPLY', () => {
  it('ACK and structured from then on', () => {
    const n = negotiation();
    expect(n.structured).toBe(false);
    structured(n);
    expect(n.structured).toBe(true);
  });

  it('twice: ERR_INVALID, still structured', () => {
    const n = negotiation();
    structured(n);
    expectError(
      n.option(OPT.STRUCTURED_REPLY, Buffer.alloc(0)),
      OPT.STRUCTURED_REPLY,
      REP.ERR_INVALID,
    );
    expect(n.structured).toBe(true);
  });

  it('with a payload: ERR_INVALID and not negotiated', () => {
    const n = negotiation();
    expectError(
      n.option(OPT.STRUCTURED_REPLY, Buffer.from([1])),
      OPT.STRUCTURED_REPLY,
      REP.ERR_INVALID,
    );
    expect(n.structured).toBe(false);
    structured(n);
  });
});

function metaReplies(step: Step, opt: number): { id: number; name: string }[] {
  const rs = replies(step);
  expect(rs[rs.length - 1]!.type).toBe(REP.ACK);
  return rs.slice(0, -1).map((r) => {
    expect(r.opt).toBe(opt);
    expect(r.type).toBe(REP.META_CONTEXT);
    return { id: r.data.readUInt32BE(0), name: r.data.subarray(4).toString() };
  });
}

describe('LIST_META_CONTEXT', () => {
  const L = OPT.LIST_META_CONTEXT;
  const ALLOC = [{ id: 0, name: META_BASE_ALLOCATION }];

  it.each([
    ['no queries', []],
    ["'base:'", ['base:']],
    ["'base:allocation'", ['base:allocation']],
    ['an unknown namespace and base:allocation', ['x-foo:bar', 'base:allocation']],
  ])('%s: base:allocation (id 0), then ACK', (_what, queries) => {
    const n = negotiation();
    structured(n);
    const s = n.option(L, metaPayload('disk', queries));
    expect(s.verdict).toBe('continue');
    expect(metaReplies(s, L)).toEqual(ALLOC);
  });

  it.each([
    ['an unknown namespace', ['x-foo:bar']],
    ['qemu:', ['qemu:dirty-bitmap:b0']],
    ['an unknown base: leaf', ['base:nothing']],
    ['a prefix of base:allocation', ['base:alloc']],
    ['no colon', ['allocation']],
  ])('%s: nothing, just ACK', (_what, queries) => {
    const n = negotiation();
    structured(n);
    expect(metaReplies(n.option(L, metaPayload('disk', queries)), L)).toEqual([]);
  });

  it('an export without extents lists nothing', () => {
    const n = negotiation();
    structured(n);
    expect(metaReplies(n.option(L, metaPayload('swap', [])), L)).toEqual([]);
    expect(metaReplies(n.option(L, metaPayload('swap', ['base:'])), L)).toEqual([]);
  });

  it('the same context asked twice is listed once', () => {
    const n = negotiation();
    structured(n);
    const s = n.option(L, metaPayload('disk', ['base:allocation', 'base:']));
    expect(metaReplies(s, L)).toEqual(ALLOC);
  });

  it('unknown export: ERR_UNKNOWN', () => {
    const n = negotiation();
    structured(n);
    expectError(n.option(L, metaPayload('nope', [])), L, REP.ERR_UNKNOWN);
  });

  it('listing does not select anything', () => {
    const n = negotiation();
    structured(n);
    n.option(L, metaPayload('disk', ['base:allocation']));
    n.option(OPT.GO, infoPayload('disk'));
    expect(n.session!.allocationContext).toBe(false);
  });
});

describe('SET_META_CONTEXT', () => {
  const S = OPT.SET_META_CONTEXT;

  it('before STRUCTURED_REPLY: ERR_INVALID', () => {
    const n = negotiation();
    expectError(n.option(S, metaPayload('disk', ['base:allocation'])), S, REP.ERR_INVALID);
    n.option(OPT.GO, infoPayload('disk'));
    expect(n.session!.allocationContext).toBe(false);
  });

  it('base:allocation: META_CONTEXT with its id, ACK; GO on that export has the context', () => {
    const n = negotiation();
    structured(n);
    const s = n.option(S, metaPayload('disk', ['base:allocation']));
    expect(s.verdict).toBe('continue');
    expect(metaReplies(s, S)).toEqual([{ id: META_ID_BASE_ALLOCATION, name: 'base:allocation' }]);
    expect(META_ID_BASE_ALLOCATION).not.toBe(0);
    expect(n.option(OPT.GO, infoPayload('disk')).verdict).toBe('transmission');
    expect(n.session).toEqual({
      export: DISK,
      flags: transmissionFlags(FULL_CAPS, false, true),
      structured: true,
      allocationContext: true,
    });
  });

  it('EXPORT_NAME on that export has the context too', () => {
    const n = negotiation();
    structured(n);
    n.option(S, metaPayload('disk', ['base:allocation']));
    expect(n.option(OPT.EXPORT_NAME, Buffer.from('disk')).verdict).toBe('transmission');
    expect(n.session!.allocationContext).toBe(true);
  });

  it('GO naming a different export than SET did: no context', () => {
    const n = negotiation();
    structured(n);
    n.option(S, metaPayload('disk', ['base:allocation']));
    n.option(OPT.GO, infoPayload('dump'));
    expect(n.session!.export).toBe(DUMP);
    expect(n.session!.allocationContext).toBe(false);
  });

  it("'base:' selects nothing in SET (the spec says ignore it)", () => {
    const n = negotiation();
    structured(n);
    expect(metaReplies(n.option(S, metaPayload('disk', ['base:'])), S)).toEqual([]);
    n.option(OPT.GO, infoPayload('disk'));
    expect(n.session!.allocationContext).toBe(false);
  });

  it('no queries select nothing', () => {
    const n = negotiation();
    structured(n);
    expect(metaReplies(n.option(S, metaPayload('disk', [])), S)).toEqual([]);
  });

  it('unknown namespaces are ignored', () => {
    const n = negotiation();
    structured(n);
    const s = n.option(S, metaPayload('disk', ['x-foo:bar', 'base:allocation', 'qemu:x']));
    expect(metaReplies(s, S)).toEqual([{ id: META_ID_BASE_ALLOCATION, name: 'base:allocation' }]);
  });

  it('an export without extents: nothing selected', () => {
    const n = negotiation();
    structured(n);
    expect(metaReplies(n.option(S, metaPayload('swap', ['base:allocation'])), S)).toEqual([]);
    n.option(OPT.GO, infoPayload('swap'));
    expect(n.session!.allocationContext).toBe(false);
  });

  it('a later SET replaces an earlier one', () => {
    const n = negotiation();
    structured(n);
    n.option(S, metaPayload('disk', ['base:allocation']));
    n.option(S, metaPayload('disk', []));
    n.option(OPT.GO, infoPayload('disk'));
    expect(n.session!.allocationContext).toBe(false);
  });

  it('a later SET on another export moves the selection there', () => {
    const n = negotiation([DISK, exp('other', 8192)]);
    structured(n);
    n.option(S, metaPayload('disk', ['base:allocation']));
    n.option(S, metaPayload('other', ['base:allocation']));
    n.option(OPT.GO, infoPayload('other'));
    expect(n.session!.allocationContext).toBe(true);
  });

  it("'' and the single export's name are the same export", () => {
    const n = negotiation([DISK]);
    structured(n);
    n.option(S, metaPayload('', ['base:allocation']));
    n.option(OPT.GO, infoPayload('disk'));
    expect(n.session!.allocationContext).toBe(true);
  });

  it('unknown export: ERR_UNKNOWN', () => {
    const n = negotiation();
    structured(n);
    expectError(n.option(S, metaPayload('nope', ['base:allocation'])), S, REP.ERR_UNKNOWN);
  });

  // Spec (NBD_OPT_SET_META_CONTEXT): "Issuing this command replaces all
  // previously-set metadata contexts (including when this command fails)".
  it('a failed SET also clears an earlier selection', () => {
    const n = negotiation();
    structured(n);
    n.option(S, metaPayload('disk', ['base:allocation']));
    expectError(n.option(S, metaPayload('nope', ['base:allocation'])), S, REP.ERR_UNKNOWN);
    n.option(OPT.GO, infoPayload('disk'));
    expect(n.session!.allocationContext).toBe(false);
  });
});

describe.each([
  ['LIST_META_CONTEXT', OPT.LIST_META_CONTEXT],
  ['SET_META_CONTEXT', OPT.SET_META_CONTEXT],
] as const)('%s payload checks', (_name, opt) => {
  it.each([
    ['empty', Buffer.alloc(0)],
    ['name length past the end', Buffer.concat([u32(9), Buffer.from('disk'), u32(0)])],
    ['no query count', Buffer.concat([u32(4), Buffer.from('disk')])],
    [
      'fewer queries than counted',
      Buffer.concat([u32(4), Buffer.from('disk'), u32(2), u32(5), Buffer.from('base:')]),
    ],
    [
      'query length past the end',
      Buffer.concat([u32(4), Buffer.from('disk'), u32(1), u32(99), Buffer.from('base:')]),
    ],
    ['a trailing byte', Buffer.concat([metaPayload('disk', ['base:']), Buffer.from([0])])],
    ['invalid UTF-8 in the name', metaPayload(Buffer.from([0xff]), [])],
    ['a NUL in a query', metaPayload('disk', [Buffer.from('base:\0allocation')])],
    ['invalid UTF-8 in a query', metaPayload('disk', [Buffer.from([0x62, 0x61, 0xe2, 0x82])])],
    ['a query over 4096 bytes', metaPayload('disk', [Buffer.alloc(4097, 0x61)])],
  ])('%s: ERR_INVALID', (_what, payload) => {
    const n = negotiation();
    structured(n);
    expectError(n.option(opt, payload), opt, REP.ERR_INVALID);
  });

  it('oversize (data null): ERR_TOO_BIG', () => {
    const n = negotiation();
    structured(n);
    expectError(n.option(opt, null), opt, REP.ERR_TOO_BIG);
  });
});

// ---- unsupported and oversize options ----------------------------------------

describe('options Ballast does not support', () => {
  it.each([
    ['an unknown option (99)', 99],
    ['option 0', 0],
    ['EXTENDED_HEADERS (11)', OPT.EXTENDED_HEADERS],
    ['STARTTLS (5): no TLS configured', OPT.STARTTLS],
    ['PEEK_EXPORT (4)', OPT.PEEK_EXPORT],
    ['2^32 - 1', 0xffffffff],
  ])('%s: ERR_UNSUP and the negotiation goes on', (_what, opt) => {
    const n = negotiation();
    expectError(n.option(opt, Buffer.from('whatever')), opt, REP.ERR_UNSUP);
    expectError(n.option(opt, Buffer.alloc(0)), opt, REP.ERR_UNSUP);
    const go = n.option(OPT.GO, infoPayload('disk'));
    expect(go.verdict).toBe('transmission');
  });

  it('an oversize unknown option: ERR_TOO_BIG, then on', () => {
    const n = negotiation();
    expectError(n.option(99, null), 99, REP.ERR_TOO_BIG);
    expect(types(n.option(OPT.LIST, Buffer.alloc(0))).pop()).toBe(REP.ACK);
  });
});

// ---- transmission flags ----------------------------------------------------

describe('transmissionFlags', () => {
  const WRITE_FLAGS =
    TFLAG.SEND_FLUSH |
    TFLAG.SEND_FUA |
    TFLAG.SEND_TRIM |
    TFLAG.SEND_WRITE_ZEROES |
    TFLAG.SEND_FAST_ZERO;

  it('everything on, writable, not structured', () => {
    expect(transmissionFlags(FULL_CAPS, false, false)).toBe(
      TFLAG.HAS_FLAGS | WRITE_FLAGS | TFLAG.CAN_MULTI_CONN | TFLAG.SEND_CACHE,
    );
  });

  it.each([
    ['the export is read-only', { ...FULL_CAPS }, true],
    ['the backend cannot write', { ...FULL_CAPS, write: false }, false],
    ['both', { ...FULL_CAPS, write: false }, true],
  ])('read-only when %s: READ_ONLY and no write-side flag', (_what, caps, readOnly) => {
    for (const s of [false, true]) {
      const f = transmissionFlags(caps, readOnly, s);
      expect(f & TFLAG.READ_ONLY).toBe(TFLAG.READ_ONLY);
      expect(f & WRITE_FLAGS).toBe(0);
      expect(f & TFLAG.HAS_FLAGS).toBe(TFLAG.HAS_FLAGS);
      // Read-side flags stay.
      expect(f & TFLAG.SEND_CACHE).toBe(TFLAG.SEND_CACHE);
      expect(f & TFLAG.SEND_DF).toBe(s ? TFLAG.SEND_DF : 0);
    }
  });

  it.each([
    ['flush', [TFLAG.SEND_FLUSH]],
    ['fua', [TFLAG.SEND_FUA]],
    ['trim', [TFLAG.SEND_TRIM]],
    ['zero', [TFLAG.SEND_WRITE_ZEROES, TFLAG.SEND_FAST_ZERO]],
    ['fastZero', [TFLAG.SEND_FAST_ZERO]],
    ['cache', [TFLAG.SEND_CACHE]],
    ['multiConn', [TFLAG.CAN_MULTI_CONN]],
    ['extents', []],
  ] as const)('cap %s off: only its flags go', (cap, gone) => {
    for (const s of [false, true]) {
      const all = transmissionFlags(FULL_CAPS, false, s);
      const f = transmissionFlags({ ...FULL_CAPS, [cap]: false }, false, s);
      const mask = gone.reduce((m: number, g: number) => m | g, 0);
      expect(all & mask).toBe(mask);
      expect(f).toBe(all & ~mask);
    }
  });

  it('rotational cap on: ROTATIONAL', () => {
    const f = transmissionFlags({ ...FULL_CAPS, rotational: true }, false, false);
    expect(f).toBe(transmissionFlags(FULL_CAPS, false, false) | TFLAG.ROTATIONAL);
    const ro = transmissionFlags({ ...FULL_CAPS, rotational: true }, true, false);
    expect(ro & TFLAG.ROTATIONAL).toBe(TFLAG.ROTATIONAL);
  });

  it('SEND_DF only with structured replies', () => {
    expect(transmissionFlags(FULL_CAPS, false, false) & TFLAG.SEND_DF).toBe(0);
    expect(transmissionFlags(FULL_CAPS, false, true) & TFLAG.SEND_DF).toBe(TFLAG.SEND_DF);
  });

  it('nothing at all: HAS_FLAGS and READ_ONLY only', () => {
    const none: BackendCaps = {
      write: false,
      flush: false,
      fua: false,
      trim: false,
      zero: false,
      fastZero: false,
      cache: false,
      extents: false,
      multiConn: false,
      rotational: false,
    };
    expect(transmissionFlags(none, false, false)).toBe(TFLAG.HAS_FLAGS | TFLAG.READ_ONLY);
  });

  it('never RESIZE, never bits above 11', () => {
    for (const ro of [false, true]) {
      for (const s of [false, true]) {
        const f = transmissionFlags({ ...FULL_CAPS, rotational: true }, ro, s);
        expect(f & TFLAG.SEND_RESIZE).toBe(0);
        expect(f & ~0xfff).toBe(0);
      }
    }
  });
});

// ---- STARTTLS ----------------------------------------------------------------

describe('STARTTLS', () => {
  const tlsNeg = (tls: 'allow' | 'require', extra: NegotiationOptions = {}) =>
    negotiation(undefined, undefined, { tls, ...extra });

  it('off: ERR_UNSUP, and nothing else changes', () => {
    const n = negotiation(undefined, undefined, { tls: 'off' });
    expectError(n.option(OPT.STARTTLS, Buffer.alloc(0)), OPT.STARTTLS, REP.ERR_UNSUP);
    expect(n.tlsActive).toBe(false);
  });

  it.each(['allow', 'require'] as const)('%s: ACK and the verdict starttls', (mode) => {
    const n = tlsNeg(mode);
    const s = n.option(OPT.STARTTLS, Buffer.alloc(0));
    expect(s.verdict).toBe('starttls');
    expect(types(s)).toEqual([REP.ACK]);
    expect(n.tlsActive).toBe(true);
  });

  it('a payload: ERR_INVALID, TLS not started', () => {
    const n = tlsNeg('require');
    expectError(n.option(OPT.STARTTLS, Buffer.from([0])), OPT.STARTTLS, REP.ERR_INVALID);
    expect(n.tlsActive).toBe(false);
  });

  it('a second STARTTLS inside TLS: ERR_INVALID', () => {
    const n = tlsNeg('allow');
    n.option(OPT.STARTTLS, Buffer.alloc(0));
    expectError(n.option(OPT.STARTTLS, Buffer.alloc(0)), OPT.STARTTLS, REP.ERR_INVALID);
  });

  it.each([
    ['LIST', OPT.LIST, Buffer.alloc(0)],
    ['INFO', OPT.INFO, infoPayload('disk')],
    ['GO', OPT.GO, infoPayload('disk')],
    ['STRUCTURED_REPLY', OPT.STRUCTURED_REPLY, Buffer.alloc(0)],
    ['LIST_META_CONTEXT', OPT.LIST_META_CONTEXT, metaPayload('disk', [])],
    ['SET_META_CONTEXT', OPT.SET_META_CONTEXT, metaPayload('disk', [])],
    ['an unknown option', 99, Buffer.alloc(0)],
    ['an oversize option', 99, null],
  ])('require, before TLS: %s gets ERR_TLS_REQD', (_what, opt, payload) => {
    const n = tlsNeg('require');
    expectError(n.option(opt, payload), opt, REP.ERR_TLS_REQD);
    expect(n.structured).toBe(false);
  });

  it('require, before TLS: EXPORT_NAME closes, ABORT is acknowledged', () => {
    expect(tlsNeg('require').option(OPT.EXPORT_NAME, Buffer.from('disk')).verdict).toBe('close');
    const a = tlsNeg('require').option(OPT.ABORT, Buffer.alloc(0));
    expect(a.verdict).toBe('close');
    expect(types(a)).toEqual([REP.ACK]);
  });

  it('require, after STARTTLS: options are served', () => {
    const n = tlsNeg('require');
    n.option(OPT.STARTTLS, Buffer.alloc(0));
    structured(n);
    expect(n.option(OPT.GO, infoPayload('disk')).verdict).toBe('transmission');
    expect(n.session?.structured).toBe(true);
  });

  it('allow: options work in plaintext too', () => {
    const n = tlsNeg('allow');
    expect(n.option(OPT.GO, infoPayload('disk')).verdict).toBe('transmission');
  });

  it('CVE-2021-3716: structured replies and meta contexts negotiated in plaintext are forgotten', () => {
    const n = tlsNeg('allow');
    structured(n);
    const set = n.option(OPT.SET_META_CONTEXT, metaPayload('disk', [META_BASE_ALLOCATION]));
    expect(types(set)).toEqual([REP.META_CONTEXT, REP.ACK]);
    n.option(OPT.STARTTLS, Buffer.alloc(0));
    expect(n.structured).toBe(false);
    expect(n.option(OPT.GO, infoPayload('disk')).verdict).toBe('transmission');
    expect(n.session?.structured).toBe(false);
    expect(n.session?.allocationContext).toBe(false);
    expect(n.session!.flags & TFLAG.SEND_DF).toBe(0);
  });

  it('CVE-2021-3716: SET_META_CONTEXT after STARTTLS needs STRUCTURED_REPLY again', () => {
    const n = tlsNeg('allow');
    structured(n);
    n.option(OPT.STARTTLS, Buffer.alloc(0));
    expectError(
      n.option(OPT.SET_META_CONTEXT, metaPayload('disk', [META_BASE_ALLOCATION])),
      OPT.SET_META_CONTEXT,
      REP.ERR_INVALID,
    );
  });
});

describe('access hooks', () => {
  it('LIST leaves out exports the client may not open; META_CONTEXT on them: ERR_POLICY', () => {
    const n = negotiation(undefined, undefined, {
      authorize: (e) => (e.name === 'disk' ? 'not for you' : null),
    });
    const list = n.option(OPT.LIST, Buffer.alloc(0));
    const names = list.replies
      .filter((r) => r.readUInt32BE(12) === REP.SERVER)
      .map((r) => r.subarray(24, 24 + r.readUInt32BE(20)).toString());
    expect(names).not.toContain('disk');
    expectError(
      n.option(OPT.LIST_META_CONTEXT, metaPayload('disk', [])),
      OPT.LIST_META_CONTEXT,
      REP.ERR_POLICY,
    );
  });

  it('readOnlyFor: the client is told READ_ONLY, without write-side flags', () => {
    const n = negotiation(undefined, undefined, { readOnlyFor: () => true });
    expect(n.option(OPT.GO, infoPayload('disk')).verdict).toBe('transmission');
    expect(n.session!.flags & TFLAG.READ_ONLY).toBe(TFLAG.READ_ONLY);
    expect(n.session!.flags & TFLAG.SEND_TRIM).toBe(0);
  });
});
