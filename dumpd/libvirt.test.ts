import { describe, expect, it } from 'vitest';
import { panicSetupProblems } from './libvirt.js';

const domain = (features: string, onCrash: string, panic: string) => `<domain type='kvm'>
  <name>vm1</name>
  <os><type arch='x86_64' machine='pc'>hvm</type></os>
  ${features}
  ${onCrash}
  <devices>
    ${panic}
  </devices>
</domain>`;

describe('panicSetupProblems', () => {
  it('finds nothing wrong with the domain the README shows', () => {
    const xml = domain(
      '<features><acpi/><apic/></features>',
      '<on_crash>preserve</on_crash>',
      "<panic model='isa'>\n      <address type='isa' iobase='0x505'/>\n    </panic>",
    );
    expect(panicSetupProblems(xml)).toEqual([]);
  });

  it('names each thing that keeps a panic from dumpd, and what to set', () => {
    expect(panicSetupProblems(domain('<features><acpi/></features>', '', ''))).toEqual([
      "no <panic model='isa'/> device, so its panics will not be seen",
      '<on_crash> is destroy: libvirt handles a panic before dumpd can dump it; set <on_crash>preserve</on_crash>',
    ]);
    expect(
      panicSetupProblems(domain('', '<on_crash>restart</on_crash>', "<panic model='isa'/>")),
    ).toEqual([
      'no <acpi/> in <features>: the guest never finds the ISA panic device',
      '<on_crash> is restart: libvirt handles a panic before dumpd can dump it; set <on_crash>preserve</on_crash>',
    ]);
  });

  it('does not ask for ACPI for a PCI panic device', () => {
    const xml = domain('', '<on_crash>preserve</on_crash>', "<panic model='pvpanic'/>");
    expect(panicSetupProblems(xml)).toEqual([]);
  });
});
