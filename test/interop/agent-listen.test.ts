// Two agents on one machine: the one that finds its API or NBD port taken says who holds it
// and how to move it (a Unix socket too), `ballast agent --api-listen` moves the API without a config file, and
// /healthz says which agent answers (host, data dir, pid).

import { writeFileSync } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import { afterAll, expect, it } from 'vitest';
import { startAgent } from '../helpers/agent.js';
import { BALLAST_BIN, makeTempDir } from '../helpers/server.js';
import { describeRun, describeWithTools, run } from '../helpers/tools.js';

describeWithTools([], 'agent listeners', () => {
  const holder = net.createServer();
  afterAll(() => holder.close());

  /**
   * Starts an agent in a new directory with `nbd` (YAML flow map, `DIR` for the
   * directory) and `--api-listen apiListen`, which must fail: its output. Its sockets
   * are in the test's directory, never the machine's /run/ballast.
   */
  async function agentFails(nbd: (dir: string) => string, apiListen: string) {
    const dir = makeTempDir('ballast-listen-');
    const cfg = path.join(dir, 'agent.yaml');
    writeFileSync(cfg, `nbd: ${nbd(dir)}\napi: { socket: ${dir}/api.sock }\n`);
    const r = await run(process.execPath, [
      BALLAST_BIN,
      'agent',
      '--config',
      cfg,
      '--data-dir',
      path.join(dir, 'data'),
      '--api-listen',
      apiListen,
    ]);
    expect(r.code, describeRun(r)).toBe(1);
    return r;
  }

  it('a taken API port names its holder and the option that moves it', async () => {
    await new Promise<void>((r) => holder.listen(0, '127.0.0.1', r));
    const port = (holder.address() as net.AddressInfo).port;
    const r = await agentFails((dir) => `{ socket: ${dir}/nbd.sock }`, `127.0.0.1:${port}`);
    expect(r.stderr).toContain(
      `BALLAST_ADDRESS_IN_USE: 127.0.0.1:${port} is already in use by pid ${process.pid} (`,
    );
    expect(r.stderr).toContain('ballast agent --api-listen HOST:PORT|none');
  });

  it('a taken NBD port names its holder and the config key that moves it', async () => {
    if (!holder.listening) await new Promise<void>((r) => holder.listen(0, '127.0.0.1', r));
    const port = (holder.address() as net.AddressInfo).port;
    const r = await agentFails(
      (dir) => `{ listen: 127.0.0.1:${port}, socket: ${dir}/nbd.sock }`,
      'none',
    );
    expect(r.stderr).toContain(
      `BALLAST_ADDRESS_IN_USE: 127.0.0.1:${port} is already in use by pid ${process.pid} (`,
    );
    // --api-listen moves the API, not NBD.
    expect(r.stderr).toContain('nbd.listen');
    expect(r.stderr).not.toContain('--api-listen');
  });

  it('a taken NBD socket names its holder and the config key that moves it', async () => {
    const sock = path.join(makeTempDir('ballast-listen-'), 'nbd.sock');
    const other = net.createServer();
    await new Promise<void>((r) => other.listen(sock, r));
    try {
      const r = await agentFails(() => `{ socket: ${sock} }`, 'none');
      expect(r.stderr).toContain(
        `BALLAST_ADDRESS_IN_USE: ${sock}: another server is listening there (pid ${process.pid} (`,
      );
      expect(r.stderr).toContain('nbd.socket in its config');
    } finally {
      other.close();
    }
  });

  it('/healthz says which agent answers: host, data dir, pid', async () => {
    const a = await startAgent();
    try {
      const h = await a.api('GET', '/healthz');
      expect(h.body).toMatchObject({ status: 'ok', dataDir: a.dataDir, pid: a.child.pid });
      expect(typeof h.body.host).toBe('string');
    } finally {
      expect(await a.stop()).toBe(0);
    }
  });
});
