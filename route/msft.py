"""Building the MSFT training data (paper Sec. 3.2): four synthetic tasks from a Text-to-SQL training set.

For every training question whose gold SQL runs:
  TS  schema (+ sample rows) + question -> gold SQL; half see a pruned schema (the gold's tables and columns
      plus random distractors), as TS does inside the MCP chain after schema linking.
  SL  the same input -> JSON of the tables and columns the gold uses (sqlglot analysis).
  NC  question + a candidate SQL + its execution result -> "correct", or "wrong" + the gold. Candidates: the
      gold re-written by sqlglot, or with one deterministic edit (EDITS); with --nc-from-model, also the SQL a
      model writes. Labels come from execution, never from the edit.
  CW  the gold cut at a clause boundary -> the rest of it.
Targets are the gold as written; prompts are prompts.py's templates, stored as chat messages so any chat format
can render them.

    python -m route.msft [--data DIR] --out data/msft [--limit 2000] [--seed 0] [--nc-from-model]
"""
import argparse
import json
import random
from collections import Counter
from pathlib import Path

from sqlglot import exp

from . import prompts
from .database import open_database
from .datasets import HELD_OUT_DBS, VALIDATION_DBS, default_root, load_dataset
from .evaluate import results_match
from .files import atomic_file
from .sql import clause_prefixes, order_matters, parse, used_schema

TASKS = ("ts", "sl", "nc", "cw")


def _record(task, ex, schema, answer, **inputs) -> dict:
    msgs, start = prompts.messages(task, schema, ex.question, ex.evidence, **inputs)
    return {"task": task, "db_id": ex.db_id, "messages": msgs, "answer_start": start,
            "target": prompts.target(task, answer)}


def same_result(db, sql: str, gold: str, gold_rows, timeout: float):
    """(the run of `sql`, whether it returns the gold's rows): the label of every NC candidate."""
    run = db.execute(sql, timeout=timeout)
    return run, run.error is None and results_match(run.rows, gold_rows, order_matters(gold))


_FLIP = {exp.GT: exp.LT, exp.LT: exp.GT, exp.GTE: exp.LTE, exp.LTE: exp.GTE, exp.EQ: exp.NEQ, exp.NEQ: exp.EQ}
_AGGS = (exp.Max, exp.Min, exp.Avg, exp.Sum)


def _edit(tree: exp.Expression, kind: str, db, rng: random.Random) -> exp.Expression | None:
    """One deterministic edit of a copy of the gold tree; None when `kind` does not apply to it."""
    t = tree.copy()
    sel = t if isinstance(t, exp.Select) else t.find(exp.Select)
    if sel is None:
        return None
    if kind == "column":  # a selected column becomes another of the query's tables
        cols = [c for c in sel.expressions if isinstance(c, exp.Column)]
        tables = [tb for tb in (db.table(x.name) for x in t.find_all(exp.Table)) if tb is not None]
        others = [c.name for tb in tables for c in tb.columns]
        if not cols or not others:
            return None
        col = rng.choice(cols)
        choices = [o for o in others if o.lower() != col.name.lower()]
        if not choices:
            return None
        col.set("this", exp.to_identifier(rng.choice(choices)))
    elif kind == "table":  # a joined table becomes another of the database's
        used = list(t.find_all(exp.Table))
        others = [tb.name for tb in db.tables if tb.name.lower() not in {u.name.lower() for u in used}]
        if len(used) < 2 or not others:
            return None
        rng.choice(used).set("this", exp.to_identifier(rng.choice(others)))
    elif kind == "drop_condition":
        if (where := sel.args.get("where")) is None:
            return None
        if isinstance(where.this, exp.And) and rng.random() < 0.5:
            where.set("this", rng.choice([where.this.this, where.this.expression]))
        else:
            sel.set("where", None)
    elif kind == "comparison":
        if not (comps := list(sel.find_all(*_FLIP))):
            return None
        c = rng.choice(comps)
        c.replace(_FLIP[type(c)](this=c.this, expression=c.expression))
    elif kind == "aggregate":
        if not (aggs := list(sel.find_all(*_AGGS))):
            return None
        a = rng.choice(aggs)
        a.replace(rng.choice([k for k in _AGGS if k is not type(a)])(this=a.this))
    elif kind == "order":
        if (order := t.args.get("order")) is None:
            return None
        o = rng.choice(order.expressions)
        o.set("desc", not o.args.get("desc"))
    elif kind == "limit":
        if (limit := t.args.get("limit")) is None:
            return None
        if rng.random() < 0.5:
            t.set("limit", None)
        else:
            limit.set("expression", exp.Literal.number(rng.choice([2, 3, 5])))
    elif kind in ("distinct", "group"):
        if not sel.args.get(kind):
            return None
        sel.set(kind, None)
    return t


EDITS = ("column", "table", "drop_condition", "comparison", "aggregate", "order", "limit", "distinct", "group")


def nc_candidate(gold: str, tree, db, rng: random.Random, correct_share: float) -> tuple[str, str] | None:
    """(candidate SQL, its kind); "rewrite" is the gold re-written by sqlglot, else the name of an edit."""
    if rng.random() < correct_share:
        return tree.sql(dialect="sqlite"), "rewrite"
    kinds = list(EDITS)
    rng.shuffle(kinds)
    for kind in kinds:
        edited = _edit(tree, kind, db, rng)
        if edited is not None:
            return edited.sql(dialect="sqlite"), kind
    return None


def _noisy_keep(keep: dict[str, set[str]], db, rng: random.Random) -> dict[str, set[str]]:
    """The gold's tables/columns plus distractors, like a schema-linking answer that over-selects."""
    out = {t: set(c) for t, c in keep.items()}
    for t in list(out):
        extra = [c.name for c in db.table(t).columns if c.name not in out[t]]
        out[t] |= set(rng.sample(extra, min(len(extra), rng.randint(0, 3))))
    others = [tb for tb in db.tables if tb.name not in out]
    if others and rng.random() < 0.5:
        tb = rng.choice(others)
        out[tb.name] = {c.name for c in rng.sample(tb.columns, min(len(tb.columns), 2))}
    return out


def build_examples(examples, tasks=TASKS, seed: int = 0, nc_correct_share: float = 0.4,
                   timeout: float = 5.0, model_sql: list[str] | None = None) -> tuple[list[dict], Counter]:
    """The MSFT records for `examples` (route.datasets.Example), and counts of what was made and dropped.
    model_sql[i]: SQL a model wrote for examples[i], one more NC candidate."""
    rng = random.Random(seed)
    records, counts = [], Counter()
    for n, ex in enumerate(examples):
        db = open_database(ex.db_path)
        gold_run = db.execute(ex.gold_sql, timeout=timeout)
        if gold_run.error:
            counts["dropped: gold does not execute"] += 1
            continue
        tree = parse(ex.gold_sql)
        schema = db.schema_prompt()  # with database.SAMPLE_ROWS rows per table, as inference shows it
        keep = used_schema(ex.gold_sql, db)
        if "ts" in tasks:
            pruned = tree is not None and keep and rng.random() < 0.5
            ts_schema = db.schema_prompt(keep=_noisy_keep(keep, db, rng)) if pruned else schema
            records.append(_record("ts", ex, ts_schema, ex.gold_sql))
            counts["ts (pruned schema)" if pruned else "ts"] += 1
        if "sl" in tasks:
            if keep:
                records.append(_record("sl", ex, schema, keep))
                counts["sl"] += 1
            else:
                counts["dropped sl: gold not analysable"] += 1
        if "nc" in tasks:
            edit = nc_candidate(ex.gold_sql, tree, db, rng, nc_correct_share) if tree is not None else None
            if edit is None:
                counts["dropped nc: no edit applies"] += 1
            cands = [] if edit is None else [edit]
            if model_sql is not None and model_sql[n].strip():
                cands.append((model_sql[n], "model"))
            for sql, kind in cands:
                run, same = same_result(db, sql, ex.gold_sql, gold_run.rows, timeout)
                if kind == "rewrite" and not same:
                    counts["dropped nc: sqlglot rewrite changed the result"] += 1
                    continue
                records.append(_record("nc", ex, schema, None if same else ex.gold_sql, sql=sql,
                                       execution=prompts.describe_execution(run)))
                counts[f"nc {'correct' if same else 'wrong'}"] += 1
                counts[f"  nc candidates from {kind}"] += 1
        if "cw" in tasks:
            cuts = clause_prefixes(ex.gold_sql)
            if cuts:
                cut = rng.choice(cuts)
                rest = ex.gold_sql.strip().rstrip(";").rstrip()[len(cut):]
                records.append(_record("cw", ex, schema, rest, partial=cut))
                counts["cw"] += 1
            else:
                counts["dropped cw: no clause boundary"] += 1
    rng.shuffle(records)  # tasks mixed
    return records, counts


def write_jsonl(records, path: Path):
    """One JSON record a line, written atomically: a half-written file is never taken for data."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


def model_sql(model, examples, batch_tokens: int = 65536, **chain_kw) -> list[str]:
    """The SQL a model (a path, None: the default model, or a loaded (model, tokenizer)) writes for each example,
    zero-shot TS on the full schema, unrepaired: NC candidates with the mistakes this model actually makes."""
    from .generate import load_for_inference
    from .mcp import run_chain

    lm, tok = model if isinstance(model, tuple) else load_for_inference(model)
    traces, _ = run_chain(lm, tok, examples, steps=(), fewshot=False, repair=False, batch_tokens=batch_tokens,
                          **chain_kw)
    return [t.sql for t in traces]


def build(data: str | Path, out: str | Path, split: str = "train", tasks=TASKS, seed: int = 0,
          limit: int | None = None, val_questions: int = 60, nc_from_model=None, **kw) -> dict:
    """Build train.jsonl and val.jsonl in `out`; returns the counts. val.jsonl (the held-out loss) takes
    `val_questions` questions of Spider's validation databases (datasets.VALIDATION_DBS); train.jsonl never sees
    those nor the second check's (HELD_OUT_DBS); a dataset without them (BIRD) holds out 2% of its questions. nc_from_model: e.g. model_sql."""
    ds = load_dataset(data, split)
    held = [e for e in ds.examples if e.db_id in VALIDATION_DBS]
    examples = [e for e in ds.examples if e.db_id not in HELD_OUT_DBS]
    rng = random.Random(seed)
    rng.shuffle(examples)
    rng.shuffle(held)
    if limit:
        examples = examples[:limit]
    if not held:
        n = max(1, len(examples) // 50)
        held, examples = examples[:n], examples[n:]
    out = Path(out)
    counts = Counter({"skipped: database missing": ds.skipped,
                      "held out: questions on validation databases": sum(e.db_id in HELD_OUT_DBS for e in ds)})
    for name, part in (("val", held[:val_questions]), ("train", examples)):
        sqls = nc_from_model(part) if nc_from_model and "nc" in tasks else None
        records, c = build_examples(part, tasks, seed, model_sql=sqls, **kw)
        write_jsonl(records, out / f"{name}.jsonl")
        counts.update({f"{name} {k}" if name == "val" else k: v for k, v in c.items()})
        counts[f"{name} records"] = len(records)
    return dict(counts)


def main(argv=None):
    ap = argparse.ArgumentParser(description="Build ROUTE's multitask (MSFT) training data.")
    ap.add_argument("--data", default=default_root(), help="Spider or BIRD root (default: $ROUTE_DATA or data/spider)")
    ap.add_argument("--split", default="train")
    ap.add_argument("--out", default="data/msft")
    ap.add_argument("--tasks", default="all", help="all, or a comma list of ts,sl,nc,cw")
    ap.add_argument("--limit", type=int, default=None, help="use only N questions (a seeded random subset)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--nc-from-model", nargs="?", const="", default=None, metavar="MODEL",
                    help="add NC candidates that a model (default: the default model) writes for the questions")
    args = ap.parse_args(argv)
    tasks = TASKS if args.tasks == "all" else tuple(args.tasks.split(","))
    # the flag alone ("") means the default model
    gen = None if args.nc_from_model is None else (lambda exs: model_sql(args.nc_from_model or None, exs))
    counts = build(args.data, args.out, args.split, tasks, args.seed, args.limit, nc_from_model=gen)
    for k in sorted(counts, key=lambda k: (k.startswith("val"), k.strip())):
        print(f"{k:48}{counts[k]:>8}")


if __name__ == "__main__":
    from .cli import run
    run(main)  # one line naming the culprit for a bad file or option; exit 130 on Ctrl-C
