// Option parsers shared by the commands.

import { CommanderError } from 'commander';

/** A commander argParser for a whole number above 0; anything else is a usage error (exit 2). */
export function positiveInt(what: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n <= 0)
      throw new CommanderError(
        2,
        'ballast.usage',
        `${what} must be a positive integer, got ${JSON.stringify(v)}`,
      );
    return n;
  };
}

/** A whole number of seconds, 0 allowed (meaning "none"). */
export function nonNegativeInt(what: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0)
      throw new CommanderError(
        2,
        'ballast.usage',
        `${what} must be a whole number, 0 or more, got ${JSON.stringify(v)}`,
      );
    return n;
  };
}
