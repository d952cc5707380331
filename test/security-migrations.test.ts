/**
 * Issue 11, the migrations install path: the application's login role owns
 * public.workspace_agents, a superuser runs migrate(), and every escalation
 * attack of test/support/escalation.ts is tried as the application. Re-running
 * migrate() is one more way the unsafe setups must be refused (it checks the
 * privilege model on every run, also when nothing is pending).
 */
import { silentLogger } from '../src/logger.ts';
import { migrate } from '../src/migrate.ts';
import { escalationSuite } from './support/escalation.ts';

escalationSuite({
  name: 'migrations',
  install: (url) => migrate({ connectionString: url }, { logger: silentLogger }),
  reapply: { 'migrate()': (url) => migrate({ connectionString: url }, { logger: silentLogger }) },
});
