// Errors a user can see carry a stable code; docs/errors.md lists them.
export class BallastError extends Error {
  readonly code: string;
  constructor(code: string, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BallastError';
    this.code = code;
  }
}

export function isBallastError(e: unknown): e is BallastError {
  return e instanceof BallastError;
}
