/**
 * The demo: a simulated fleet heartbeats at the real rate through the real
 * library (HeartbeatStager with its defaults, startMerger every 5 s), then 10 %
 * of it disconnects at once; heartbeat.agent_status() must show those agents
 * disconnected after the next merge. Ends with the statements the database
 * executed against what one UPDATE per heartbeat would have cost.
 *
 * On the given database it touches only the heartbeat schema (migrations) and
 * the agents it creates, which it removes afterwards, also after an error or
 * Ctrl-C. Without one it runs on an embedded PostgreSQL that it deletes.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import pg from 'pg';
import { startEmbeddedPostgres, type EmbeddedDatabase } from '../embedded.ts';
import type { Logger } from '../logger.ts';
import { silentLogger } from '../logger.ts';
import { mergeNow, type MergeResult } from '../merge.ts';
import { startMerger, type Merger } from '../merger.ts';
import { migrate } from '../migrate.ts';
import { HeartbeatStager } from '../stager.ts';
import { agentStatus, readStatus, type MergeStatus } from '../status.ts';
import { watchStatusChanges, type StatusWatcher } from '../status-events.ts';
import { Fleet } from './fleet.ts';
import { fmt, Progress, seconds } from './progress.ts';
import { StatementCounter } from './statement-counter.ts';

export interface DemoOptions {
  /** Simulated agents. */
  agents: number;
  /** How long the fleet heartbeats before the disconnect storm, in seconds. */
  seconds: number;
  /** The database to use; without one an embedded PostgreSQL is started. */
  databaseUrl?: string;
  /** How the database URL is shown (password hidden). */
  shownUrl?: string;
  /** Raw output (no newline added). */
  write: (text: string) => void;
  /** Rewrite the progress line in place (a terminal) instead of a line every ~5 s. */
  tty: boolean;
  /** Aborts the run (Ctrl-C); it still cleans up. */
  signal: AbortSignal;
}

const HEARTBEAT_PERIOD_MS = 15_000;
const HEARTBEAT_JITTER = 0.1;
const MERGE_INTERVAL_MS = 5_000;
const DISCONNECT_FRACTION = 0.1;
const TICK_MS = 50;
const SAMPLE_MS = 1_000;

const pool = (url: string, max: number, name: string): pg.Pool => {
  const p = new pg.Pool({ connectionString: url, max, application_name: name, connectionTimeoutMillis: 10_000 });
  p.on('error', () => {});
  return p;
};

/** Waits for `promise` at most `ms`; never rejects. */
const within = async (promise: Promise<unknown> | undefined, ms: number): Promise<void> => {
  if (promise) await Promise.race([promise.catch(() => {}), sleep(ms, undefined, { ref: false })]);
};

/**
 * Every agent's first heartbeat falls in the first 15 s (the real rate); a
 * demo shorter than ~19 s squeezes them into its first 80 %, so that every
 * agent has connected before the disconnect storm.
 */
const firstWindowMs = (demoSeconds: number): number => Math.min(HEARTBEAT_PERIOD_MS, demoSeconds * 800);

const message = (err: unknown): string => (err instanceof Error ? err.message : String(err));

export async function runDemo(o: DemoOptions): Promise<void> {
  const progress = new Progress({ tty: o.tty, write: o.write });
  const say = (text: string): void => progress.line(text);
  // quiet once cleanup starts: what the stager could not write then belongs to agents being removed
  let quiet = false;
  const logger: Logger = {
    debug() {},
    info() {},
    warn: (m) => quiet || say(`warning: ${m}`),
    error: (m) => quiet || say(`error: ${m}`),
  };
  // the heartbeat loop's own failure (stage() threw) aborts the run like Ctrl-C does
  const failure = new AbortController();
  const signal = AbortSignal.any([o.signal, failure.signal]);
  const aborted = (): void => {
    if (signal.aborted) throw signal.reason;
  };

  const fleet = new Fleet(o.agents, {
    periodMs: HEARTBEAT_PERIOD_MS,
    jitter: HEARTBEAT_JITTER,
    firstWithinMs: firstWindowMs(o.seconds),
  });
  let embedded: EmbeddedDatabase | undefined;
  let url = o.databaseUrl;
  let agentsInserted = false;
  let work: pg.Pool | undefined;
  let merging: pg.Pool | undefined;
  let counter: StatementCounter | undefined;
  let stager: HeartbeatStager | undefined;
  let merger: Merger | undefined;
  let watcher: StatusWatcher | undefined;
  let beats: NodeJS.Timeout | undefined;
  let outcome: unknown;
  try {
    // ---- database
    if (url) say(`using ${o.shownUrl ?? 'the given database'}`);
    else {
      say('no DATABASE_URL: starting an embedded PostgreSQL ...');
      const t = performance.now();
      try {
        embedded = await startEmbeddedPostgres({ shared_preload_libraries: 'pg_stat_statements' });
      } catch (err) {
        // not installed, no binaries, no user: a second try would fail the same way
        if (signal.aborted || (err as { code?: unknown }).code === 'EMBEDDED_POSTGRES_UNAVAILABLE') throw err;
        embedded = await startEmbeddedPostgres(); // count from pg_stat_database instead
      }
      url = embedded.url;
      say(`embedded PostgreSQL ready in ${seconds(performance.now() - t)}`);
    }
    aborted();

    // ---- setup: migrations, agents (its connections are closed before counting starts)
    const setup = pool(url, 1, 'pg-heartbeat demo setup');
    try {
      const { rows } = await setup.query<{ v: string }>("SELECT current_setting('server_version') AS v");
      const ran = await migrate({ pool: setup }, { logger: silentLogger });
      say(`PostgreSQL ${rows[0]!.v.split(' ')[0]}; migrations: ${ran.length ? `applied ${ran.length}` : 'up to date'}`);
      if (embedded) await setup.query('CREATE EXTENSION IF NOT EXISTS pg_stat_statements').catch(() => {});
      agentsInserted = true; // from here on, cleanup deletes them (deleting none is harmless)
      await setup.query(
        "INSERT INTO public.workspace_agents (id, updated_at) SELECT unnest($1::uuid[]), now() - interval '1 hour'",
        [fleet.ids],
      );
    } finally {
      await setup.end();
    }
    say(`created ${fmt(o.agents)} agents in public.workspace_agents (never connected yet)`);
    aborted();
    counter = new StatementCounter(url);
    await counter.start();
    say(`counting database statements with ${counter.description}`);

    // ---- a consumer of status events (docs/events.md): woken by NOTIFY on a connection of its own
    const stormWatch = { startedAt: 0, gone: new Set<string>(), delays: [] as number[], events: 0 };
    watcher = watchStatusChanges({ connectionString: url }, {
      since: 'now',
      logger,
      onChange: (e) => {
        stormWatch.events++;
        if (e.reason === 'disconnect' && stormWatch.gone.delete(e.agentId)) stormWatch.delays.push(performance.now() - stormWatch.startedAt);
      },
    });
    await watcher.ready;

    // ---- the fleet
    const merged = { merges: 0, rows: 0, agents: 0 };
    // the app's pool (COPY, disconnects) and, as in a deployment, the merger on a connection of its own
    work = pool(url, 4, 'pg-heartbeat demo');
    merging = pool(url, 1, 'pg-heartbeat demo merger');
    counter.watch(work);
    counter.watch(merging);
    stager = new HeartbeatStager({ pool: work }, { logger });
    merger = startMerger(
      { pool: merging },
      {
        intervalMs: MERGE_INTERVAL_MS,
        logger,
        onMerge: (r) => {
          if (r.skippedConcurrent) return;
          merged.merges++;
          merged.rows += r.rowsConsumed;
          merged.agents += r.agentsUpdated;
        },
      },
    );
    const rate = o.agents / (HEARTBEAT_PERIOD_MS / 1000);
    say(
      `heartbeating for ${o.seconds} s: each agent every ${HEARTBEAT_PERIOD_MS / 1000} s ± ${HEARTBEAT_JITTER * 100} % ` +
        `(≈ ${fmt(rate)}/s at steady state), the first within ${fmt(firstWindowMs(o.seconds) / 1000, 1)} s; ` +
        'the stager COPYs every 5 s (0.4 s before each merge), the merger merges every 5 s',
    );
    const startedDb = (await readStatus({ pool: counter.pool }, { logger })).checkedAt;
    const t0 = Date.now();
    fleet.start(t0);
    const s = stager;
    beats = setInterval(() => {
      try {
        fleet.beat(s, Date.now());
      } catch (err) {
        failure.abort(err);
      }
    }, TICK_MS);
    const c = counter;
    const sample = async (): Promise<MergeStatus> => {
      const dbStatements = await c.read();
      const status = await readStatus({ pool: c.pool }, { logger });
      progress.update({ elapsedMs: Date.now() - t0, heartbeats: fleet.heartbeats, dbStatements, mergedRows: merged.rows, mergeLagMs: status.mergeLagMs });
      return status;
    };
    /** Samples until a merge that started after `after` (database clock) has run; returns the last sample. */
    const nextMerge = async (after: Date, what: string): Promise<MergeStatus & { lastMerge: NonNullable<MergeStatus['lastMerge']> }> => {
      const waitUntil = Date.now() + 3 * MERGE_INTERVAL_MS;
      for (;;) {
        const status = await sample();
        if (status.lastMerge && status.lastMerge.at > after) return status as MergeStatus & { lastMerge: NonNullable<MergeStatus['lastMerge']> };
        if (Date.now() > waitUntil) throw new Error(`no merge ran within ${(3 * MERGE_INTERVAL_MS) / 1000} s ${what}`);
        await sleep(SAMPLE_MS / 2, undefined, { signal });
      }
    };
    const stormAtMs = t0 + o.seconds * 1000;
    for (let now = Date.now(); now < stormAtMs; now = Date.now()) {
      await sleep(Math.min(SAMPLE_MS, stormAtMs - now), undefined, { signal });
      await sample();
    }
    if (merged.merges === 0) {
      // a demo shorter than the first merge: wait for it, so that some agents show connected
      say('waiting for the first merge before the disconnect storm ...');
      await nextMerge(startedDb, 'since the heartbeats started');
    }

    // ---- the disconnect storm
    // The storm hits agents the database already shows connected. (An agent whose first heartbeat is
    // not merged yet when it disconnects keeps first_connected_at NULL: disconnect_agent() writes only
    // disconnected_at, and the merge then skips the older heartbeat, so agent_status() says 'connecting'.)
    const before = await agentStatus(c.pool, { agentIds: fleet.ids });
    const connected = new Set(before.filter((r) => r.status === 'connected').map((r) => r.agentId));
    const gone = fleet.leave(Math.max(1, Math.round(o.agents * DISCONNECT_FRACTION)), connected);
    if (gone.length === 0) throw new Error('no agent shows connected yet (heartbeats are COPYed and merged on the 5 s grid: the first merge with heartbeats comes within about 8 s): use --seconds 12 or more');
    const stormStarted = performance.now();
    stormWatch.startedAt = stormStarted;
    for (const id of gone) stormWatch.gone.add(id);
    const at = new Date();
    const applied = await Promise.all(
      gone.map((agentId) => s.disconnect({ agentId, disconnectedAt: at, updatedAt: at, replicaId: fleet.replicaId })),
    );
    const stormMs = performance.now() - stormStarted;
    say(
      `disconnect storm: ${fmt(gone.length)} agents (${DISCONNECT_FRACTION * 100} %) disconnected through HeartbeatStager.disconnect ` +
        `in ${seconds(stormMs)} (${fmt(applied.filter(Boolean).length)} rows changed), picked among the ${fmt(connected.size)} ` +
        `agent_status() showed connected; the rest keep heartbeating`,
    );
    const stormDone = (await sample()).checkedAt;
    aborted();
    // every disconnect is an event; the watcher has them within about a second
    for (const until = Date.now() + 5_000; stormWatch.gone.size > 0 && Date.now() < until; ) await sleep(20, undefined, { signal });
    const delays = [...stormWatch.delays].sort((a, b) => a - b);
    const pct = (q: number): string => seconds(delays[Math.min(delays.length - 1, Math.floor(q * delays.length))] ?? 0);
    say(
      `status events: ${fmt(delays.length)} of ${fmt(gone.length)} 'disconnect' events reached a watcher (LISTEN/NOTIFY), ` +
        `median ${pct(0.5)}, last ${pct(1)} after the storm's first disconnect()` +
        (stormWatch.gone.size > 0 ? `; CHECK FAILED: ${fmt(stormWatch.gone.size)} missing` : ''),
    );

    // ---- after the next merge, heartbeat.agent_status() must show them disconnected
    const m = (await nextMerge(stormDone, 'after the disconnect storm')).lastMerge;
    const rows = await agentStatus(c.pool, { agentIds: fleet.ids });
    const goneSet = new Set(gone);
    const byStatus = new Map<string, number>();
    let goneStillShown = 0;
    let othersDisconnected = 0;
    for (const r of rows) {
      byStatus.set(r.status, (byStatus.get(r.status) ?? 0) + 1);
      if (goneSet.has(r.agentId) && r.status !== 'disconnected') goneStillShown++;
      if (!goneSet.has(r.agentId) && r.status === 'disconnected') othersDisconnected++;
    }
    say(
      `next merge (${m.at.toISOString().slice(11, 19)} UTC): ${fmt(m.rowsConsumed)} staged rows, ${fmt(m.agentsUpdated)} agents updated, ` +
        `${fmt(m.skippedStale)} older heartbeats skipped as stale`,
    );
    const shown = ['connected', 'disconnected', 'connecting', 'timeout']
      .filter((k) => byStatus.has(k))
      .map((k) => `${fmt(byStatus.get(k)!)} ${k}`)
      .join(', ');
    say(
      `heartbeat.agent_status(): ${shown}; ` +
        (goneStillShown === 0
          ? `all ${fmt(gone.length)} disconnected agents show 'disconnected'`
          : `CHECK FAILED: ${fmt(goneStillShown)} of the ${fmt(gone.length)} disconnected agents do not show 'disconnected'`),
    );
    let check: Error | undefined;
    if (goneStillShown > 0 || rows.length !== fleet.size || othersDisconnected > 0) {
      check = new Error(
        `check failed: after the merge that followed the disconnect storm, ${goneStillShown} of ${gone.length} disconnected agents ` +
          `did not show 'disconnected', ${othersDisconnected} still-connected agents did, ${rows.length} of ${fleet.size} agents found`,
      );
    }

    // ---- end of traffic: last COPY and a last merge, then the figures
    clearInterval(beats);
    beats = undefined;
    const trafficMs = Date.now() - t0;
    await merger.stop();
    await watcher.close();
    await stager.flush();
    const last: MergeResult = await mergeNow(merging);
    if (!last.skippedConcurrent) merged.rows += last.rowsConsumed;
    await stager.close();
    const st = stager.stats();
    const ms = merger.stats();
    await work.end();
    await merging.end();
    const dbCount = await counter.finish();
    progress.end();

    const merges = ms.merges + ms.skippedConcurrent + ms.failures + 1;
    const copies = st.copies + st.failedCopies;
    const heartbeatStatements = copies + merges;
    const ours = heartbeatStatements + gone.length;
    const naive = fleet.heartbeats + gone.length;
    const perS = (n: number): string => `${fmt(n / (trafficMs / 1000), 1)}/s`;
    const x = (a: number, b: number): string => (b > 0 ? `${fmt(a / b, a / b >= 10 ? 0 : 1)}×` : '–');
    const label = (l: string): string => `  ${l.padEnd(22)}`;
    say('');
    say(`summary: ${fmt(o.agents)} agents, ${seconds(trafficMs)} of traffic`);
    say(
      `${label('heartbeats')}${fmt(fleet.heartbeats)} (${perS(fleet.heartbeats)}), ${fmt(st.deduped)} folded in memory, ` +
        `${fmt(st.droppedByDisconnect)} dropped by a newer disconnect; ${fmt(gone.length)} disconnects`,
    );
    say(
      `${label('pg-heartbeat')}${fmt(ours)} statements (${perS(ours)}): ${fmt(copies)} COPY (${fmt(st.rowsCopied)} rows), ` +
        `${fmt(merges)} merges (${fmt(merged.rows)} rows), ${fmt(gone.length)} disconnects — its own count`,
    );
    say(
      `${label('the database counted')}${fmt(dbCount)} (${perS(dbCount)}) — ${counter.description}` +
        (counter.description.startsWith('pg_stat_database')
          ? `, the status watcher's ${fmt(watcher.stats().reads)} reads (${fmt(stormWatch.events)} events) included`
          : ''),
    );
    say(`${label('naive')}${fmt(naive)} statements (${perS(naive)}): one UPDATE per heartbeat and per disconnect`);
    say(
      `${label('=>')}${fmt(heartbeatStatements)} statements for ${fmt(fleet.heartbeats)} heartbeats (${x(fleet.heartbeats, heartbeatStatements)} fewer); ` +
        `disconnects stay one statement each; overall ${x(naive, ours)} fewer`,
    );
    if (stormWatch.gone.size > 0) {
      check ??= new Error(`check failed: ${stormWatch.gone.size} of ${gone.length} disconnects never reached the status watcher`);
    }
    if (check) throw check;
  } catch (err) {
    outcome = signal.aborted ? signal.reason : err;
  } finally {
    // ---- cleanup, also after an error or Ctrl-C
    quiet = true;
    if (beats) clearInterval(beats);
    progress.end();
    await within(merger?.stop(), 5_000);
    await within(watcher?.close(), 3_000);
    await within(stager?.close(), 3_000);
    if (work && !work.ended) await within(work.end(), 3_000);
    if (merging && !merging.ended) await within(merging.end(), 3_000);
    await counter?.close();
    const cleanup: string[] = [];
    if (url && agentsInserted && !embedded) {
      const admin = pool(url, 1, 'pg-heartbeat demo cleanup');
      try {
        await admin.query('DELETE FROM heartbeat.agent_connection_staging WHERE agent_id = ANY($1::uuid[])', [fleet.ids]);
        const { rowCount } = await admin.query('DELETE FROM public.workspace_agents WHERE id = ANY($1::uuid[])', [fleet.ids]);
        cleanup.push(`removed the demo's ${fmt(rowCount ?? 0)} agents`);
      } catch (err) {
        cleanup.push(`could not remove the demo's ${fmt(fleet.size)} agents: ${message(err)}`);
        outcome ??= err;
      } finally {
        await admin.end().catch(() => {});
      }
    }
    if (embedded) {
      await embedded.stop();
      cleanup.push('stopped and deleted the embedded PostgreSQL');
    }
    if (cleanup.length) say(`cleanup: ${cleanup.join('; ')}`);
  }
  if (outcome !== undefined) throw outcome;
}
