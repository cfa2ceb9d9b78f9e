// Prometheus metrics (prom-client). The data path only bumps plain numbers in
// ExportStats; everything here is read at scrape time.

import client from 'prom-client';
import { cmdName } from '../nbd/protocol.js';
import type { NbdServer } from '../nbd/server.js';
import { LATENCY_BUCKETS, STAT_COMMANDS } from '../nbd/stats.js';
import type { DeviceManager } from './devices.js';
import type { Store } from './store/store.js';

const LATENCY_HELP = 'NBD request latency from header read to reply sent, per device and operation';
const OPS = Array.from({ length: STAT_COMMANDS }, (_, i) => cmdName(i).toLowerCase());

export interface MetricsOptions {
  store?: Pick<Store, 'revision'>;
  /** Receives the function the API calls once per answered request. */
  onApi?: (record: (method: string, route: string, status: number) => void) => void;
}

export function createMetrics(
  devices: DeviceManager,
  server: () => NbdServer | null,
  opts: MetricsOptions = {},
): client.Registry {
  const registry = new client.Registry();
  client.collectDefaultMetrics({ register: registry, prefix: 'ballast_' });

  const api = new client.Counter({
    name: 'ballast_api_requests_total',
    help: 'Management API requests answered, per method, route and HTTP status',
    labelNames: ['method', 'route', 'status'],
    registers: [registry],
  });
  opts.onApi?.((method, route, status) => api.inc({ method, route, status }));
  const store = opts.store;
  if (store) {
    new client.Gauge({
      name: 'ballast_store_revision',
      help: 'Revision of the local state store (moves on every change)',
      registers: [registry],
      async collect() {
        this.set(await store.revision());
      },
    });
  }
  new client.Gauge({
    name: 'ballast_device_problems',
    help: 'Problems found when reconciling the state with the files at start (see ballast status)',
    registers: [registry],
    collect() {
      this.set(devices.problems.length);
    },
  });

  const perDevice = (
    name: string,
    help: string,
    pick: (s: NonNullable<ReturnType<DeviceManager['statsOf']>>) => Float64Array,
  ): void => {
    new client.Counter({
      name,
      help,
      labelNames: ['device', 'op'],
      registers: [registry],
      collect() {
        this.reset();
        for (const d of devices.liveNames()) {
          const s = devices.statsOf(d);
          if (!s) continue;
          const arr = pick(s);
          for (let i = 0; i < STAT_COMMANDS; i++) {
            if (arr[i]! > 0) this.inc({ device: d, op: OPS[i]! }, arr[i]!);
          }
        }
      },
    });
  };
  perDevice(
    'ballast_nbd_requests_total',
    'NBD requests answered, per device and operation',
    (s) => s.requests,
  );
  perDevice('ballast_nbd_errors_total', 'NBD requests answered with an error', (s) => s.errors);
  perDevice(
    'ballast_nbd_refused_total',
    'NBD requests refused before reaching storage (validation)',
    (s) => s.refused,
  );
  perDevice(
    'ballast_nbd_denied_total',
    'NBD requests refused with EPERM by the reservation or access list (never reach storage)',
    (s) => s.denied,
  );
  perDevice('ballast_nbd_bytes_total', 'Bytes read or written by NBD requests', (s) => s.bytes);

  // The latency histogram is kept as bucket counts on the data path and
  // exposed here in Prometheus' cumulative form.
  registry.registerMetric({
    name: 'ballast_nbd_request_duration_seconds',
    help: LATENCY_HELP,
    type: 'histogram',
    aggregator: 'sum',
    get: async () => {
      const values: {
        labels: Record<string, string | number>;
        value: number;
        metricName: string;
      }[] = [];
      for (const d of devices.liveNames()) {
        const s = devices.statsOf(d);
        if (!s) continue;
        for (let i = 0; i < STAT_COMMANDS; i++) {
          if (s.requests[i] === 0) continue;
          const b = s.latency[i]!;
          let cum = 0;
          for (let k = 0; k < LATENCY_BUCKETS.length; k++) {
            cum += b[k]!;
            values.push({
              labels: { device: d, op: OPS[i]!, le: LATENCY_BUCKETS[k]! },
              value: cum,
              metricName: 'ballast_nbd_request_duration_seconds_bucket',
            });
          }
          cum += b[LATENCY_BUCKETS.length]!;
          values.push({
            labels: { device: d, op: OPS[i]!, le: '+Inf' },
            value: cum,
            metricName: 'ballast_nbd_request_duration_seconds_bucket',
          });
          values.push({
            labels: { device: d, op: OPS[i]! },
            value: s.latencySum[i]!,
            metricName: 'ballast_nbd_request_duration_seconds_sum',
          });
          values.push({
            labels: { device: d, op: OPS[i]! },
            value: cum,
            metricName: 'ballast_nbd_request_duration_seconds_count',
          });
        }
      }
      return {
        name: 'ballast_nbd_request_duration_seconds',
        help: LATENCY_HELP,
        type: 'histogram',
        values,
        aggregator: 'sum',
      };
    },
    reset: () => {},
  } as unknown as client.Metric);

  new client.Gauge({
    name: 'ballast_nbd_connections',
    help: 'Open NBD connections per device',
    labelNames: ['device'],
    registers: [registry],
    collect() {
      this.reset();
      for (const d of devices.liveNames())
        this.set({ device: d }, devices.statsOf(d)?.connections ?? 0);
    },
  });
  new client.Gauge({
    name: 'ballast_nbd_open_connections',
    help: 'Open NBD connections, handshakes included',
    registers: [registry],
    collect() {
      this.set(server()?.connections.size ?? 0);
    },
  });
  new client.Gauge({
    name: 'ballast_nbd_handshakes',
    help: 'NBD connections still in the handshake',
    registers: [registry],
    collect() {
      this.set(server()?.handshakes ?? 0);
    },
  });
  new client.Counter({
    name: 'ballast_nbd_closed_connections_total',
    help: 'NBD connections the server closed before they were served, by reason',
    labelNames: ['reason'],
    registers: [registry],
    collect() {
      const st = server()?.stats;
      this.reset();
      this.inc({ reason: 'handshake_timeout' }, st?.handshakeTimeouts ?? 0);
      this.inc({ reason: 'evicted' }, st?.handshakesEvicted ?? 0);
      this.inc({ reason: 'refused' }, st?.connectionsRefused ?? 0);
    },
  });
  new client.Gauge({
    name: 'ballast_device_size_bytes',
    help: 'Virtual size of each device',
    labelNames: ['device', 'role'],
    registers: [registry],
    collect() {
      this.reset();
      for (const v of devices.list()) this.set({ device: v.name, role: v.role }, v.size);
    },
  });
  new client.Gauge({
    name: 'ballast_device_allocated_bytes',
    help: 'Storage really used by each device (sparse files)',
    labelNames: ['device'],
    registers: [registry],
    collect() {
      this.reset();
      for (const v of devices.list()) this.set({ device: v.name }, v.allocatedBytes);
    },
  });
  const poolGauge = (
    name: string,
    help: string,
    key: 'capacityBytes' | 'provisionedBytes' | 'allocatedBytes' | 'limitBytes',
  ): void => {
    new client.Gauge({
      name,
      help,
      labelNames: ['pool', 'media'],
      registers: [registry],
      async collect() {
        this.reset();
        for (const p of await devices.poolStatus())
          this.set({ pool: p.name, media: p.media }, p[key]);
      },
    });
  };
  poolGauge(
    'ballast_pool_capacity_bytes',
    'Pool capacity (quota or filesystem size)',
    'capacityBytes',
  );
  poolGauge(
    'ballast_pool_limit_bytes',
    'Most that may be provisioned (capacity x overcommit)',
    'limitBytes',
  );
  poolGauge(
    'ballast_pool_provisioned_bytes',
    'Sum of device extent sizes in the pool',
    'provisionedBytes',
  );
  poolGauge(
    'ballast_pool_allocated_bytes',
    "Blocks really used by the pool's extents",
    'allocatedBytes',
  );
  return registry;
}
