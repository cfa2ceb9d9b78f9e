import { describe, expect, it } from 'vitest';
import type { KeyValue, WatchEvent } from '../agent/store/store.js';
import {
  cloudEvent,
  parseEventId,
  parseTypes,
  previousLost,
  sign,
  TIME_GRACE_MS,
  TIMES,
  Translator,
  timePrunable,
} from './events.js';
import { tierChanges, tierOf } from './tier.js';

let rev = 10;
function kv(key: string, value: unknown, modRevision = rev): KeyValue {
  return {
    key,
    value: typeof value === 'string' ? value : JSON.stringify(value),
    createRevision: 1,
    modRevision,
    version: 1,
  };
}
function put(key: string, value: unknown, prev?: unknown): WatchEvent {
  rev++;
  return {
    type: 'put',
    kv: kv(key, value, rev),
    ...(prev !== undefined ? { prevKv: kv(key, prev, rev - 1) } : {}),
    revision: rev,
  };
}
function del(key: string, prev: unknown): WatchEvent {
  rev++;
  return {
    type: 'delete',
    kv: { key, value: '', createRevision: 0, modRevision: rev, version: 0 },
    prevKv: kv(key, prev, rev - 1),
    revision: rev,
  };
}
const dev = (over: Record<string, unknown> = {}) => ({
  name: 'd1',
  size: 1024,
  role: 'paging',
  guest: 'vm1',
  extents: [{ pool: 'p', file: '/p/d1.img', size: 1024 }],
  state: 'ready',
  by: 'a',
  updatedAt: '2026-01-01T00:00:00.000Z',
  ...over,
});

describe('Translator: the store history as events', () => {
  it('a device: created, resized, extended, deleted — once each, before and after', () => {
    const t = new Translator();
    const kinds = [
      put('devices/d1', dev({ state: 'creating' })),
      put('devices/d1', dev(), dev({ state: 'creating' })),
      put('devices/d1', dev({ size: 2048 }), dev()),
      put(
        'devices/d1',
        dev({
          size: 4096,
          extents: [
            { pool: 'p', size: 2048 },
            { pool: 'q', size: 2048 },
          ],
        }),
        dev({ size: 2048 }),
      ),
      put('devices/d1', dev({ state: 'deleting' }), dev()),
      del('devices/d1', dev({ state: 'deleting' })),
    ].flatMap((e) => t.translate(e).map((x) => x.kind));
    expect(kinds).toEqual([
      'device.created',
      'device.resized',
      'device.extended',
      'device.deleted',
    ]);
    const r = new Translator().translate(put('devices/d1', dev({ size: 2048 }), dev()))[0]!;
    expect(r.data).toMatchObject({ before: { size: 1024 }, after: { size: 2048 } });
    expect(r.id).toBe(String(rev));
    expect(r.host).toBe('a');
  });

  it('members: joined, left after a clean stop, expired otherwise', () => {
    const t = new Translator();
    const kinds = [
      put('members/a', { host: 'a', startedAt: 'x' }),
      put('hosts/a', { host: 'a', state: 'left', since: 'y' }),
      del('members/a', { host: 'a' }),
      put('members/b', { host: 'b' }),
      del('members/b', { host: 'b' }),
      put('members/b', { host: 'b' }, { host: 'b' }), // a keepalive-free rewrite: nothing
    ].flatMap((e) => t.translate(e).map((x) => x.kind));
    expect(kinds).toEqual(['member.joined', 'member.left', 'member.joined', 'member.expired']);
    // seeded: a host that left before the starting revision
    expect(new Translator({ hostsLeft: ['c'] }).translate(del('members/c', {}))).toEqual([]);
  });

  it('reservations carry who did it; explicit events pass through; other keys are silent', () => {
    const t = new Translator();
    const [e] = t.translate(
      put(
        'pr/d1',
        {
          state: { generation: 2 },
          seq: 2,
          last: { action: 'preempt-abort', initiator: 'b', actor: 'uid:0', time: 't', host: 'b' },
          abort: ['a'],
        },
        { state: { generation: 1 }, seq: 1 },
      ),
    );
    expect(e).toMatchObject({
      kind: 'reservation.changed',
      subject: 'd1',
      host: 'b',
      data: { action: 'preempt-abort', initiator: 'b', preempted: ['a'] },
    });
    const [x] = t.translate(
      put('events/a', {
        kind: 'tier.changed',
        subject: 'd1',
        host: 'a',
        time: 't',
        data: { before: ['ssd'], after: ['hdd'] },
      }),
    );
    expect(x).toMatchObject({ kind: 'tier.changed', subject: 'd1', data: { after: ['hdd'] } });
    expect(t.translate(put('acks/a', '5'))).toEqual([]);
    expect(t.translate(put('notify/cursor/x', '5'))).toEqual([]);
    expect(t.translate(put('events/a', 'garbage'))).toEqual([]);
  });

  it('several events of one revision get ids R, R.1, R.2 in order', () => {
    const t = new Translator();
    rev++;
    const same = (key: string, v: unknown): WatchEvent => ({
      type: 'put',
      kv: kv(key, v, rev),
      revision: rev,
    });
    const ids = [
      same('events/a', { kind: 'tier.changed', subject: 'x', host: 'a', time: 't', data: {} }),
      same('members/z', { host: 'z' }),
    ].flatMap((e) => t.translate(e).map((x) => x.id));
    expect(ids).toEqual([String(rev), `${rev}.1`]);
    expect(parseEventId(`${rev}.1`)).toEqual({ revision: rev, n: 1 });
    expect(parseEventId('12x')).toBeNull();
  });
});

describe('types, CloudEvents, signatures, tiers', () => {
  it('parses --types, refusing what it does not know', () => {
    const f = parseTypes('device.*,tier.changed');
    expect(f('device.created')).toBe(true);
    expect(f('tier.changed')).toBe(true);
    expect(f('member.joined')).toBe(false);
    expect(f('resync')).toBe(true);
    expect(parseTypes('io.ballast.member.*')('member.left')).toBe(true);
    expect(() => parseTypes('device.bogus')).toThrow(/unknown event type/);
    expect(() => parseTypes('dev ice')).toThrow(/bad event type/);
    expect(() => parseTypes('device.*,')).toThrow(/bad event type/);
  });

  it('builds structured CloudEvents 1.0 and HMAC-SHA256 signatures', () => {
    const ce = cloudEvent(
      {
        id: '7',
        revision: 7,
        n: 0,
        kind: 'device.created',
        subject: 'd',
        host: 'a',
        time: 't',
        data: {},
      },
      'prod',
      'b',
    );
    expect(ce).toMatchObject({
      specversion: '1.0',
      id: '7',
      source: '/ballast/prod/a',
      type: 'io.ballast.device.created',
      subject: 'd',
    });
    // RFC 4231 test case 2
    expect(sign('what do ya want for nothing?', 'Jefe')).toBe(
      'sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843',
    );
  });

  it('a tier is the set of media under the extents; a pool flip changes the devices on it', () => {
    const devs = [
      { name: 'a', extents: [{ pool: 'fast' }] },
      { name: 'b', extents: [{ pool: 'fast' }, { pool: 'bulk' }] },
      { name: 'c', extents: [{ pool: 'bulk' }] },
    ];
    const before = (p: string) => (p === 'fast' ? 'ssd' : 'hdd') as 'ssd' | 'hdd';
    expect(tierOf(devs[1]!, before)).toEqual(['hdd', 'ssd']);
    const ch = tierChanges(devs, before, () => 'hdd');
    expect(ch.map((c) => [c.device, c.before.join('+'), c.after.join('+')])).toEqual([
      ['a', 'ssd', 'hdd'],
      ['b', 'hdd+ssd', 'hdd'],
    ]);
  });
});

describe('previousLost', () => {
  it('a change that had a value before and comes without it was compacted under the watch', () => {
    // as etcd sends it when the revision before was compacted meanwhile: no prev_kv
    const bare = (e: WatchEvent): WatchEvent => {
      const { prevKv: _, ...rest } = e;
      return rest;
    };
    const from = { revision: 0, n: 0 };
    const deleting = put('devices/d1', dev({ state: 'deleting' }), dev());
    deleting.kv.version = 2;
    expect(previousLost(deleting, from)).toBe(false);
    expect(previousLost(bare(deleting), from)).toBe(true);
    // read as a first put it makes no device.deleted at all
    expect(new Translator().translate(bare(deleting))).toEqual([]);
    const gone = bare(del('devices/d1', dev()));
    expect(previousLost(gone, from)).toBe(true);
    expect(previousLost(bare(del('acl/d1', { entries: [] })), from)).toBe(true);
    // at a resync's revision (the compaction point) none is ever there, nor needed
    expect(previousLost(gone, { revision: gone.revision, n: 999_999 })).toBe(false);
    expect(previousLost(gone, { revision: gone.revision, n: 0 })).toBe(true);
    expect(previousLost(gone, { revision: gone.revision + 1, n: 0 })).toBe(false);
    // a key's first put has nothing before it; explicit events and hosts need none
    expect(previousLost(put('devices/d2', dev({ name: 'd2' })), from)).toBe(false);
    const ev = put('events/a', { kind: 'member.fenced', host: 'a', time: 't', data: {} });
    ev.kv.version = 5;
    expect(previousLost(ev, from)).toBe(false);
  });
});

describe('stored event times', () => {
  const kv = (rev: string, value: string): KeyValue => ({
    key: `${TIMES}${rev}`,
    value,
    createRevision: 1,
    modRevision: 1,
    version: 1,
  });
  const now = Date.parse('2026-12-07T08:02:00.000Z');

  it('are kept while their revision can still be read, and for a while after it is compacted', () => {
    // Regression (the nemesis, seed 2, 30 min): etcd compacted at 33280 while agent a
    // was frozen with events 33255 and 33268 taken off its watch; the times were pruned
    // at once, and a's follow stream stamped both anew, 2.7 s and 1.6 s later than
    // every webhook and other stream had them.
    const fresh = kv('33255', '2026-12-07T08:01:53.943Z');
    expect(timePrunable(fresh, 33280, now)).toBe(false);
    expect(timePrunable(fresh, 33000, now + 2 * TIME_GRACE_MS)).toBe(false);
    expect(timePrunable(fresh, 33280, now + TIME_GRACE_MS)).toBe(true);
    // a resync's time is kept under its id, <revision>.999999
    expect(timePrunable(kv('33280.999999', '2026-12-07T08:01:53.943Z'), 33281, now)).toBe(false);
    expect(
      timePrunable(kv('33280.999999', '2026-12-07T08:01:53.943Z'), 33281, now + TIME_GRACE_MS),
    ).toBe(true);
    // not a time: goes with its history
    expect(timePrunable(kv('12', 'garbage'), 33280, now)).toBe(true);
  });
});
