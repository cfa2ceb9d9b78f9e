// `ballast notify add|ls|rm|test` (recipients of configuration-change events)
// and `ballast events` (the event log, or a live stream of it).

import { readFileSync } from 'node:fs';
import type { Command } from 'commander';
import { AgentError, Client } from '../agent/api-client.js';
import { EVENT_KINDS, parseTypes } from '../notify/events.js';
import { type Common, client, json, out, table, withCommon } from './manage.js';

interface RecipientView {
  name: string;
  url: string;
  types: string;
  signed: boolean;
  cursor: string | null;
  deliveredBy: string | null;
  lastError: string | null;
  disabled?: { reason: string; at: string };
}

function checkTypes(spec: string | undefined): void {
  try {
    parseTypes(spec);
  } catch (e) {
    throw new AgentError('NOTIFY_BAD_TYPES', (e as Error).message);
  }
}

export function registerNotify(program: Command): void {
  const notify = program
    .command('notify')
    .summary('recipients of configuration-change events (CloudEvents over HTTP POST)')
    .description(
      'Register HTTP endpoints that get every configuration change they ask for — devices ' +
        'created, resized, attached; tier changes; reservations; members joining, leaving, ' +
        'fenced; pools full; dumps — as CloudEvents 1.0 (structured JSON), signed with ' +
        'HMAC-SHA256 (header X-Ballast-Signature: sha256=HEX) when a secret is given. Delivery ' +
        'is at least once, in event-id order, resumed after restarts from a cursor in the store; ' +
        'receivers de-duplicate by id. A 410 Gone answer disables the recipient.\n\n' +
        `Event types: ${EVENT_KINDS.join(', ')}`,
    );
  withCommon(
    notify
      .command('add')
      .description('register a recipient; it hears of what happens from now on')
      .argument('<NAME>')
      .requiredOption('-u, --url <URL>', 'http:// or https:// endpoint')
      .option('-t, --types <LIST>', "comma-separated types, * wildcards: 'device.*,tier.changed'")
      .option(
        '--secret-file <FILE>',
        "HMAC key to sign each body with: the file's text without surrounding whitespace (its newline), at least 16 characters",
      ),
  ).action(
    async (name: string, o: Common & { url: string; types?: string; secretFile?: string }) => {
      checkTypes(o.types);
      let secret: string | undefined;
      if (o.secretFile) {
        try {
          secret = readFileSync(o.secretFile, 'utf8').trim();
        } catch (e) {
          throw new AgentError('NOTIFY_BAD_SECRET', unreadableSecret(o.secretFile, e));
        }
      }
      const r = (await client(o).request('POST', '/v1/notify', {
        name,
        url: o.url,
        types: o.types ?? '',
        ...(secret !== undefined ? { secret } : {}),
      })) as RecipientView;
      if (o.json) return json(r);
      out(
        `added recipient ${r.name}: ${r.url} (${r.types || 'every type'}${r.signed ? ', signed' : ''})`,
      );
    },
  );
  withCommon(notify.command('ls').description('the recipients, their cursor and state')).action(
    async (o: Common) => {
      const r = (await client(o).request('GET', '/v1/notify')) as { recipients: RecipientView[] };
      if (o.json) return json(r);
      out(
        table(
          ['NAME', 'URL', 'TYPES', 'STATE', 'CURSOR', 'BY', 'LAST ERROR'],
          r.recipients.map((x) => [
            x.name,
            x.url,
            x.types || '*',
            x.disabled ? `disabled (${x.disabled.reason})` : 'active',
            x.cursor ?? '-',
            x.deliveredBy ?? '-',
            x.lastError ?? '-',
          ]),
        ),
      );
    },
  );
  withCommon(notify.command('rm').description('remove a recipient').argument('<NAME>')).action(
    async (name: string, o: Common) => {
      const r = await client(o).request('DELETE', `/v1/notify/${encodeURIComponent(name)}`);
      if (o.json) return json(r);
      out(`removed recipient ${name}`);
    },
  );
  withCommon(
    notify.command('test').description('send a test event to a recipient now').argument('<NAME>'),
  ).action(async (name: string, o: Common) => {
    const r = (await client(o).request('POST', `/v1/notify/${encodeURIComponent(name)}/test`)) as {
      outcome: string;
      error?: string;
      id: string;
    };
    if (o.json) return json(r);
    out(`${name}: test event ${r.id}: ${r.outcome}${r.error ? ` (${r.error})` : ''}`);
    if (r.outcome !== 'delivered') process.exitCode = 1;
  });

  withCommon(
    program
      .command('events')
      .summary('the configuration-change event log, or a live stream of it')
      .description(
        "Print the events still in the store's history (or those after --since). With " +
          '--follow keep printing new ones, from now on unless --since says from where, resuming ' +
          'after a lost connection from the last id seen.',
      )
      .option('-f, --follow', 'keep printing events as they happen')
      .option('--since <ID>', 'only events after this id')
      .option('-t, --types <LIST>', "comma-separated types, * wildcards: 'device.*,tier.changed'"),
  ).action(async (o: Common & { follow?: boolean; since?: string; types?: string }) => {
    checkTypes(o.types);
    const c = new Client({ agent: o.agent, tokenFile: o.tokenFile });
    const q = new URLSearchParams();
    if (o.follow) q.set('follow', '1');
    if (o.types) q.set('types', o.types);
    const sse = new SseReader(o.since);
    // As a browser's EventSource: after a lost connection, wait (the agent's `retry:`,
    // doubled while reconnecting fails, up to 30 s), then ask again with Last-Event-ID.
    let failures = 0;
    for (;;) {
      const headers: Record<string, string> = sse.lastId ? { 'last-event-id': sse.lastId } : {};
      let reason: string;
      const before = sse.events;
      try {
        await c.stream(
          `/v1/events?${q}`,
          headers,
          (t) => {
            for (const ev of sse.push(t)) print(ev, o.json === true);
          },
          () => {
            if (failures > 0) {
              process.stderr.write(
                `ballast events: reconnected${sse.lastId ? `, resuming after event ${sse.lastId}` : ''}\n`,
              );
            }
          },
        );
        if (!o.follow) return;
        reason = 'the agent ended the stream';
      } catch (e) {
        if (!o.follow || !retryable(e)) throw e;
        reason = (e as Error).message;
      }
      sse.reset();
      failures = sse.events > before ? 1 : failures + 1;
      const full = Math.min(30_000, sse.retryMs * 2 ** Math.min(failures - 1, 10));
      const wait = full / 2 + Math.random() * (full / 2);
      process.stderr.write(
        `ballast events: ${reason}; reconnecting in ${(wait / 1000).toFixed(1)} s` +
          `${sse.lastId ? ` from event ${sse.lastId}` : ''}\n`,
      );
      await new Promise((r) => setTimeout(r, wait));
    }
  });
}

/** Worth reconnecting after: the agent away or overloaded, not a refusal of the request. */
function retryable(e: unknown): boolean {
  if (!(e instanceof AgentError)) return false;
  return e.exitCode === 3 || (e.status !== undefined && e.status >= 500) || e.status === 429;
}

interface StreamedEvent {
  id: string;
  time: string;
  type: string;
  subject?: string;
  source: string;
  data: unknown;
}

function print(ev: StreamedEvent, asJson: boolean): void {
  if (asJson) out(JSON.stringify(ev));
  else {
    out(
      `${ev.id.padEnd(8)} ${ev.time}  ${ev.type.replace(/^io\.ballast\./, '').padEnd(20)} ${(ev.subject ?? '-').padEnd(16)} ${ev.source}  ${JSON.stringify(ev.data)}`,
    );
  }
}

/**
 * Server-Sent Events as EventSource reads them: `id:` sets the last event id
 * (also in a block without data), `retry:` the reconnection delay, `data:` lines
 * make the event, comments (`:`) are skipped.
 */
export class SseReader {
  lastId: string | undefined;
  retryMs = 1000;
  /** Events read so far, over every connection. */
  events = 0;
  private buf = '';

  constructor(lastId?: string) {
    this.lastId = lastId;
  }

  /** A new connection: what was left of a block on the old one is dropped. */
  reset(): void {
    this.buf = '';
  }

  push(text: string): StreamedEvent[] {
    this.buf += text.replace(/\r\n?/g, '\n');
    const got: StreamedEvent[] = [];
    for (let i = this.buf.indexOf('\n\n'); i >= 0; i = this.buf.indexOf('\n\n')) {
      const block = this.buf.slice(0, i);
      this.buf = this.buf.slice(i + 2);
      const data: string[] = [];
      for (const line of block.split('\n')) {
        if (line === '' || line.startsWith(':')) continue;
        const colon = line.indexOf(':');
        const field = colon < 0 ? line : line.slice(0, colon);
        let value = colon < 0 ? '' : line.slice(colon + 1);
        if (value.startsWith(' ')) value = value.slice(1);
        if (field === 'data') data.push(value);
        else if (field === 'id' && !value.includes('\0')) this.lastId = value;
        else if (field === 'retry' && /^\d+$/.test(value)) this.retryMs = Number(value);
      }
      if (data.length === 0) continue;
      const ev = JSON.parse(data.join('\n')) as StreamedEvent;
      this.events++;
      got.push(ev);
    }
    return got;
  }
}

/** Why a secret file could not be read, and how to make one. */
export function unreadableSecret(file: string, e: unknown): string {
  const code = (e as NodeJS.ErrnoException).code;
  const why =
    code === 'ENOENT'
      ? 'it does not exist'
      : code === 'EACCES'
        ? 'permission denied'
        : code === 'EISDIR'
          ? 'it is a directory'
          : (e as Error).message;
  return (
    `cannot read the secret file ${file}: ${why}; make one readable by its owner only, e.g. ` +
    `install -d -m 0700 "$(dirname ${file})" && (umask 077; head -c 32 /dev/urandom | base64 > ${file})`
  );
}
