// Python edge-case scripts judged by libnbd, run through nbdsh (which runs
// `python3 -m nbd`, so PATH must find the system python that has the module).

import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { type RunResult, run } from './tools.js';

/** Python defined before every script: `connect()`, `fails()`, `URI`. */
export const PRELUDE = `
import errno, os, sys, nbd
URI = os.environ.get('URI', '')
MiB = 1024 * 1024

def connect(uri=None, strict=None, meta=True, full_info=False, opt=False, structured=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if full_info:
        h.set_full_info(True)
    if opt:
        h.set_opt_mode(True)
    if not structured:
        h.set_request_structured_replies(False)
    h.connect_uri(uri or URI)
    if strict is not None:
        h.set_strict_mode(strict)
    return h

def fails(fn, *errnums):
    """Runs fn, which must raise nbd.Error with one of errnums (any if none given)."""
    try:
        fn()
    except nbd.Error as e:
        if errnums and e.errnum not in errnums:
            raise AssertionError('expected errno %s, got %r: %s' % (
                [errno.errorcode.get(n, n) for n in errnums],
                errno.errorcode.get(e.errnum, e.errnum), e.string))
        return e.errnum
    raise AssertionError('expected failure with %s but it succeeded' % (
        [errno.errorcode.get(n, n) for n in errnums],))

def eq(a, b, what=''):
    if a != b:
        raise AssertionError('%s: expected %r, got %r' % (what, b, a))
`;

/** Strips the common indentation of a template literal (Python cares). */
export function dedent(code: string): string {
  const lines = code.replace(/^\n/, '').split('\n');
  const indents = lines.filter((l) => l.trim() !== '').map((l) => /^ */.exec(l)![0].length);
  const cut = indents.length ? Math.min(...indents) : 0;
  return lines.map((l) => l.slice(cut)).join('\n');
}

/**
 * Runs PRELUDE+code in nbdsh (`nbdsh -n -c`), with URI (and any `env`) in the environment.
 * The script goes through a file so that Python tracebacks quote the failing line.
 */
export async function nbdsh(
  code: string,
  env: Record<string, string> = {},
  timeoutMs = 45_000,
): Promise<RunResult> {
  const dir = await mkdtemp(path.join(os.tmpdir(), 'ballast-py-'));
  const file = path.join(dir, 'script.py');
  try {
    await writeFile(file, `${PRELUDE}\n${dedent(code)}\n`);
    const stmt = `exec(compile(open(${JSON.stringify(file)}).read(), ${JSON.stringify(file)}, 'exec'))`;
    const r = await run('nbdsh', ['-n', '-c', stmt], { env, timeoutMs });
    return { ...r, cmd: `nbdsh -n -c <script>\n${dedent(code)}` };
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}
