// dumpd started the way the README's first lines start it, before any guest runs.

import { existsSync, mkdtempSync, rmSync, statSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { parseConfig } from './config.js';
import { Dumpd } from './daemon.js';
import { QmpMonitor } from './qmp.js';

describe('dumpd before its guests', () => {
  let dir = '';
  let d: Dumpd | undefined;
  afterEach(async () => {
    await d?.stop();
    rmSync(dir, { recursive: true, force: true });
  });

  it('makes a watched directory that is missing, and says what an offline guest needs', async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-dd-'));
    const watched = path.join(dir, 'run', 'qemu');
    const log: string[] = [];
    d = new Dumpd(
      parseConfig(`
listen: 127.0.0.1:0
runDir: ${path.join(dir, 'rundir')}
guests:
  - { name: web1, qmp: ${watched}/web1.qmp, device: "nbd+unix:///web1-dump?socket=/nowhere" }
  - { name: web2, qmp: tcp:127.0.0.1:1, device: "nbd+unix:///web2-dump?socket=/nowhere" }
watch:
  - { dir: ${watched}, device: "nbd+unix:///{guest}-dump?socket=/nowhere" }
`),
      { resolveDevice: async () => 'nbd+unix:///x?socket=/nowhere', log: (s) => log.push(s) },
    );
    await d.start();
    expect(existsSync(watched) && statSync(watched).isDirectory()).toBe(true);
    expect(statSync(watched).mode & 0o777).toBe(0o755);
    expect(log).toContain(`created ${watched} (watched for QMP sockets)`);
    await expect(d.dump('web1')).rejects.toMatchObject({
      code: 'DUMP_GUEST_OFFLINE',
      message: expect.stringContaining(`-qmp unix:${watched}/web1.qmp,server=on,wait=off`),
    });
    await expect(d.dump('web2')).rejects.toMatchObject({
      message: expect.stringContaining('-qmp tcp:127.0.0.1:1,server=on,wait=off'),
    });
  });
});

describe('QmpMonitor.connectNow', () => {
  it('connects to a QEMU that just started without waiting out the retry backoff', async () => {
    const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-dd-'));
    const sock = path.join(dir, 'g.qmp');
    // Retries every 60 s: only connectNow can connect within this test.
    const m = new QmpMonitor(sock, { retryMs: 60_000, maxRetryMs: 60_000 });
    const srv = net.createServer((c) => {
      c.write('{"QMP":{"version":{"qemu":{"major":7,"minor":2,"micro":0}},"capabilities":[]}}\n');
      c.on('data', (b) => {
        for (const l of b.toString().split('\n').filter(Boolean))
          c.write(`${JSON.stringify({ return: {}, id: JSON.parse(l).id })}\n`);
      });
    });
    try {
      m.start();
      expect(await m.connectNow(200)).toBe(false); // nothing listens yet
      await new Promise<void>((r) => srv.listen(sock, r));
      expect(await m.connectNow(5000)).toBe(true);
      expect(m.client).not.toBeNull();
    } finally {
      m.stop();
      srv.close();
      rmSync(dir, { recursive: true, force: true });
    }
  });
});
