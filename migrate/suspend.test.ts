import { describe, expect, it } from 'vitest';
import { BallastError } from '../agent/errors.js';
import { fallsBackToNbd } from './suspend.js';

describe('fallsBackToNbd: when the command moves the stream itself', () => {
  const err = (code: string) => new BallastError(code, 'x');

  it('falls back for another host’s device and an agent without streams, when auto', () => {
    for (const code of [
      'BALLAST_DEVICE_REMOTE',
      'BALLAST_NOT_FOUND',
      'BALLAST_METHOD_NOT_ALLOWED',
    ]) {
      expect(fallsBackToNbd('auto', err(code))).toBe(true);
      expect(fallsBackToNbd('agent', err(code))).toBe(false);
    }
  });

  it('never hides a refusal or a failure of the agent’s stream', () => {
    for (const code of [
      'BALLAST_STREAM_DENIED',
      'BALLAST_STREAM_RANGE',
      'BALLAST_DEVICE_BUSY',
      'BALLAST_DEVICE_NOT_FOUND',
      'BALLAST_AGENT_UNREACHABLE',
    ]) {
      expect(fallsBackToNbd('auto', err(code))).toBe(false);
    }
    expect(fallsBackToNbd('auto', new Error('BALLAST_DEVICE_REMOTE'))).toBe(false);
  });
});
