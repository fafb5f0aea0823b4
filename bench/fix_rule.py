"""What the chain would have answered under the previous rule for fixes, from a trace of the current one.

    python bench/fix_rule.py runs/val2_mcp.jsonl runs/val2_mcp_oldrule.jsonl --data DIR --split val2
    python bench/compare.py runs/val2_mcp_oldrule.jsonl runs/val2_mcp.jsonl --data DIR --split val2

Current rule (mcp.py): an NC fix or a CW completion replaces the answer only if it runs and wins the vote it
joins; CW is not asked where the candidates agree. Previous rule: any NC fix that runs replaced the answer, and
any CW completion that runs with rows. The trace keeps every fix the model wrote (its candidates, sources "nc"
and "cw"), so the previous rule's answers follow from it, with one gap: where the previous rule would have
asked CW (3+ tables, candidates agreeing, or after an NC fix the current rule rejected), the model was not
asked, and this script keeps the answer before CW. Writes a copy of the trace with nc_sql and sql replaced.
"""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.steps import read_traces, traces_and_split  # noqa: E402
from route.database import open_database  # noqa: E402


def previous_rule(row: dict, db) -> tuple[str, str]:
    """(nc_sql, sql) under the previous rule."""
    fix = {c["source"]: c for c in row["candidates"] if c["source"] in ("nc", "cw")}
    nc_sql = fix["nc"]["sql"] if "nc" in fix and fix["nc"]["error"] is None else row.get("vote_sql") or row["sql"]
    cw = fix.get("cw")
    runs = cw is not None and cw["error"] is None and bool(db.execute(cw["sql"]).rows)
    return nc_sql, cw["sql"] if runs else nc_sql


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    out = Path(argv.pop(1))
    args, ds = traces_and_split(argv)
    rows, summary = read_traces(args.traces[0], len(ds.examples))
    changed = 0
    with open(out, "w", encoding="utf-8") as f:
        for row, ex in zip(rows, ds.examples):
            nc_sql, sql = previous_rule(row, open_database(ex.db_path))
            changed += sql != row["sql"]
            f.write(json.dumps(row | {"nc_sql": nc_sql, "sql": sql}, ensure_ascii=False) + "\n")
        f.write(json.dumps({"summary": summary}) + "\n")
    print(f"{out}: {changed} of {len(rows)} final answers differ under the previous rule")


if __name__ == "__main__":
    main()
