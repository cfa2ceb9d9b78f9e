// Guests that libvirt runs. libvirt holds QEMU's monitor, so dumpd goes through
// libvirt for everything (virsh, the maintained client; no binding):
//
//   panic     `virsh event --loop --event lifecycle` (one per connection) reports
//             "Crashed Panicked"; <on_crash>preserve</on_crash> keeps the domain
//             paused for dumpd instead of destroying it. A domain found crashed when
//             the connection (re)starts is handled the same way.
//   dump      `virsh dump DOMAIN FIFO --memory-only --format F`: libvirtd opens the
//             FIFO and hands it to QEMU; dumpd reads the other end onto the device.
//             A dump-guest-memory run through a second QMP monitor is no option:
//             Debian 12's libvirtd 9.0 dies (SIGSEGV) on the DUMP_COMPLETED event of
//             a dump it did not start.
//   after     reboot: virsh reset, then virsh resume if not running (a crashed domain
//             is paused); pause: virsh suspend if running; poweroff: virsh destroy.

import { type ChildProcess, execFile, spawn } from 'node:child_process';
import { EventEmitter } from 'node:events';
import { DumpError } from './catalog.js';
import type { After } from './config.js';

const TIMEOUT_MS = 30_000;

function virshEnv(): NodeJS.ProcessEnv {
  return { ...process.env, LC_ALL: 'C', LANG: 'C' };
}

/** Runs `virsh -c URI ARGS`; rejects with DUMP_LIBVIRT_FAILED and virsh's message. */
export function virsh(uri: string, args: string[], timeoutMs = TIMEOUT_MS): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      'virsh',
      ['-q', '-c', uri, ...args],
      { timeout: timeoutMs, env: virshEnv() },
      (err, stdout, stderr) => {
        if (!err) {
          resolve(stdout);
          return;
        }
        const why =
          (err as NodeJS.ErrnoException).code === 'ENOENT'
            ? 'virsh is not installed (apt-get install libvirt-clients)'
            : stderr.trim().replace(/\s+/g, ' ') || err.message;
        reject(new DumpError('DUMP_LIBVIRT_FAILED', `virsh ${args.join(' ')}: ${why}`));
      },
    );
  });
}

/** The domain's state word as virsh domstate prints it: running, paused, crashed... */
export async function domainState(uri: string, domain: string): Promise<string> {
  return (await virsh(uri, ['domstate', domain])).trim();
}

/** A memory-only dump of the domain into `file` (the FIFO dumpd reads), through libvirtd. */
export async function libvirtDump(
  uri: string,
  domain: string,
  file: string,
  format: string,
  timeoutMs: number,
): Promise<void> {
  await virsh(uri, ['dump', domain, file, '--memory-only', '--format', format], timeoutMs);
}

/**
 * What in a domain's XML keeps its panics from reaching dumpd: no panic device, an
 * `on_crash` other than preserve (libvirt destroys or restarts it first), or an ISA
 * panic device without ACPI (the guest finds that device only through ACPI).
 */
export function panicSetupProblems(xml: string): string[] {
  const out: string[] = [];
  const panic = /<panic\b[^>]*>/.exec(xml)?.[0];
  const model = panic && (/model=['"]([^'"]+)['"]/.exec(panic)?.[1] ?? 'isa');
  if (!panic) out.push("no <panic model='isa'/> device, so its panics will not be seen");
  else if (model === 'isa' && !/<acpi\s*\/?>/.test(xml))
    out.push('no <acpi/> in <features>: the guest never finds the ISA panic device');
  const onCrash = /<on_crash>\s*([\w-]+)\s*<\/on_crash>/.exec(xml)?.[1] ?? 'destroy';
  if (onCrash !== 'preserve')
    out.push(
      `<on_crash> is ${onCrash}: libvirt handles a panic before dumpd can dump it; set <on_crash>preserve</on_crash>`,
    );
  return out;
}

/** panicSetupProblems of the domain's definition; [] when libvirt cannot show it. */
export async function domainPanicProblems(uri: string, domain: string): Promise<string[]> {
  const xml = await virsh(uri, ['dumpxml', domain]).catch(() => '');
  return xml ? panicSetupProblems(xml) : [];
}

export async function libvirtAfter(uri: string, domain: string, after: After): Promise<void> {
  switch (after) {
    case 'none':
      return;
    case 'pause':
      if ((await domainState(uri, domain)) === 'running') await virsh(uri, ['suspend', domain]);
      return;
    case 'poweroff':
      await virsh(uri, ['destroy', domain]);
      return;
    case 'reboot':
      await virsh(uri, ['reset', domain]);
      if ((await domainState(uri, domain)) !== 'running') await virsh(uri, ['resume', domain]);
      return;
  }
}

/**
 * The lifecycle events of every domain on one libvirt connection, from a long-running
 * `virsh event --loop`. Emits 'up' once the connection answers (and after every
 * reconnect), 'down' when virsh ends, and 'lifecycle' (domain, event, detail) for
 * lines such as: event 'lifecycle' for domain 'vm1': Crashed Panicked
 */
export class LibvirtEvents extends EventEmitter {
  private child: ChildProcess | null = null;
  private stopped = false;
  private timer: NodeJS.Timeout | null = null;
  connected = false;

  constructor(
    readonly uri: string,
    private readonly opts: { retryMs?: number } = {},
  ) {
    super();
  }

  start(): void {
    if (this.stopped || this.child) return;
    const child = spawn('virsh', ['-c', this.uri, 'event', '--loop', '--event', 'lifecycle'], {
      env: virshEnv(),
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    let buf = '';
    let err = '';
    child.stdout?.setEncoding('utf8');
    child.stdout?.on('data', (d: string) => {
      buf += d;
      for (let nl = buf.indexOf('\n'); nl >= 0; nl = buf.indexOf('\n')) {
        const line = buf.slice(0, nl).trim();
        buf = buf.slice(nl + 1);
        const m = /^event 'lifecycle' for domain '(.+)': (\S+)(?: (\S+))?$/.exec(line);
        if (m) this.emit('lifecycle', m[1], m[2], m[3] ?? '');
      }
    });
    child.stderr?.on('data', (d: Buffer) => {
      err += d.toString();
    });
    child.on('error', (e) => {
      err += e.message;
    });
    child.once('close', () => {
      this.child = null;
      if (this.connected) {
        this.connected = false;
        this.emit('down', err.trim().replace(/\s+/g, ' '));
      }
      if (!this.stopped) this.timer = setTimeout(() => this.start(), this.opts.retryMs ?? 1000);
    });
    // virsh says nothing until an event comes: ask the connection separately.
    void virsh(this.uri, ['uri']).then(
      () => {
        if (this.child === child && !this.connected) {
          this.connected = true;
          this.emit('up');
        }
      },
      () => {},
    );
  }

  stop(): void {
    this.stopped = true;
    if (this.timer) clearTimeout(this.timer);
    this.child?.kill('SIGTERM');
  }
}
