import { benchCommand } from './bench-command.ts';
import type { Command } from './command.ts';
import { demoCommand } from './demo-command.ts';
import { mergeCommand } from './merge-command.ts';
import { mergerCommand } from './merger-command.ts';
import { migrateCommand } from './migrate-command.ts';
import { scheduleCommand } from './schedule-command.ts';
import { statusCommand } from './status-command.ts';
import { unscheduleCommand } from './unschedule-command.ts';

/** Every subcommand, in the order --help lists them. */
export const commands: Command[] = [migrateCommand, mergeCommand, mergerCommand, scheduleCommand, unscheduleCommand, statusCommand, demoCommand, benchCommand];
