// Applies sql/001_workspace_agents.sql. The table may belong to the application,
// so going down never drops it.
import { sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('001_workspace_agents.sql'));
export const down = () => {};
