/** Reads one of the numbered SQL files in sql/ (the single source of truth). */
export function sqlFile(name: string): string;
/** The `down` of a forward-only migration: throws a clear error (the run's transaction rolls back). */
export function forwardOnly(name: string): () => never;
