// Every request is checked here before it reaches a backend. Pure: the
// header and what was negotiated in, an NBD error value (or 0) out.

import { BLOCK_SIZE_MAX, CMD, CMD_FLAG, NBD_ERR, TFLAG } from './protocol.js';
import type { RequestHeader } from './reader.js';

export interface ValidationContext {
  /** Transmission flags as sent to the client. */
  flags: number;
  size: number;
  structured: boolean;
  allocationContext: boolean;
}

const WRITE_SIDE = (1 << CMD.WRITE) | (1 << CMD.TRIM) | (1 << CMD.WRITE_ZEROES);

/** Which transmission flag must have been advertised for each command. */
function advertised(type: number, flags: number): boolean {
  switch (type) {
    case CMD.READ:
    case CMD.BLOCK_STATUS:
      return true;
    case CMD.WRITE:
      return (flags & TFLAG.READ_ONLY) === 0;
    case CMD.FLUSH:
      return (flags & TFLAG.SEND_FLUSH) !== 0;
    case CMD.TRIM:
      return (flags & TFLAG.SEND_TRIM) !== 0;
    case CMD.WRITE_ZEROES:
      return (flags & TFLAG.SEND_WRITE_ZEROES) !== 0;
    case CMD.CACHE:
      return (flags & TFLAG.SEND_CACHE) !== 0;
    default:
      return false;
  }
}

/** The command flags each command may carry, given what was advertised. */
function allowedFlags(type: number, ctx: ValidationContext): number {
  // FUA, once advertised, is valid on every command (a no-op where nothing is written).
  const fua = ctx.flags & TFLAG.SEND_FUA ? CMD_FLAG.FUA : 0;
  switch (type) {
    case CMD.READ:
      return fua | (ctx.structured ? CMD_FLAG.DF : 0);
    case CMD.WRITE_ZEROES:
      return fua | CMD_FLAG.NO_HOLE | (ctx.flags & TFLAG.SEND_FAST_ZERO ? CMD_FLAG.FAST_ZERO : 0);
    case CMD.BLOCK_STATUS:
      return fua | CMD_FLAG.REQ_ONE;
    default:
      return fua;
  }
}

/**
 * Returns 0 if the request may be dispatched, else the NBD error to reply with.
 * Order matters and follows what clients expect: unknown command or flag →
 * EINVAL; write on a read-only export → EPERM; unadvertised → EINVAL; too big
 * → EINVAL/EOVERFLOW; out of range → ENOSPC for writes, EINVAL otherwise.
 */
export function validateRequest(h: RequestHeader, ctx: ValidationContext): number {
  const { type, flags, offset, length } = h;
  if (type > CMD.BLOCK_STATUS || type === CMD.DISC) return NBD_ERR.EINVAL;
  if ((flags & ~allowedFlags(type, ctx)) !== 0) {
    // FUA etc. on a read-only export is a write-side request all the same.
    if (ctx.flags & TFLAG.READ_ONLY && (1 << type) & WRITE_SIDE) return NBD_ERR.EPERM;
    return NBD_ERR.EINVAL;
  }
  if (ctx.flags & TFLAG.READ_ONLY && (1 << type) & WRITE_SIDE) return NBD_ERR.EPERM;
  if (!advertised(type, ctx.flags)) return NBD_ERR.EINVAL;
  if (type === CMD.FLUSH) return offset === 0 && length === 0 ? 0 : NBD_ERR.EINVAL;
  if (type === CMD.BLOCK_STATUS && !(ctx.structured && ctx.allocationContext)) {
    return NBD_ERR.EINVAL;
  }
  if (length === 0) return NBD_ERR.EINVAL;
  // Only READ and WRITE move a payload; the others may span more than the maximum.
  if ((type === CMD.READ || type === CMD.WRITE) && length > BLOCK_SIZE_MAX) {
    return type === CMD.READ && flags & CMD_FLAG.DF ? NBD_ERR.EOVERFLOW : NBD_ERR.EINVAL;
  }
  if (offset > ctx.size || length > ctx.size - offset) {
    return (1 << type) & WRITE_SIDE ? NBD_ERR.ENOSPC : NBD_ERR.EINVAL;
  }
  return 0;
}
