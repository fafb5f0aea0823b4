"""How much quantization changes the answers: one run unquantized (A), one quantized (B), same questions.

    python infer.py --steps none --out runs/quant/demo_ts_none.jsonl --quiet
    python infer.py --steps none --quant int8 --out runs/quant/demo_ts_int8.jsonl --quiet
    python bench/quant_diff.py runs/quant/demo_ts_none.jsonl runs/quant/demo_ts_int8.jsonl

Per question, from the two infer.py traces: do the final SQLs differ (as written), and do their execution results
differ (the rows each run got when infer.py executed them, compared as multisets, or their errors). Prints the
counts, EX of both runs when the traces carry a verdict (`correct`, paired as bench/compare.py does), and the questions whose results differ.
"""
import json
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.compare import paired  # noqa: E402


def read(path):
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    return [r for r in rows if "summary" not in r]


def result(trace):
    """What executing the final SQL gave: its error, or its rows as a multiset (row order aside)."""
    return ("error", trace["error"]) if trace["error"] else Counter(json.dumps(r) for r in trace["rows"])


def main(a_path, b_path):
    a, b = read(a_path), read(b_path)
    if [t["question"] for t in a] != [t["question"] for t in b]:
        sys.exit("the two traces do not answer the same questions in the same order")
    sql = [i for i, (x, y) in enumerate(zip(a, b)) if x["sql"] != y["sql"]]
    res = [i for i, (x, y) in enumerate(zip(a, b)) if result(x) != result(y)]
    print(f"A = {a_path}\nB = {b_path}\n{len(a)} questions: final SQL differs on {len(sql)}, "
          f"execution result differs on {len(res)}")
    if all("correct" in t for t in a + b):  # bench/compare.py's paired figures (it wants a whole split)
        r = paired(*(np.array([t["correct"] for t in x], dtype=int) for x in (a, b)))
        print(f"EX: A {r['a']:.1f}, B {r['b']:.1f}, B - A {r['diff']:+.1f} (95% {r['lo']:+.1f} to {r['hi']:+.1f}); "
              f"right only in A {r['only_a']}, only in B {r['only_b']}, McNemar p {r['p']:.2f}")
    for i in res:
        print(f"\n[{a[i]['db_id']}] {a[i]['question']}\n  A: {a[i]['sql']}\n  B: {b[i]['sql']}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(*sys.argv[1:])
