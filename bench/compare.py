"""Two runs on the same questions, compared the way a choice should be: paired, with an interval.

    python bench/compare.py runs/val_a.jsonl runs/val_b.jsonl --data data/spider --split val

For every step both traces ran (bench/steps.py's columns), per question: is A right, is B right. Prints B - A in
EX points with a 95% interval from a paired bootstrap over questions (10,000 resamples, seeded), the questions
only A and only B get right, and the exact McNemar p-value on those. A change counts when it wins on both
validation checks (val and val2) and its interval excludes zero; a gain inside the interval is not a gain.
"""
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.steps import FIELDS, read_traces, step_preds, traces_and_split  # noqa: E402
from route.evaluate import evaluate  # noqa: E402


def paired(a: np.ndarray, b: np.ndarray, resamples: int = 10_000, seed: int = 0) -> dict:
    """B - A on paired 0/1 outcomes: difference in points, 95% bootstrap interval, discordant counts, McNemar p."""
    d = b.astype(float) - a.astype(float)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    lo, hi = np.percentile(d[idx].mean(axis=1), [2.5, 97.5])
    only_a, only_b = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return {"a": 100 * a.mean(), "b": 100 * b.mean(), "diff": 100 * d.mean(), "lo": 100 * lo, "hi": 100 * hi,
            "only_a": only_a, "only_b": only_b, "p": p}


def main(argv=None):
    args, ds = traces_and_split(argv)
    if len(args.traces) != 2:
        sys.exit("give exactly two traces: A (the reference) and B (the change)")
    (rows_a, sum_a), (rows_b, sum_b) = (read_traces(p, len(ds.examples)) for p in args.traces)
    plain = not sum_a.get("steps") and not sum_b.get("steps")  # --steps none: the TS answer is plain TS
    print(f"A = {args.traces[0]}\nB = {args.traces[1]}\n{len(ds.examples)} questions of {ds.name}")
    print(f"{'step':10}{'A':>7}{'B':>7}{'B - A':>8}   {'95% interval':16}{'only A':>7}{'only B':>7}{'p':>8}")
    shown = None
    for name, key in FIELDS:
        pa, pb = step_preds(rows_a, key), step_preds(rows_b, key)
        if pa is None or pb is None or (pa, pb) == shown:  # a step that ran on neither side answers as before
            continue
        shown, name = (pa, pb), "plain TS" if plain and key == "ts_sql" else name
        a, b = (np.array([r.correct for r in evaluate(p, ds.examples).results]) for p in (pa, pb))
        r = paired(a, b)
        print(f"{name:10}{r['a']:>7.1f}{r['b']:>7.1f}{r['diff']:>+8.1f}   [{r['lo']:+5.1f}, {r['hi']:+5.1f}]    "
              f"{r['only_a']:>7}{r['only_b']:>7}{r['p']:>8.3f}")


if __name__ == "__main__":
    main()
