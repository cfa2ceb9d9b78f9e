// Per-export counters kept as plain numbers on the data path; whoever exports
// metrics reads them at scrape time. Recording costs a few array increments.

/** Upper bounds of the latency buckets, in seconds. */
export const LATENCY_BUCKETS = [
  0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
];

/** Commands are numbered 0..7 on the wire; one slot each. */
export const STAT_COMMANDS = 8;

export class ExportStats {
  readonly requests = new Float64Array(STAT_COMMANDS);
  readonly errors = new Float64Array(STAT_COMMANDS);
  readonly bytes = new Float64Array(STAT_COMMANDS);
  /** Refused before reaching the backend (validation, policy). */
  readonly refused = new Float64Array(STAT_COMMANDS);
  /** Of those, refused by the export's access control (EPERM). */
  readonly denied = new Float64Array(STAT_COMMANDS);
  /** Per command: one count per bucket (not cumulative) plus +Inf at the end. */
  readonly latency: Float64Array[] = [];
  readonly latencySum = new Float64Array(STAT_COMMANDS);
  connections = 0;
  /** Told after each change of `connections` (the owner's first/last client events). */
  onConnections?: (connections: number, delta: 1 | -1) => void;

  constructor() {
    for (let i = 0; i < STAT_COMMANDS; i++) {
      this.latency.push(new Float64Array(LATENCY_BUCKETS.length + 1));
    }
  }

  record(cmd: number, bytes: number, failed: boolean, seconds: number): void {
    const c = cmd & 7;
    this.requests[c]!++;
    if (failed) this.errors[c]!++;
    else this.bytes[c]! += bytes;
    this.latencySum[c]! += seconds;
    let i = 0;
    while (i < LATENCY_BUCKETS.length && seconds > LATENCY_BUCKETS[i]!) i++;
    this.latency[c]![i]!++;
  }
}
