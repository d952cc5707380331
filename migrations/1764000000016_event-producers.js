// Applies sql/016_event_producers.sql. Forward-only (see docs/versions.md).
import { forwardOnly, sqlFile } from '../sql/load.js';

export const up = (pgm) => pgm.sql(sqlFile('016_event_producers.sql'));
export const down = forwardOnly('016_event_producers');
