/** The fenced code blocks of the README and docs/ pages, for the tests that run them. */
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

const ROOT = fileURLToPath(new URL('../..', import.meta.url));

export interface Block {
  page: string;
  lang: string;
  code: string;
  line: number;
  /** The HTML comment on the line above the fence, if any. */
  marker: string | undefined;
}

/** The fenced code blocks of a Markdown page (path relative to the repository), with the comment right above each. */
export function codeBlocks(page: string): Block[] {
  const lines = readFileSync(join(ROOT, page), 'utf8').split('\n');
  const blocks: Block[] = [];
  for (let i = 0; i < lines.length; i++) {
    const open = /^```(\S*)/.exec(lines[i]!);
    if (!open) continue;
    const start = i;
    const body: string[] = [];
    for (i++; i < lines.length && !/^```\s*$/.test(lines[i]!); i++) body.push(lines[i]!);
    const above = lines[start - 1]?.trim() ?? '';
    blocks.push({ page, lang: open[1]!, code: body.join('\n') + '\n', line: start + 1, marker: /^<!--.*-->$/.test(above) ? above : undefined });
  }
  return blocks;
}

