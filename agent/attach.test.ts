import { describe, expect, it } from 'vitest';
import {
  diskSerial,
  guestPart,
  libvirtSlice,
  libvirtXml,
  nextTarget,
  qemuArgs,
  targetOrder,
  validTarget,
  virshAttach,
} from './attach.js';

const MiB = 1024 * 1024;

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

describe('the part of a paging device before its suspend area', () => {
  const ep = { socket: '/run/ballast/nbd.sock' };

  it('QEMU: a raw node with size= over the NBD node, the -device on it', () => {
    expect(guestPart('swap-vm1', qemuArgs('swap-vm1', ep), 368050176)).toEqual([
      '-blockdev',
      'driver=nbd,node-name=ballast-swap-vm1,server.type=unix,server.path=/run/ballast/nbd.sock,export=swap-vm1',
      '-blockdev',
      'driver=raw,node-name=ballast-swap-vm1-raw,file=ballast-swap-vm1,size=368050176',
      '-device',
      'virtio-blk-pci,drive=ballast-swap-vm1-raw,id=ballast-swap-vm1-dev,serial=swap-vm1',
    ]);
  });

  it('QEMU over TLS: the credentials object stays first', () => {
    const args = guestPart(
      'swap-vm1',
      qemuArgs('swap-vm1', { tcp: { host: '10.0.0.1', port: 10809 } }, { dir: '/etc/pki/qemu' }),
      MiB,
    );
    expect(args[0]).toBe('-object');
    expect(args.filter((a) => a === '-blockdev')).toHaveLength(2);
    expect(args[args.length - 1]).toMatch(/^virtio-blk-pci,drive=ballast-swap-vm1-raw,/);
  });

  it('libvirt: a storage slice in the <source>', () => {
    const xml = libvirtSlice(libvirtXml('swap-vm1', ep), 368050176);
    expect(xml).toContain(
      [
        "    <host transport='unix' socket='/run/ballast/nbd.sock'/>",
        "    <slices><slice type='storage' offset='0' size='368050176'/></slices>",
        '  </source>',
      ].join('\n'),
    );
  });
});
