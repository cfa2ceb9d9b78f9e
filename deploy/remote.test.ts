// The host-side scripts, run here through a local shell instead of SSH: the layout,
// the links, pruning, starting and stopping under a pidfile. The systemd branch cannot
// run here (systemd is not PID 1), so every script is at least checked by `sh -n`.

import { execFile, execFileSync } from 'node:child_process';
import { existsSync, mkdirSync, mkdtempSync, readlinkSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, describe, expect, it } from 'vitest';
import { parseInventory } from './inventory.js';
import { type Desired, desiredFor, Remote } from './remote.js';
import type { ExecOptions, ExecResult, Session } from './ssh.js';

const dir = mkdtempSync(join(tmpdir(), 'ballast-remote-'));
afterAll(() => rmSync(dir, { recursive: true, force: true }));

/** Runs what would go over SSH in a local /bin/sh, and remembers every command. */
class LocalSession {
  readonly commands: string[] = [];

  exec(command: string, _opts: ExecOptions): Promise<ExecResult> {
    this.commands.push(command);
    return new Promise((resolve) => {
      execFile('/bin/sh', ['-c', command], (err, stdout, stderr) => {
        const code = err ? ((err as { code?: number }).code ?? 1) : 0;
        resolve({ code: typeof code === 'number' ? code : 1, stdout, stderr });
      });
    });
  }

  async run(command: string, step: string): Promise<string> {
    const r = await this.exec(command, { timeoutMs: 10_000 });
    if (r.code !== 0) throw new Error(`${step}: exit ${r.code}: ${r.stderr}`);
    return r.stdout;
  }

  async hold(command: string): Promise<() => void> {
    this.commands.push(command);
    return () => {};
  }
}

function remoteFor(prefix: string, command: string[]) {
  const inv = parseInventory(
    { hosts: { h: { address: 'x', key: '/k', prefix, service: { command } } } },
    'inv',
    '/',
  );
  const host = inv.hosts[0]!;
  const s = new LocalSession();
  return { s, host, r: new Remote(s as unknown as Session, host) };
}

/** A release directory as installRelease leaves it. */
function fakeRelease(prefix: string, id: string): void {
  mkdirSync(join(prefix, 'releases', id), { recursive: true });
  writeFileSync(join(prefix, 'releases', id, '.ballast-release'), `${id}\n`);
}

describe('host-side scripts', () => {
  it('are valid sh, the systemd branch included', async () => {
    const prefix = join(dir, 'syntax');
    const { s, r, host } = remoteFor(prefix, ['sleep', '30']);
    const d = desiredFor(host, { id: '1.0.0-aaaaaaaaaaaa', version: '1.0.0' });
    fakeRelease(prefix, d.releaseId);
    await r.probe(d);
    await r.writeDeploy(d);
    await r.lock();
    await r.stop();
    await r.switchTo(d.id, true);
    await r.logTail(5, true);
    await r.logTail(5);
    for (const c of s.commands) {
      expect(c.startsWith('exec /bin/sh -c ')).toBe(true);
      // sh -n reads the script without running it
      execFileSync('/bin/sh', ['-c', c.replace(/^exec \/bin\/sh -c /, 'exec /bin/sh -n -c ')]);
    }
    // restart (with the unit file for systemd hosts) and the install are checked unrun
    const calls: string[] = [];
    const record = async (c: string) => {
      calls.push(c);
      return '';
    };
    const dry = new Remote(
      {
        run: record,
        exec: async (c: string) => {
          calls.push(c);
          return { code: 0, stdout: '', stderr: '' };
        },
        upload: async () => {},
      } as unknown as Session,
      host,
    );
    await dry.restart(d.id);
    const release = { id: d.releaseId, version: '1.0.0', tarball: '/x', sha256: 'ab', size: 1 };
    await dry.installRelease({ ...release, dispose: () => {} }, () => {});
    expect(calls.join('\n')).toContain('systemctl daemon-reload');
    expect(calls.join('\n')).toContain('tar -xzf');
    for (const c of calls) {
      execFileSync('/bin/sh', ['-c', c.replace(/^exec \/bin\/sh -c /, 'exec /bin/sh -n -c ')]);
    }
  });

  it('starts and stops the agent under a pidfile, and switches and prunes the links', async () => {
    const prefix = join(dir, 'life');
    const { r, host } = remoteFor(prefix, ['sleep', '300']);
    const deploys: Desired[] = [];
    for (const v of ['1', '2', '3']) {
      const d = desiredFor(host, { id: `1.0.${v}-${v.repeat(12)}`, version: `1.0.${v}` });
      fakeRelease(prefix, d.releaseId);
      deploys.push(d);
    }
    const [d1, d2, d3] = deploys as [Desired, Desired, Desired];

    await r.writeDeploy(d1);
    expect(readlinkSync(join(prefix, 'deploys', d1.id, 'release'))).toBe(
      `../../releases/${d1.releaseId}`,
    );
    let st = await r.probe(d1);
    expect(st).toMatchObject({
      current: null,
      running: null,
      releasePresent: true,
      deployPresent: true,
    });
    await r.restart(d1.id);
    st = await r.probe();
    expect(st.running).toBe(d1.id);
    const pid1 = st.pid;
    expect(pid1).toBeGreaterThan(0);
    await r.switchTo(d1.id, true);

    await r.writeDeploy(d2);
    await r.restart(d2.id);
    st = await r.probe();
    expect(st.running).toBe(d2.id);
    expect(st.pid).not.toBe(pid1);
    await r.switchTo(d2.id, true);
    st = await r.probe();
    expect([st.current, st.previous]).toEqual([d2.id, d1.id]);
    expect(st.currentConfig).toBe(d2.config);

    // d3 is written but never switched to: the next prune removes it and its release
    await r.writeDeploy(d3);
    expect(existsSync(join(prefix, 'deploys', d3.id))).toBe(true);
    await r.switchTo(d2.id, true);
    st = await r.probe();
    expect([st.current, st.previous]).toEqual([d2.id, d1.id]);
    expect(existsSync(join(prefix, 'deploys', d3.id))).toBe(false);
    expect(existsSync(join(prefix, 'releases', d3.releaseId))).toBe(false);
    expect(existsSync(join(prefix, 'releases', d1.releaseId))).toBe(true);

    const log = await r.logTail(5, true);
    expect(log).toContain(`=== ballast deploy: starting ${d2.id}`);
    expect(log).not.toContain(d1.id);

    await r.stop();
    st = await r.probe();
    expect(st.running).toBeNull();
    expect(existsSync(join(prefix, 'run', 'agent.pid'))).toBe(false);
  });

  it('never takes a foreign process for the agent', async () => {
    const prefix = join(dir, 'foreign');
    const { r } = remoteFor(prefix, ['sleep', '300']);
    mkdirSync(join(prefix, 'run'), { recursive: true });
    // a pidfile naming a live process that is not ours (this test runner)
    writeFileSync(join(prefix, 'run', 'agent.pid'), `${process.pid}\n`);
    expect((await r.probe()).running).toBeNull();
    await r.stop(); // must not signal it
    expect(existsSync(`/proc/${process.pid}`)).toBe(true);
  });
});
