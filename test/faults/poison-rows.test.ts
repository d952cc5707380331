/**
 * Poison rows: an existing workspace_agents with an ordinary CHECK constraint,
 * a FOREIGN KEY and a trigger that raises for some agents. The merge applies
 * every other agent in the same call and moves each snapshot that cannot be
 * applied to heartbeat.dead_letters with its SQLSTATE and message; the counts
 * show in the merge result and in heartbeat.status. After the cause is fixed,
 * heartbeat.retry_dead_letters() puts them back and the next merge applies them.
 * migrate() warns about each such object, once per object.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { after, before, describe, test } from 'node:test';
import { silentLogger } from '../../src/logger.ts';
import { mergeNow } from '../../src/merge.ts';
import { migrate } from '../../src/migrate.ts';
import { startMerger } from '../../src/merger.ts';
import { readStatus } from '../../src/status.ts';
import { HeartbeatStager } from '../../src/stager.ts';
import { createAgents, createTestDb, stagedCount, type TestDb } from '../support/db.ts';
import { recordingLogger, waitFor } from '../support/wait.ts';

let db: TestDb;
before(async () => {
  db = await createTestDb('fault_poison');
});
after(async () => {
  await db?.drop();
});

const T = new Date(Date.UTC(2026, 0, 1));
const T2 = new Date(Date.UTC(2026, 0, 2));
const GOOD_REPLICA = randomUUID();
const UNKNOWN_REPLICA = randomUUID();
const OLD_DISCONNECT = new Date(Date.UTC(1999, 0, 1));

async function addHazards(): Promise<void> {
  await db.pool.query(`
    CREATE TABLE public.replicas (id uuid PRIMARY KEY);
    INSERT INTO public.replicas VALUES ('${GOOD_REPLICA}');
    ALTER TABLE public.workspace_agents
      ADD CONSTRAINT disconnected_after_2000 CHECK (disconnected_at IS NULL OR disconnected_at >= '2000-01-01'),
      ADD CONSTRAINT replica_exists FOREIGN KEY (last_connected_replica_id) REFERENCES public.replicas (id);
    CREATE TABLE public.quarantine (agent_id uuid PRIMARY KEY);
    GRANT SELECT ON public.quarantine TO heartbeat_definer;
    CREATE FUNCTION public.refuse_quarantined() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF EXISTS (SELECT 1 FROM public.quarantine q WHERE q.agent_id = NEW.id) THEN
        RAISE EXCEPTION 'agent % is quarantined', NEW.id;
      END IF;
      RETURN NEW;
    END $$;
    CREATE TRIGGER refuse_quarantined BEFORE UPDATE ON public.workspace_agents
      FOR EACH ROW EXECUTE FUNCTION public.refuse_quarantined();
  `);
}

describe('poison rows', () => {
  test('migrate() says nothing about the table as pg-heartbeat creates it', async () => {
    const log = recordingLogger();
    await migrate({ connectionString: db.url }, { logger: log });
    assert.deepEqual(log.calls.filter((c) => c.level === 'warn').map((c) => c.message), []);
  });

  test('a CHECK, a FOREIGN KEY and a raising trigger: every other agent is applied by the same merge; the rest are dead letters', async () => {
    await addHazards();
    const ids = await createAgents(db.pool, 1000);
    const checkBad = ids.slice(0, 5);
    const fkBad = ids.slice(5, 10);
    const trigBad = ids.slice(10, 15);
    const good = ids.slice(15);
    await db.pool.query('INSERT INTO public.quarantine SELECT unnest($1::uuid[])', [trigBad]);

    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { logger: silentLogger });
    try {
      for (const agentId of ids) {
        stager.stage({
          agentId, firstConnectedAt: T, lastConnectedAt: T, updatedAt: T,
          lastConnectedReplicaId: fkBad.includes(agentId) ? UNKNOWN_REPLICA : GOOD_REPLICA,
          disconnectedAt: checkBad.includes(agentId) ? OLD_DISCONNECT : null,
        });
      }
      await stager.flush();
    } finally {
      await stager.close();
    }
    const r = await mergeNow(db.pool);
    assert.equal(r.rowsConsumed, ids.length);
    assert.equal(r.agentsUpdated, good.length, 'every other agent applied');
    assert.equal(r.deadLettered, 15);
    assert.equal(r.statements, 1, 'by one merge call');
    assert.equal(r.skippedStale + r.skippedUnknown + r.skippedInvalid + r.deferredLocked, 0);
    assert.equal(await stagedCount(db.pool), 0);
    const { rows: applied } = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2', [good, T],
    );
    assert.equal(Number(applied[0]!.n), good.length);
    const { rows: untouched } = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at < $2', [[...checkBad, ...fkBad, ...trigBad], T],
    );
    assert.equal(Number(untouched[0]!.n), 15, 'the poison agents keep their old rows');

    const { rows: letters } = await db.pool.query<{ agent_id: string; sqlstate: string; message: string; updated_at: Date; last_connected_replica_id: string }>(
      'SELECT agent_id, sqlstate, message, updated_at, last_connected_replica_id FROM heartbeat.dead_letters ORDER BY id',
    );
    const by = (set: string[]): typeof letters => letters.filter((l) => set.includes(l.agent_id));
    assert.equal(letters.length, 15);
    for (const l of by(checkBad)) {
      assert.equal(l.sqlstate, '23514');
      assert.match(l.message, /disconnected_after_2000/);
    }
    for (const l of by(fkBad)) {
      assert.equal(l.sqlstate, '23503');
      assert.match(l.message, /replica_exists/);
      assert.equal(l.last_connected_replica_id, UNKNOWN_REPLICA, 'the whole snapshot is kept');
    }
    for (const l of by(trigBad)) {
      assert.equal(l.sqlstate, 'P0001');
      assert.match(l.message, /is quarantined/);
    }
    assert.deepEqual([by(checkBad).length, by(fkBad).length, by(trigBad).length], [5, 5, 5]);
    assert.ok(letters.every((l) => l.updated_at.getTime() === T.getTime()));

    const { rows: status } = await db.pool.query<{ dead_letters: string; last_merge_dead_lettered: string }>(
      'SELECT dead_letters, last_merge_dead_lettered FROM heartbeat.status',
    );
    assert.deepEqual(status[0], { dead_letters: '15', last_merge_dead_lettered: '15' });
    const typed = await readStatus({ pool: db.pool });
    assert.equal(typed.deadLetters, 15);
    assert.equal(typed.lastMerge?.deadLettered, 15);
    assert.ok(typed.lastDeadLetterAt instanceof Date);

    // migrate() names each object the merge tripped on, one line each
    const log = recordingLogger();
    await migrate({ connectionString: db.url }, { logger: log });
    const warnings = log.calls.filter((c) => c.level === 'warn').map((c) => c.message);
    assert.equal(warnings.length, 3, warnings.join('\n'));
    assert.ok(warnings.some((w) => /CHECK constraint "disconnected_after_2000"/.test(w)));
    assert.ok(warnings.some((w) => /FOREIGN KEY "replica_exists"/.test(w)));
    assert.ok(warnings.some((w) => /trigger "refuse_quarantined"/.test(w)));
    assert.ok(warnings.every((w) => /heartbeat\.dead_letters/.test(w) && !w.includes('\n')));

    // the cause is fixed: the replica exists, the quarantine is lifted, the CHECK is relaxed
    await db.pool.query(`
      INSERT INTO public.replicas VALUES ('${UNKNOWN_REPLICA}');
      DELETE FROM public.quarantine;
      ALTER TABLE public.workspace_agents DROP CONSTRAINT disconnected_after_2000,
        ADD CONSTRAINT disconnected_after_1990 CHECK (disconnected_at IS NULL OR disconnected_at >= '1990-01-01');
    `);
    const retried = await db.pool.query<{ n: string }>('SELECT heartbeat.retry_dead_letters() AS n');
    assert.equal(Number(retried.rows[0]!.n), 15);
    assert.equal(await stagedCount(db.pool), 15);
    const again = await mergeNow(db.pool);
    assert.equal(again.agentsUpdated, 15, 'the retried snapshots apply');
    assert.equal(again.deadLettered, 0);
    const { rows: now } = await db.pool.query<{ n: string }>(
      'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2', [ids, T],
    );
    assert.equal(Number(now[0]!.n), ids.length, 'every agent holds its snapshot');
    const after = await readStatus({ pool: db.pool });
    assert.equal(after.deadLetters, 0);
    assert.equal(after.lastMerge?.deadLettered, 0);
  });

  test('a running merger goes on merging while some rows are poison, and warns', async () => {
    const ids = await createAgents(db.pool, 300);
    await db.pool.query('INSERT INTO public.quarantine SELECT unnest($1::uuid[])', [ids.slice(0, 3)]);
    const log = recordingLogger();
    const merger = startMerger({ connectionString: db.url }, { intervalMs: 300, logger: log });
    const stager = new HeartbeatStager({ connectionString: db.url, max: 1 }, { flushIntervalMs: 50, logger: silentLogger });
    try {
      for (const agentId of ids) stager.stage({ agentId, lastConnectedAt: T2, updatedAt: T2, lastConnectedReplicaId: GOOD_REPLICA });
      await waitFor(async () => {
        const { rows } = await db.pool.query<{ n: string }>(
          'SELECT count(*) AS n FROM public.workspace_agents WHERE id = ANY($1::uuid[]) AND updated_at = $2', [ids, T2],
        );
        return Number(rows[0]!.n) === ids.length - 3;
      }, 'the merger to apply the rest', 20_000);
      await waitFor(() => merger.stats().deadLettered === 3, 'three dead letters counted');
      assert.equal(merger.stats().failures, 0, 'no merge failed');
      assert.ok(log.calls.some((c) => c.level === 'warn' && /3 staged snapshot\(s\) could not be applied/.test(c.message)));
      const before = merger.stats().merges;
      await waitFor(() => merger.stats().merges > before + 2, 'more merges after it');
    } finally {
      await stager.close();
      await merger.close();
    }
    await db.pool.query('DELETE FROM public.quarantine');
  });

  test('migrate() leaves alone a FOREIGN KEY and an UPDATE OF trigger on columns the merge never writes', async () => {
    const other = await createTestDb('fault_poison_quiet');
    try {
      await other.pool.query(`
        CREATE TABLE public.owners (id int PRIMARY KEY);
        ALTER TABLE public.workspace_agents ADD COLUMN owner_id int REFERENCES public.owners (id);
        CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NEW; END $$;
        CREATE TRIGGER owner_changed BEFORE UPDATE OF owner_id ON public.workspace_agents FOR EACH ROW EXECUTE FUNCTION public.noop();
        CREATE TRIGGER on_insert BEFORE INSERT ON public.workspace_agents FOR EACH ROW EXECUTE FUNCTION public.noop();
      `);
      const quiet = recordingLogger();
      await migrate({ connectionString: other.url }, { logger: quiet });
      assert.deepEqual(quiet.calls.filter((c) => c.level === 'warn').map((c) => c.message), []);
      // the same trigger on a column the merge writes is reported
      await other.pool.query(
        'CREATE TRIGGER seen BEFORE UPDATE OF last_connected_at ON public.workspace_agents FOR EACH ROW EXECUTE FUNCTION public.noop()',
      );
      const loud = recordingLogger();
      await migrate({ connectionString: other.url }, { logger: loud });
      const warnings = loud.calls.filter((c) => c.level === 'warn').map((c) => c.message);
      assert.equal(warnings.length, 1, warnings.join('\n'));
      assert.match(warnings[0]!, /trigger "seen"/);
    } finally {
      await other.drop();
    }
  });
});
