// EtcdStore on a real 1-member etcd that serves clients over TLS with client
// certificates: the https path (ca, cert, key), and the one member killed and
// restarted on its data directory.
import { randomBytes } from 'node:crypto';
import { mkdtempSync, rmSync } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { afterAll, afterEach, beforeAll, expect, it } from 'vitest';
import { isStoreError, type WatchEvent, type Watcher } from '../agent/store/store.js';
import { ETCD_TOOLS, type EtcdCluster, startEtcdCluster } from '../test/helpers/etcd.js';
import { waitFor } from '../test/helpers/store-contract.js';
import { makePki, type Pki } from '../test/helpers/tls.js';
import { describeWithTools } from '../test/helpers/tools.js';
import { EtcdStore, type EtcdStoreOptions } from './etcd-store.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

describeWithTools([...ETCD_TOOLS, 'openssl'], 'EtcdStore on a 1-member etcd over TLS', () => {
  let dir: string;
  let pki: Pki;
  let cluster: EtcdCluster;
  const stores: EtcdStore[] = [];
  const watchers: Watcher[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-etcd-tls-'));
    pki = await makePki(dir, ['agent']);
    cluster = await startEtcdCluster({
      size: 1,
      tls: { cert: pki.serverCert, key: pki.serverKey, ca: pki.caCert },
    });
  });

  afterEach(async () => {
    for (const w of watchers.splice(0)) await w.cancel();
    for (const s of stores.splice(0)) await s.close();
  });

  afterAll(async () => {
    await cluster?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  function client(which: string): Pick<EtcdStoreOptions, 'ca' | 'cert' | 'key'> {
    return {
      ca: path.join(which, 'ca-cert.pem'),
      cert: path.join(which, 'client-cert.pem'),
      key: path.join(which, 'client-key.pem'),
    };
  }

  async function open(extra: Partial<EtcdStoreOptions>): Promise<EtcdStore> {
    const s = await EtcdStore.connect({
      endpoints: cluster.endpoints,
      prefix: `/single/${randomBytes(6).toString('hex')}/`,
      timeoutMs: 2000,
      ...extra,
    });
    stores.push(s);
    return s;
  }

  const codeOf = (p: Promise<unknown>) =>
    p.then(
      () => 'ok',
      (e: unknown) => (isStoreError(e) ? e.code : String(e)),
    );

  it('speaks TLS with a client certificate; without one, or with an untrusted one, calls fail within the deadline', async () => {
    expect(cluster.endpoints[0]).toMatch(/^https:/);
    const s = await open(client(pki.clients.get('agent')!));
    await s.put('k', 'v');
    expect((await s.get('k'))?.value).toBe('v');

    for (const bad of [
      { ca: pki.caCert },
      client(pki.foreign),
      { ...client(pki.clients.get('agent')!), ca: path.join(pki.dir, 'other-ca-cert.pem') },
    ]) {
      const t0 = performance.now();
      const code = await codeOf((await open(bad)).get('k'));
      expect(['STORE_UNAVAILABLE', 'STORE_TIMEOUT']).toContain(code);
      expect(performance.now() - t0).toBeLessThan(2000 + 300);
    }
    expect(await codeOf(open({ ...client(pki.clients.get('agent')!), ca: '/nonexistent' }))).toBe(
      'STORE_IO',
    );
    expect(await codeOf(open({ endpoints: ['http://127.0.0.1:1', 'https://127.0.0.1:2'] }))).toBe(
      'STORE_INVALID_ARGUMENT',
    );
  });

  it('the only member killed: calls fail at once as unavailable; restarted on its data, nothing is lost and the watch resumes', async () => {
    const s = await open(client(pki.clients.get('agent')!));
    const start = (await s.revision()) + 1;
    const events: WatchEvent[] = [];
    const errors: unknown[] = [];
    watchers.push(
      await s.watch('', {
        fromRevision: start,
        onEvent: (e) => events.push(e),
        onError: (e) => errors.push(e),
      }),
    );
    await s.put('a', '1');
    await s.put('b', '1');
    await waitFor(() => events.length === 2, 5000, 'two events');

    await cluster.kill(0);
    const t0 = performance.now();
    expect(await codeOf(s.put('c', '1'))).toBe('STORE_UNAVAILABLE');
    expect(await codeOf(s.get('a'))).toBe('STORE_UNAVAILABLE');
    // Refused connections fail at once, not at the deadline.
    expect(performance.now() - t0).toBeLessThan(1000);
    await sleep(300); // the watch tries to come back meanwhile

    await cluster.restart(0);
    await waitFor(
      async () => (await codeOf(s.put('d', '1'))) === 'ok',
      10_000,
      'writes to work again',
    );
    expect((await s.range('')).kvs.map((k) => k.key)).toEqual(['a', 'b', 'd']);
    await waitFor(() => events.length === 3, 10_000, 'the event after the restart');
    expect(events.map((e) => [e.kv.key, e.revision])).toEqual([
      ['a', start],
      ['b', start + 1],
      ['d', start + 2],
    ]);
    expect(s.watchResumes).toBeGreaterThanOrEqual(1);
    expect(errors).toEqual([]);
  });
});
