import { describe, expect, it } from 'vitest';
import {
  diskSerial,
  libvirtXml,
  nextTarget,
  targetOrder,
  validTarget,
  virshAttach,
} from './attach.js';

describe("a guest's devices at once", () => {
  it('get targets in the order the guest kernel names disks', () => {
    expect(nextTarget('vdb')).toBe('vdc');
    expect(nextTarget('vdz')).toBe('vdaa');
    expect(nextTarget('vdaz')).toBe('vdba');
    expect(nextTarget('vdzz')).toBe('vdaaa');
    expect(validTarget('vdb')).toBe(true);
    expect(validTarget('sdb')).toBe(false);
    expect(validTarget("vd'")).toBe(false);
  });

  it('paging first, then dump, then the others, each by name', () => {
    const order = targetOrder([
      { name: 'z-data', role: 'data' },
      { name: 'b-dump', role: 'dump' },
      { name: 'a-data', role: 'data' },
      { name: 'c-swap', role: 'paging' },
    ]).map((d) => d.name);
    expect(order).toEqual(['c-swap', 'b-dump', 'a-data', 'z-data']);
  });

  it("names each disk by its device (virtio-blk's serial, 20 bytes at most)", () => {
    expect(diskSerial('swap-vm1')).toBe('swap-vm1');
    expect(diskSerial('a-very-long-device-name-indeed')).toBe('a-very-long-device-n');
    expect(
      libvirtXml('swap-vm1', { socket: '/run/ballast/nbd.sock' }, { target: 'vdc' }),
    ).toContain("<target dev='vdc' bus='virtio'/>\n  <serial>swap-vm1</serial>");
  });

  it('virsh: one attach-device per disk, each fed by its own here-document', () => {
    const out = virshAttach("vm'1", ['<disk>a</disk>', '<disk>b</disk>']);
    expect(out.split('\n')).toEqual([
      `virsh attach-device 'vm'\\''1' /dev/stdin --live --persistent <<'BALLAST_DISK'`,
      '<disk>a</disk>',
      'BALLAST_DISK',
      `virsh attach-device 'vm'\\''1' /dev/stdin --live --persistent <<'BALLAST_DISK_2'`,
      '<disk>b</disk>',
      'BALLAST_DISK_2',
    ]);
  });
});
