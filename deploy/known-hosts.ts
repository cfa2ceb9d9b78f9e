// Host key verification against an OpenSSH known_hosts file: plain and hashed
// (|1|salt|hash) entries, [host]:port names, wildcard and negated patterns,
// @revoked markers. An unknown host is refused unless the caller accepts new
// keys (then the key is recorded, hashed); a changed key is always refused.

import { createHash, createHmac, randomBytes } from 'node:crypto';
import { appendFileSync, mkdirSync, readFileSync, statSync } from 'node:fs';
import { dirname } from 'node:path';
import { DeployError } from './errors.js';

export interface KnownHostEntry {
  line: number;
  marker: '' | '@revoked' | '@cert-authority';
  /** The host field as written: comma-separated patterns or one |1|salt|hash. */
  hosts: string;
  keyType: string;
  key: Buffer;
}

export function parseKnownHosts(text: string): KnownHostEntry[] {
  const out: KnownHostEntry[] = [];
  text.split('\n').forEach((raw, i) => {
    const line = raw.trim();
    if (line === '' || line.startsWith('#')) return;
    const f = line.split(/\s+/);
    let marker: KnownHostEntry['marker'] = '';
    if (f[0] === '@revoked' || f[0] === '@cert-authority') {
      marker = f[0];
      f.shift();
    } else if (f[0]?.startsWith('@')) {
      return; // an unknown marker: OpenSSH ignores the line too
    }
    const [hosts, keyType, b64] = f;
    if (!hosts || !keyType || !b64 || !/^[A-Za-z0-9+/]+={0,2}$/.test(b64)) return;
    const key = Buffer.from(b64, 'base64');
    if (blobKeyType(key) !== keyType) return;
    out.push({ line: i + 1, marker, hosts, keyType, key });
  });
  return out;
}

/** The key type named inside an SSH public key blob (its first string). */
export function blobKeyType(blob: Buffer): string | null {
  if (blob.length < 4) return null;
  const n = blob.readUInt32BE(0);
  if (n === 0 || n > 64 || 4 + n > blob.length) return null;
  return blob.subarray(4, 4 + n).toString('latin1');
}

/** The name a host is known by: `host` on port 22, `[host]:port` otherwise. */
export function knownHostName(host: string, port: number): string {
  const h = host.toLowerCase();
  return port === 22 ? h : `[${h}]:${port}`;
}

export function hashHostName(name: string, salt: Buffer = randomBytes(20)): string {
  const mac = createHmac('sha1', salt).update(name).digest();
  return `|1|${salt.toString('base64')}|${mac.toString('base64')}`;
}

function globMatch(pattern: string, s: string): boolean {
  const re = pattern
    .replace(/[.+^${}()|[\]\\]/g, '\\$&')
    .replace(/\*/g, '.*')
    .replace(/\?/g, '.');
  return new RegExp(`^${re}$`).test(s);
}

/** Whether an entry's host field names `name` (from knownHostName). */
export function hostFieldMatches(field: string, name: string): boolean {
  if (field.startsWith('|1|')) {
    const [, , salt, hash] = field.split('|');
    if (!salt || !hash) return false;
    const want = Buffer.from(hash, 'base64');
    const got = createHmac('sha1', Buffer.from(salt, 'base64')).update(name).digest();
    return want.length === got.length && want.equals(got);
  }
  let matched = false;
  for (const p of field.toLowerCase().split(',')) {
    if (p.startsWith('!')) {
      if (globMatch(p.slice(1), name)) return false;
    } else if (globMatch(p, name)) {
      matched = true;
    }
  }
  return matched;
}

/** OpenSSH's fingerprint form: SHA256:base64, no padding. */
export function fingerprint(key: Buffer): string {
  return `SHA256:${createHash('sha256').update(key).digest('base64').replace(/=+$/, '')}`;
}

export type Verdict =
  | { kind: 'known'; line: number }
  | { kind: 'unknown' }
  | { kind: 'changed'; lines: number[] }
  | { kind: 'revoked'; line: number };

export function verifyHostKey(
  entries: readonly KnownHostEntry[],
  host: string,
  port: number,
  key: Buffer,
): Verdict {
  const name = knownHostName(host, port);
  for (const e of entries) {
    if (e.marker === '@revoked' && e.key.equals(key)) return { kind: 'revoked', line: e.line };
  }
  const mine = entries.filter((e) => e.marker === '' && hostFieldMatches(e.hosts, name));
  const same = mine.find((e) => e.key.equals(key));
  if (same) return { kind: 'known', line: same.line };
  if (mine.length > 0) return { kind: 'changed', lines: mine.map((e) => e.line) };
  return { kind: 'unknown' };
}

/** The key types known for a host, so the handshake can ask for one of those first. */
export function knownKeyTypes(entries: readonly KnownHostEntry[], host: string, port: number) {
  const name = knownHostName(host, port);
  return [
    ...new Set(
      entries
        .filter((e) => e.marker === '' && hostFieldMatches(e.hosts, name))
        .map((e) => e.keyType),
    ),
  ];
}

/** Host key algorithms (as negotiated) that prove a key of each type. */
export function algorithmsFor(keyType: string): string[] {
  return keyType === 'ssh-rsa' ? ['rsa-sha2-512', 'rsa-sha2-256', 'ssh-rsa'] : [keyType];
}

/**
 * A known_hosts file, read once, appended to when new keys are accepted; plus
 * read-only files consulted the same way (OpenSSH's global /etc/ssh/ssh_known_hosts).
 */
export class KnownHosts {
  private entries: KnownHostEntry[];
  private readonly others: { file: string; entries: KnownHostEntry[] }[];

  constructor(
    readonly file: string,
    private readonly acceptNew: boolean,
    readOnly: readonly string[] = [],
    /** Told of each key recorded (as ssh says "Permanently added"). */
    private readonly onAdded?: (message: string) => void,
  ) {
    this.entries = KnownHosts.read(file);
    this.others = readOnly.map((f) => ({ file: f, entries: KnownHosts.read(f) }));
  }

  private static read(file: string): KnownHostEntry[] {
    let text = '';
    try {
      text = readFileSync(file, 'utf8');
    } catch (e) {
      if ((e as NodeJS.ErrnoException).code !== 'ENOENT') {
        throw new DeployError(
          'DEPLOY_KNOWN_HOSTS_UNREADABLE',
          `cannot read known_hosts ${file}: ${(e as Error).message}`,
          { cause: e },
        );
      }
    }
    return parseKnownHosts(text);
  }

  private get sets(): { file: string; entries: KnownHostEntry[] }[] {
    return [{ file: this.file, entries: this.entries }, ...this.others];
  }

  preferredAlgorithms(host: string, port: number): string[] {
    const types = this.sets.flatMap((s) => knownKeyTypes(s.entries, host, port));
    return [...new Set(types)].flatMap(algorithmsFor);
  }

  /**
   * Checks a presented key; throws a DeployError unless it is known (or new and
   * accepted, in which case it is recorded). `label` names the inventory host.
   */
  check(label: string, host: string, port: number, key: Buffer): 'known' | 'added' {
    const verdicts = this.sets.map((s) => ({
      file: s.file,
      v: verifyHostKey(s.entries, host, port, key),
    }));
    const type = blobKeyType(key) ?? 'unknown-type';
    const name = knownHostName(host, port);
    for (const { file, v } of verdicts) {
      if (v.kind === 'revoked') {
        throw new DeployError(
          'DEPLOY_HOST_KEY_REVOKED',
          `${label} (${name}) presented a REVOKED ${type} key ${fingerprint(key)} (${file}:${v.line}); refusing to connect`,
          { host: label },
        );
      }
    }
    if (verdicts.some((x) => x.v.kind === 'known')) return 'known';
    const stale = verdicts.filter((x) => x.v.kind === 'changed');
    const changed = stale.map(({ file, v }) =>
      v.kind === 'changed' ? `${file} line ${v.lines.join(', ')}` : file,
    );
    if (changed.length > 0) {
      throw new DeployError(
        'DEPLOY_HOST_KEY_CHANGED',
        `HOST KEY CHANGED for ${label} (${name}): it presented ${type} ${fingerprint(key)}, ` +
          `which does not match ${changed.join(' and ')}. Someone may be ` +
          'intercepting the connection, or the host was reinstalled. Refusing to connect; ' +
          `if the change is expected, remove the old entry (ssh-keygen -R '${name}' -f ${stale[0]?.file ?? this.file}).`,
        { host: label },
      );
    }
    if (!this.acceptNew) {
      throw new DeployError(
        'DEPLOY_HOST_KEY_UNKNOWN',
        `${label} (${name}) is not in ${this.sets.map((x) => x.file).join(' or ')}; its ${type} key is ${fingerprint(key)}. ` +
          'Check the fingerprint and run again with --accept-new to record it.',
        { host: label },
      );
    }
    this.add(host, port, key);
    this.onAdded?.(`${label} (${name}): ${type} key ${fingerprint(key)} recorded in ${this.file}`);
    return 'added';
  }

  private add(host: string, port: number, key: Buffer): void {
    const type = blobKeyType(key) ?? 'unknown-type';
    const line = `${hashHostName(knownHostName(host, port))} ${type} ${key.toString('base64')}\n`;
    try {
      mkdirSync(dirname(this.file), { recursive: true, mode: 0o700 });
      let needsNewline = false;
      try {
        const st = statSync(this.file);
        if (st.size > 0) needsNewline = !readFileSync(this.file, 'utf8').endsWith('\n');
      } catch {}
      appendFileSync(this.file, (needsNewline ? '\n' : '') + line, { mode: 0o600 });
    } catch (e) {
      throw new DeployError(
        'DEPLOY_KNOWN_HOSTS_UNREADABLE',
        `cannot record the key of ${host}:${port} in ${this.file}: ${(e as Error).message}`,
        { cause: e },
      );
    }
    this.entries = KnownHosts.read(this.file);
  }
}
