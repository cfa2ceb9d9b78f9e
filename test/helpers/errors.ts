import { expect } from 'vitest';
import { BallastError } from '../../agent/errors.js';

/** The stable code of the BallastError `f` throws, or undefined when it throws nothing. */
export function codeOf(f: () => unknown): string | undefined {
  try {
    f();
  } catch (e) {
    expect(e).toBeInstanceOf(BallastError);
    return (e as BallastError).code;
  }
  return undefined;
}
