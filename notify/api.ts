// The notification routes and metrics, mounted by the agent.

import client from 'prom-client';
import type { RouteSet } from '../agent/api.js';
import { BallastError } from '../agent/errors.js';
import type { Notifier } from './notifier.js';

export function notifyRoutes(n: Notifier): RouteSet {
  return (route) => [
    route('GET', '/v1/notify', async () => ({ recipients: await n.list() })),
    route('POST', '/v1/notify', async (_q, _p, body) => n.add(body)),
    route('DELETE', '/v1/notify/:name', async (_q, [name]) => {
      await n.remove(name!);
      return { deleted: name };
    }),
    route('POST', '/v1/notify/:name/test', async (_q, [name]) => n.test(name!)),
    route('POST', '/v1/events', async (_q, _p, body) => {
      // For the guest daemon and scripts: an event the agent records in the log for them.
      const kind = body.kind;
      if (kind !== 'dump.completed' && kind !== 'dump.failed' && kind !== 'memory.rebalanced') {
        throw new BallastError(
          'NOTIFY_BAD_TYPES',
          'only dump.completed, dump.failed and memory.rebalanced may be posted',
        );
      }
      const subject = typeof body.subject === 'string' ? body.subject : undefined;
      const data =
        typeof body.data === 'object' && body.data !== null
          ? (body.data as Record<string, unknown>)
          : {};
      n.emit(kind, subject, data);
      return { recorded: kind };
    }),
  ];
}

export function notifyMetrics(registry: client.Registry, n: Notifier): (kind: string) => void {
  const produced = new client.Counter({
    name: 'ballast_events_total',
    help: 'Configuration-change events seen in the store, by kind',
    labelNames: ['kind'],
    registers: [registry],
  });
  new client.Counter({
    name: 'ballast_notify_deliveries_total',
    help: 'Delivery attempts by recipient and outcome (delivered, failed, timeout, unreachable, throttled, gone)',
    labelNames: ['recipient', 'outcome'],
    registers: [registry],
    collect() {
      this.reset();
      for (const [k, v] of n.outcomes) {
        const [recipient, outcome] = k.split('\u0000');
        this.inc({ recipient: recipient!, outcome: outcome! }, v);
      }
    },
  });
  new client.Gauge({
    name: 'ballast_notify_recipient_lag_events',
    help: 'Events waiting to be delivered to a recipient (delivered by this agent)',
    labelNames: ['recipient'],
    registers: [registry],
    collect() {
      this.reset();
      for (const p of n.progress()) this.set({ recipient: p.name }, p.behind);
    },
  });
  new client.Gauge({
    name: 'ballast_notify_oldest_undelivered_seconds',
    help: 'How long the event a recipient has not yet acknowledged has been tried',
    labelNames: ['recipient'],
    registers: [registry],
    collect() {
      this.reset();
      for (const p of n.progress()) this.set({ recipient: p.name }, p.oldestUndeliveredSeconds);
    },
  });
  return (kind) => produced.inc({ kind });
}
