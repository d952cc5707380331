import type { Command } from './command.ts';
import { demoCommand } from './demo-command.ts';
import { mergeCommand } from './merge-command.ts';
import { migrateCommand } from './migrate-command.ts';

/** Every subcommand, in the order --help lists them. */
export const commands: Command[] = [migrateCommand, mergeCommand, demoCommand];
