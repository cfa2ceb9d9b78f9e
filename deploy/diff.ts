// A small line diff (longest common subsequence) for showing config changes in plans.

export type DiffLine = { op: ' ' | '-' | '+'; text: string };

export function diffLines(before: string, after: string): DiffLine[] {
  const a = before === '' ? [] : before.replace(/\n$/, '').split('\n');
  const b = after === '' ? [] : after.replace(/\n$/, '').split('\n');
  const n = a.length;
  const m = b.length;
  // lcs[i][j]: length of the LCS of a[i..] and b[j..]
  const lcs: number[][] = Array.from({ length: n + 1 }, () => new Array<number>(m + 1).fill(0));
  for (let i = n - 1; i >= 0; i--) {
    const row = lcs[i]!;
    const next = lcs[i + 1]!;
    for (let j = m - 1; j >= 0; j--) {
      row[j] = a[i] === b[j] ? next[j + 1]! + 1 : Math.max(next[j]!, row[j + 1]!);
    }
  }
  const out: DiffLine[] = [];
  let i = 0;
  let j = 0;
  while (i < n && j < m) {
    if (a[i] === b[j]) {
      out.push({ op: ' ', text: a[i]! });
      i++;
      j++;
    } else if (lcs[i + 1]![j]! >= lcs[i]![j + 1]!) {
      out.push({ op: '-', text: a[i++]! });
    } else {
      out.push({ op: '+', text: b[j++]! });
    }
  }
  while (i < n) out.push({ op: '-', text: a[i++]! });
  while (j < m) out.push({ op: '+', text: b[j++]! });
  return out;
}

/** The changed lines with `context` unchanged lines around each change; [] when equal. */
export function formatDiff(before: string, after: string, context = 2): string[] {
  const d = diffLines(before, after);
  if (!d.some((l) => l.op !== ' ')) return [];
  const show = new Array<boolean>(d.length).fill(false);
  d.forEach((l, k) => {
    if (l.op === ' ') return;
    for (let x = Math.max(0, k - context); x <= Math.min(d.length - 1, k + context); x++) {
      show[x] = true;
    }
  });
  const out: string[] = [];
  let gap = false;
  d.forEach((l, k) => {
    if (!show[k]) {
      if (!gap) out.push('  ...');
      gap = true;
      return;
    }
    gap = false;
    out.push(`${l.op} ${l.text}`);
  });
  return out;
}
