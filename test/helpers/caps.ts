import type { BackendCaps } from '../../nbd/backend.js';

/** Every capability a backend can claim, on a non-rotational medium: test and fuzz backends. */
export const FULL_CAPS: BackendCaps = {
  write: true,
  flush: true,
  fua: true,
  trim: true,
  zero: true,
  fastZero: true,
  cache: true,
  extents: true,
  multiConn: true,
  rotational: false,
};
