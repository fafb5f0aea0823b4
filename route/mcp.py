"""Multitask Collaboration Prompting (MCP, paper Sec. 3.3): the four tasks chained at inference.

For a batch of questions, each step runs batched across all of them through generate():
  1. SL  schema linking: the SL answer (tables/columns as JSON) and a first "pre-SQL" written on the full
         schema; the pruned schema keeps the union of what SL names and what the pre-SQL uses (read with
         sqlglot), plus the keys that join the kept tables.
  2. TS  text-to-SQL on the pruned schema.
  3. NC  noise correction: the SQL is run; the model sees the question, the SQL and the execution result
         (or error) and says `correct` or gives a fix. A fix is accepted only if it executes.
  4. CW  continuation writing: SQL that fails, or joins three or more tables, is rewritten from `SELECT`;
         the completion is accepted only if it executes and returns rows.
NC and CW see the full schema: it keeps them robust to pruning mistakes, and it is free, since the
full-schema prefix is already in the KV cache from step 1.
"""
import time
from dataclasses import dataclass, field

from . import prompts
from .database import open_database
from .generate import PrefixCache, Stats, generate
from .sql import count_tables, used_schema

STEPS = ("sl", "nc", "cw")
MAX_NEW = {"sl": 128, "ts": 256, "nc": 256, "cw": 256}


@dataclass
class Trace:
    """Everything the chain did for one question (written to --out as JSONL)."""
    question: str
    db_id: str
    sl_answer: str = ""
    linked: dict = field(default_factory=dict)
    pre_sql: str = ""
    pruned_schema: str = ""
    ts_sql: str = ""
    nc_answer: str = ""
    nc: str = ""        # "correct", "fixed", "fix rejected" or "kept" (no verdict, no usable fix)
    nc_sql: str = ""    # the SQL after NC (what a chain without CW answers)
    cw_answer: str = ""
    cw: str = ""        # "used", "rejected" or "" (not triggered)
    sql: str = ""       # the final SQL
    error: str | None = None
    rows: list = field(default_factory=list)


def _merge(*links: dict[str, set[str]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for link in links:
        for t, cols in link.items():
            out.setdefault(t, set()).update(cols)
    return out


def run_chain(model, tok, examples, steps=STEPS, fewshot: bool = True, sample_rows: int = 3,
              batch_tokens: int = 65536, reuse_prefix: bool = True, progress: bool = True,
              timeout: float = 10.0, generate_fn=generate) -> tuple[list[Trace], dict[str, float]]:
    """Answer every example; returns the traces and seconds per step. steps=() is plain text-to-SQL.
    generate_fn stands in for generate() in tests (a scripted model)."""
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown MCP steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    cache, times = PrefixCache(), {}
    dbs = [open_database(e.db_path) for e in examples]
    schemas = {db.path: db.schema_prompt(sample_rows=sample_rows) for db in dbs}
    traces = [Trace(e.question, e.db_id) for e in examples]

    def ask(task, items, name=None):
        """items: (index, prompt parts); returns the answers in order."""
        t0 = time.perf_counter()
        st = Stats()
        outs = generate_fn(model, tok, [p for _, p in items], max_new_tokens=MAX_NEW[task], stop=prompts.STOP[task],
                           keep_stop=task == "nc",
                        batch_tokens=batch_tokens, prefix_cache=cache, reuse_prefix=reuse_prefix, stats=st,
                        progress=progress, desc=name or task)
        times[name or task] = times.get(name or task, 0.0) + time.perf_counter() - t0
        return outs

    def full(task, i, e, **kw):
        return prompts.build(tok, task, schemas[dbs[i].path], e.question, e.evidence, fewshot, **kw)

    # 1. Schema linking: SL answers and pre-SQL share the full-schema prefix, so they run in one call.
    if "sl" in steps:
        n = len(examples)
        outs = ask("ts", [(i, full("sl", i, e)) for i, e in enumerate(examples)] +
                   [(i, full("ts", i, e)) for i, e in enumerate(examples)], "sl+pre-sql")
        for i, tr in enumerate(traces):
            tr.sl_answer, tr.pre_sql = outs[i], prompts.parse_sql(outs[n + i])
            tr.linked = _merge(prompts.parse_links(tr.sl_answer, dbs[i]), used_schema(tr.pre_sql, dbs[i]))
            if tr.linked:
                tr.pruned_schema = dbs[i].schema_prompt(keep=tr.linked, sample_rows=sample_rows)

    # 2. Text-to-SQL, on the pruned schema where there is one. A pruned prompt is unique to its question,
    # so it is passed whole (not cut into cacheable parts) to keep the prefix cache for shared prefixes.
    items = []
    for i, (e, tr) in enumerate(zip(examples, traces)):
        if tr.pruned_schema:
            items.append((i, "".join(prompts.build(tok, "ts", tr.pruned_schema, e.question, e.evidence))))
        else:
            items.append((i, full("ts", i, e)))
    for (i, _), out in zip(items, ask("ts", items)):
        traces[i].ts_sql = traces[i].sql = prompts.parse_sql(out)

    # 3. Noise correction with execution feedback.
    if "nc" in steps:
        runs = [db.execute(tr.sql, timeout=timeout) for db, tr in zip(dbs, traces)]
        items = [(i, full("nc", i, e, sql=tr.sql, execution=prompts.describe_execution(runs[i])))
                 for i, (e, tr) in enumerate(zip(examples, traces))]
        for i, out in enumerate(ask("nc", items)):
            tr = traces[i]
            tr.nc_answer = out
            ok, fix = prompts.parse_verdict(out)
            if ok:
                tr.nc = "correct"
            elif fix and fix.strip() != tr.sql.strip():
                if dbs[i].execute(fix, timeout=timeout).error is None:
                    tr.nc, tr.sql = "fixed", fix
                else:
                    tr.nc = "fix rejected"
            else:
                tr.nc = "kept"
            tr.nc_sql = tr.sql

    # 4. Continuation writing for SQL that fails or is complex (3+ tables).
    if "cw" in steps:
        todo = [i for i, (db, tr) in enumerate(zip(dbs, traces))
                if db.execute(tr.sql, timeout=timeout).error is not None or count_tables(tr.sql) >= 3]
        # "SELECT" without its space: training cuts queries at token boundaries the same way (msft.py)
        items = [(i, full("cw", i, examples[i], partial="SELECT")) for i in todo]
        for (i, _), out in zip(items, ask("cw", items) if items else []):
            tr = traces[i]
            tr.cw_answer = out
            sql = prompts.parse_sql(out, partial="SELECT")
            res = dbs[i].execute(sql, timeout=timeout)
            if res.error is None and res.rows:
                tr.cw, tr.sql = "used", sql
            else:
                tr.cw = "rejected"

    for db, tr in zip(dbs, traces):
        res = db.execute(tr.sql, timeout=timeout)
        tr.error, tr.rows = res.error, [list(r) for r in res.rows[:20]]
    return traces, times
