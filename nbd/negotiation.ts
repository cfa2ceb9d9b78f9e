// The handshake as a pure state machine: bytes in (already framed by
// HandshakeReader), reply buffers and a verdict out. No sockets here.
//
//   start ── greeting ──▶ await flags ── known flags ──▶ options
//   options: LIST / INFO / STRUCTURED_REPLY / *_META_CONTEXT / unknown → reply, stay
//            ABORT → ACK, close
//            STARTTLS (tls allow|require, not yet TLS) → ACK, forget everything
//              negotiated so far, 'starttls' (the transport upgrades or drops)
//            with tls require and no TLS yet: any other option → ERR_TLS_REQD
//              (EXPORT_NAME, which has no error reply → close)
//            EXPORT_NAME → export reply (or close if unknown) → transmission
//            GO → INFO replies + ACK → transmission (or error reply, stay)

import type { BackendCaps } from './backend.js';
import type { Export, ExportCatalog } from './export.js';
import {
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  BLOCK_SIZE_PREFERRED,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  INFO,
  KNOWN_CLIENT_FLAGS,
  MAX_STRING,
  META_BASE_ALLOCATION,
  META_ID_BASE_ALLOCATION,
  NBDMAGIC,
  OPT,
  OPTION_REPLY_MAGIC,
  optName,
  REP,
  TFLAG,
} from './protocol.js';

/** What the connection should do after an option. */
export type Verdict = 'continue' | 'close' | 'transmission' | 'starttls';

export interface Step {
  replies: Buffer[];
  verdict: Verdict;
  /** Why the handshake closed, for the log. */
  reason?: string;
}

/** What transmission needs to know about the negotiated session. */
export interface Session {
  export: Export;
  /** The transmission flags sent to the client. */
  flags: number;
  structured: boolean;
  /** base:allocation was selected for this export. */
  allocationContext: boolean;
}

export interface NegotiationOptions {
  /** Optional access check at GO / EXPORT_NAME; return a message to refuse with ERR_POLICY. */
  authorize?: (exp: Export) => string | null;
  /** At GO / EXPORT_NAME: serve this export read-only to this client. */
  readOnlyFor?: (exp: Export) => boolean;
  /** STARTTLS: refused (off, the default), offered (allow) or demanded (require). */
  tls?: 'off' | 'allow' | 'require';
}

export function greeting(): Buffer {
  const b = Buffer.alloc(18);
  b.writeBigUInt64BE(NBDMAGIC, 0);
  b.writeBigUInt64BE(IHAVEOPT, 8);
  b.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
  return b;
}

/** Transmission flags from what the backend can do and what was negotiated. */
export function transmissionFlags(
  caps: BackendCaps,
  readOnly: boolean,
  structured: boolean,
): number {
  let f: number = TFLAG.HAS_FLAGS;
  const writable = caps.write && !readOnly;
  if (!writable) f |= TFLAG.READ_ONLY;
  else {
    if (caps.flush) f |= TFLAG.SEND_FLUSH;
    if (caps.fua) f |= TFLAG.SEND_FUA;
    if (caps.trim) f |= TFLAG.SEND_TRIM;
    if (caps.zero) {
      f |= TFLAG.SEND_WRITE_ZEROES;
      if (caps.fastZero) f |= TFLAG.SEND_FAST_ZERO;
    }
  }
  if (caps.rotational) f |= TFLAG.ROTATIONAL;
  if (structured) f |= TFLAG.SEND_DF;
  if (caps.multiConn) f |= TFLAG.CAN_MULTI_CONN;
  if (caps.cache) f |= TFLAG.SEND_CACHE;
  return f;
}

export function optionReply(opt: number, type: number, data?: Buffer): Buffer {
  const len = data ? data.length : 0;
  const b = Buffer.allocUnsafe(20 + len);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(opt, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(len, 16);
  if (data) data.copy(b, 20);
  return b;
}

const utf8 = new TextDecoder('utf-8', { fatal: true });

/** A spec string: valid UTF-8, no NUL, at most 4096 bytes. */
function decodeString(buf: Buffer): string | null {
  if (buf.length > MAX_STRING || buf.includes(0)) return null;
  try {
    return utf8.decode(buf);
  } catch {
    return null;
  }
}

class BadOption extends Error {}

/** A cursor over an option payload that throws BadOption on any overrun. */
class Cursor {
  pos = 0;
  constructor(private readonly buf: Buffer) {}
  u16(): number {
    if (this.pos + 2 > this.buf.length) throw new BadOption('truncated');
    const v = this.buf.readUInt16BE(this.pos);
    this.pos += 2;
    return v;
  }
  u32(): number {
    if (this.pos + 4 > this.buf.length) throw new BadOption('truncated');
    const v = this.buf.readUInt32BE(this.pos);
    this.pos += 4;
    return v;
  }
  string(len: number): string {
    if (len > this.buf.length - this.pos) throw new BadOption('string runs past the option');
    const s = decodeString(this.buf.subarray(this.pos, this.pos + len));
    if (s === null) throw new BadOption('string is not valid UTF-8 of at most 4096 bytes');
    this.pos += len;
    return s;
  }
  end(): void {
    if (this.pos !== this.buf.length) throw new BadOption('trailing bytes');
  }
}

export class Negotiation {
  structured = false;
  noZeroes = false;
  /** The export that SET_META_CONTEXT applied to, and whether it selected base:allocation. */
  private metaExport: Export | null = null;
  private metaAllocation = false;
  session: Session | null = null;
  /** STARTTLS was accepted: from here on the transport is TLS (or gone). */
  tlsActive = false;

  constructor(
    private readonly catalog: ExportCatalog,
    private readonly options: NegotiationOptions = {},
  ) {}

  /** Returns an error message if the connection must be dropped. */
  clientFlags(flags: number): string | null {
    if ((flags & ~KNOWN_CLIENT_FLAGS) !== 0) {
      return `unknown client flags 0x${(flags >>> 0).toString(16)}`;
    }
    if (!(flags & FLAG_C_FIXED_NEWSTYLE)) return 'client does not speak fixed newstyle';
    this.noZeroes = (flags & FLAG_C_NO_ZEROES) !== 0;
    return null;
  }

  option(opt: number, data: Buffer | null): Step {
    const tls = this.options.tls ?? 'off';
    if (tls === 'require' && !this.tlsActive && opt !== OPT.STARTTLS && opt !== OPT.ABORT) {
      if (opt === OPT.EXPORT_NAME) {
        return { replies: [], verdict: 'close', reason: 'EXPORT_NAME before TLS' };
      }
      return this.error(opt, REP.ERR_TLS_REQD, 'this server requires TLS: send STARTTLS first');
    }
    if (opt === OPT.SET_META_CONTEXT) {
      // SET replaces the selection even when it fails.
      this.metaExport = null;
      this.metaAllocation = false;
    }
    if (data === null) {
      // EXPORT_NAME has no error reply and ABORT's payload is ignored: both end the session.
      if (opt === OPT.EXPORT_NAME) {
        return { replies: [], verdict: 'close', reason: 'EXPORT_NAME too large' };
      }
      if (opt === OPT.ABORT) {
        return { replies: [optionReply(opt, REP.ACK)], verdict: 'close', reason: 'client aborted' };
      }
      return this.error(opt, REP.ERR_TOO_BIG, `${optName(opt)} payload too large`);
    }
    try {
      switch (opt) {
        case OPT.EXPORT_NAME:
          return this.exportName(data);
        case OPT.ABORT:
          return {
            replies: [optionReply(opt, REP.ACK)],
            verdict: 'close',
            reason: 'client aborted',
          };
        case OPT.LIST:
          return this.list(data);
        case OPT.INFO:
        case OPT.GO:
          return this.infoGo(opt, data);
        case OPT.STRUCTURED_REPLY:
          if (data.length !== 0) throw new BadOption('STRUCTURED_REPLY takes no payload');
          if (this.structured) throw new BadOption('structured replies already negotiated');
          this.structured = true;
          return { replies: [optionReply(opt, REP.ACK)], verdict: 'continue' };
        case OPT.LIST_META_CONTEXT:
        case OPT.SET_META_CONTEXT:
          return this.metaContext(opt, data);
        case OPT.STARTTLS:
          return this.startTls(data);
        default:
          return this.error(opt, REP.ERR_UNSUP, `option ${optName(opt)} is not supported`);
      }
    } catch (e) {
      if (e instanceof BadOption) return this.error(opt, REP.ERR_INVALID, e.message);
      throw e;
    }
  }

  private startTls(data: Buffer): Step {
    if ((this.options.tls ?? 'off') === 'off') {
      return this.error(OPT.STARTTLS, REP.ERR_UNSUP, 'TLS is not configured on this server');
    }
    if (data.length !== 0) throw new BadOption('STARTTLS takes no payload');
    if (this.tlsActive) throw new BadOption('TLS is already active');
    // Nothing said in plaintext may carry over into the TLS session (CVE-2021-3716).
    this.tlsActive = true;
    this.structured = false;
    this.metaExport = null;
    this.metaAllocation = false;
    this.session = null;
    return { replies: [optionReply(OPT.STARTTLS, REP.ACK)], verdict: 'starttls' };
  }

  private error(opt: number, type: number, message: string): Step {
    return { replies: [optionReply(opt, type, Buffer.from(message))], verdict: 'continue' };
  }

  private exportName(data: Buffer): Step {
    const name = decodeString(data);
    const exp = name === null ? undefined : this.catalog.lookup(name);
    // EXPORT_NAME has no way to report an error: the spec says close.
    if (!exp)
      return { replies: [], verdict: 'close', reason: `unknown export ${JSON.stringify(name)}` };
    const refusal = this.options.authorize?.(exp);
    if (refusal) return { replies: [], verdict: 'close', reason: refusal };
    const s = this.enter(exp);
    const b = Buffer.alloc(this.noZeroes ? 10 : 134);
    b.writeBigUInt64BE(BigInt(exp.backend.size), 0);
    b.writeUInt16BE(s.flags, 8);
    return { replies: [b], verdict: 'transmission' };
  }

  private list(data: Buffer): Step {
    if (data.length !== 0) throw new BadOption('LIST takes no payload');
    const replies: Buffer[] = [];
    for (const e of this.catalog.list()) {
      // A client is not told about exports it may not open.
      if (this.options.authorize?.(e)) continue;
      const name = Buffer.from(e.name);
      const desc = Buffer.from(e.description);
      const p = Buffer.alloc(4 + name.length + desc.length);
      p.writeUInt32BE(name.length, 0);
      name.copy(p, 4);
      desc.copy(p, 4 + name.length);
      replies.push(optionReply(OPT.LIST, REP.SERVER, p));
    }
    replies.push(optionReply(OPT.LIST, REP.ACK));
    return { replies, verdict: 'continue' };
  }

  private infoGo(opt: number, data: Buffer): Step {
    const c = new Cursor(data);
    const name = c.string(c.u32());
    const n = c.u16();
    const requested = new Set<number>();
    for (let i = 0; i < n; i++) requested.add(c.u16());
    c.end();
    const exp = this.catalog.lookup(name);
    if (!exp) return this.error(opt, REP.ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`);
    const refusal = this.options.authorize?.(exp);
    if (refusal) return this.error(opt, REP.ERR_POLICY, refusal);

    const flags = transmissionFlags(exp.backend.caps, this.readOnly(exp), this.structured);
    const replies: Buffer[] = [];
    const info = (type: number, body: Buffer): void => {
      const p = Buffer.alloc(2 + body.length);
      p.writeUInt16BE(type, 0);
      body.copy(p, 2);
      replies.push(optionReply(opt, REP.INFO, p));
    };
    if (requested.has(INFO.NAME)) info(INFO.NAME, Buffer.from(exp.name));
    if (requested.has(INFO.DESCRIPTION) && exp.description) {
      info(INFO.DESCRIPTION, Buffer.from(exp.description));
    }
    // Sent whether asked or not: a minimum of 1 places no burden on clients.
    const bs = Buffer.alloc(12);
    bs.writeUInt32BE(BLOCK_SIZE_MIN, 0);
    bs.writeUInt32BE(BLOCK_SIZE_PREFERRED, 4);
    bs.writeUInt32BE(BLOCK_SIZE_MAX, 8);
    info(INFO.BLOCK_SIZE, bs);
    const ex = Buffer.alloc(10);
    ex.writeBigUInt64BE(BigInt(exp.backend.size), 0);
    ex.writeUInt16BE(flags, 8);
    info(INFO.EXPORT, ex);
    replies.push(optionReply(opt, REP.ACK));
    if (opt === OPT.INFO) return { replies, verdict: 'continue' };
    this.enter(exp);
    return { replies, verdict: 'transmission' };
  }

  private readOnly(exp: Export): boolean {
    return exp.readOnly || (this.options.readOnlyFor?.(exp) ?? false);
  }

  private enter(exp: Export): Session {
    const allocation = this.metaAllocation && this.metaExport === exp;
    this.session = {
      export: exp,
      flags: transmissionFlags(exp.backend.caps, this.readOnly(exp), this.structured),
      structured: this.structured,
      allocationContext: allocation,
    };
    return this.session;
  }

  private metaContext(opt: number, data: Buffer): Step {
    const set = opt === OPT.SET_META_CONTEXT;
    const c = new Cursor(data);
    const name = c.string(c.u32());
    const n = c.u32();
    const queries: string[] = [];
    for (let i = 0; i < n; i++) queries.push(c.string(c.u32()));
    c.end();
    if (set && !this.structured) {
      throw new BadOption('SET_META_CONTEXT needs structured replies first');
    }
    const exp = this.catalog.lookup(name);
    if (!exp) return this.error(opt, REP.ERR_UNKNOWN, `unknown export ${JSON.stringify(name)}`);
    const refusal = this.options.authorize?.(exp);
    if (refusal) return this.error(opt, REP.ERR_POLICY, refusal);
    let match = false;
    if (!set && queries.length === 0) match = exp.backend.caps.extents;
    for (const q of queries) {
      if ((q === META_BASE_ALLOCATION || (!set && q === 'base:')) && exp.backend.caps.extents) {
        match = true;
      }
    }
    const replies: Buffer[] = [];
    if (match) {
      const name = Buffer.from(META_BASE_ALLOCATION);
      const p = Buffer.alloc(4 + name.length);
      p.writeUInt32BE(set ? META_ID_BASE_ALLOCATION : 0, 0);
      name.copy(p, 4);
      replies.push(optionReply(opt, REP.META_CONTEXT, p));
    }
    if (set) {
      this.metaExport = exp;
      this.metaAllocation = match;
    }
    replies.push(optionReply(opt, REP.ACK));
    return { replies, verdict: 'continue' };
  }
}
