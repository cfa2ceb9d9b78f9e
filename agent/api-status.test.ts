// Every HTTP status docs/errors.md promises for an error code is the one the
// API answers with: the tables' `HTTP` column against the API's mapping.

import { readFileSync } from 'node:fs';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { httpStatus } from './api.js';

const DOC = path.join(import.meta.dirname, '..', 'docs', 'errors.md');

/** [code, status] for each row of a table whose second column is `HTTP`. */
function documented(): [string, number][] {
  const out: [string, number][] = [];
  let httpTable = false;
  for (const line of readFileSync(DOC, 'utf8').split('\n')) {
    if (!line.startsWith('|')) {
      httpTable = false;
      continue;
    }
    const cells = line.split('|').map((c) => c.trim());
    if (cells[1] === 'code') {
      httpTable = cells[2] === 'HTTP';
      continue;
    }
    if (!httpTable) continue;
    const code = /^`([A-Z_]+)`/.exec(cells[1] ?? '')?.[1];
    const status = Number(cells[2]);
    if (code && Number.isInteger(status) && status >= 100) out.push([code, status]);
  }
  return out;
}

describe('documented HTTP statuses', () => {
  const rows = documented();

  it('the error tables are found', () => {
    // The agent's, the reservations', the cluster's and the notifications' tables.
    expect(rows.length).toBeGreaterThan(30);
    expect(rows.map(([c]) => c)).toContain('NOTIFY_EXISTS');
  });

  it.each(rows)('%s answers %i', (code, status) => {
    expect(httpStatus(code)).toBe(status);
  });

  it('the store codes answer 500, but for the ones the local store section names', () => {
    const text = readFileSync(DOC, 'utf8');
    const section = text.slice(
      text.indexOf('### The local store'),
      text.indexOf('### The etcd store'),
    );
    const codes = [...new Set([...section.matchAll(/\| `(STORE_[A-Z_]+)`/g)].map((m) => m[1]!))];
    expect(codes.length).toBeGreaterThan(8);
    const except: Record<string, number> = {
      STORE_CONFLICT: 409,
      STORE_CLOSED: 503,
      STORE_UNAVAILABLE: 503,
      STORE_TIMEOUT: 504,
    };
    for (const c of codes) expect(httpStatus(c), c).toBe(except[c] ?? 500);
  });
});
