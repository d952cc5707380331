import type { Command } from './command.ts';
import { demoCommand } from './demo-command.ts';
import { mergeCommand } from './merge-command.ts';
import { mergerCommand } from './merger-command.ts';
import { migrateCommand } from './migrate-command.ts';
import { scheduleCommand } from './schedule-command.ts';
import { statusCommand } from './status-command.ts';
import { unscheduleCommand } from './unschedule-command.ts';
import { watchCommand } from './watch-command.ts';

/**
 * Every subcommand, in the order --help lists them. The benchmark is not one: it needs bench/, which is
 * not published (`npm run bench` in a source checkout).
 */
export const commands: Command[] = [migrateCommand, mergeCommand, mergerCommand, scheduleCommand, unscheduleCommand, statusCommand, watchCommand, demoCommand];
