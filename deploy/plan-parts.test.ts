import { describe, expect, it } from 'vitest';
import { diffLines, formatDiff } from './diff.js';
import { parseInventory } from './inventory.js';
import { forEachHost } from './pool.js';
import { desiredFor, releaseOf, shq, versionOf } from './remote.js';

describe('config diff', () => {
  it('is empty for equal texts and marks changed lines with context', () => {
    expect(formatDiff('a\nb\n', 'a\nb\n')).toEqual([]);
    expect(diffLines('a\nb\nc', 'a\nx\nc')).toEqual([
      { op: ' ', text: 'a' },
      { op: '-', text: 'b' },
      { op: '+', text: 'x' },
      { op: ' ', text: 'c' },
    ]);
    const before = ['1', '2', '3', '4', '5', '6', '7', '8'].join('\n');
    const after = ['1', '2', '3', '4', '5', '6', '7', 'eight'].join('\n');
    expect(formatDiff(before, after, 1)).toEqual(['  ...', '  7', '- 8', '+ eight']);
    expect(formatDiff('', 'new: 1\n')).toEqual(['+ new: 1']);
  });
});

describe('deploy ids and run scripts', () => {
  const inv = parseInventory(
    {
      defaults: { key: '/k', prefix: "/opt/it's" },
      hosts: {
        a: { address: 'x', agent: { api: { listen: '127.0.0.1:1' } } },
        b: { address: 'y', service: { env: { A: 'b c' } } },
      },
    },
    'inv',
    '/',
  );
  const [a, b] = inv.hosts as [(typeof inv.hosts)[0], (typeof inv.hosts)[0]];
  const rel = { id: '1.2.3-0123456789ab', version: '1.2.3' };

  it('names a deploy by release and config, stable across runs', () => {
    const d = desiredFor(a, rel);
    expect(d.id).toMatch(/^1\.2\.3-0123456789ab\.[0-9a-f]{8}$/);
    expect(desiredFor(a, rel).id).toBe(d.id);
    expect(desiredFor(b, rel).id).not.toBe(d.id);
    expect(releaseOf(d.id)).toBe(rel.id);
    expect(versionOf(d.id)).toBe('1.2.3');
    expect(versionOf(null)).toBeNull();
  });

  it('writes a run script that execs the agent of that deploy, quoted for sh', () => {
    const d = desiredFor(b, rel);
    expect(d.run).toContain(`export BALLAST_DEPLOY_PREFIX='/opt/it'\\''s'`);
    expect(d.run).toContain(`export BALLAST_DEPLOY_ID='${d.id}'`);
    expect(d.run).toContain("export A='b c'");
    expect(d.run).toContain(
      `exec 'node' '/opt/it'\\''s/releases/${rel.id}/bin/ballast' 'agent' '--config' '/opt/it'\\''s/deploys/${d.id}/agent.yaml'`,
    );
    expect(d.config).toContain("dataDir: /opt/it's/data");
    expect(shq("a'b")).toBe(`'a'\\''b'`);
  });
});

describe('forEachHost', () => {
  const hosts = ['h1', 'h2', 'h3', 'h4'].map((name) => ({ name }));

  it('stops starting hosts after a failure when rolling', async () => {
    const seen: string[] = [];
    const out = await forEachHost(hosts, { parallel: 1, stopOnFailure: true }, async (h) => {
      seen.push(h.name);
      if (h.name === 'h2') throw new Error('boom');
      return h.name;
    });
    expect(seen).toEqual(['h1', 'h2']);
    expect(out.map((o) => o.status)).toEqual(['ok', 'failed', 'skipped', 'skipped']);
  });

  it('runs at most `parallel` at once, and all of them without stopOnFailure', async () => {
    let running = 0;
    let most = 0;
    const out = await forEachHost(hosts, { parallel: 2, stopOnFailure: false }, async (h) => {
      running++;
      most = Math.max(most, running);
      await new Promise((r) => setImmediate(r));
      running--;
      if (h.name === 'h1') throw new Error('x');
      return 1;
    });
    expect(most).toBe(2);
    expect(out.map((o) => o.status)).toEqual(['failed', 'ok', 'ok', 'ok']);
  });

  it('skips hosts not started once aborted', async () => {
    const ac = new AbortController();
    const out = await forEachHost(
      hosts,
      { parallel: 1, stopOnFailure: true, signal: ac.signal },
      async () => {
        ac.abort();
        return 1;
      },
    );
    expect(out.map((o) => o.status)).toEqual(['ok', 'skipped', 'skipped', 'skipped']);
  });
});
