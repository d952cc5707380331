/**
 * A static scan of src/ and sql/ for SQL text built from non-constant values:
 *   - TypeScript/JavaScript: a template literal that looks like SQL may only
 *     interpolate UPPER_CASE constants, pg.escapeIdentifier()/escapeLiteral()
 *     calls, calls with string-literal arguments only, or the parameter of a
 *     local (non-exported) helper that is only ever called with string
 *     literals; a SQL-looking string may only be `+`-joined to the same;
 *   - SQL: dynamic SQL (EXECUTE) may not be built with || or format('%s').
 * Values must travel as parameters ($1, USING). The scanner checks itself on
 * bad samples first, so it can fail.
 */
import assert from 'node:assert/strict';
import { readdirSync, readFileSync } from 'node:fs';
import { join, relative } from 'node:path';
import { describe, test } from 'node:test';
import { PACKAGE_ROOT } from '../../src/paths.ts';

interface Literal {
  kind: 'string' | 'template';
  /** Static text (template parts joined with a placeholder). */
  text: string;
  /** Interpolated expressions of a template. */
  exprs: string[];
  start: number;
  end: number;
}

/** Finds string and template literals, skipping comments and regex-free code well enough for this codebase. */
export function literals(src: string): Literal[] {
  const out: Literal[] = [];
  let i = 0;
  const readTemplate = (): Literal => {
    const start = i;
    i++; // `
    let text = '';
    const exprs: string[] = [];
    while (i < src.length && src[i] !== '`') {
      if (src[i] === '\\') {
        text += src.slice(i, i + 2);
        i += 2;
      } else if (src[i] === '$' && src[i + 1] === '{') {
        i += 2;
        let depth = 1;
        const from = i;
        while (i < src.length && depth > 0) {
          const c = src[i]!;
          if (c === '`') {
            readTemplate(); // nested template: skip it whole
            continue;
          }
          if (c === "'" || c === '"') {
            readString();
            continue;
          }
          if (c === '{') depth++;
          if (c === '}') depth--;
          i++;
        }
        exprs.push(src.slice(from, i - 1).trim());
        text += '\u0000';
      } else {
        text += src[i];
        i++;
      }
    }
    i++;
    return { kind: 'template', text, exprs, start, end: i };
  };
  const readString = (): Literal => {
    const start = i;
    const quote = src[i]!;
    i++;
    let text = '';
    while (i < src.length && src[i] !== quote && src[i] !== '\n') {
      if (src[i] === '\\') {
        text += src.slice(i, i + 2);
        i += 2;
      } else text += src[i++];
    }
    i++;
    return { kind: 'string', text, exprs: [], start, end: i };
  };
  while (i < src.length) {
    const c = src[i]!;
    if (c === '/' && src[i + 1] === '/') {
      while (i < src.length && src[i] !== '\n') i++;
    } else if (c === '/' && src[i + 1] === '*') {
      const close = src.indexOf('*/', i + 2);
      i = close < 0 ? src.length : close + 2;
    } else if (c === '`') out.push(readTemplate());
    else if (c === "'" || c === '"') out.push(readString());
    else i++;
  }
  return out;
}

const VERBS = ['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'COPY', 'ALTER', 'CREATE', 'DROP', 'GRANT', 'REVOKE', 'TRUNCATE', 'CALL', 'EXECUTE'];
const CLAUSES = ['FROM', 'WHERE', 'INTO', 'SET', 'VALUES', 'RETURNING', 'JOIN', 'TABLE', 'STDIN', 'LIMIT', 'ORDER', 'AS', 'ON', 'TO',
  'DATABASE', 'ROLE', 'SCHEMA', 'FUNCTION'];
const STARTS = /^\s*(SELECT|INSERT|UPDATE|DELETE|COPY|ALTER|CREATE|DROP|GRANT|REVOKE|TRUNCATE|CALL|SET|WITH)\s+(\u0000|[a-z_]+\.[a-z_]|[A-Z]{2,}\b|\*)/;

export function looksLikeSql(text: string): boolean {
  if (STARTS.test(text)) return true;
  const words = new Set(text.match(/\b[A-Z]{2,}\b/g) ?? []);
  return VERBS.some((w) => words.has(w)) && CLAUSES.some((w) => words.has(w));
}

/** Parameters of local helpers `const f = (p: string): string => ...` that every call site feeds a string literal. */
function literalOnlyHelperParams(src: string): Set<string> {
  const safe = new Set<string>();
  for (const m of src.matchAll(/(^|\n)(\s*)(export\s+)?const\s+(\w+)\s*=\s*\((\w+)(?:\s*:\s*string)?\)(?:\s*:\s*string)?\s*=>/g)) {
    if (m[3]) continue; // exported: callers elsewhere
    const [name, param] = [m[4]!, m[5]!];
    const calls = [...src.matchAll(new RegExp(`\\b${name}\\(([^)]*)\\)`, 'g'))].filter((c) => c.index !== m.index! + m[0].indexOf(name));
    if (calls.length > 0 && calls.every((c) => /^\s*'[^'\\]*'\s*$/.test(c[1]!))) safe.add(param);
  }
  return safe;
}

const SAFE_EXPR = [
  /^[A-Z][A-Z0-9_]*$/, // a constant
  /^(pg\.)?escape(Identifier|Literal)\([^()]*\)$/,
  /^[\w.]+\(\s*'[^'\\]*'\s*(,\s*'[^'\\]*'\s*)*\)$/, // a call with string literals only
];

/** Problems in one TS/JS source. */
export function scanScript(src: string): string[] {
  const problems: string[] = [];
  const safeNames = literalOnlyHelperParams(src);
  const lits = literals(src);
  // const locals built only from safe parts (quoted identifiers, constants) are safe too
  for (const m of src.matchAll(/\bconst\s+(\w+)\s*=\s*(pg\.)?escapeIdentifier\([^()]*\)\s*;/g)) safeNames.add(m[1]!);
  lits.forEach((lit, k) => {
    const decl = /\bconst\s+(\w+)\s*=\s*$/.exec(src.slice(lits[k - 1]?.end ?? 0, lit.start));
    const ends = /^\s*;/.test(src.slice(lit.end, lit.end + 20));
    if (decl && ends && lit.exprs.every((e) => SAFE_EXPR.some((re) => re.test(e)) || safeNames.has(e))) safeNames.add(decl[1]!);
  });
  const line = (at: number): number => src.slice(0, at).split('\n').length;
  const safeOperand = (code: string): boolean =>
    SAFE_EXPR.some((re) => re.test(code.trim())) || safeNames.has(code.trim());
  lits.forEach((lit, k) => {
    if (!looksLikeSql(lit.text)) return;
    for (const e of lit.exprs) {
      if (!SAFE_EXPR.some((re) => re.test(e)) && !safeNames.has(e)) problems.push(`line ${line(lit.start)}: \${${e}} interpolated into SQL`);
    }
    // `+` joins: the code between this literal and its neighbours
    const after = src.slice(lit.end, lits[k + 1]?.start ?? src.length);
    const plusAfter = /^\s*\+\s*([^\n;,)]*)/.exec(after);
    if (plusAfter && plusAfter[1]!.trim() !== '' && !safeOperand(plusAfter[1]!)) {
      problems.push(`line ${line(lit.start)}: SQL + ${plusAfter[1]!.trim()}`);
    }
    const before = src.slice(lits[k - 1]?.end ?? 0, lit.start);
    const plusBefore = /([^\n;,(=]*)\+\s*$/.exec(before);
    if (plusBefore && plusBefore[1]!.trim() !== '' && !safeOperand(plusBefore[1]!)) {
      problems.push(`line ${line(lit.start)}: ${plusBefore[1]!.trim()} + SQL`);
    }
  });
  return problems;
}

/**
 * The arguments of a format() call that its %s (or %n$s) placeholders take:
 * `undefined` when the call cannot be read.
 */
function percentSArgs(call: string): string[] | undefined {
  // the format string: '...' or $tag$...$tag$
  const fmt = /^\s*'((?:[^']|'')*)'/.exec(call) ?? /^\s*\$(\w*)\$[\s\S]*?\$\1\$/.exec(call);
  if (!fmt) return undefined;
  const text = fmt[0].startsWith("'", fmt[0].search(/\S/)) ? fmt[1]! : fmt[0];
  const args: string[] = [];
  let depth = 0;
  let quoted = false;
  let from = fmt[0].length;
  for (let i = from; i < call.length; i++) {
    const c = call[i]!;
    if (c === "'") quoted = !quoted;
    if (quoted) continue;
    if (c === '(') depth++;
    if (c === ')') {
      if (depth === 0) {
        args.push(call.slice(from, i));
        break;
      }
      depth--;
    }
    if (c === ',' && depth === 0) {
      args.push(call.slice(from, i));
      from = i + 1;
    }
  }
  const values = args.slice(1).map((a) => a.trim());
  const picked: string[] = [];
  let next = 0;
  for (const m of text.matchAll(/%(?:(\d+)\$)?([sIL%])/g)) {
    if (m[2] === '%') continue;
    const index = m[1] ? Number(m[1]) - 1 : next;
    next = index + 1;
    if (m[2] === 's') picked.push(values[index] ?? '');
  }
  return picked;
}

/**
 * Problems in one SQL file: dynamic SQL built by concatenation, or by
 * format()'s %s with anything but an explicit integer cast (identifiers go
 * through %I, values through %L or USING).
 */
export function scanSql(src: string): string[] {
  const problems: string[] = [];
  const code = src.replace(/--[^\n]*/g, '');
  for (const m of code.matchAll(/\bEXECUTE\s+(?!ON\b)([\s\S]*?);/gi)) {
    const stmt = m[1]!;
    if (/^(FUNCTION|PROCEDURE)\b/i.test(stmt.trim())) continue; // GRANT EXECUTE ON ..., CREATE TRIGGER ... EXECUTE FUNCTION
    if (/\|\|/.test(stmt)) problems.push(`EXECUTE built with ||: ${stmt.slice(0, 80)}`);
    for (const f of stmt.matchAll(/format\s*\(/gi)) {
      const args = percentSArgs(stmt.slice(f.index! + f[0].length));
      if (args === undefined || args.some((a) => !/::\s*(int|integer|int4|int8|bigint)\s*$/i.test(a))) {
        problems.push(`EXECUTE built with format('%s') of a non-integer: ${stmt.slice(0, 80)}`);
      }
    }
  }
  return problems;
}

function files(dir: string, exts: string[]): string[] {
  return readdirSync(dir, { withFileTypes: true }).flatMap((e) =>
    e.isDirectory() ? files(join(dir, e.name), exts) : exts.some((x) => e.name.endsWith(x)) ? [join(dir, e.name)] : [],
  );
}

describe('no SQL built from input', () => {
  test('the scanner flags the patterns it is meant to (so it can fail)', () => {
    const bad = [
      'const q = `SELECT * FROM heartbeat.status WHERE id = ${id}`;',
      'await client.query(`DELETE FROM ${table} WHERE x = 1`);',
      "const q = 'SELECT * FROM public.workspace_agents WHERE id = ' + agentId;",
      "const q = name + ' FROM heartbeat.status WHERE true SELECT';",
      'const q = `COPY ${schema}.${table} (a) FROM STDIN`;',
      'export const col = (c: string) => `SELECT ${c} FROM t`; col(userInput);',
      'const view = `${schema}.pg_stat_statements`; const q = `SELECT sum(calls) FROM ${view}`;',
    ];
    for (const sample of bad) assert.notDeepEqual(scanScript(sample), [], `flagged: ${sample}`);
    const good = [
      'const Q = `SELECT ${ms(\'merge_lag\')} FROM heartbeat.status`;',
      'const Q = `COPY ${STAGING} (a, b) ` + \'FROM STDIN (FORMAT binary)\';',
      'await c.query(`CREATE DATABASE ${pg.escapeIdentifier(name)}`);',
      "const ms = (column: string): string => `extract(epoch FROM ${column}) AS ${column}_ms`; const Q = `SELECT ${ms('a')} FROM t`;",
      'log.warn(`COPY into staging failed; retrying in ${delay} ms`);',
      'ctx.out(`${n} statements (${c} COPY + 1 merge); one UPDATE per heartbeat would be ${m}`);',
      'const view = `${pg.escapeIdentifier(schema)}.pg_stat_statements`; const q = `SELECT sum(calls) FROM ${view}`;',
      "await pool.query('SELECT * FROM heartbeat.agent_status($1, $2)', [timeout, ids]);",
    ];
    for (const sample of good) assert.deepEqual(scanScript(sample), [], `not flagged: ${sample}`);
    assert.notDeepEqual(scanSql("EXECUTE 'SELECT * FROM ' || tbl;"), []);
    assert.notDeepEqual(scanSql("EXECUTE format('SELECT * FROM %s', tbl);"), []);
    assert.deepEqual(scanSql("EXECUTE format('SELECT * FROM %I WHERE x = $1', tbl) USING v;"), []);
    assert.notDeepEqual(scanSql("EXECUTE format('SELECT %I FROM %1$s', tbl);"), [], 'positional %s of a name');
    assert.notDeepEqual(scanSql("EXECUTE format('MODULUS %s, REMAINDER %s', n::integer, k);"), [], 'one %s without a cast');
    assert.deepEqual(scanSql("EXECUTE format('CREATE TABLE %I (MODULUS %s, REMAINDER %s)', name, n::integer, (k)::int);"), []);
    assert.deepEqual(scanSql('EXECUTE format($q$DELETE FROM heartbeat.%1$I WHERE x = $1$q$, part) USING v;'), []);
    assert.notDeepEqual(scanSql('EXECUTE format($q$DELETE FROM %1$s$q$, part) USING v;'), []);
    assert.deepEqual(scanSql('GRANT EXECUTE ON FUNCTION heartbeat.f() TO heartbeat_writer;'), []);
  });

  test('src/ and sql/ build no SQL text from non-constant values', () => {
    const problems: string[] = [];
    const scripts = [...files(join(PACKAGE_ROOT, 'src'), ['.ts', '.js']), ...files(join(PACKAGE_ROOT, 'sql'), ['.ts', '.js'])];
    const sqls = files(join(PACKAGE_ROOT, 'sql'), ['.sql']);
    assert.ok(scripts.length > 5 && sqls.length >= 5, 'found the sources');
    for (const f of scripts) for (const p of scanScript(readFileSync(f, 'utf8'))) problems.push(`${relative(PACKAGE_ROOT, f)} ${p}`);
    for (const f of sqls) for (const p of scanSql(readFileSync(f, 'utf8'))) problems.push(`${relative(PACKAGE_ROOT, f)} ${p}`);
    assert.deepEqual(problems, []);
  });
});
