"""Score a prediction file against gold SQL: execution accuracy with Spider's or BIRD's rules (route/evaluate.py).

    python score.py --pred PRED --gold GOLD --db-root DIR [--mode spider|bird] [--out results.jsonl]

PRED: one SQL per line (Spider's format; anything after a tab is ignored), JSONL (infer.py's trace, or any
{"sql": ...} rows, matched to the gold by "question_id", "dev_index", "index" or "position" when every row has
one), or BIRD's predict_dev.json. GOLD: Spider's gold format ("SQL<tab>db_id" per line) or a dataset JSON file.
The mode defaults to BIRD's rules when either file is BIRD's.
"""
import argparse
import json
import sys
from pathlib import Path

from route.database import DEFAULT_TIMEOUT
from route.datasets import Dataset, Example, read_json
from route.evaluate import BIRD_SEP, evaluate


def read_gold(path: str | Path, db_root: str | Path) -> Dataset:
    """The gold examples (from Spider's gold format or a dataset JSON file) whose database exists under db_root,
    each with its position in the file (to line up predictions given one per line)."""
    path, db_root = Path(path), Path(db_root)
    if path.suffix == ".json":
        records = [(r.get("query", r.get("SQL", "")), r["db_id"], r.get("question", ""),
                    r.get("question_id", r.get("dev_index", i)), r.get("difficulty", ""))
                   for i, r in enumerate(read_json(path))]
    else:
        records = []
        for i, line in enumerate(line for line in path.open(encoding="utf-8") if line.strip()):
            sql, _, db_id = line.strip().rpartition("\t")
            if not sql:
                raise ValueError(f"{path}: gold line {i + 1} is not 'SQL<tab>db_id'")
            records.append((sql, db_id.strip(), "", i, ""))
    gold = Dataset(f"gold/{path.stem}", [])
    for position, (sql, db_id, question, index, level) in enumerate(records):
        db_path = db_root / db_id / f"{db_id}.sqlite"
        if db_path.is_file():
            gold.examples.append(Example(question, db_id, db_path, sql.strip(), "", int(index), level, position))
        else:
            gold.skipped += 1
            gold.missing_dbs.add(db_id)
    return gold


def read_preds(path: str | Path, n_gold: int) -> list[str] | dict[int, str]:
    """Predictions as a list (by position) or a dict (by example index)."""
    path = Path(path)
    if path.suffix == ".jsonl":
        preds, by_index = [], {}
        for n, line in enumerate(path.open(encoding="utf-8"), 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: malformed JSON on line {n}, column {e.colno}: {e.msg}") from None
            if "summary" in r and "sql" not in r:  # infer.py's last line: times and EX, not a prediction
                continue
            sql = next((r[k] for k in ("sql", "pred", "prediction", "predicted_sql", "SQL", "query") if k in r), "")
            preds.append(sql or "")
            # the same id the gold side uses (read_gold: question_id, then dev_index, then the position)
            key = next((k for k in ("question_id", "dev_index", "index", "position") if k in r), None)
            if key is not None:
                by_index[int(r[key])] = sql or ""
        return by_index if len(by_index) == len(preds) and by_index else preds
    if path.suffix == ".json":  # BIRD: {"0": "SQL\t----- bird -----\tdb_id", ...}, or a list of SQL strings
        data = read_json(path)
        if isinstance(data, dict):
            return {int(k): (v or "").split("\t")[0].strip() for k, v in data.items()}
        return [(v or "").split("\t")[0].strip() for v in data]
    lines = path.read_text(encoding="utf-8").split("\n")
    while lines and not lines[-1].strip():
        lines.pop()
    if len(lines) != n_gold:  # Spider's script drops blank lines; accept files written that way too
        lines = [line for line in lines if line.strip()]
    return [line.split("\t")[0].strip() for line in lines]


def is_bird(path: str | Path) -> bool:
    """A BIRD file: a dataset JSON whose records carry BIRD's "SQL" field, or a predict_dev.json dict."""
    if Path(path).suffix != ".json":
        return False
    data = read_json(Path(path))
    if isinstance(data, dict):
        return any(isinstance(v, str) and BIRD_SEP in v for v in data.values())
    return bool(data) and isinstance(data[0], dict) and "SQL" in data[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pred", required=True, help="predictions: one SQL per line, .jsonl, or BIRD's .json")
    ap.add_argument("--gold", required=True, help="gold: 'SQL<tab>db_id' per line, or a dataset .json")
    ap.add_argument("--db-root", required=True, help="folder holding <db_id>/<db_id>.sqlite")
    ap.add_argument("--out", help="per-example results (JSONL); default: next to PRED, .results.jsonl")
    ap.add_argument("--mode", choices=("spider", "bird"), default=None,
                    help="whose rules (default: bird when the gold or the predictions are BIRD's files)")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds per query")
    ap.add_argument("--keep-distinct", action="store_true", help="spider mode: do not strip DISTINCT")
    args = ap.parse_args(argv)

    gold = read_gold(args.gold, args.db_root)
    n_gold = len(gold.examples) + gold.skipped
    preds = read_preds(args.pred, n_gold)
    if isinstance(preds, list):
        if len(preds) != n_gold:
            print(f"error: {len(preds)} predictions in {args.pred} for {n_gold} gold queries in {args.gold}",
                  file=sys.stderr)
            return 2
        preds = [preds[e.position] for e in gold]  # drop the predictions of skipped examples
    mode = args.mode or ("bird" if is_bird(args.gold) or is_bird(args.pred) else "spider")
    report = evaluate(preds, gold, mode, args.timeout, args.keep_distinct)
    out = Path(args.out) if args.out else Path(args.pred).with_suffix(".results.jsonl")
    report.write_jsonl(out)
    print(report)
    print(f"per-example results: {out}")
    return 0


if __name__ == "__main__":
    from route import cli
    sys.exit(cli.run(main))  # a bad --pred, --gold or --db-root: one line naming it
