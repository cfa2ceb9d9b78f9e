// A real Prometheus scrapes the agent's /metrics (with the bearer token, as
// it would from another host) and its HTTP API is asked whether the target
// is up and whether the NBD request counter moved after I/O.

import { type ChildProcess, spawn } from 'node:child_process';
import { writeFileSync } from 'node:fs';
import http from 'node:http';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { freePort } from '../helpers/server.js';
import { describeRun, describeWithTools, run, toolEnv } from '../helpers/tools.js';

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function get(port: number, urlPath: string): Promise<{ status: number; text: string }> {
  return new Promise((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port, path: urlPath }, (res) => {
        let text = '';
        res.setEncoding('utf8');
        res.on('data', (d: string) => {
          text += d;
        });
        res.on('end', () => resolve({ status: res.statusCode ?? 0, text }));
      })
      .on('error', reject);
  });
}

describeWithTools(['prometheus', 'qemu-io'], 'Prometheus scrapes the agent', () => {
  let agent: AgentHandle;
  let prom: ChildProcess;
  let promPort: number;
  let promLog = '';

  /** Instant query; the values of the result vector (empty if none). */
  const query = async (q: string): Promise<number[]> => {
    const r = await get(promPort, `/api/v1/query?query=${encodeURIComponent(q)}`);
    expect(r.status, r.text).toBe(200);
    const j = JSON.parse(r.text) as {
      data: { result: { value: [number, string] }[] };
    };
    return j.data.result.map((x) => Number(x.value[1]));
  };

  /** Polls a query until `ok` holds for its values; returns them. */
  const until = async (q: string, ok: (v: number[]) => boolean): Promise<number[]> => {
    let v: number[] = [];
    for (let i = 0; i < 600; i++) {
      v = await query(q);
      if (ok(v)) return v;
      await sleep(100);
    }
    throw new Error(`${q} never satisfied the condition; last ${JSON.stringify(v)}\n${promLog}`);
  };

  beforeAll(async () => {
    agent = await startAgent({ api: { requireToken: true } });
    const c = await agent.cli('device', 'create', 'pm', '--size', '16M');
    expect(c.code, describeRun(c)).toBe(0);
    promPort = await freePort();
    const cfg = path.join(agent.dir, 'prometheus.yml');
    writeFileSync(
      cfg,
      [
        'global: { scrape_interval: 1s, evaluation_interval: 1s }',
        'scrape_configs:',
        '  - job_name: ballast',
        '    authorization:',
        `      credentials_file: ${path.join(agent.dataDir, 'api-token')}`,
        '    static_configs:',
        `      - targets: ['127.0.0.1:${agent.apiPort}']`,
        '',
      ].join('\n'),
    );
    prom = spawn(
      'prometheus',
      [
        `--config.file=${cfg}`,
        `--storage.tsdb.path=${path.join(agent.dir, 'tsdb')}`,
        `--web.listen-address=127.0.0.1:${promPort}`,
      ],
      { env: toolEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
    );
    prom.stderr?.on('data', (b: Buffer) => {
      promLog += b.toString();
    });
    for (let i = 0; ; i++) {
      if (prom.exitCode !== null) throw new Error(`prometheus exited:\n${promLog}`);
      const ok = await get(promPort, '/-/ready').then(
        (r) => r.status === 200,
        () => false,
      );
      if (ok) break;
      if (i > 600) throw new Error(`prometheus not ready:\n${promLog}`);
      await sleep(100);
    }
  });

  afterAll(async () => {
    if (prom && prom.exitCode === null) {
      const gone = new Promise((r) => prom.once('exit', r));
      prom.kill('SIGTERM');
      await gone;
    }
    if (agent) expect(await agent.stop()).toBe(0);
  });

  it('sees the agent up, with the bearer token', async () => {
    expect(await until('up{job="ballast"}', (v) => v[0] === 1)).toEqual([1]);
    // Pool and device gauges arrive with their labels.
    const size = await until(
      'ballast_device_size_bytes{device="pm",role="data"}',
      (v) => v.length > 0,
    );
    expect(size).toEqual([16 * 1024 * 1024]);
    const cap = await until('ballast_pool_capacity_bytes{pool="default"}', (v) => v.length > 0);
    expect(cap[0]).toBeGreaterThan(0);
  });

  it('the NBD write counter of the device moves after I/O', async () => {
    const q = 'ballast_nbd_requests_total{job="ballast",device="pm",op="write"}';
    const w1 = await run('qemu-io', ['-f', 'raw', agent.uri('pm'), '-c', 'write -P 1 0 64k']);
    expect(w1.code, describeRun(w1)).toBe(0);
    const [before] = await until(q, (v) => (v[0] ?? 0) >= 1);
    const cmds = ['write -P 2 0 64k', 'write -P 3 1M 64k', 'write -P 4 2M 64k'];
    const w2 = await run('qemu-io', [
      '-f',
      'raw',
      agent.uri('pm'),
      ...cmds.flatMap((c) => ['-c', c]),
    ]);
    expect(w2.code, describeRun(w2)).toBe(0);
    const [after] = await until(q, (v) => (v[0] ?? 0) >= before! + 3);
    expect(after).toBe(before! + 3);
    // Bytes and the latency histogram follow.
    const bytes = await until(
      'ballast_nbd_bytes_total{device="pm",op="write"}',
      (v) => (v[0] ?? 0) >= 4 * 65536,
    );
    expect(bytes[0]).toBe(4 * 65536);
    const count = await until(
      'ballast_nbd_request_duration_seconds_count{device="pm",op="write"}',
      (v) => (v[0] ?? 0) >= 4,
    );
    expect(count[0]).toBe(4);
  });
});
