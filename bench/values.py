"""Value linking without a model: are the values a gold query compares with shown to the model?

    python bench/values.py --data data/spider --split val [--split val2]

For every question whose gold SQL compares a column with a string literal (=, !=, LIKE, IN), the literal counts
as shown when a `table.column = 'value'` line of route/values.py carries it (case-insensitively; a LIKE pattern
when the value contains it), and, for comparison, when the schema prompt's three sample rows per table hold it.
Also: lines shown per question, the time to match a question, and the index of the largest database (build
time, cells, bytes). The profile of gold SQL spends nothing: no model runs.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlglot import exp  # noqa: E402

from route.database import open_database  # noqa: E402
from route.datasets import default_root, load_dataset  # noqa: E402
from route.sql import parse  # noqa: E402
from route.values import ValueLinker, build_index, name_words  # noqa: E402


def literals(sql: str) -> list[tuple[str, bool]]:
    """(text, is_like) of each string literal the gold compares a column with. Spider writes most of them in
    double quotes, which SQLite reads as a string where no column has that name (sqlglot: a quoted column)."""
    tree, out = parse(sql), []
    if tree is None:
        return out
    for node in tree.find_all(exp.EQ, exp.NEQ, exp.Like, exp.In):
        like = isinstance(node, exp.Like)
        for rhs in node.expressions if isinstance(node, exp.In) else [node.expression]:
            if isinstance(rhs, exp.Literal) and rhs.is_string:
                text = rhs.this
            elif isinstance(rhs, exp.Column) and not rhs.table and rhs.this.args.get("quoted"):
                text = rhs.name
            else:
                continue
            if text.strip("% "):
                out.append((text.strip("%").lower() if like else text.lower(), like))
    return out


def shown(lit: tuple[str, bool], values: list[str]) -> bool:
    text, like = lit
    return any(text in v.lower() if like else text == v.lower() for v in values)


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(default_root()))
    ap.add_argument("--split", action="append", default=None)
    args = ap.parse_args(argv)
    print(f"{'split':8}{'questions':>10}{'with literals':>15}{'literals':>10}{'shown':>8}{'in samples':>12}"
          f"{'lines/q':>9}{'ms/q':>7}")
    for split in args.split or ["val", "val2"]:
        ds, linkers = load_dataset(args.data, split), {}
        n_q = n_lit = n_shown = n_sample = lines = 0
        seconds = 0.0
        for e in ds.examples:
            db = open_database(e.db_path)
            if e.db_id not in linkers:
                names = name_words([t.name for t in db.tables] + [c.name for t in db.tables for c in t.columns])
                linkers[e.db_id] = ValueLinker(build_index(db), names)
            t0 = time.perf_counter()
            matches = linkers[e.db_id].match(e.question)
            seconds += time.perf_counter() - t0
            lines += len(matches)
            lits = literals(e.gold_sql)
            if not lits:
                continue
            samples = [str(v) for rows in db.sample_rows(3).values() for row in rows for v in row]
            n_q, n_lit = n_q + 1, n_lit + len(lits)
            n_shown += sum(shown(lit, [v for _, _, v in matches]) for lit in lits)
            n_sample += sum(shown(lit, samples) for lit in lits)
        print(f"{split:8}{len(ds):>10}{n_q:>15}{n_lit:>10}{100 * n_shown / n_lit:>7.1f}%{100 * n_sample / n_lit:>11.1f}%"
              f"{lines / len(ds):>9.2f}{1000 * seconds / len(ds):>7.2f}")
    root = Path(args.data) / "database"
    largest = max(root.glob("*/*.sqlite"), key=lambda p: p.stat().st_size)
    t0 = time.perf_counter()
    index = build_index(open_database(largest))
    t1 = time.perf_counter()
    ValueLinker(index)
    print(f"largest database {largest.name} ({largest.stat().st_size / 1e6:.1f} MB): index of {len(index['cells'])} "
          f"cells, {len(json.dumps(index)) / 1e6:.2f} MB as JSON, built in {t1 - t0:.2f} s "
          f"(+ {time.perf_counter() - t1:.2f} s to load), partial: {index['partial']}")


if __name__ == "__main__":
    main()
