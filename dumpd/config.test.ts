import { describe, expect, it } from 'vitest';
import { DEFAULT_LISTEN, parseConfig, watchedGuest } from './config.js';

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
      },
    ]);
  });

  it('accepts JSON too', () => {
    expect(parseConfig('{"listen": "127.0.0.1:1", "guests": []}').listen).toBe('127.0.0.1:1');
  });

  it('refuses what it cannot use, naming the place', () => {
    bad('- 1', /must be a mapping/);
    bad('guests: [{ qmp: /q, device: nbd://h/ }]', /guests\[0\]: "name" is required/);
    bad('guests: [{ name: a, device: nbd://h/ }]', /"qmp" is required/);
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
    });
    expect(watchedGuest(w, 'web1.sock', c.defaults)).toBeNull();
    expect(watchedGuest(w, '.qmp', c.defaults)).toBeNull();
  });
});
