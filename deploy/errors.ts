// Errors `ballast deploy` can show carry a stable DEPLOY_* code; docs/errors.md lists them.

export type DeployErrorCode =
  | 'DEPLOY_INVENTORY_UNREADABLE'
  | 'DEPLOY_INVENTORY_INVALID'
  | 'DEPLOY_NO_HOSTS'
  | 'DEPLOY_KNOWN_HOSTS_UNREADABLE'
  | 'DEPLOY_HOST_KEY_UNKNOWN'
  | 'DEPLOY_HOST_KEY_CHANGED'
  | 'DEPLOY_HOST_KEY_REVOKED'
  | 'DEPLOY_KEY_UNREADABLE'
  | 'DEPLOY_CONNECT_FAILED'
  | 'DEPLOY_CONNECT_TIMEOUT'
  | 'DEPLOY_AUTH_FAILED'
  | 'DEPLOY_STEP_FAILED'
  | 'DEPLOY_STEP_TIMEOUT'
  | 'DEPLOY_HOST_BUSY'
  | 'DEPLOY_PACK_FAILED'
  | 'DEPLOY_CHECKSUM_MISMATCH'
  | 'DEPLOY_INSTALL_FAILED'
  | 'DEPLOY_HEALTH_FAILED'
  | 'DEPLOY_NO_PREVIOUS'
  | 'DEPLOY_INTERRUPTED'
  | 'DEPLOY_ROLLOUT_FAILED'
  | 'DEPLOY_EXEC_FAILED'
  | 'DEPLOY_HOSTS_FAILED';

export class DeployError extends Error {
  readonly code: DeployErrorCode;
  /** The inventory host the error is about, when there is one. */
  readonly host: string | undefined;
  constructor(
    code: DeployErrorCode,
    message: string,
    options?: { cause?: unknown; host?: string },
  ) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'DeployError';
    this.code = code;
    this.host = options?.host;
  }
}

export function isDeployError(e: unknown): e is DeployError {
  return e instanceof DeployError;
}

/** The message of anything thrown, with its code when it has one. */
export function describeError(e: unknown): string {
  if (isDeployError(e)) return `${e.code}: ${e.message}`;
  if (e instanceof Error) return e.message;
  return String(e);
}
