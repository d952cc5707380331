/**
 * The demo's live progress line: rewritten in place with `\r` on a terminal,
 * one plain line every ~5 s otherwise (logs, CI, pipes).
 */

export const fmt = (n: number, digits = 0): string =>
  n.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });

export const seconds = (ms: number): string => `${fmt(ms / 1000, 1)} s`;

export interface ProgressSample {
  /** Milliseconds since the heartbeats started. */
  elapsedMs: number;
  heartbeats: number;
  dbStatements: number;
  mergedRows: number;
  mergeLagMs: number | null;
}

export interface ProgressOptions {
  tty: boolean;
  /** Raw output (no newline added). */
  write: (text: string) => void;
  /** Minimum time between two lines when not on a terminal. */
  plainEveryMs?: number;
}

export class Progress {
  readonly #tty: boolean;
  readonly #write: (text: string) => void;
  readonly #plainEveryMs: number;
  #last: ProgressSample | null = null;
  #shown = false;

  constructor(options: ProgressOptions) {
    this.#tty = options.tty;
    this.#write = options.write;
    this.#plainEveryMs = options.plainEveryMs ?? 5_000;
  }

  /** Takes a sample; shows it now on a terminal, else when ~5 s passed since the last line. */
  update(sample: ProgressSample): void {
    const last = this.#last ?? { elapsedMs: 0, heartbeats: 0, dbStatements: 0, mergedRows: 0, mergeLagMs: null };
    const dt = (sample.elapsedMs - last.elapsedMs) / 1000;
    if (dt <= 0) return;
    if (!this.#tty && this.#last !== null && sample.elapsedMs - last.elapsedMs < this.#plainEveryMs - 250) return;
    const line = [
      `${fmt(sample.elapsedMs / 1000).padStart(4)} s`,
      `heartbeats ${fmt((sample.heartbeats - last.heartbeats) / dt).padStart(6)}/s`,
      `db statements ${fmt((sample.dbStatements - last.dbStatements) / dt, 1).padStart(6)}/s`,
      `merged ${fmt(sample.mergedRows).padStart(7)} rows`,
      `merge lag ${sample.mergeLagMs === null ? '  none (staging empty)' : seconds(sample.mergeLagMs).padStart(7)}`,
    ].join('  ');
    this.#last = sample;
    if (this.#tty) {
      this.#write(`\r${line}\x1b[K`);
      this.#shown = true;
    } else this.#write(`${line}\n`);
  }

  /** Prints a line of its own, below the progress line. */
  line(text: string): void {
    this.end();
    this.#write(`${text}\n`);
  }

  /** Moves past the progress line (terminal only). */
  end(): void {
    if (this.#shown) this.#write('\n');
    this.#shown = false;
  }
}
