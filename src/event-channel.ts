/**
 * A bounded hand-off from the watcher's read loop to an async iterator: the loop
 * pushes (and waits while `capacity` items are buffered: backpressure), the
 * consumer pulls with next(). end() stops it (buffered items are dropped: they
 * were never delivered), fail(err) lets the consumer take what is buffered and
 * then rejects its next() with `err`.
 */
export class EventChannel<T> {
  readonly #buffer: T[] = [];
  readonly #pullers: { resolve: (r: IteratorResult<T>) => void; reject: (e: unknown) => void }[] = [];
  #room: (() => void) | undefined;
  #ended = false;
  #error: { error: unknown } | undefined;

  constructor(
    private readonly capacity: number,
    /** Called as an item is handed to the consumer (before its next() resolves). */
    private readonly taken: (item: T) => void,
  ) {}

  /** Hands `item` over; resolves once the buffer has room again (at once while it has). Dropped after end()/fail(). */
  async push(item: T): Promise<void> {
    if (this.#ended || this.#error) return;
    const puller = this.#pullers.shift();
    if (puller) {
      this.taken(item);
      puller.resolve({ value: item, done: false });
      return;
    }
    this.#buffer.push(item);
    while (this.#buffer.length >= this.capacity && !this.#ended && !this.#error) {
      await new Promise<void>((resolve) => (this.#room = resolve));
    }
  }

  next(): Promise<IteratorResult<T>> {
    if (this.#ended) return Promise.resolve({ value: undefined, done: true });
    if (this.#buffer.length > 0) {
      const item = this.#buffer.shift() as T;
      this.#wakePusher();
      this.taken(item);
      return Promise.resolve({ value: item, done: false });
    }
    if (this.#error) {
      this.#ended = true;
      return Promise.reject(this.#error.error);
    }
    return new Promise((resolve, reject) => this.#pullers.push({ resolve, reject }));
  }

  /** Stops: pending and later next() calls resolve done, buffered items are dropped, a waiting push returns. */
  end(): void {
    if (this.#ended) return;
    this.#ended = true;
    this.#buffer.length = 0;
    for (const p of this.#pullers.splice(0)) p.resolve({ value: undefined, done: true });
    this.#wakePusher();
  }

  /** Fails: the consumer gets what is buffered, then `error` (once; done after that). */
  fail(error: unknown): void {
    if (this.#ended || this.#error) return;
    this.#error = { error };
    const pullers = this.#pullers.splice(0);
    if (pullers.length > 0) {
      this.#ended = true;
      pullers[0]!.reject(error);
      for (const p of pullers.slice(1)) p.resolve({ value: undefined, done: true });
    }
    this.#wakePusher();
  }

  #wakePusher(): void {
    const room = this.#room;
    this.#room = undefined;
    room?.();
  }
}
