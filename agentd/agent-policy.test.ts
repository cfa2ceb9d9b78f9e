import { mkdtempSync, writeFileSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { anonymousRefusal, socketGroupId } from './agent.js';

const tcp = { remoteAddress: '127.0.0.1' };
const unix = {};
const conn = (identityMethod: string, raw: { remoteAddress?: string }) => ({ identityMethod, raw });

describe('anonymous NBD clients', () => {
  it('unix (the default): served on the Unix socket, refused on TCP', () => {
    expect(anonymousRefusal('unix', conn('anonymous', unix))).toBeNull();
    expect(anonymousRefusal('unix', conn('anonymous', tcp))).toMatch(/Unix socket only/);
  });
  it('named clients pass whatever the policy', () => {
    for (const m of ['x509', 'psk', 'mapped']) {
      expect(anonymousRefusal('none', conn(m, tcp))).toBeNull();
      expect(anonymousRefusal('unix', conn(m, tcp))).toBeNull();
    }
  });
  it('any lets them in everywhere; none nowhere', () => {
    expect(anonymousRefusal('any', conn('anonymous', tcp))).toBeNull();
    expect(anonymousRefusal('none', conn('anonymous', unix))).toMatch(/refused/);
  });
});

describe('the NBD socket group', () => {
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-grp-'));
  const file = path.join(dir, 'group');
  writeFileSync(file, 'root:x:0:\nkvm:x:107:libvirt-qemu\n');
  it('is looked up by name; a missing default group means root only', () => {
    expect(socketGroupId('kvm', false, file)).toBe(107);
    expect(socketGroupId('qemu', false, file)).toBeNull();
    expect(socketGroupId(null, false, file)).toBeNull();
    expect(socketGroupId('4242', true, file)).toBe(4242);
  });
  it('a configured group that does not exist is a config error', () => {
    expect(() => socketGroupId('qemu', true, file)).toThrow(/nbd\.socketGroup: no group named/);
  });
});
