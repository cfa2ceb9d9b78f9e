// The docs say what the code does, checked: every metric the code registers is in
// docs/metrics.md, every error code it can answer is in docs/errors.md, and every link
// from one of the repository's Markdown files to another (and to a heading in it) resolves.

import { existsSync, readdirSync, readFileSync, statSync } from 'node:fs';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { describe, expect, it } from 'vitest';

const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..');
const SKIP = new Set(['node_modules', 'dist', 'build', '.git', 'corpus', 'regressions']);

function walk(dir: string, keep: (f: string) => boolean, out: string[] = []): string[] {
  for (const name of readdirSync(dir)) {
    if (SKIP.has(name) || name.startsWith('.')) continue;
    const p = path.join(dir, name);
    if (statSync(p).isDirectory()) walk(p, keep, out);
    else if (keep(p)) out.push(p);
  }
  return out;
}

const read = (f: string) => readFileSync(f, 'utf8');
const tsOf = (dir: string) =>
  existsSync(dir) ? walk(dir, (f) => f.endsWith('.ts') && !f.endsWith('.test.ts')) : [];

/** The product's sources (not tests, benchmarks or fault campaigns). */
const SERVED = ['agent', 'agentd', 'nbd', 'cli', 'cluster', 'notify', 'dumpd', 'migrate', 'deploy'];
// A part no command runs yet (a controller being built) joins once a command imports it:
// users see its metrics and codes from then on.
const PARTS = ['guestd'].filter((d) =>
  SERVED.some((s) => tsOf(path.join(ROOT, s)).some((f) => read(f).includes(`/${d}/`))),
);
const SOURCES = [...SERVED, ...PARTS].flatMap((d) => tsOf(path.join(ROOT, d)));
const rel = (f: string) => path.relative(ROOT, f);

describe('docs/metrics.md', () => {
  it('lists every metric the code registers', () => {
    const doc = read(path.join(ROOT, 'docs/metrics.md'));
    const documented = new Set([...doc.matchAll(/`(ballast_[a-z0-9_]+)`/g)].map((m) => m[1]));
    const missing: string[] = [];
    let seen = 0;
    for (const f of SOURCES) {
      const text = read(f);
      if (!text.includes("from 'prom-client'")) continue;
      for (const m of text.matchAll(/['`](ballast_[a-z0-9_]+)['`]/g)) {
        const name = m[1]!;
        seen++;
        // A histogram's _sum, _count and _bucket series come with it.
        const base = name.replace(/_(sum|count|bucket)$/, '');
        if (!documented.has(name) && !documented.has(base)) missing.push(`${name} (${rel(f)})`);
      }
    }
    // The scan must find what it looks for, or it proves nothing.
    expect(seen).toBeGreaterThan(30);
    expect(missing).toEqual([]);
  });
});

/** Upper-case identifiers in sources that look like codes but are not errors. */
const NOT_ERRORS: Record<string, string> = {
  GUEST_PANICKED: "QEMU's QMP event",
  BALLAST_DISK: 'the marker attach prints in a libvirt disk',
  NBD_TLS_CONFIG: 'loadTls turns it into BALLAST_TLS_CONFIG before anyone sees it',
};
const PREFIXES =
  'BALLAST|STORE|PR|NOTIFY|DUMP|DUMPD|MIGRATE|SUSPEND|TAKEOVER|DEPLOY|NBD|QMP|MEMORY|CLUSTER';

describe('docs/errors.md', () => {
  it('documents every error code the code can answer', () => {
    const doc = read(path.join(ROOT, 'docs/errors.md'));
    const documented = new Set([...doc.matchAll(/`([A-Z][A-Z0-9_]+)`/g)].map((m) => m[1]!));
    // Rows such as `NBD_REP_ERR_*` stand for a family.
    const families = [...doc.matchAll(/`([A-Z][A-Z0-9_]+_)\*`/g)].map((m) => m[1]!);
    const re = new RegExp(`['\`]((?:${PREFIXES})_[A-Z0-9_]*[A-Z0-9])['\`]`, 'g');
    const missing = new Set<string>();
    let seen = 0;
    for (const f of SOURCES) {
      for (const m of read(f).matchAll(re)) {
        const code = m[1]!;
        seen++;
        if (code in NOT_ERRORS || documented.has(code)) continue;
        if (families.some((p) => code.startsWith(p))) continue;
        missing.add(`${code} (${rel(f)})`);
      }
    }
    expect(seen).toBeGreaterThan(150);
    expect([...missing]).toEqual([]);
  });
});

/** GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens. */
function anchor(heading: string): string {
  return heading
    .trim()
    .toLowerCase()
    .replace(/`/g, '')
    .replace(/[^\p{L}\p{N}\s_-]/gu, '')
    .replace(/\s/g, '-');
}

function anchorsOf(file: string): Set<string> {
  const out = new Set<string>();
  const counts = new Map<string, number>();
  let fenced = false;
  for (const line of read(file).split('\n')) {
    if (/^\s*```/.test(line)) fenced = !fenced;
    const m = fenced ? null : /^#{1,6}\s+(.*)$/.exec(line);
    if (!m) continue;
    const a = anchor(m[1]!);
    const n = counts.get(a) ?? 0;
    counts.set(a, n + 1);
    out.add(n === 0 ? a : `${a}-${n}`);
  }
  return out;
}

describe('Markdown links', () => {
  it('every link to a file of the repository, and to a heading in it, resolves', () => {
    const docs = walk(ROOT, (f) => f.endsWith('.md'));
    expect(docs.length).toBeGreaterThan(5);
    const broken: string[] = [];
    let seen = 0;
    for (const doc of docs) {
      const text = read(doc).replace(/```[\s\S]*?```/g, '');
      for (const m of text.matchAll(/\]\(([^)\s]+)\)/g)) {
        const target = m[1]!;
        if (/^[a-z][a-z0-9+.-]*:/i.test(target)) continue; // http:, mailto: ...
        seen++;
        const [file, hash] = target.split('#', 2) as [string, string | undefined];
        const to = file === '' ? doc : path.resolve(path.dirname(doc), file);
        if (!existsSync(to)) {
          broken.push(`${rel(doc)}: ${target} (no such file)`);
          continue;
        }
        if (hash !== undefined && to.endsWith('.md') && !anchorsOf(to).has(hash)) {
          broken.push(`${rel(doc)}: ${target} (no such heading in ${rel(to)})`);
        }
      }
    }
    expect(seen).toBeGreaterThan(10);
    expect(broken).toEqual([]);
  });
});
