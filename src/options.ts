/**
 * Validation of option values: every option of the public API is checked
 * against its range here, with an {@link InvalidOptionError} naming it. Times
 * are capped at 2^31 - 1 ms, the largest delay setTimeout honours (a larger one
 * silently becomes 1 ms).
 */
import { InvalidOptionError } from './errors.ts';

export const MAX_TIMER_MS = 2 ** 31 - 1;

/** A duration in ms within [min, MAX_TIMER_MS], or `fallback` when undefined. */
export function durationOption(value: unknown, name: string, fallback: number, min = 1): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value)) throw new InvalidOptionError(name, `must be a finite number of milliseconds, got ${describe(value)}`);
  if (value < min || value > MAX_TIMER_MS) {
    throw new InvalidOptionError(name, `must be from ${min} to ${MAX_TIMER_MS} ms, got ${value}`);
  }
  return value;
}

/** A whole number within [min, max], or `fallback` when undefined. */
export function countOption(value: unknown, name: string, fallback: number, min = 1, max = 2 ** 31 - 1): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isInteger(value)) throw new InvalidOptionError(name, `must be a whole number, got ${describe(value)}`);
  if (value < min || value > max) throw new InvalidOptionError(name, `must be from ${min} to ${max}, got ${value}`);
  return value;
}

/** A number in [0, 1), or `fallback` when undefined. */
export function fractionOption(value: unknown, name: string, fallback: number): number {
  if (value === undefined) return fallback;
  if (typeof value !== 'number' || !Number.isFinite(value) || value < 0 || value >= 1) {
    throw new InvalidOptionError(name, `must be a number from 0 up to (not including) 1, got ${describe(value)}`);
  }
  return value;
}

/** A function or undefined. */
export function functionOption<F>(value: unknown, name: string): F | undefined {
  if (value === undefined) return undefined;
  if (typeof value !== 'function') throw new InvalidOptionError(name, `must be a function, got ${describe(value)}`);
  return value as F;
}

/** Rejects option names outside `known` (a typo would otherwise be ignored silently). */
export function checkOptionNames(options: object, known: readonly string[], where: string): void {
  for (const key of Object.keys(options)) {
    if (!known.includes(key)) throw new InvalidOptionError(`${where}: ${key}`, `is not a known option (known: ${known.join(', ')})`);
  }
}

function describe(value: unknown): string {
  if (value === null) return 'null';
  if (typeof value === 'number') return String(value);
  if (typeof value === 'string') return JSON.stringify(value.slice(0, 40));
  return typeof value;
}
