import { constants } from 'node:os';
import { describe, expect, it } from 'vitest';
import { nbdError } from './errors.js';
import { NBD_ERR } from './protocol.js';

const E = constants.errno;
/** Linux's ESHUTDOWN; Node's errno table does not name it. */
const ESHUTDOWN = 108;

describe('nbdError: host errno → NBD error', () => {
  it('0 is success, with or without fastZero', () => {
    expect(nbdError(0)).toBe(0);
    expect(nbdError(0, true)).toBe(0);
  });

  it.each([
    ['EROFS', E.EROFS, NBD_ERR.EPERM],
    ['EPERM', E.EPERM, NBD_ERR.EPERM],
    ['EACCES', E.EACCES, NBD_ERR.EPERM],
    ['ENOSPC', E.ENOSPC, NBD_ERR.ENOSPC],
    ['EDQUOT', E.EDQUOT, NBD_ERR.ENOSPC],
    ['EFBIG', E.EFBIG, NBD_ERR.ENOSPC],
    ['ENOMEM', E.ENOMEM, NBD_ERR.ENOMEM],
    ['EINVAL', E.EINVAL, NBD_ERR.EINVAL],
    ['EOVERFLOW', E.EOVERFLOW, NBD_ERR.EOVERFLOW],
    ['ESHUTDOWN (108)', ESHUTDOWN, NBD_ERR.ESHUTDOWN],
    ['EIO', E.EIO, NBD_ERR.EIO],
  ])('%s → NBD value %i, fastZero or not', (_name, errno, want) => {
    expect(nbdError(errno)).toBe(want);
    expect(nbdError(errno, false)).toBe(want);
    expect(nbdError(errno, true)).toBe(want);
  });

  it.each([
    ['ENOTSUP', E.ENOTSUP],
    ['EOPNOTSUPP', E.EOPNOTSUPP],
  ])('%s → ENOTSUP only for a FAST_ZERO request, else EINVAL', (_name, errno) => {
    expect(nbdError(errno, true)).toBe(NBD_ERR.ENOTSUP);
    expect(nbdError(errno, false)).toBe(NBD_ERR.EINVAL);
    expect(nbdError(errno)).toBe(NBD_ERR.EINVAL);
  });

  it.each([
    ['ENOENT', E.ENOENT],
    ['EBADF', E.EBADF],
    ['EAGAIN', E.EAGAIN],
    ['EINTR', E.EINTR],
    ['ENXIO', E.ENXIO],
    ['ETIMEDOUT', E.ETIMEDOUT],
    ['ESTALE', E.ESTALE],
    ['ENOTCONN', E.ENOTCONN],
    ['an unknown 9999', 9999],
    ['a negative -5', -5],
  ])('%s → EIO', (_name, errno) => {
    expect(nbdError(errno)).toBe(NBD_ERR.EIO);
    expect(nbdError(errno, true)).toBe(NBD_ERR.EIO);
  });

  it('only values the spec defines ever come out', () => {
    const allowed = new Set<number>([0, ...Object.values(NBD_ERR)]);
    for (let errno = 0; errno < 200; errno++) {
      expect(allowed.has(nbdError(errno))).toBe(true);
      expect(allowed.has(nbdError(errno, true))).toBe(true);
    }
  });

  it('ENOTSUP never comes out without fastZero', () => {
    for (let errno = 0; errno < 200; errno++) {
      expect(nbdError(errno)).not.toBe(NBD_ERR.ENOTSUP);
    }
  });

  it('the NBD values are the spec numbers', () => {
    expect(NBD_ERR).toEqual({
      EPERM: 1,
      EIO: 5,
      ENOMEM: 12,
      EINVAL: 22,
      ENOSPC: 28,
      EOVERFLOW: 75,
      ENOTSUP: 95,
      ESHUTDOWN: 108,
    });
  });
});
