import { constants as os } from 'node:os';
import { NBD_ERR } from './protocol.js';

const E = os.errno;

/**
 * The one place where a host errno becomes an NBD error value. Anything the
 * spec has no name for is an I/O error. ENOTSUP reaches the client only for
 * FAST_ZERO, where it means "cannot be fast"; elsewhere it is EINVAL.
 */
export function nbdError(errno: number, fastZero = false): number {
  switch (errno) {
    case 0:
      return 0;
    case E.EROFS:
    case E.EPERM:
    case E.EACCES:
      return NBD_ERR.EPERM;
    case E.ENOSPC:
    case E.EDQUOT:
    case E.EFBIG:
      return NBD_ERR.ENOSPC;
    case E.ENOMEM:
      return NBD_ERR.ENOMEM;
    case E.EINVAL:
      return NBD_ERR.EINVAL;
    case E.EOVERFLOW:
      return NBD_ERR.EOVERFLOW;
    case 108: // ESHUTDOWN on Linux; not in Node's table
      return NBD_ERR.ESHUTDOWN;
    case E.ENOTSUP:
    case E.EOPNOTSUPP:
      return fastZero ? NBD_ERR.ENOTSUP : NBD_ERR.EINVAL;
    default:
      return NBD_ERR.EIO;
  }
}
