import { execFileSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import type { DeployError } from './errors.js';
import {
  algorithmsFor,
  blobKeyType,
  fingerprint,
  hashHostName,
  hostFieldMatches,
  KnownHosts,
  knownHostName,
  parseKnownHosts,
  verifyHostKey,
} from './known-hosts.js';

function blob(type: string, body: string): Buffer {
  const t = Buffer.from(type);
  const b = Buffer.from(body);
  const out = Buffer.alloc(8 + t.length + b.length);
  out.writeUInt32BE(t.length, 0);
  t.copy(out, 4);
  out.writeUInt32BE(b.length, 4 + t.length);
  b.copy(out, 8 + t.length);
  return out;
}

const K1 = blob('ssh-ed25519', 'key-one-32-bytes-long-xxxxxxxxxx');
const K2 = blob('ssh-ed25519', 'key-two-32-bytes-long-xxxxxxxxxx');
const R1 = blob('ssh-rsa', 'an-rsa-key');
const b64 = (k: Buffer) => k.toString('base64');

const dir = mkdtempSync(join(tmpdir(), 'ballast-kh-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

describe('known_hosts parsing', () => {
  it('reads plain, hashed, marked and commented lines, and skips malformed ones', () => {
    const text = [
      '# a comment',
      '',
      `alpha.example,10.0.0.1 ssh-ed25519 ${b64(K1)} comment here`,
      `${hashHostName('[beta.example]:2222')} ssh-ed25519 ${b64(K2)}`,
      `@revoked * ssh-rsa ${b64(R1)}`,
      `@cert-authority *.example ssh-ed25519 ${b64(K2)}`,
      '@weird-marker host ssh-ed25519 AAAA',
      'only-two-fields ssh-ed25519',
      `mismatch ssh-rsa ${b64(K1)}`, // the blob says ed25519: ignored
      `   indented ssh-ed25519 ${b64(K1)}   `,
    ].join('\n');
    const e = parseKnownHosts(text);
    expect(e.map((x) => [x.line, x.marker, x.keyType])).toEqual([
      [3, '', 'ssh-ed25519'],
      [4, '', 'ssh-ed25519'],
      [5, '@revoked', 'ssh-rsa'],
      [6, '@cert-authority', 'ssh-ed25519'],
      [10, '', 'ssh-ed25519'],
    ]);
    expect(e[0]!.key.equals(K1)).toBe(true);
  });

  it('names hosts as OpenSSH does: bare on port 22, [host]:port otherwise, lower case', () => {
    expect(knownHostName('Alpha.Example', 22)).toBe('alpha.example');
    expect(knownHostName('127.0.0.1', 2222)).toBe('[127.0.0.1]:2222');
  });

  it('matches patterns with wildcards, negation and port brackets', () => {
    expect(hostFieldMatches('alpha,beta', 'beta')).toBe(true);
    expect(hostFieldMatches('ALPHA', 'alpha')).toBe(true);
    expect(hostFieldMatches('*.example', 'a.example')).toBe(true);
    expect(hostFieldMatches('*.example,!bad.example', 'bad.example')).toBe(false);
    expect(hostFieldMatches('host?', 'host1')).toBe(true);
    expect(hostFieldMatches('host?', 'host12')).toBe(false);
    expect(hostFieldMatches('[127.0.0.1]:2222', '[127.0.0.1]:2222')).toBe(true);
    expect(hostFieldMatches('127.0.0.1', '[127.0.0.1]:2222')).toBe(false);
    expect(hostFieldMatches('[127.0.0.1]:*', '[127.0.0.1]:2222')).toBe(true);
    expect(hostFieldMatches('a.b', 'axb')).toBe(false); // dots are literal
  });

  it('hashes names with HMAC-SHA1 like OpenSSH, and matches only the hashed name', () => {
    const salt = Buffer.alloc(20, 7);
    const h = hashHostName('[127.0.0.1]:2222', salt);
    expect(h).toMatch(/^\|1\|[A-Za-z0-9+/=]{28}\|[A-Za-z0-9+/=]{28}$/);
    expect(hostFieldMatches(h, '[127.0.0.1]:2222')).toBe(true);
    expect(hostFieldMatches(h, '127.0.0.1')).toBe(false);
    expect(hostFieldMatches('|1|broken', 'x')).toBe(false);
  });

  it('agrees with ssh-keygen on hashed entries (both ways)', () => {
    const file = join(dir, 'kh-keygen');
    writeFileSync(
      file,
      `${hashHostName('[127.0.0.1]:2201')} ssh-ed25519 ${b64(K1)}\nplain.example ssh-ed25519 ${b64(K2)}\n`,
    );
    // ssh-keygen finds our hashed entry...
    const found = execFileSync('ssh-keygen', ['-F', '[127.0.0.1]:2201', '-f', file]).toString();
    expect(found).toContain(b64(K1));
    // ...and we find the entries ssh-keygen -H hashes.
    execFileSync('ssh-keygen', ['-H', '-f', file], { stdio: 'ignore' });
    const e = parseKnownHosts(readFileSync(file, 'utf8'));
    expect(e.every((x) => x.hosts.startsWith('|1|'))).toBe(true);
    expect(verifyHostKey(e, 'plain.example', 22, K2).kind).toBe('known');
    expect(verifyHostKey(e, '127.0.0.1', 2201, K1).kind).toBe('known');
  });

  it('tells known, unknown, changed and revoked keys apart', () => {
    const e = parseKnownHosts(
      [
        `[h]:2201 ssh-ed25519 ${b64(K1)}`,
        `@revoked * ssh-rsa ${b64(R1)}`,
        `other ssh-ed25519 ${b64(K2)}`,
      ].join('\n'),
    );
    expect(verifyHostKey(e, 'h', 2201, K1)).toEqual({ kind: 'known', line: 1 });
    expect(verifyHostKey(e, 'h', 2202, K1)).toEqual({ kind: 'unknown' });
    expect(verifyHostKey(e, 'h', 2201, K2)).toEqual({ kind: 'changed', lines: [1] });
    expect(verifyHostKey(e, 'nowhere', 22, R1)).toEqual({ kind: 'revoked', line: 2 });
  });

  it('fingerprints keys as ssh-keygen -l does', () => {
    const pub = join(dir, 'fp');
    execFileSync('ssh-keygen', ['-q', '-t', 'ed25519', '-N', '', '-f', pub]);
    const [type, data] = readFileSync(`${pub}.pub`, 'utf8').split(' ');
    const key = Buffer.from(data!, 'base64');
    expect(blobKeyType(key)).toBe(type);
    const want = execFileSync('ssh-keygen', ['-l', '-f', `${pub}.pub`])
      .toString()
      .split(' ')[1];
    expect(fingerprint(key)).toBe(want);
  });

  it('offers all RSA signature algorithms for an ssh-rsa key', () => {
    expect(algorithmsFor('ssh-rsa')).toEqual(['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa']);
    expect(algorithmsFor('ssh-ed25519')).toEqual(['ssh-ed25519']);
  });
});

describe('KnownHosts', () => {
  const codeOf = (f: () => unknown) => {
    try {
      f();
    } catch (e) {
      return (e as DeployError).code;
    }
    return 'no error';
  };

  it('refuses an unknown host without --accept-new, and records nothing', () => {
    const file = join(dir, 'kh1');
    const kh = new KnownHosts(file, false);
    expect(codeOf(() => kh.check('h1', '127.0.0.1', 2201, K1))).toBe('DEPLOY_HOST_KEY_UNKNOWN');
    expect(() => readFileSync(file)).toThrow();
  });

  it('records a new host hashed with --accept-new, then knows it and refuses a change', () => {
    const file = join(dir, 'kh2');
    writeFileSync(file, `existing ssh-ed25519 ${b64(K2)}`); // no trailing newline
    const kh = new KnownHosts(file, true);
    expect(kh.check('h1', '127.0.0.1', 2201, K1)).toBe('added');
    const lines = readFileSync(file, 'utf8').split('\n');
    expect(lines[0]).toBe(`existing ssh-ed25519 ${b64(K2)}`);
    expect(lines[1]).toMatch(/^\|1\|/);
    expect(kh.check('h1', '127.0.0.1', 2201, K1)).toBe('known');
    expect(new KnownHosts(file, false).check('h1', '127.0.0.1', 2201, K1)).toBe('known');
    // accept-new never trusts a changed key
    expect(codeOf(() => kh.check('h1', '127.0.0.1', 2201, K2))).toBe('DEPLOY_HOST_KEY_CHANGED');
    expect(kh.preferredAlgorithms('127.0.0.1', 2201)).toEqual(['ssh-ed25519']);
  });

  it('says which key --accept-new recorded, and where', () => {
    const file = join(dir, 'kh2b');
    const said: string[] = [];
    const kh = new KnownHosts(file, true, [], (m) => said.push(m));
    kh.check('kvm1', '127.0.0.1', 2201, K1);
    kh.check('kvm1', '127.0.0.1', 2201, K1);
    expect(said).toEqual([
      `kvm1 ([127.0.0.1]:2201): ssh-ed25519 key ${fingerprint(K1)} recorded in ${file}`,
    ]);
  });

  it('names the host, the file line and the fingerprint when a key changed', () => {
    const file = join(dir, 'kh3');
    writeFileSync(file, `# c\n[127.0.0.1]:2201 ssh-ed25519 ${b64(K1)}\n`);
    try {
      new KnownHosts(file, true).check('h1', '127.0.0.1', 2201, K2);
      expect.unreachable();
    } catch (e) {
      const err = e as DeployError;
      expect(err.code).toBe('DEPLOY_HOST_KEY_CHANGED');
      expect(err.host).toBe('h1');
      expect(err.message).toContain(`${file} line 2`);
      expect(err.message).toContain(fingerprint(K2));
    }
  });

  it('refuses a revoked key even for a new host', () => {
    const file = join(dir, 'kh4');
    writeFileSync(file, `@revoked * ssh-ed25519 ${b64(K1)}\n`);
    expect(codeOf(() => new KnownHosts(file, true).check('h', 'x', 22, K1))).toBe(
      'DEPLOY_HOST_KEY_REVOKED',
    );
  });

  it('consults read-only files too, and records new keys only in its own', () => {
    const global = join(dir, 'global');
    const mine = join(dir, 'kh5');
    writeFileSync(global, `[127.0.0.1]:2201 ssh-ed25519 ${b64(K1)}\n`);
    const kh = new KnownHosts(mine, true, [global, join(dir, 'absent')]);
    expect(kh.check('h1', '127.0.0.1', 2201, K1)).toBe('known');
    expect(kh.preferredAlgorithms('127.0.0.1', 2201)).toEqual(['ssh-ed25519']);
    try {
      kh.check('h1', '127.0.0.1', 2201, K2);
      expect.unreachable();
    } catch (e) {
      expect((e as DeployError).code).toBe('DEPLOY_HOST_KEY_CHANGED');
      expect((e as DeployError).message).toContain(`${global} line 1`);
    }
    expect(kh.check('h2', '127.0.0.1', 2202, K2)).toBe('added');
    expect(readFileSync(global, 'utf8').split('\n')).toHaveLength(2);
    expect(parseKnownHosts(readFileSync(mine, 'utf8'))).toHaveLength(1);
  });

  it('reports an unreadable file with a code', () => {
    expect(codeOf(() => new KnownHosts(dir, false))).toBe('DEPLOY_KNOWN_HOSTS_UNREADABLE');
  });
});
