import { describe, expect, it } from 'vitest';
import type { BallastError } from '../agent/errors.js';
import { codeOf } from '../test/helpers/errors.js';
import { type ExportSpec, parseExportSpec, type ServeOptions, serve } from './serve.js';

describe('parseExportSpec', () => {
  it('every key', () => {
    expect(
      parseExportSpec('name=swap,file=/var/lib/swap.img,size=4G,read-only,description=Guest swap'),
    ).toEqual({
      name: 'swap',
      file: '/var/lib/swap.img',
      size: 4 * 1024 ** 3,
      readOnly: true,
      description: 'Guest swap',
    });
  });

  it('defaults: writable, no description, no size', () => {
    const s = parseExportSpec('name=a,file=a.img');
    expect(s).toEqual({ name: 'a', file: 'a.img', readOnly: false, description: '' });
    expect(s.size).toBeUndefined();
  });

  it('keys in any order', () => {
    expect(parseExportSpec('description=d,size=1M,file=f,name=n')).toEqual({
      name: 'n',
      file: 'f',
      size: 1024 * 1024,
      readOnly: false,
      description: 'd',
    });
  });

  it.each([
    ['read-only', true],
    ['readonly', true],
    ['ro', true],
    ['ro=true', true],
    ['ro=yes', true],
    ['read-only=true', true],
    ['readonly=yes', true],
    ['ro=false', false],
    ['read-only=no', false],
  ])('%s → readOnly %s', (form, want) => {
    expect(parseExportSpec(`name=a,file=b,${form}`).readOnly).toBe(want);
  });

  it('values may contain "=", and only the first "=" splits', () => {
    const s = parseExportSpec('name=a=b,file=/tmp/x=y.img,description=k=v');
    expect(s.name).toBe('a=b');
    expect(s.file).toBe('/tmp/x=y.img');
    expect(s.description).toBe('k=v');
  });

  it('the empty name (the default export) is a name', () => {
    expect(parseExportSpec('name=,file=f').name).toBe('');
    expect(parseExportSpec('name,file=f').name).toBe('');
  });

  it('UTF-8 and spaces are kept as given', () => {
    expect(parseExportSpec('name=dïsk one,file=f,description= spaced ')).toMatchObject({
      name: 'dïsk one',
      description: ' spaced ',
    });
  });

  it('cache=none or writeback, nothing else', () => {
    expect(parseExportSpec('name=d,file=d.img,cache=none').cache).toBe('none');
    expect(parseExportSpec('name=d,file=d.img,cache=writeback').cache).toBe('writeback');
    for (const bad of ['cache', 'cache=', 'cache=direct', 'cache=None'])
      expect(codeOf(() => parseExportSpec(`name=d,file=d.img,${bad}`))).toBe('BALLAST_BAD_EXPORT');
  });

  it.each([
    ['no name', 'file=a.img'],
    ['no file', 'name=a'],
    ['an empty file', 'name=a,file='],
    ['file without a value', 'name=a,file'],
    ['nothing', ''],
  ])('%s → BALLAST_BAD_EXPORT', (_what, text) => {
    expect(codeOf(() => parseExportSpec(text))).toBe('BALLAST_BAD_EXPORT');
  });

  it.each([
    ['an unknown key', 'name=a,file=b,colour=red', '"colour"'],
    ['a key in the wrong case', 'Name=a,file=b', '"Name"'],
    ['a trailing comma', 'name=a,file=b,', '""'],
    ['a leading blank', 'name=a, file=b', '" file"'],
  ])('%s → BALLAST_BAD_EXPORT naming the key', (_what, text, key) => {
    try {
      parseExportSpec(text);
      expect.unreachable();
    } catch (e) {
      expect((e as BallastError).code).toBe('BALLAST_BAD_EXPORT');
      expect((e as Error).message).toContain(`unknown key ${key}`);
      expect((e as Error).message).toContain(JSON.stringify(text));
    }
  });

  it.each([
    ['a bad size', 'name=a,file=b,size=lots'],
    ['a fractional size', 'name=a,file=b,size=1.5'],
    ['size without a value', 'name=a,file=b,size'],
    ['an empty size', 'name=a,file=b,size='],
  ])('%s → BALLAST_BAD_SIZE', (_what, text) => {
    expect(codeOf(() => parseExportSpec(text))).toBe('BALLAST_BAD_SIZE');
  });

  it('the size error names the --export spec', () => {
    try {
      parseExportSpec('name=a,file=b,size=lots');
      expect.unreachable();
    } catch (e) {
      expect((e as Error).message).toContain('--export');
      expect((e as Error).message).toContain('"lots"');
    }
  });

  // A typo in a safety switch must not silently serve the file writable.
  it('an unrecognised read-only value is read-only or refused, never silently writable', () => {
    const writable: string[] = [];
    for (const form of ['ro=1', 'read-only=on', 'readonly=TRUE', 'ro=y']) {
      try {
        if (!parseExportSpec(`name=a,file=b,${form}`).readOnly) writable.push(form);
      } catch (e) {
        expect((e as BallastError).code).toBe('BALLAST_BAD_EXPORT');
      }
    }
    expect(writable).toEqual([]);
  });
});

describe('serve: checks made before anything is opened', () => {
  const base: ServeOptions = {
    exports: [],
    listen: [],
    socket: [],
    maxConnections: 1,
    handshakeTimeoutMs: 1000,
    verbose: false,
  };
  const spec = (name: string): ExportSpec => ({
    name,
    // Never opened: every case fails earlier.
    file: '/nonexistent/ballast-test/never-opened.img',
    readOnly: true,
    description: '',
  });

  it('nothing to serve → BALLAST_USAGE', async () => {
    await expect(serve(base)).rejects.toMatchObject({ code: 'BALLAST_USAGE' });
  });

  it('the same export name twice → BALLAST_BAD_EXPORT', async () => {
    await expect(serve({ ...base, exports: [spec('a'), spec('a')] })).rejects.toMatchObject({
      code: 'BALLAST_BAD_EXPORT',
    });
    await expect(serve({ ...base, exports: [spec(''), spec('')] })).rejects.toMatchObject({
      code: 'BALLAST_BAD_EXPORT',
    });
  });

  it('a bad --listen address → BALLAST_BAD_ADDRESS', async () => {
    await expect(
      serve({ ...base, exports: [spec('a')], listen: ['127.0.0.1:99999'] }),
    ).rejects.toMatchObject({ code: 'BALLAST_BAD_ADDRESS' });
  });
});
