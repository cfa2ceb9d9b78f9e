// What `ballast attach --format qemu` prints works as printed: qemu-img and
// qemu-io open the device through the -blockdev options, and QEMU itself
// starts with the printed arguments (frozen with -S), after which QMP
// query-block shows the virtio disk on the agent's export.

import { spawn } from 'node:child_process';
import net from 'node:net';
import path from 'node:path';
import { afterAll, beforeAll, expect, it } from 'vitest';
import { type AgentHandle, startAgent } from '../helpers/agent.js';
import { MiB } from '../helpers/server.js';
import { makePki, type Pki } from '../helpers/tls.js';
import { describeRun, describeWithTools, run, runOk, toolEnv } from '../helpers/tools.js';

/** The printed line as argv (the values never need quoting). */
function argv(line: string): string[] {
  return line.trim().split(/\s+/);
}

/** The value of -blockdev in printed QEMU arguments. */
function blockdev(args: string[]): string {
  const i = args.indexOf('-blockdev');
  expect(i).toBeGreaterThanOrEqual(0);
  return args[i + 1]!;
}

/** A minimal QMP client: greeting, capabilities, then one command per call. */
class Qmp {
  private buf = '';
  private waiters: ((msg: Record<string, unknown>) => void)[] = [];
  private constructor(private readonly sock: net.Socket) {
    sock.setEncoding('utf8');
    sock.on('data', (d: string) => {
      this.buf += d;
      for (let nl = this.buf.indexOf('\n'); nl >= 0; nl = this.buf.indexOf('\n')) {
        const line = this.buf.slice(0, nl).trim();
        this.buf = this.buf.slice(nl + 1);
        if (!line) continue;
        const msg = JSON.parse(line) as Record<string, unknown>;
        if ('event' in msg) continue;
        this.waiters.shift()?.(msg);
      }
    });
  }

  static async connect(socketPath: string): Promise<Qmp> {
    for (let i = 0; ; i++) {
      try {
        const sock = await new Promise<net.Socket>((resolve, reject) => {
          const s = net.connect(socketPath);
          s.once('connect', () => resolve(s));
          s.once('error', reject);
        });
        const q = new Qmp(sock);
        const greeting = await q.next();
        expect(greeting).toHaveProperty('QMP');
        await q.execute('qmp_capabilities');
        return q;
      } catch (e) {
        if (i > 200) throw e;
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  private next(): Promise<Record<string, unknown>> {
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async execute(cmd: string): Promise<unknown> {
    const reply = this.next();
    this.sock.write(`${JSON.stringify({ execute: cmd })}\n`);
    const r = await reply;
    if ('error' in r) throw new Error(`${cmd}: ${JSON.stringify(r.error)}`);
    return r.return;
  }

  close(): void {
    this.sock.destroy();
  }
}

describeWithTools(
  ['qemu-img', 'qemu-io', 'qemu-system-x86_64'],
  'ballast attach: the printed QEMU arguments work',
  () => {
    let agent: AgentHandle;

    beforeAll(async () => {
      agent = await startAgent({ nbd: { identities: ['127.0.0.1=local'] } });
      const r = await agent.cli(
        'device',
        'create',
        'swap-vm1',
        '--size',
        '32M',
        '--role',
        'paging',
        '--guest',
        'vm1',
      );
      expect(r.code, describeRun(r)).toBe(0);
    });

    afterAll(async () => {
      if (agent) expect(await agent.stop()).toBe(0);
    });

    for (const transport of ['unix', 'tcp'] as const) {
      it(`qemu-img and qemu-io open the device through the printed -blockdev (${transport})`, async () => {
        const r = await agent.cli(
          'attach',
          'swap-vm1',
          '--format',
          'qemu',
          '--transport',
          transport,
        );
        expect(r.code, describeRun(r)).toBe(0);
        const opts = blockdev(argv(r.stdout));
        expect(opts).toContain(
          transport === 'unix' ? 'server.type=unix' : `server.port=${agent.nbdPort}`,
        );
        const info = await runOk('qemu-img', ['info', '--output=json', '--image-opts', opts]);
        expect(JSON.parse(info.stdout)['virtual-size']).toBe(32 * MiB);
        const pattern = transport === 'unix' ? '0x71' : '0x72';
        const io = await runOk('qemu-io', [
          '--image-opts',
          opts,
          '-c',
          `write -P ${pattern} 1M 2M`,
          '-c',
          `read -P ${pattern} 1M 2M`,
          '-c',
          'read -P 0 0 1M',
        ]);
        expect(io.stdout).toContain('wrote 2097152/2097152 bytes at offset 1048576');
        expect(io.stdout + io.stderr).not.toMatch(/Pattern verification failed|failed:/);
      });
    }

    it('qemu-system-x86_64 -S starts with the printed arguments; query-block shows the disk', async () => {
      const r = await agent.cli('attach', 'swap-vm1', '--format', 'qemu');
      expect(r.code, describeRun(r)).toBe(0);
      const printed = argv(r.stdout);
      const qmpSock = path.join(agent.dir, 'qmp.sock');
      const qemu = spawn(
        'qemu-system-x86_64',
        [
          '-S',
          '-nodefaults',
          '-display',
          'none',
          '-machine',
          'pc,accel=tcg',
          '-m',
          '64',
          '-qmp',
          `unix:${qmpSock},server=on,wait=off`,
          ...printed,
        ],
        { env: toolEnv(), stdio: ['ignore', 'pipe', 'pipe'] },
      );
      let err = '';
      qemu.stderr.on('data', (b: Buffer) => {
        err += b.toString();
      });
      const exited = new Promise<number | null>((res) => qemu.once('exit', (c) => res(c)));
      let qmp: Qmp | undefined;
      try {
        qmp = await Promise.race([
          Qmp.connect(qmpSock),
          exited.then((c) => {
            throw new Error(`qemu exited (${c}):\n${err}`);
          }),
        ]);
        const status = (await qmp.execute('query-status')) as { status: string };
        expect(status.status).toBe('prelaunch');
        const blocks = (await qmp.execute('query-block')) as {
          qdev?: string;
          inserted?: { 'node-name': string; image: { filename: string; 'virtual-size': number } };
        }[];
        const disk = blocks.find((b) => b.inserted?.['node-name'] === 'ballast-swap-vm1');
        expect(disk, JSON.stringify(blocks)).toBeDefined();
        expect(disk!.qdev).toContain('ballast-swap-vm1-dev');
        expect(disk!.inserted!.image['virtual-size']).toBe(32 * MiB);
        expect(disk!.inserted!.image.filename).toContain('swap-vm1');
        // The agent sees QEMU's connection to the device.
        const d = JSON.parse((await agent.cli('device', 'show', 'swap-vm1', '--json')).stdout);
        expect(d.connections).toBe(1);
        await qmp.execute('quit');
        expect(await exited).toBe(0);
      } finally {
        qmp?.close();
        qemu.kill('SIGKILL');
      }
    });

    it('the NBD URI printed by --format uri works with qemu-img', async () => {
      for (const t of ['unix', 'tcp']) {
        const u = await agent.cli('attach', 'swap-vm1', '--format', 'uri', '--transport', t);
        expect(u.code, describeRun(u)).toBe(0);
        const info = await run('qemu-img', ['info', '--output=json', u.stdout.trim()]);
        expect(info.code, describeRun(info)).toBe(0);
        expect(JSON.parse(info.stdout)['virtual-size']).toBe(32 * MiB);
      }
    });
  },
);

describeWithTools(
  ['virt-xml-validate', 'xmllint'],
  "ballast attach --format libvirt: a <disk> libvirt's schema accepts",
  () => {
    let agent: AgentHandle;

    beforeAll(async () => {
      agent = await startAgent({ nbd: { identities: ['127.0.0.1=local'] } });
      const r = await agent.cli('device', 'create', 'dump-vm1', '--size', '8M', '--role', 'dump');
      expect(r.code, describeRun(r)).toBe(0);
    });

    afterAll(async () => {
      if (agent) expect(await agent.stop()).toBe(0);
    });

    for (const transport of ['unix', 'tcp'] as const) {
      it(`validates inside a domain (${transport})`, async () => {
        const r = await agent.cli(
          'attach',
          'dump-vm1',
          '--format',
          'libvirt',
          '--transport',
          transport,
        );
        expect(r.code, describeRun(r)).toBe(0);
        expect(r.stdout).toContain(
          transport === 'unix'
            ? `<host transport='unix' socket='${agent.nbdSocket}'/>`
            : `<host name='127.0.0.1' port='${agent.nbdPort}'/>`,
        );
        const file = path.join(agent.dir, `domain-${transport}.xml`);
        const { writeFileSync } = await import('node:fs');
        writeFileSync(
          file,
          [
            "<domain type='kvm'>",
            '  <name>vm1</name>',
            "  <memory unit='MiB'>64</memory>",
            "  <os><type arch='x86_64'>hvm</type></os>",
            '  <devices>',
            r.stdout.trim(),
            '  </devices>',
            '</domain>',
            '',
          ].join('\n'),
        );
        const v = await run('virt-xml-validate', [file, 'domain']);
        expect(v.code, describeRun(v)).toBe(0);
        expect(v.stdout + v.stderr).toContain('validates');
      });
    }
  },
);

describeWithTools(
  ['qemu-img', 'nbdinfo', 'openssl'],
  'ballast attach --transport tcp: what the agent takes over TCP, judged by qemu-img',
  () => {
    let plain: AgentHandle;
    let tls: AgentHandle;
    let pki: Pki;

    beforeAll(async () => {
      plain = await startAgent();
      pki = await makePki(path.join(plain.dir, 'pki'), ['vm1']);
      tls = await startAgent({
        nbd: { tls: { mode: 'require', cert: pki.serverCert, key: pki.serverKey, ca: pki.caCert } },
      });
      for (const a of [plain, tls]) {
        const r = await a.cli('device', 'create', 'swap-vm1', '--size', '16M');
        expect(r.code, describeRun(r)).toBe(0);
      }
    });

    afterAll(async () => {
      for (const a of [plain, tls]) if (a) expect(await a.stop()).toBe(0);
    });

    it('anonymous TCP clients refused: stderr says what to configure; QEMU is indeed refused', async () => {
      const r = await plain.cli('attach', 'swap-vm1', '--transport', 'tcp');
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stderr).toMatch(/refuses anonymous TCP clients \(nbd\.anonymous: unix\)/);
      expect(r.stderr).toMatch(/nbd\.identities: \["ADDRESS=NAME"\]/);
      expect(r.stderr).toMatch(/nbd\.anonymous: any/);
      const info = await run('qemu-img', ['info', '--image-opts', blockdev(argv(r.stdout))]);
      expect(info.code).not.toBe(0);
      expect(info.stderr).toMatch(/Denied by server for option 7/);
      // over the Unix socket nothing needs saying
      const unix = await plain.cli('attach', 'swap-vm1');
      expect(unix.stderr).toBe('');
      const json = await plain.cli('attach', 'swap-vm1', '--transport', 'tcp', '--json');
      expect(JSON.parse(json.stdout).note).toMatch(/refuses anonymous TCP clients/);
    });

    it('TLS by certificate configured: the TLS variant is printed, and works with the credentials where it says', async () => {
      const r = await tls.cli('attach', 'swap-vm1', '--transport', 'tcp');
      expect(r.code, describeRun(r)).toBe(0);
      expect(r.stderr).toMatch(/TLS certificate .*\/etc\/pki\/qemu/);
      const args = argv(r.stdout);
      const obj = args[args.indexOf('-object') + 1]!;
      expect(obj).toMatch(/^tls-creds-x509,id=[^,]+,dir=\/etc\/pki\/qemu,endpoint=client$/);
      const opts = blockdev(args);
      expect(opts).toMatch(/,tls-creds=/);
      // the client's credentials live elsewhere here: only dir= changes
      const dir = pki.clients.get('vm1')!;
      const mine = obj.replace('dir=/etc/pki/qemu', `dir=${dir}`);
      const info = await run('qemu-img', [
        'info',
        '--output=json',
        '--object',
        mine,
        '--image-opts',
        opts,
      ]);
      expect(info.code, describeRun(info)).toBe(0);
      expect(JSON.parse(info.stdout)['virtual-size']).toBe(16 * MiB);
      // and as printed without its credentials, refused
      const bare = await run('qemu-img', [
        'info',
        '--image-opts',
        opts.replace(/,tls-creds=[^,]+/, ''),
      ]);
      expect(bare.code).not.toBe(0);
      const uri = await tls.cli('attach', 'swap-vm1', '--transport', 'tcp', '--format', 'uri');
      expect(uri.stdout.trim()).toMatch(/^nbds:\/\/.*\?tls-certificates=\/etc\/pki\/qemu$/);
      const size = await run('nbdinfo', [
        '--size',
        uri.stdout.trim().replace('/etc/pki/qemu', dir),
      ]);
      expect(size.code, describeRun(size)).toBe(0);
      expect(size.stdout.trim()).toBe(String(16 * MiB));
      const xml = await tls.cli('attach', 'swap-vm1', '--transport', 'tcp', '--format', 'libvirt');
      expect(xml.stdout).toContain(`<source protocol='nbd' name='swap-vm1' tls='yes'>`);
    });
  },
);
