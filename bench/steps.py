"""Score every step of an MCP trace (infer.py --out): what a chain cut after each step would answer.

    python bench/steps.py runs/val_untuned.jsonl [runs/val_adapter.jsonl ...] [--data DIR] --split val

Greedy steps are deterministic, so a chain cut after TS answers exactly the trace's `ts_sql`, one cut after
NC its `nc_sql`, and so on; the pre-SQL is plain text-to-SQL on the full schema (the `--steps none` answer,
up to bf16 batch-order noise). Prints one row per trace: EX of each step, the share of final queries that
fail to execute, and the run's time.
"""
import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from route.database import open_database  # noqa: E402
from route.datasets import default_root, load_dataset  # noqa: E402
from route.evaluate import evaluate  # noqa: E402

FIELDS = [("pre-SQL", "pre_sql"), ("SL+TS", "ts_sql"), ("+vote", "vote_sql"), ("+NC", "nc_sql"),
          ("full", "sql")]


def read_traces(path, n: int) -> tuple[list[dict], dict]:
    """The per-question rows of an infer.py --out file and its summary (times, steps)."""
    rows = [json.loads(line) for line in open(path, encoding="utf-8") if line.strip()]
    summary = rows.pop()["summary"] if rows and "summary" in rows[-1] else {}
    if len(rows) != n:
        sys.exit(f"{path}: {len(rows)} traces for {n} questions")
    return rows, summary


def traces_and_split(argv):
    """The command line both trace scripts take: trace files, --data, --split; returns (args, dataset)."""
    ap = argparse.ArgumentParser()
    ap.add_argument("traces", nargs="+")
    ap.add_argument("--data", default=str(default_root()))
    ap.add_argument("--split", required=True)
    ap.add_argument("--limit", type=int, default=0, help="the traces cover the split's first N questions")
    args = ap.parse_args(argv)
    ds = load_dataset(args.data, args.split)
    if args.limit:
        ds.examples = ds.examples[:args.limit]
    return args, ds


def step_preds(rows: list[dict], key: str) -> list[str] | None:
    """What a chain cut after the step `key` answers, per question; None if the trace never ran it."""
    preds = [r.get(key) or "" for r in rows]
    if not any(preds):
        return None
    if key in ("pre_sql", "vote_sql"):  # steps that did not run fall back on the answer before them
        preds = [p or r["ts_sql"] for p, r in zip(preds, rows)]
    elif key == "nc_sql":
        preds = [p or r.get("vote_sql") or r["ts_sql"] for p, r in zip(preds, rows)]
    return preds


def main(argv=None):
    args, ds = traces_and_split(argv)
    print(f"{'trace':40}" + "".join(f"{n:>9}" for n, _ in FIELDS) + f"{'fails':>8}{'min':>7}")
    for path in args.traces:
        rows, summary = read_traces(path, len(ds.examples))
        cells = []
        for _, key in FIELDS:
            preds = step_preds(rows, key)
            cells.append(f"{'-':>9}" if preds is None else f"{100 * evaluate(preds, ds.examples).accuracy:>9.1f}")
        fails = sum(open_database(e.db_path).execute(r["sql"], timeout=10).error is not None
                    for e, r in zip(ds.examples, rows))
        minutes = summary.get("total_seconds", 0) / 60
        print(f"{Path(path).name:40}" + "".join(cells) + f"{100 * fails / len(rows):>7.1f}%{minutes:>7.1f}")

if __name__ == "__main__":
    main()
