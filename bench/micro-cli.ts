/**
 * `node --import tsx bench/micro-cli.ts <database-url> [agents]`: only the
 * stage() micro-benchmark, against a migrated database.
 */
import { runMicro } from './micro.ts';

const [url, agents] = process.argv.slice(2);
if (!url) throw new Error('usage: micro-cli.ts <database-url> [agents]');
console.log(JSON.stringify(await runMicro(url, agents ? Number(agents) : undefined)));
