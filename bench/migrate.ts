// Moving guests, in one run:
//   live   migration total time and downtime of a guest whose paging device is a Ballast
//          device (two agents on a 3-member etcd, the hand-off at pre-switchover), against the
//          same guest with its paging device on nbdkit (a plain migration, no hand-off)
//   save   suspend into the paging device (`ballast guest suspend`: the agent's own
//          stream, and through this process over NBD, --via nbd) against QEMU's
//          `migrate` to a local file (exec:cat, then fdatasync)
//   load   resume from the device (both ways) against `migrate-incoming` from that file
//
// The guest boots nothing: its RAM is a private mapping of a file of random bytes
// (memory-backend-file), so the stream carries real data, and it runs the firmware,
// which dirties next to nothing. Downtime is the guest's: the source's STOP event to the
// destination's RESUME event (QMP timestamps, one clock), and QEMU's own figure.
//
//   npm run bench:migrate -- [--mem-mib 256] [--rounds 5] [--dir DIR]
//
// Results go to stdout and bench-results/migrate.json.

import { randomFillSync } from 'node:crypto';
import {
  closeSync,
  fdatasyncSync,
  mkdirSync,
  mkdtempSync,
  openSync,
  readFileSync,
  rmSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import http from 'node:http';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import { fileURLToPath } from 'node:url';
import { BallastError } from '../agent/errors.js';
import { QmpClient, type QmpEvent } from '../dumpd/qmp.js';
import { type AgentApi, ensureHeld } from '../migrate/handoff.js';
import { suspendArea } from '../migrate/image.js';
import { migrateLive } from '../migrate/live.js';
import { queryMigrate, setCapabilities, waitMigration } from '../migrate/qemu.js';
import { resumeGuest, suspendGuest } from '../migrate/suspend.js';
import { startEtcdCluster } from '../test/harness/local-etcd.js';
import { Child, killAll } from './proc.js';

const log = (m: string) => process.stderr.write(`[bench:migrate] ${m}\n`);
const ROOT = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const MiB = 1024 * 1024;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

function arg(name: string, def: string): string {
  const i = process.argv.indexOf(`--${name}`);
  return (i >= 0 ? process.argv[i + 1] : undefined) ?? def;
}

async function until(what: string, f: () => Promise<boolean> | boolean, ms = 30_000) {
  const deadline = performance.now() + ms;
  while (!(await f())) {
    if (performance.now() > deadline) throw new Error(`timed out waiting for ${what}`);
    await sleep(50);
  }
}

function api(socketPath: string): AgentApi {
  return {
    request(method, p, body) {
      const payload = body === undefined ? undefined : Buffer.from(JSON.stringify(body));
      return new Promise((resolve, reject) => {
        const req = http.request(
          {
            socketPath,
            method,
            path: p,
            headers: payload
              ? { 'content-type': 'application/json', 'content-length': payload.length }
              : {},
          },
          (res) => {
            const chunks: Buffer[] = [];
            res.on('data', (c: Buffer) => chunks.push(c));
            res.on('end', () => {
              const j = JSON.parse(Buffer.concat(chunks).toString() || '{}');
              if ((res.statusCode ?? 500) >= 300) reject(new BallastError(j.code, j.message));
              else resolve(j);
            });
          },
        );
        req.on('error', reject);
        req.end(payload);
      });
    },
  };
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  const m = Math.floor(s.length / 2);
  return s.length % 2 ? (s[m] as number) : ((s[m - 1] as number) + (s[m] as number)) / 2;
}

/** CPU time (user + system) of a process so far, in ms (from /proc, 10 ms ticks). */
function cpuMs(pid: number): number {
  const f = readFileSync(`/proc/${pid}/stat`, 'utf8').split(') ')[1]?.split(' ') ?? [];
  return (Number(f[11]) + Number(f[12])) * 10;
}

function eventMs(e: QmpEvent | undefined): number {
  return e?.timestamp ? e.timestamp.seconds * 1000 + e.timestamp.microseconds / 1000 : Number.NaN;
}

async function main(): Promise<void> {
  const memMiB = Number(arg('mem-mib', '256'));
  const rounds = Number(arg('rounds', '5'));
  const dir = mkdtempSync(path.join(arg('dir', os.tmpdir()), 'ballast-bench-mig-'));
  process.on('exit', () => {
    killAll();
    rmSync(dir, { recursive: true, force: true });
  });
  log(`guest RAM ${memMiB} MiB of random bytes, ${rounds} rounds, in ${dir}`);
  const ram = path.join(dir, 'ram.bin');
  const fd = openSync(ram, 'w');
  const chunk = Buffer.alloc(16 * MiB);
  for (let i = 0; i < memMiB / 16; i++) writeSync(fd, randomFillSync(chunk));
  closeSync(fd);

  // a real 3-member etcd on loopback, two agents sharing a pool, one paging device
  const etcd = await startEtcdCluster({ size: 3, dir });
  const shared = path.join(dir, 'shared');
  mkdirSync(shared);
  const agents: Record<string, { api: AgentApi; nbd: string; pid: number }> = {};
  for (const h of ['a', 'b']) {
    const d = path.join(dir, h);
    mkdirSync(d);
    const cfg = path.join(d, 'agent.yaml');
    writeFileSync(
      cfg,
      [
        `dataDir: ${path.join(d, 'data')}`,
        `nbd: { socket: ${path.join(d, 'nbd.sock')} }`,
        `api: { listen: [], socket: ${path.join(d, 'api.sock')} }`,
        'pools:',
        `  - { name: shared, path: ${shared}, shared: true }`,
        `cluster: { name: bench, etcd: [${etcd.endpoints.join(', ')}], host: ${h}, leaseTtl: 5 }`,
        '',
      ].join('\n'),
    );
    const c = new Child(process.execPath, [
      path.join(ROOT, 'bin', 'ballast'),
      'agent',
      '--config',
      cfg,
    ]);
    const a = api(path.join(d, 'api.sock'));
    await until(`agent ${h}`, async () => {
      if (!c.running) throw new Error(`agent ${h} exited:\n${c.output()}`);
      return a.request('GET', '/healthz').then(
        () => true,
        () => false,
      );
    });
    agents[h] = { api: a, nbd: path.join(d, 'nbd.sock'), pid: c.pid };
  }
  const A = agents.a as { api: AgentApi; nbd: string; pid: number };
  const B = agents.b as { api: AgentApi; nbd: string; pid: number };
  const devBytes = 2 * memMiB * MiB + 64 * MiB;
  await A.api.request('POST', '/v1/devices', {
    name: 'g-swap',
    size: String(devBytes),
    pool: 'shared',
    role: 'paging',
    guest: 'g',
  });
  const area = suspendArea(devBytes, memMiB * MiB);
  if (!area) throw new Error('device too small');
  // the same guest's paging device on nbdkit
  const kitFile = path.join(dir, 'kit.img');
  writeFileSync(kitFile, '');
  truncateSync(kitFile, devBytes);
  const kitSock = path.join(dir, 'kit.sock');
  new Child('nbdkit', ['--exit-with-parent', '-f', '-U', kitSock, 'file', `file=${kitFile}`]);
  await until('nbdkit', () => {
    try {
      return statSync(kitSock).isSocket();
    } catch {
      return false;
    }
  });

  let n = 0;
  async function qemu(nbdSock: string, exportName: string, incoming: boolean) {
    n++;
    const qmp = path.join(dir, `q${n}.qmp`);
    const c = new Child('qemu-system-x86_64', [
      '-nodefaults',
      '-display',
      'none',
      '-machine',
      'pc,accel=tcg,memory-backend=ram0',
      '-object',
      `memory-backend-file,id=ram0,size=${memMiB}M,mem-path=${ram},share=off`,
      '-m',
      `${memMiB}M`,
      '-blockdev',
      `driver=nbd,node-name=swap0,server.type=unix,server.path=${nbdSock}${exportName ? `,export=${exportName}` : ''},reconnect-delay=60`,
      '-blockdev',
      `driver=raw,node-name=swap,file=swap0,size=${area?.offset}`,
      '-device',
      'virtio-blk-pci,drive=swap,id=swap-dev,werror=stop,rerror=stop',
      '-qmp',
      `unix:${qmp},server=on,wait=off`,
      ...(incoming ? ['-incoming', 'defer', '-S'] : []),
    ]);
    await until('qemu', () => {
      if (!c.running) throw new Error(`qemu exited:\n${c.output()}`);
      try {
        return statSync(qmp).isSocket();
      } catch {
        return false;
      }
    });
    return { c, qmp };
  }

  const res: Record<string, number[]> = {};
  const put = (k: string, v: number) => {
    res[k] ??= [];
    res[k].push(v);
  };

  for (let r = 0; r < rounds; r++) {
    for (const which of r % 2 ? ['nbdkit', 'ballast'] : ['ballast', 'nbdkit']) {
      await sleep(500);
      if (which === 'ballast') {
        const src = await qemu(A.nbd, 'g-swap', false);
        const dst = await qemu(B.nbd, 'g-swap', true);
        const rep = await migrateLive({
          guest: 'g',
          from: { qmp: src.qmp, api: A.api },
          to: { qmp: dst.qmp, api: B.api },
          uri: `unix:${path.join(dir, 'mig.sock')}`,
        });
        put('ballast.total', rep.totalMs);
        put('ballast.downtime', rep.downtimeMs);
        put('ballast.qemuDowntime', rep.qemuDowntimeMs);
        put('ballast.handoff', rep.handoffMs);
        log(
          `round ${r + 1} ballast: total ${rep.totalMs.toFixed(0)} ms, downtime ${rep.downtimeMs.toFixed(0)} ms (QEMU ${rep.qemuDowntimeMs} ms), hand-off ${rep.handoffMs.toFixed(1)} ms`,
        );
        await src.c.stop(2000);
        await dst.c.stop(2000);
      } else {
        const src = await qemu(kitSock, '', false);
        const dst = await qemu(kitSock, '', true);
        const s = await QmpClient.connect(src.qmp);
        const d = await QmpClient.connect(dst.qmp);
        const t0 = performance.now();
        await setCapabilities(d, { events: true });
        await setCapabilities(s, { events: true });
        await s.execute('migrate-set-parameters', {
          'max-bandwidth': 64 * 1024 ** 3,
          'downtime-limit': 300,
        });
        let stop: QmpEvent | undefined;
        let resume: QmpEvent | undefined;
        s.once('STOP', (e: QmpEvent) => {
          stop = e;
        });
        d.once('RESUME', (e: QmpEvent) => {
          resume = e;
        });
        const uri = `unix:${path.join(dir, 'mig.sock')}`;
        await d.execute('migrate-incoming', { uri });
        await s.execute('migrate', { uri });
        // as migrateLive does: both ends completed, then `cont` at once
        let [done] = await Promise.all([
          waitMigration(s, ['completed'], { timeoutMs: 300_000, step: 'x', t0, pollMs: 20 }),
          waitMigration(d, ['completed'], { timeoutMs: 60_000, step: 'x', t0, pollMs: 20 }),
        ]);
        await d.execute('cont');
        // QEMU reports `completed` (downtime 0 or absent) a moment before it fills it in
        for (let i = 0; i < 50 && !done.downtime; i++) {
          await sleep(10);
          done = await queryMigrate(s);
        }
        await until('RESUME', () => resume !== undefined, 5000);
        const total = performance.now() - t0;
        put('nbdkit.total', total);
        put('nbdkit.downtime', eventMs(resume) - eventMs(stop));
        put('nbdkit.qemuDowntime', done.downtime ?? 0);
        log(
          `round ${r + 1} nbdkit: total ${total.toFixed(0)} ms, downtime ${(eventMs(resume) - eventMs(stop)).toFixed(0)} ms (QEMU ${done.downtime} ms)`,
        );
        s.close();
        d.close();
        await src.c.stop(2000);
        await dst.c.stop(2000);
      }
    }
  }

  // suspend/resume against QEMU's migrate to and from a local file
  const local = path.join(dir, 'local.mig');
  await ensureHeld(A.api, 'g-swap', 'a'); // the guest runs on host a
  // the agent's own stream ('device'), the same through this process over NBD ('nbd'),
  // and the local file, in a rotating order
  const sides = ['device', 'nbd', 'file'] as const;
  for (let r = 0; r < rounds; r++) {
    for (let i = 0; i < sides.length; i++) {
      const which = sides[(r + i) % sides.length] as (typeof sides)[number];
      await sleep(500);
      const src = await qemu(A.nbd, 'g-swap', false);
      if (which !== 'file') {
        const via = which === 'device' ? 'agent' : 'nbd';
        const cpu0 = process.cpuUsage();
        const agent0 = cpuMs(A.pid);
        const sus = await suspendGuest({ guest: 'g', qmp: src.qmp, api: A.api, via });
        const cpu = process.cpuUsage(cpu0);
        if (sus.via !== via) throw new Error(`asked for ${via}, suspended via ${sus.via}`);
        put(`save.${which}`, sus.mibPerSec);
        // where the stream's CPU goes: this process (ballast guest suspend) and the agent
        put(`save.cpu.suspend.${which}`, (cpu.user + cpu.system) / 1000);
        put(`save.cpu.agent.${which}`, cpuMs(A.pid) - agent0);
        const dst = await qemu(A.nbd, 'g-swap', true);
        const t0 = performance.now();
        const res2 = await resumeGuest({ guest: 'g', qmp: dst.qmp, api: A.api, via });
        put(`load.${which}`, res2.mibPerSec);
        log(
          `round ${r + 1} ${which}: save ${(sus.bytes / MiB).toFixed(0)} MiB at ${sus.mibPerSec.toFixed(0)} MiB/s (${sus.ms.toFixed(0)} ms in all${sus.direct ? ', O_DIRECT' : ''}), load at ${res2.mibPerSec.toFixed(0)} MiB/s (${(performance.now() - t0).toFixed(0)} ms to running)`,
        );
        await dst.c.stop(2000);
      } else {
        const q = await QmpClient.connect(src.qmp);
        await setCapabilities(q, { events: true });
        await q.execute('migrate-set-parameters', { 'max-bandwidth': 64 * 1024 ** 3 });
        const t0 = performance.now();
        await q.execute('stop');
        await q.execute('migrate', { uri: `exec:cat > ${local}` });
        await waitMigration(q, ['completed'], { timeoutMs: 300_000, step: 'x', t0, pollMs: 20 });
        const lfd = openSync(local, 'r+');
        fdatasyncSync(lfd);
        closeSync(lfd);
        const saveMs = performance.now() - t0;
        const bytes = statSync(local).size;
        put('save.file', bytes / MiB / (saveMs / 1000));
        await q.execute('quit').catch(() => {});
        q.close();
        const dst = await qemu(A.nbd, 'g-swap', true);
        const d = await QmpClient.connect(dst.qmp);
        await setCapabilities(d, { events: true });
        const t1 = performance.now();
        await d.execute('migrate-incoming', { uri: `exec:cat ${local}` });
        await waitMigration(d, ['completed'], {
          timeoutMs: 300_000,
          step: 'x',
          t0: t1,
          pollMs: 20,
        });
        const loadMs = performance.now() - t1;
        put('load.file', bytes / MiB / (loadMs / 1000));
        log(
          `round ${r + 1} file: save ${(bytes / MiB).toFixed(0)} MiB at ${(bytes / MiB / (saveMs / 1000)).toFixed(0)} MiB/s, load at ${(bytes / MiB / (loadMs / 1000)).toFixed(0)} MiB/s`,
        );
        d.close();
        rmSync(local, { force: true });
        await dst.c.stop(2000);
      }
      await src.c.stop(2000);
    }
  }

  const m = (k: string) => median(res[k] ?? []);
  const rows: [string, string, string, string][] = [
    ['live migration', 'Ballast (hand-off)', 'nbdkit (none)', 'difference'],
    [
      'total, ms',
      m('ballast.total').toFixed(0),
      m('nbdkit.total').toFixed(0),
      `${(m('ballast.total') - m('nbdkit.total')).toFixed(0)} ms`,
    ],
    [
      'downtime STOP→RESUME, ms',
      m('ballast.downtime').toFixed(0),
      m('nbdkit.downtime').toFixed(0),
      `${(m('ballast.downtime') - m('nbdkit.downtime')).toFixed(0)} ms`,
    ],
    [
      "downtime (QEMU's), ms",
      m('ballast.qemuDowntime').toFixed(0),
      m('nbdkit.qemuDowntime').toFixed(0),
      `${(m('ballast.qemuDowntime') - m('nbdkit.qemuDowntime')).toFixed(0)} ms`,
    ],
    ['hand-off itself, ms', m('ballast.handoff').toFixed(1), '-', ''],
    ['suspend / resume', 'paging device', 'local file', 'ratio'],
    ...(['device', 'nbd'] as const).flatMap((w): [string, string, string, string][] => {
      const how = w === 'device' ? 'agent stream' : 'via NBD';
      const per256 = (k: string) => ((m(k) * 256 * MiB) / (memMiB * MiB)).toFixed(0);
      return [
        [
          `save (${how}), MiB/s`,
          m(`save.${w}`).toFixed(0),
          m('save.file').toFixed(0),
          `${(m(`save.${w}`) / m('save.file')).toFixed(2)}×`,
        ],
        [
          `load (${how}), MiB/s`,
          m(`load.${w}`).toFixed(0),
          m('load.file').toFixed(0),
          `${(m(`load.${w}`) / m('load.file')).toFixed(2)}×`,
        ],
        [
          `save (${how}), CPU ms per 256 MiB`,
          `suspend ${per256(`save.cpu.suspend.${w}`)} + agent ${per256(`save.cpu.agent.${w}`)}`,
          '(QEMU + cat)',
          '',
        ],
      ];
    }),
  ];
  const w = [0, 1, 2, 3].map((i) => Math.max(...rows.map((r) => (r[i] ?? '').length)));
  const line = (r: string[]) => `| ${r.map((c, i) => c.padEnd(w[i] as number)).join(' | ')} |`;
  const out = [
    `guest RAM ${memMiB} MiB (random), medians of ${rounds} rounds, QEMU TCG, one machine`,
    line(rows[0] as string[]),
    `|${w.map((x) => '-'.repeat(x + 2)).join('|')}|`,
    ...rows.slice(1).map(line),
  ].join('\n');
  process.stdout.write(`${out}\n`);
  mkdirSync(path.join(ROOT, 'bench-results'), { recursive: true });
  writeFileSync(
    path.join(ROOT, 'bench-results', 'migrate.json'),
    JSON.stringify({ memMiB, rounds, samples: res }, null, 2),
  );
  await etcd.stop();
}

main().then(
  () => process.exit(0),
  (e) => {
    process.stderr.write(`[bench:migrate] failed: ${(e as Error).stack ?? e}\n`);
    process.exit(1);
  },
);
