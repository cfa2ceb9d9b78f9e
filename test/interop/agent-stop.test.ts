// SIGTERM with an event stream open: the agent ends the stream itself (a clean end of
// the chunked reply, which a following client resumes from with Last-Event-ID) instead
// of waiting for its client and finally cutting the connection.

import http from 'node:http';
import { expect, it } from 'vitest';
import { startAgent } from '../helpers/agent.js';
import { describeWithTools } from '../helpers/tools.js';

describeWithTools([], 'agent stop with clients', () => {
  it('SIGTERM ends a following event stream cleanly, then exits 0', async () => {
    const a = await startAgent();
    const res = await new Promise<http.IncomingMessage>((resolve, reject) => {
      http
        .get({ socketPath: a.apiSocket, path: '/v1/events?follow=1', agent: false }, resolve)
        .on('error', reject);
    });
    expect(res.statusCode).toBe(200);
    res.resume();
    const ended = new Promise<string>((resolve) => {
      res.on('end', () => resolve('end'));
      res.on('aborted', () => resolve('aborted'));
      res.on('error', (e) => resolve(`error ${e.message}`));
    });
    const code = await a.stop();
    expect(await ended).toBe('end');
    expect(code).toBe(0);
  });
});
