/** Reading Prometheus's text exposition format in tests. */

export interface Exposition {
  /** Every sample: name (with _bucket/_sum/_count for histograms), labels, value. */
  samples: { name: string; labels: Record<string, string>; value: number }[];
  /** `# TYPE` of every metric family. */
  types: Map<string, string>;
  /** `# HELP` of every metric family. */
  help: Map<string, string>;
}

export function parseExposition(text: string): Exposition {
  const out: Exposition = { samples: [], types: new Map(), help: new Map() };
  for (const line of text.split('\n')) {
    if (line.startsWith('# TYPE ')) {
      const [, , name, type] = line.split(' ');
      out.types.set(name!, type!);
    } else if (line.startsWith('# HELP ')) {
      const rest = line.slice('# HELP '.length);
      const i = rest.indexOf(' ');
      out.help.set(rest.slice(0, i), rest.slice(i + 1));
    } else if (line && !line.startsWith('#')) {
      const m = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) throw new Error(`not a sample line: ${line}`);
      const labels: Record<string, string> = {};
      for (const l of (m[2] ?? '').matchAll(/([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"/g)) labels[l[1]!] = l[2]!;
      out.samples.push({ name: m[1]!, labels, value: Number(m[3]) });
    }
  }
  return out;
}

/** The sum of the samples named `name` whose labels include `where`; undefined when there is none. */
export function value(e: Exposition, name: string, where: Record<string, string> = {}): number | undefined {
  const found = e.samples.filter((s) => s.name === name && Object.entries(where).every(([k, v]) => s.labels[k] === v));
  return found.length === 0 ? undefined : found.reduce((t, s) => t + s.value, 0);
}

/** The names a scrape serves: each family, plus _bucket/_sum/_count of histograms (and _created, never used here). */
export function servedNames(e: Exposition): Set<string> {
  const names = new Set(e.samples.map((s) => s.name));
  for (const [name, type] of e.types) {
    names.add(name);
    if (type === 'histogram') for (const suffix of ['_bucket', '_sum', '_count']) names.add(name + suffix);
  }
  return names;
}

export async function scrape(url: string): Promise<Exposition> {
  const res = await fetch(url, { signal: AbortSignal.timeout(20_000) });
  if (res.status !== 200) throw new Error(`GET ${url}: ${res.status} ${await res.text()}`);
  return parseExposition(await res.text());
}
