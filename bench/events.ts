// Event delivery: latency from a change committed to a recipient having it, and
// throughput to one recipient. A real agent (single host, its embedded store) and
// a real HTTP receiver in this process; the changes are access-list updates (one
// store revision, one `acl.changed` event each).
//
//   npm run bench:events -- [--changes 300] [--burst 2000] [--concurrency 4]
//
// Latency is measured from just before the API call that makes the change to the
// receiver's arrival of its event (so it includes the API round trip, a bound from
// above). Throughput: a burst of changes made while the receiver refuses (503), then
// the rate at which that backlog reaches it once it accepts (first to last arrival). Results go to stdout and
// bench-results/events.json.

import { spawn } from 'node:child_process';
import { mkdirSync, mkdtempSync, rmSync, writeFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';

const log = (m: string) => process.stderr.write(`[bench:events] ${m}\n`);
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');

function arg(name: string, def: number): number {
  const i = process.argv.indexOf(`--${name}`);
  const v = i >= 0 ? Number(process.argv[i + 1]) : Number.NaN;
  return Number.isFinite(v) && v > 0 ? v : def;
}

function request(sock: string, method: string, p: string, body?: unknown): Promise<number> {
  const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
  return new Promise((resolve, reject) => {
    const req = http.request(
      {
        socketPath: sock,
        method,
        path: p,
        headers: payload
          ? { 'content-type': 'application/json', 'content-length': payload.length }
          : {},
      },
      (res) => {
        res.resume();
        res.on('end', () => resolve(res.statusCode ?? 0));
      },
    );
    req.on('error', reject);
    req.end(payload);
  });
}

function pct(xs: number[], p: number): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.min(s.length - 1, Math.floor((p / 100) * s.length))] ?? Number.NaN;
}

async function main(): Promise<void> {
  const changes = arg('changes', 300);
  const burst = arg('burst', 2000);
  const conc = arg('concurrency', 4);
  const dir = mkdtempSync(path.join(os.tmpdir(), 'ballast-bench-events-'));
  const sock = path.join(dir, 'api.sock');
  writeFileSync(
    path.join(dir, 'agent.yaml'),
    [
      `dataDir: ${path.join(dir, 'data')}`,
      `nbd: { listen: [], socket: ${path.join(dir, 'nbd.sock')} }`,
      `api: { listen: [], socket: ${sock} }`,
      'events: { rescanInterval: 0, retryCap: 1 }',
    ].join('\n'),
  );
  // the receiver: arrival time per subject/revision
  const arrivals = new Map<string, number>();
  let received = 0;
  let firstAt = 0;
  let lastAt = 0;
  let refusing = false;
  const rx = http.createServer((req, res) => {
    const chunks: Buffer[] = [];
    req.on('data', (c: Buffer) => chunks.push(c));
    req.on('end', () => {
      if (refusing) {
        res.writeHead(503).end();
        return;
      }
      const now = performance.now();
      const ce = JSON.parse(Buffer.concat(chunks).toString()) as {
        subject?: string;
        data: { after?: { identity: string }[] | null };
      };
      const who = ce.data.after?.[0]?.identity;
      if (who) arrivals.set(who, now);
      received++;
      if (firstAt === 0) firstAt = now;
      lastAt = now;
      res.writeHead(204).end();
    });
  });
  await new Promise<void>((r) => rx.listen(0, '127.0.0.1', r));
  const url = `http://127.0.0.1:${(rx.address() as AddressInfo).port}/`;
  const agent = spawn(
    process.execPath,
    [path.join(ROOT, 'bin', 'ballast'), 'agent', '--config', path.join(dir, 'agent.yaml')],
    { stdio: ['ignore', 'ignore', 'inherit'] },
  );
  try {
    for (let i = 0; ; i++) {
      try {
        if ((await request(sock, 'GET', '/healthz')) === 200) break;
      } catch {}
      if (i > 200) throw new Error('agent did not start');
      await new Promise((r) => setTimeout(r, 50));
    }
    for (let d = 0; d < conc; d++) {
      await request(sock, 'POST', '/v1/devices', { name: `e${d}`, size: '1M' });
    }
    await request(sock, 'POST', '/v1/notify', { name: 'bench', url, types: 'acl.changed' });

    // latency: one change at a time
    const lat: number[] = [];
    for (let i = 0; i < changes; i++) {
      const who = `l${i}`;
      const t0 = performance.now();
      await request(sock, 'PUT', '/v1/devices/e0/acl', {
        entries: [{ identity: who, access: 'rw' }],
      });
      const deadline = performance.now() + 10_000;
      while (!arrivals.has(who) && performance.now() < deadline) {
        await new Promise((r) => setImmediate(r));
      }
      const at = arrivals.get(who);
      if (at !== undefined) lat.push(at - t0);
    }
    // throughput: a burst over `conc` devices at once, made while the receiver is
    // refusing (so the backlog measures delivery, not how fast changes are made)
    refusing = true;
    received = 0;
    firstAt = 0;
    const tb = performance.now();
    let next = 0;
    await Promise.all(
      Array.from({ length: conc }, async (_, d) => {
        for (;;) {
          const i = next++;
          if (i >= burst) return;
          await request(sock, 'PUT', `/v1/devices/e${d}/acl`, {
            entries: [{ identity: `b${i}`, access: 'rw' }],
          });
        }
      }),
    );
    const produced = performance.now() - tb;
    refusing = false;
    const deadline = performance.now() + 120_000;
    while (received < burst && performance.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    const delivered = lastAt - firstAt;
    const result = {
      latencyMs: {
        n: lat.length,
        p50: +pct(lat, 50).toFixed(2),
        p90: +pct(lat, 90).toFixed(2),
        p99: +pct(lat, 99).toFixed(2),
        max: +Math.max(...lat).toFixed(2),
      },
      burst: {
        changes: burst,
        received,
        producedPerSecond: Math.round((burst / produced) * 1000),
        deliveredPerSecond: Math.round((received / delivered) * 1000),
        seconds: +(delivered / 1000).toFixed(2),
      },
    };
    mkdirSync(path.join(ROOT, 'bench-results'), { recursive: true });
    writeFileSync(path.join(ROOT, 'bench-results', 'events.json'), JSON.stringify(result, null, 2));
    const l = result.latencyMs;
    const b = result.burst;
    process.stdout.write(
      [
        '| measure | value | goal |',
        '| --- | --- | --- |',
        `| change → receiver, p50 | ${l.p50} ms | |`,
        `| change → receiver, p99 | ${l.p99} ms | < 200 ms |`,
        `| change → receiver, max | ${l.max} ms | |`,
        `| burst of ${b.changes}: made | ${b.producedPerSecond} changes/s | |`,
        `| burst of ${b.changes}: delivered | ${b.deliveredPerSecond} events/s (${b.received} in ${b.seconds} s) | ≥ 1,000 events/s |`,
        '',
      ].join('\n'),
    );
  } finally {
    agent.kill('SIGTERM');
    await new Promise((r) => agent.once('exit', r));
    rx.close();
    rmSync(dir, { recursive: true, force: true });
  }
  log('done');
}

main().catch((e) => {
  process.stderr.write(`[bench:events] ${(e as Error).stack ?? e}\n`);
  process.exit(1);
});
