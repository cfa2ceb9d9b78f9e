// GET /v1/events as clients hold it: real curl on the Unix socket and on TCP, and
// `ballast events --follow`, for longer than the API's request deadline, and through
// a kill -9 and restart of the agent (the CLI resumes from the last id it saw).

import { type ChildProcess, spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent, writeAgentConfig } from '../helpers/agent.js';
import { Receiver } from '../helpers/receiver.js';
import { BALLAST_BIN } from '../helpers/server.js';
import { describeWithTools } from '../helpers/tools.js';
import { until as waitUntil } from '../helpers/wait.js';

const until = (what: string, pred: () => boolean | Promise<boolean>, ms = 30_000) =>
  waitUntil(what, pred, ms);

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

interface Proc {
  child: ChildProcess;
  out: () => string;
  err: () => string;
  exited: () => boolean;
}

const procs: ChildProcess[] = [];

function start(cmd: string, args: string[], env: Record<string, string> = {}): Proc {
  const child = spawn(cmd, args, { env: { ...process.env, ...env } });
  procs.push(child);
  let out = '';
  let err = '';
  let exited = false;
  child.stdout?.on('data', (b: Buffer) => {
    out += b.toString();
  });
  child.stderr?.on('data', (b: Buffer) => {
    err += b.toString();
  });
  child.once('exit', () => {
    exited = true;
  });
  return { child, out: () => out, err: () => err, exited: () => exited };
}

describeWithTools(['curl'], 'the event stream: long-lived, resumed', () => {
  let a: AgentHandle;

  beforeAll(async () => {
    // A request deadline of 1 s: a stream must outlive it many times over.
    a = await startAgent({ api: { requestTimeout: 1 }, events: { rescanInterval: 0 } });
  });
  afterAll(async () => {
    for (const p of procs) p.kill('SIGKILL');
    await a?.stop();
  });

  it('streams live past the request deadline on the Unix socket and TCP; a slow body is still cut off', async () => {
    const token = path.join(a.dataDir, 'api-token');
    const unix = start('curl', [
      '-sN',
      '--unix-socket',
      a.apiSocket,
      'http://agent/v1/events?follow=1&types=device.created',
    ]);
    const tcp = start('curl', [
      '-sN',
      '-H',
      `authorization: Bearer ${(await import('node:fs')).readFileSync(token, 'utf8').trim()}`,
      `http://127.0.0.1:${a.apiPort}/v1/events?follow=1&types=device.created`,
    ]);
    const cli = start(
      process.execPath,
      [BALLAST_BIN, 'events', '--follow', '--json', '--types', 'device.created'],
      { BALLAST_AGENT: `unix:${a.apiSocket}` },
    );
    // Each stream is open (the agent wrote its first line) before the clock starts.
    await until('the curl streams are open', () => unix.out() !== '' && tcp.out() !== '');
    const opened = performance.now();
    // A request whose body stops coming, meanwhile: still closed at the deadline.
    const slow = net.connect(a.apiPort, '127.0.0.1');
    slow.on('error', () => {});
    slow.on('data', () => {});
    const slowClosed = new Promise<void>((r) => slow.once('close', () => r()));
    slow.write('POST /v1/devices HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"na');
    await slowClosed;
    // Five request deadlines on the streams' clock.
    while (performance.now() - opened < 5_000) await sleep(200);
    expect((await a.cli('device', 'create', 'long1', '--size', '1M')).code).toBe(0);
    await until(
      'every stream printed it',
      () =>
        unix.out().includes('long1') && tcp.out().includes('long1') && cli.out().includes('long1'),
    );
    expect([unix.exited(), tcp.exited(), cli.exited()]).toEqual([false, false, false]);
    expect(cli.err()).toBe('');
    for (const p of [unix, tcp, cli]) p.child.kill('SIGINT');
  });

  it('ballast events --follow resumes from the last id after the agent is killed and restarted', async () => {
    const cli = start(process.execPath, [BALLAST_BIN, 'events', '--follow', '--json'], {
      BALLAST_AGENT: `unix:${a.apiSocket}`,
    });
    await sleep(300);
    expect((await a.cli('device', 'create', 'before-kill', '--size', '1M')).code).toBe(0);
    await until('the stream printed it', () => cli.out().includes('before-kill'));
    await a.kill9();
    await a.start();
    // Made at once: before or after the CLI is back, it must come, once.
    expect((await a.cli('device', 'create', 'after-restart', '--size', '1M')).code).toBe(0);
    await until('the stream printed the change after the restart', () =>
      cli.out().includes('after-restart'),
    );
    expect(cli.exited()).toBe(false);
    expect(cli.err()).toMatch(/ballast events: .*lost.*; reconnecting in \d+\.\d s from event \d+/);
    const created = cli
      .out()
      .split('\n')
      .filter(Boolean)
      .map((l) => JSON.parse(l) as { id: string; type: string; subject?: string })
      .filter((e) => e.type === 'io.ballast.device.created')
      .map((e) => e.subject);
    expect(created).toEqual(['before-kill', 'after-restart']);
    cli.child.kill('SIGINT');
  });

  it('a medium changed while the agent was stopped is reported when it starts; an id keeps its time', async () => {
    const opts = {
      pools: [{ name: 'fast', media: 'ssd' }],
      events: { rescanInterval: 0, retryCap: 0.5 },
    };
    const b = await startAgent(opts);
    const rx = new Receiver();
    await rx.start();
    try {
      expect(
        (await b.cli('notify', 'add', 'tier', '--url', rx.url, '--types', 'tier.changed')).code,
      ).toBe(0);
      expect((await b.cli('device', 'create', 'm1', '--size', '1M', '--pool', 'fast')).code).toBe(
        0,
      );
      // An access list, then the device removed with it: a change that stores no time.
      expect(
        (await b.api('PUT', '/v1/devices/m1/acl', { entries: [{ identity: 'x', access: 'rw' }] }))
          .status,
      ).toBe(200);
      expect((await b.cli('device', 'create', 'm2', '--size', '1M', '--pool', 'fast')).code).toBe(
        0,
      );
      expect((await b.cli('device', 'rm', 'm1')).code).toBe(0);
      expect(await b.stop()).toBe(0);
      // The pool's medium is another one when the agent comes back.
      writeAgentConfig(b.dir, { ...opts, pools: [{ name: 'fast', media: 'hdd' }] });
      await b.start();
      await until('the tier change delivered', () => rx.got.length > 0);
      expect(rx.got.map((g) => [g.subject, g.data.before, g.data.after])).toEqual([
        ['m2', ['ssd'], ['hdd']],
      ]);
      expect(rx.got[0]!.data.reason).toMatch(/since the agent last ran/);
      // Read twice, a while apart: each id with the same time.
      const read = async () => {
        const r = await b.cli('events', '--json');
        expect(r.code, r.stderr).toBe(0);
        return r.stdout
          .split('\n')
          .filter(Boolean)
          .map((l) => JSON.parse(l) as { id: string; time: string; type: string });
      };
      const first = await read();
      expect(first.some((e) => e.type === 'io.ballast.acl.changed')).toBe(true);
      await sleep(50);
      const second = await read();
      expect(second.map((e) => [e.id, e.time])).toEqual(first.map((e) => [e.id, e.time]));
    } finally {
      await rx.stop();
      await b.stop();
    }
  }, 180_000);
});
