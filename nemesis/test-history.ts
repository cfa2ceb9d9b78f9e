// A recorded history around hand-made or generated operations, for the checkers'
// tests: one device `d` of one block, nothing injected, every agent converged.

import type { History, Op } from './history.js';

export function history(
  ops: Op[],
  final: Partial<History['final']> = {},
  conns: History['conns'] = [],
  more: Partial<Omit<History, 'ops' | 'conns' | 'final'>> = {},
): History {
  return {
    seed: 1,
    ops,
    conns,
    faults: [],
    prDevices: ['d'],
    blocks: 1,
    ...more,
    final: {
      agents: [],
      converged: true,
      audit: {},
      blocks: {},
      consumers: {},
      eventLog: [],
      compactions: [],
      ...final,
    },
  };
}
