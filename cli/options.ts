// Option parsers shared by the commands.

import { CommanderError } from 'commander';
import { parseSize } from '../agent/units.js';

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

/** A size with an optional K/M/G suffix (binary units), above 0. */
export function sizeArg(what: string): (v: string) => number {
  return (v) => {
    let n = 0;
    try {
      n = parseSize(v, what);
    } catch (e) {
      throw new CommanderError(2, 'ballast.usage', (e as Error).message);
    }
    if (n <= 0) throw new CommanderError(2, 'ballast.usage', `${what} must be above 0`);
    return n;
  };
}
