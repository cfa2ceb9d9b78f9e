import { describe, expect, it } from 'vitest';
import { DEFAULT_LISTEN, parseConfig, watchedGuest } from './config.js';
import { loopGuard } from './daemon.js';

const bad = (text: string, msg: RegExp) =>
  expect(() => parseConfig(text)).toThrow(
    expect.objectContaining({ code: 'DUMP_BAD_CONFIG', message: expect.stringMatching(msg) }),
  );

describe('dumpd config', () => {
  it('reads guests with URIs or agent devices, defaults and overrides', () => {
    const c = parseConfig(`
defaults: { format: kdump-zlib, keep: 2 }
guests:
  - { name: a, qmp: /run/a.qmp, device: "nbd+unix:///a?socket=/s" }
  - { name: b, qmp: tcp:127.0.0.1:4444, agent: unix:/run/api.sock, agentDevice: b-dump, after: pause, format: elf, keep: 5, mode: early-reboot, streamMiBps: 40 }
`);
    expect(c.listen).toBe(DEFAULT_LISTEN);
    expect(c.dumpTimeoutMs).toBe(1_800_000);
    expect(c.guests).toEqual([
      {
        name: 'a',
        qmp: '/run/a.qmp',
        device: { uri: 'nbd+unix:///a?socket=/s' },
        format: 'kdump-zlib',
        after: 'reboot',
        keep: 2,
        mode: 'dump-then-reboot',
        streamMiBps: 0,
        loopLimit: { dumps: 3, minutes: 10 },
      },
      {
        name: 'b',
        qmp: 'tcp:127.0.0.1:4444',
        device: { agent: 'unix:/run/api.sock', device: 'b-dump' },
        format: 'elf',
        after: 'pause',
        keep: 5,
        mode: 'early-reboot',
        streamMiBps: 40,
        loopLimit: { dumps: 3, minutes: 10 },
      },
    ]);
  });

  it('reads libvirt guests: a connection URI instead of a QMP socket', () => {
    const c = parseConfig(`
guests:
  - { name: vm1, libvirt: "qemu:///system?socket=/tmp/x/libvirt-sock", agentDevice: vm1-dump }
  - { name: vm2, libvirt: true, device: "nbd+unix:///vm2-dump?socket=/run/ballast/nbd.sock" }
`);
    expect(c.guests[0]).toMatchObject({
      name: 'vm1',
      libvirt: 'qemu:///system?socket=/tmp/x/libvirt-sock',
    });
    expect(c.guests[0]?.qmp).toBeUndefined();
    expect(c.guests[1]).toMatchObject({ name: 'vm2', libvirt: 'qemu:///system', after: 'reboot' });
  });

  it('accepts JSON too', () => {
    expect(parseConfig('{"listen": "127.0.0.1:1", "guests": []}').listen).toBe('127.0.0.1:1');
  });

  it('refuses what it cannot use, naming the place', () => {
    bad('- 1', /must be a mapping/);
    bad('guests: [{ qmp: /q, device: nbd://h/ }]', /guests\[0\]: "name" is required/);
    bad('guests: [{ name: a, device: nbd://h/ }]', /give either "qmp" .* or "libvirt"/);
    bad('guests: [{ name: a, qmp: /q, libvirt: true, device: nbd://h/ }]', /either "qmp"/);
    bad('guests: [{ name: a, libvirt: vm1, device: nbd://h/ }]', /libvirt connection URI/);
    bad('guests: [{ name: a, qmp: /q }]', /either "device"/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, agentDevice: d }]', /either "device"/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, format: pdf }]', /format must be one of/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, after: explode }]', /after must be one of/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, keep: 0 }]', /keep must be/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, mode: later }]', /mode must be one of/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, format: migration }]', /format must be/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, streamMiBps: -1 }]', /streamMiBps/);
    bad('guests: [{ name: a, qmp: /q, device: nbd://h/, colour: red }]', /unknown key "colour"/);
    bad('guests: [{ name: "a b", qmp: /q, device: nbd://h/ }]', /bad guest name/);
    bad(
      'guests: [{ name: a, qmp: /q, device: nbd://h/ }, { name: a, qmp: /r, device: nbd://h/ }]',
      /listed twice/,
    );
    bad('watch: [{ dir: /run, device: nbd://h/x }]', /must contain \{guest\}/);
    bad('dumpTimeoutSeconds: -1', /dumpTimeoutSeconds/);
    bad('bogus: 1', /unknown key "bogus"/);
    bad('guests: [', /not YAML/);
  });

  it('maps watched sockets to guests', () => {
    const c = parseConfig(`
defaults: { after: none, mode: early-reboot }
watch:
  - { dir: /run/qemu/, device: "nbd+unix:///{guest}-dump?socket=/s", keep: 7 }
`);
    const w = c.watch[0];
    expect(w).toBeDefined();
    if (!w) return;
    expect(watchedGuest(w, 'web1.qmp', c.defaults)).toEqual({
      name: 'web1',
      qmp: '/run/qemu/web1.qmp',
      device: { uri: 'nbd+unix:///web1-dump?socket=/s' },
      format: 'elf',
      after: 'none',
      keep: 7,
      mode: 'early-reboot',
      streamMiBps: 0,
      loopLimit: { dumps: 3, minutes: 10 },
    });
    expect(watchedGuest(w, 'web1.sock', c.defaults)).toBeNull();
    expect(watchedGuest(w, '.qmp', c.defaults)).toBeNull();
  });
});

describe('papercuts found by a new user', () => {
  it('a per-guest tlsCerts is read (nbds:// dump devices)', () => {
    const c = parseConfig(`
guests:
  - { name: g1, qmp: /q.sock, device: "nbds://h:10809/g1-dump", tlsCerts: /etc/ballast/tls }
`);
    expect(c.guests[0]?.tlsCerts).toBe('/etc/ballast/tls');
  });

  it('a typo in a watch entry, or in defaults, is an error naming the key', () => {
    expect(() =>
      parseConfig('watch:\n  - { dir: /run/qemu, device: "nbd:///{guest}", sufix: .sock }\n'),
    ).toThrow(/watch\[0\]: unknown key "sufix"/);
    expect(() => parseConfig('defaults: { keeep: 3 }\n')).toThrow(/defaults: unknown key "keeep"/);
  });

  it('watch entries take agent and tokenFile; tokenFile needs agent', () => {
    const c = parseConfig(`
watch:
  - { dir: /run/qemu, agent: "http://127.0.0.1:10810", tokenFile: /t, device: "{guest}-dump" }
`);
    const g = watchedGuest(c.watch[0]!, 'vm1.qmp', c.defaults);
    expect(g?.device).toEqual({
      agent: 'http://127.0.0.1:10810',
      device: 'vm1-dump',
      tokenFile: '/t',
    });
    expect(() =>
      parseConfig('watch:\n  - { dir: /run/qemu, device: "nbd:///{guest}", tokenFile: /t }\n'),
    ).toThrow(/"tokenFile" goes with "agent"/);
  });

  it('loopLimit: 3 dumps in 10 minutes by default, settable, 0 turns it off', () => {
    expect(parseConfig('guests: []\n').defaults.loopLimit).toEqual({ dumps: 3, minutes: 10 });
    const c = parseConfig(`
defaults: { loopLimit: { dumps: 5, minutes: 30 } }
guests:
  - { name: g1, qmp: /q, device: "nbd:///x", loopLimit: { dumps: 0 } }
`);
    expect(c.defaults.loopLimit).toEqual({ dumps: 5, minutes: 30 });
    expect(c.guests[0]?.loopLimit).toEqual({ dumps: 0, minutes: 30 });
    expect(() => parseConfig('defaults: { loopLimit: { dumps: -1 } }\n')).toThrow(
      /loopLimit\.dumps/,
    );
    expect(() => parseConfig('defaults: { loopLimit: { count: 1 } }\n')).toThrow(
      /loopLimit: unknown key "count"/,
    );
  });
});

describe('the panic loop guard', () => {
  const guest = (after: 'reboot' | 'none', dumps = 3, minutes = 10) => ({
    cfg: {
      ...parseConfig(`guests: [{ name: g, qmp: /q, device: "nbd:///x", after: ${after} }]\n`)
        .guests[0]!,
      loopLimit: { dumps, minutes },
    },
    recentPanics: [] as number[],
  });

  it('reboots up to N times in M minutes, then pauses', () => {
    const st = guest('reboot');
    const log: string[] = [];
    const at = (min: number) => loopGuard(st, (m) => log.push(m), min * 60_000);
    expect([at(0), at(1), at(2)]).toEqual(['reboot', 'reboot', 'reboot']);
    expect(at(3)).toBe('pause');
    expect(log[0]).toMatch(/4 panics within 10 min .*pausing/);
    // Panics spread wider than the window reboot again.
    const slow = guest('reboot');
    expect([0, 6, 12, 18, 24].map((m) => loopGuard(slow, () => {}, m * 60_000))).toEqual([
      'reboot',
      'reboot',
      'reboot',
      'reboot',
      'reboot',
    ]);
  });

  it('leaves other policies and a zero limit alone', () => {
    const none = guest('none');
    for (let i = 0; i < 10; i++) expect(loopGuard(none, () => {}, i)).toBe('none');
    const off = guest('reboot', 0);
    for (let i = 0; i < 10; i++) expect(loopGuard(off, () => {}, i)).toBe('reboot');
  });
});
