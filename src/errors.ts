/**
 * pg-heartbeat's errors: one base class with a `cause`, and a few subclasses a
 * caller can branch on. Database errors are mapped from their SQLSTATE (or the
 * socket error code) by {@link toHeartbeatError}.
 */
export class HeartbeatError extends Error {
  override readonly name: string = 'HeartbeatError';
  /** A stable, machine-readable code (for example `INVALID_UPDATE`). */
  readonly code: string;

  constructor(message: string, options: { code?: string; cause?: unknown } = {}) {
    super(message, options.cause === undefined ? undefined : { cause: options.cause });
    this.code = options.code ?? 'HEARTBEAT_ERROR';
  }
}

/** An update or disconnect was rejected before reaching the database; nothing of it was kept. */
export class InvalidUpdateError extends HeartbeatError {
  override readonly name = 'InvalidUpdateError';
  /** The offending field, e.g. `agentId` or `updatedAt`. */
  readonly field: string;

  constructor(field: string, message: string) {
    super(`invalid heartbeat update: ${field} ${message}`, { code: 'INVALID_UPDATE' });
    this.field = field;
  }
}

/** The stager (or merger) was closed; it accepts no more work. */
export class ClosedError extends HeartbeatError {
  override readonly name = 'ClosedError';

  /** `what` is closed; or, with `reason`, `what` was cancelled because of it. */
  constructor(what: string, reason?: string) {
    super(reason === undefined ? `${what} is closed` : `${what} was cancelled: ${reason}`, { code: 'CLOSED' });
  }
}

/** An option passed to pg-heartbeat is out of range or of the wrong type. */
export class InvalidOptionError extends HeartbeatError {
  override readonly name = 'InvalidOptionError';
  /** The option, e.g. `flushIntervalMs`. */
  readonly option: string;

  constructor(option: string, message: string) {
    super(`pg-heartbeat: ${option} ${message}`, { code: 'INVALID_OPTION' });
    this.option = option;
  }
}

/**
 * Metrics were asked for but the optional peer dependency `prom-client` is not installed
 * (`npm install prom-client`). Nothing else of pg-heartbeat needs it.
 */
export class MetricsUnavailableError extends HeartbeatError {
  override readonly name = 'MetricsUnavailableError';

  constructor(cause: unknown) {
    super('pg-heartbeat: metrics need the optional peer dependency prom-client, which is not installed: npm install prom-client', {
      code: 'METRICS_UNAVAILABLE', cause,
    });
  }
}

/** A failure reported by PostgreSQL or the connection to it. */
export class DatabaseError extends HeartbeatError {
  override readonly name: string = 'DatabaseError';
  /** The SQLSTATE, or the socket error code (e.g. ECONNREFUSED), when known. */
  readonly sqlState: string | undefined;

  constructor(message: string, options: { code?: string; sqlState?: string | undefined; cause?: unknown } = {}) {
    super(message, { code: options.code ?? 'DATABASE_ERROR', cause: options.cause });
    this.sqlState = options.sqlState;
  }
}

/** The database could not be reached, or the connection broke (class 08, 57P0x, socket errors). */
export class ConnectionError extends DatabaseError {
  override readonly name = 'ConnectionError';
}

/** pg-heartbeat's schema or functions are missing: run the migrations (`pg-heartbeat migrate`). */
export class MigrationsMissingError extends DatabaseError {
  override readonly name = 'MigrationsMissingError';
}

/** The role lacks a privilege (42501); grant it `heartbeat_writer`. */
export class PermissionDeniedError extends DatabaseError {
  override readonly name = 'PermissionDeniedError';
}

/** statement_timeout (57014) or lock_timeout (55P03) was hit, or an operation ran out of time. */
export class TimeoutError extends DatabaseError {
  override readonly name = 'TimeoutError';
}

/**
 * Status events after the id a watcher asked for were already deleted by retention (SQLSTATE HBP01 from
 * heartbeat.status_events_after()): a consumer that resumes from there has lost events.
 */
export class EventsPurgedError extends DatabaseError {
  override readonly name = 'EventsPurgedError';
  /** The id the read asked for events after. */
  readonly afterId: number | undefined;
  /** Every event with an id up to this one was purged (heartbeat.event_state.purged_through): what is left follows it. */
  readonly purgedThrough: number | undefined;

  constructor(message: string, options: { afterId?: number | undefined; purgedThrough?: number | undefined; cause?: unknown } = {}) {
    super(message, { code: 'EVENTS_PURGED', sqlState: 'HBP01', cause: options.cause });
    this.afterId = options.afterId;
    this.purgedThrough = options.purgedThrough;
  }
}

/** The number `pattern` captures in `text`, as a safe integer. */
function captured(text: string, pattern: RegExp): number | undefined {
  const m = pattern.exec(text);
  const n = m ? Number(m[1]) : NaN;
  return Number.isSafeInteger(n) ? n : undefined;
}

const CONNECTION_CODES = new Set([
  'ECONNREFUSED', 'ECONNRESET', 'EPIPE', 'ETIMEDOUT', 'ENOTFOUND', 'EAI_AGAIN', 'EHOSTUNREACH', 'ENETUNREACH',
]);

function describe(err: unknown): string {
  if (err instanceof Error && err.message) return err.message;
  if (err instanceof AggregateError) return err.errors.map(describe).join('; ');
  return String(err);
}

/**
 * Maps anything thrown by `pg` (or a socket) to a {@link HeartbeatError}.
 * `doing` names the operation, e.g. `"COPY into staging"`.
 */
export function toHeartbeatError(err: unknown, doing: string): HeartbeatError {
  if (err instanceof HeartbeatError) return err;
  const e = err as { code?: unknown; message?: unknown } | null;
  const code = typeof e?.code === 'string' ? e.code : undefined;
  const text = `${doing} failed: ${describe(err) || code || 'unknown error'}`;
  if (code === undefined) {
    // pg reports a closed connection without a code
    if (/terminat|Connection|connect/i.test(describe(err))) return new ConnectionError(text, { code: 'CONNECTION', cause: err });
    return new DatabaseError(text, { cause: err });
  }
  if (CONNECTION_CODES.has(code) || code.startsWith('08') || code.startsWith('57P0') || code === '53300') {
    return new ConnectionError(text, { code: 'CONNECTION', sqlState: code, cause: err });
  }
  if (code === '42P01' || code === '42883' || code === '3F000') {
    return new MigrationsMissingError(`${text} (run the migrations: pg-heartbeat migrate)`, {
      code: 'MIGRATIONS_MISSING', sqlState: code, cause: err,
    });
  }
  if (code === '42501') {
    // pg-heartbeat's own refusals of an unsafe privilege model carry their hint; granting a role is not the fix
    const refusal = /^pg-heartbeat (refuses|: SECURITY DEFINER)/.test(describe(err));
    const hint = typeof (e as { hint?: unknown }).hint === 'string' ? (e as { hint: string }).hint : 'grant the role heartbeat_writer';
    return new PermissionDeniedError(refusal ? `${text} (see docs/security.md)` : `${text} (${hint})`, {
      code: 'PERMISSION_DENIED', sqlState: code, cause: err,
    });
  }
  if (code === 'HBP01') {
    // 'heartbeat.status_events_after: events after 12 were purged (retention); the oldest kept follows 40'
    const said = describe(err);
    return new EventsPurgedError(`${text} (events were lost: resync from heartbeat.agent_status(), then watch from 'now')`, {
      afterId: captured(said, /events after (\d+)/), purgedThrough: captured(said, /oldest kept follows (\d+)/), cause: err,
    });
  }
  if (code === '57014' || code === '55P03') {
    return new TimeoutError(text, { code: 'TIMEOUT', sqlState: code, cause: err });
  }
  if (code === '40P01' || code === '40001') {
    return new DatabaseError(`${text} (retry)`, { code: 'CONFLICT', sqlState: code, cause: err });
  }
  return new DatabaseError(text, { sqlState: code, cause: err });
}
