// The house shows the design: the source tree's rooms (top-level folders, and
// test/harness/) stand in layers, and every import points down. A file imports
// files of its own room and of rooms on lower rows; rooms on one row do not
// import each other. A test (`*.test.ts`) beside the code may also import test/
// (its helpers and harness). No files import each other, even through others or
// only for types. And the product holds nothing that only tests, benchmarks and
// campaigns use: every source of a product room is imported, step by step, from
// what runs (the CLI and the NBD worker thread).

import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import ts from 'typescript';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');

/** The rooms, bottom row first. */
const LAYERS: readonly (readonly string[])[] = [
  // the NBD protocol, client and server: nothing Ballast-specific
  ['nbd'],
  // a host's devices, pools, reservations, store, streams and management API
  ['agent'],
  // what builds on them: several hosts (etcd, membership, fencing), change events, dumps
  ['cluster', 'notify', 'dumpd'],
  // the agent process that wires them; moving guests; the guest daemon; deploying hosts
  ['agentd', 'migrate', 'guestd', 'deploy'],
  // the command line: every command
  ['cli'],
  // what tests, benchmarks and fault campaigns share (built into dist/ for the last two)
  ['test/harness'],
  ['bench'],
  ['nemesis'],
  // the tests and their helpers
  ['test'],
];

/** The product: the rows up to the CLI's. */
const PRODUCT = LAYERS.slice(0, LAYERS.findIndex((row) => row.includes('cli')) + 1).flat();
/** What runs: bin/ballast starts the CLI, nbd/workers.ts starts the worker threads. */
const ENTRIES = ['cli/index.ts', 'nbd/worker.ts'];
/** Rooms a test beside the code may import besides its room's own. */
const TEST_ROOMS = ['test', 'test/harness'];

const SKIP = new Set(['node_modules', 'dist', 'build', '.git']);
const ROW = new Map(LAYERS.flatMap((row, i) => row.map((room) => [room, i] as const)));
/** Longest first, so that test/harness/x.ts is test/harness's, not test's. */
const ROOMS = [...ROW.keys()].sort((a, b) => b.length - a.length);

function roomOf(file: string): string | undefined {
  return ROOMS.find((r) => file.startsWith(`${r}/`));
}

function walk(dir: string, out: string[] = []): string[] {
  for (const name of readdirSync(path.join(ROOT, dir))) {
    if (SKIP.has(name) || name.startsWith('.')) continue;
    const rel = path.join(dir, name);
    if (statSync(path.join(ROOT, rel)).isDirectory()) walk(rel, out);
    else if (name.endsWith('.ts')) out.push(rel);
  }
  return out;
}

/** Each file's imports (type-only and dynamic ones too), as files relative to ROOT. */
function importGraph(files: string[]): Map<string, string[]> {
  const graph = new Map<string, string[]>();
  for (const f of files) {
    const info = ts.preProcessFile(readFileSync(path.join(ROOT, f), 'utf8'), true, true);
    const targets = info.importedFiles
      .map((i) => i.fileName)
      .filter((spec) => spec.startsWith('.'))
      .map((spec) => path.normalize(path.join(path.dirname(f), spec)).replace(/\.js$/, '.ts'));
    graph.set(f, targets);
  }
  return graph;
}

/** Import cycles: each strongly connected set of more than one file (or a file importing itself). */
function cycles(graph: Map<string, string[]>): string[][] {
  const index = new Map<string, number>();
  const low = new Map<string, number>();
  const stack: string[] = [];
  const onStack = new Set<string>();
  const out: string[][] = [];
  let next = 0;
  const visit = (v: string): void => {
    index.set(v, next);
    low.set(v, next);
    next++;
    stack.push(v);
    onStack.add(v);
    for (const w of graph.get(v) ?? []) {
      if (!graph.has(w)) continue;
      if (!index.has(w)) {
        visit(w);
        low.set(v, Math.min(low.get(v)!, low.get(w)!));
      } else if (onStack.has(w)) {
        low.set(v, Math.min(low.get(v)!, index.get(w)!));
      }
    }
    if (low.get(v) !== index.get(v)) return;
    const scc: string[] = [];
    let w: string;
    do {
      w = stack.pop()!;
      onStack.delete(w);
      scc.push(w);
    } while (w !== v);
    if (scc.length > 1 || graph.get(v)!.includes(v)) out.push(scc.sort());
  };
  for (const v of graph.keys()) if (!index.has(v)) visit(v);
  return out;
}

const topRooms = [...new Set(ROOMS.map((r) => r.split('/')[0]!))];
const files = topRooms.filter((d) => existsSync(path.join(ROOT, d))).flatMap((d) => walk(d));
const graph = importGraph(files);
const isTest = (f: string) => f.endsWith('.test.ts');

describe('the layering of the rooms', () => {
  it('names every folder that holds TypeScript', () => {
    const withTs = readdirSync(ROOT).filter(
      (d) =>
        !SKIP.has(d) &&
        !d.startsWith('.') &&
        statSync(path.join(ROOT, d)).isDirectory() &&
        walk(d).length > 0,
    );
    expect(withTs.filter((d) => !topRooms.includes(d))).toEqual([]);
  });

  it('has every import point down (or within its room)', () => {
    const up: string[] = [];
    let crossing = 0;
    for (const [f, targets] of graph) {
      const from = roomOf(f)!;
      for (const t of targets) {
        const to = roomOf(t);
        if (to === undefined || to === from) continue;
        crossing++;
        if (ROW.get(to)! < ROW.get(from)!) continue;
        if (isTest(f) && TEST_ROOMS.includes(to)) continue;
        up.push(`${f} -> ${t} (${from} may not import ${to})`);
      }
    }
    // The scan must find what it looks for, or it proves nothing.
    expect(crossing).toBeGreaterThan(300);
    expect(up).toEqual([]);
  });

  it('has no import cycle between files', () => {
    expect(cycles(graph).map((c) => c.join(' -> '))).toEqual([]);
  });

  it('holds in the product only what the product runs', () => {
    const reached = new Set<string>();
    const todo = [...ENTRIES];
    for (let f = todo.pop(); f !== undefined; f = todo.pop()) {
      if (reached.has(f)) continue;
      reached.add(f);
      todo.push(...(graph.get(f) ?? []));
    }
    const product = files.filter((f) => !isTest(f) && PRODUCT.includes(roomOf(f)!));
    expect(product.length).toBeGreaterThan(100);
    expect(product.filter((f) => !reached.has(f))).toEqual([]);
  });
});
