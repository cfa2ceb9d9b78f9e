import { describe, expect, it } from 'vitest';
import { libvirtXml, qemuArgs } from '../agent/attach.js';
import { leaveOutArea } from './area.js';
import { movableLibvirt, movableQemuArgs } from './takeover.js';

describe('attach output for a guest that moves', () => {
  it('QEMU: the NBD client reconnects, a refused write pauses the guest', () => {
    const args = movableQemuArgs(qemuArgs('vm1-swap', { socket: '/run/b/nbd.sock' }));
    expect(args[1]).toMatch(/^driver=nbd,.*export=vm1-swap,reconnect-delay=60$/);
    expect(args[3]).toMatch(/^virtio-blk-pci,.*,werror=stop,rerror=stop$/);
    expect(movableQemuArgs(args)).toEqual(args); // once only
  });

  it('libvirt: one target per device and the stop error policy', () => {
    const x = movableLibvirt(libvirtXml('vm1-dump', { socket: '/run/b/nbd.sock' }), 2);
    expect(x).toContain("<target dev='vdd' bus='virtio'/>");
    expect(x).toContain("error_policy='stop' rerror_policy='stop'/>");
    expect(movableLibvirt(x, 2)).toBe(x);
  });

  it('--guest-ram: the paging device without its suspend area, still one that moves', () => {
    const area = { offset: 351 * 2 ** 20, end: 512 * 2 ** 20 - 4096, ramBytes: 128 * 2 ** 20 };
    const a = leaveOutArea(
      {
        device: 'vm1-swap',
        uri: 'nbd+unix:///vm1-swap?socket=/run/b/nbd.sock',
        qemu: qemuArgs('vm1-swap', { socket: '/run/b/nbd.sock' }),
        libvirt: libvirtXml('vm1-swap', { socket: '/run/b/nbd.sock' }),
      },
      area,
    );
    expect(a.suspendArea).toEqual(area);
    const args = movableQemuArgs(a.qemu);
    expect(args[0]).toBe('-blockdev');
    expect(args[1]).toMatch(/^driver=nbd,node-name=ballast-vm1-swap,.*,reconnect-delay=60$/);
    expect(args.slice(2, 4)).toEqual([
      '-blockdev',
      `driver=raw,node-name=ballast-vm1-swap-raw,file=ballast-vm1-swap,size=${area.offset}`,
    ]);
    expect(args[5]).toMatch(
      /^virtio-blk-pci,drive=ballast-vm1-swap-raw,.*,werror=stop,rerror=stop$/,
    );
    expect(movableLibvirt(a.libvirt, 0)).toContain(
      `<slices><slice type='storage' offset='0' size='${area.offset}'/></slices>`,
    );
    // no area: as it was
    const plain = { device: 'd', uri: 'u', qemu: ['-x'], libvirt: '<disk/>' };
    expect(leaveOutArea(plain, undefined)).toBe(plain);
  });
});
