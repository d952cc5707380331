/** Reads one of the numbered SQL files in sql/ (the single source of truth). */
export function sqlFile(name: string): string;
