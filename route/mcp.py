"""Multitask Collaboration Prompting (MCP, paper Sec. 3.3): the four tasks chained at inference.

For a batch of questions, each step runs batched across all of them through generate():
  1. SL  schema linking: the SL answer (tables/columns as JSON) and a first "pre-SQL" written on the full
         schema; the pruned schema keeps the union of what SL names and what the pre-SQL uses (read with
         sqlglot), plus the keys that join the kept tables. A table SL names without any column it can
         resolve keeps all its columns: recall first, a missing column costs more than an extra one.
  2. TS  text-to-SQL on the pruned schema: the greedy answer and `samples` sampled ones, which share the
         prompt's KV cache so that only decoding multiplies. Every candidate (TS, samples, pre-SQL) that fails
         is repaired from the schema where the repair is unambiguous (repair.py), then they vote by execution
         result (vote.py): the largest group of equal results answers, the greedy TS breaks ties.
  3. NC  noise correction, where the candidates disagree: the SQL is run; the model sees the question, the
         SQL and the execution result (or error) and says `correct` or gives a fix, accepted only if it runs.
  4. CW  continuation writing: SQL that fails, or joins three or more tables, is rewritten from `SELECT`;
         the completion is accepted only if it executes and returns rows.
NC and CW see the full schema: it keeps them robust to pruning mistakes, and it is free, since the
full-schema prefix is already in the KV cache from step 1.
"""
import time
from dataclasses import dataclass, field

from . import prompts
from .database import open_database
from .generate import PrefixCache, generate
from .repair import repair as repair_sql
from .sql import count_tables, used_schema
from .vote import Candidate, vote

STEPS = ("sl", "nc", "cw")
MAX_NEW_TOKENS = {"sl": 128, "ts": 256, "nc": 256, "cw": 256}  # per task


@dataclass
class Trace:
    """Everything the chain did for one question (written to --out as JSONL)."""
    question: str
    db_id: str
    sl_answer: str = ""
    linked: dict = field(default_factory=dict)
    pre_sql: str = ""
    pruned_schema: str = ""
    ts_sql: str = ""    # the greedy TS answer, as written
    candidates: list = field(default_factory=list)  # vote.Candidate as dicts: sql, source, error, group
    vote_sql: str = ""  # the candidate the vote chose (what a chain without NC and CW answers)
    nc_answer: str = ""
    nc: str = ""        # "correct", "fixed", "fix rejected", "kept" (no verdict, no usable fix), or skipped
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


def _unanimous(candidates: list[dict]) -> bool:
    """Two or more candidates ran, and all returned the same result (one vote group)."""
    ran = [c for c in candidates if c["error"] is None]
    return len(ran) >= 2 and len({c["group"] for c in ran}) == 1


def run_chain(model, tok, examples, steps=STEPS, fewshot: bool = True, samples: int = 0,
              temperature: float = 0.8, seed: int = 0, repair: bool = True, recall_sl: bool = True, base=None,
              sample_rows: int = 3, batch_tokens: int = 65536, reuse_prefix: bool = True, progress: bool = True,
              timeout: float = 10.0, generate_fn=generate) -> tuple[list[Trace], dict[str, float]]:
    """Answer every example; returns the traces and seconds per step. steps=() is plain text-to-SQL (with
    samples=0 and repair=False, the model's greedy answer as written). samples: sampled TS candidates per
    question (temperature, seed) for the vote. base: a second model (the base model of `model`'s adapter)
    whose greedy TS answer on the same pruned schema votes too. generate_fn stands in for generate() in tests."""
    unknown = set(steps) - set(STEPS)
    if unknown:
        raise ValueError(f"unknown MCP steps {sorted(unknown)}; choose from {', '.join(STEPS)}")
    cache, times = PrefixCache(), {}
    dbs = [open_database(e.db_path) for e in examples]
    schemas = {db.path: db.schema_prompt(sample_rows=sample_rows) for db in dbs}
    traces = [Trace(e.question, e.db_id) for e in examples]

    def ask(task, items, step=None, prefix_cache=cache, lm=model, **kw):
        """Prompts of one task, items (index, prompt parts), for one step of the chain (named as the task
        unless given: the pre-SQL, the samples and the base model's answers are TS prompts); returns the
        answers in order, and counts the step's time."""
        if not items:
            return []
        t0, step = time.perf_counter(), step or task
        outs = generate_fn(lm, tok, [p for _, p in items], max_new_tokens=MAX_NEW_TOKENS[task],
                           stop=prompts.STOP[task], keep_stop=task == "nc", batch_tokens=batch_tokens,
                           prefix_cache=prefix_cache, reuse_prefix=reuse_prefix, progress=progress, desc=step, **kw)
        times[step] = times.get(step, 0.0) + time.perf_counter() - t0
        return outs

    def full(task, i, e, **kw):
        return prompts.build(tok, task, schemas[dbs[i].path], e.question, e.evidence, fewshot, **kw)

    def run(i, sql):
        """(sql, its execution), repaired from the schema first if it fails and a repair runs."""
        res = dbs[i].execute(sql, timeout=timeout)
        if res.error is not None and repair and (fixed := repair_sql(sql, dbs[i])):
            if (res2 := dbs[i].execute(fixed, timeout=timeout)).error is None:
                return fixed, res2
        return sql, res

    # 1. Schema linking: the SL answers, and the pre-SQL (a TS prompt on the full schema), share the
    # full-schema prefix (computed once, cached).
    if "sl" in steps:
        sl_outs = ask("sl", [(i, full("sl", i, e)) for i, e in enumerate(examples)])
        pre_outs = ask("ts", [(i, full("ts", i, e)) for i, e in enumerate(examples)], step="pre-sql")
        for i, tr in enumerate(traces):
            tr.sl_answer, tr.pre_sql = sl_outs[i], prompts.parse_sql(pre_outs[i])
            linked = prompts.parse_links(tr.sl_answer, dbs[i])
            if recall_sl:  # a table named without a column that resolves keeps all its columns
                linked = {t: cols or {c.name for c in dbs[i].table(t).columns} for t, cols in linked.items()}
            tr.linked = _merge(linked, used_schema(tr.pre_sql, dbs[i]))
            if tr.linked:
                tr.pruned_schema = dbs[i].schema_prompt(keep=tr.linked, sample_rows=sample_rows)

    # 2. Text-to-SQL, on the pruned schema where there is one. A pruned prompt is unique to its question: it
    # goes as token ids (encoded part by part, as in training) with all but its last token one cache level,
    # which the greedy answer and the samples share, in a cache of their own that dies with this step.
    items = []
    for i, (e, tr) in enumerate(zip(examples, traces)):
        if tr.pruned_schema:
            parts = tok.encode_parts([prompts.build(tok, "ts", tr.pruned_schema, e.question, e.evidence)])[0]
            ids = [t for part in parts for t in part]
            items.append((i, (ids[:-1], ids[-1:])))
        else:
            items.append((i, full("ts", i, e)))
    ts_cache = PrefixCache(max_bytes=1 << 30)
    for (i, _), out in zip(items, ask("ts", items, prefix_cache=ts_cache)):
        traces[i].ts_sql = prompts.parse_sql(out)
    sampled = ask("ts", [it for it in items for _ in range(samples)], step="samples", prefix_cache=ts_cache,
                  temperature=temperature, seed=seed)
    del ts_cache
    base_cache = PrefixCache(max_bytes=1 << 30)
    from_base = ask("ts", items, step="base ts", prefix_cache=base_cache, lm=base) if base else []
    for k, (i, _) in enumerate(items):
        tr = traces[i]
        cands = [Candidate(tr.ts_sql, "ts")] + ([Candidate(tr.pre_sql, "pre-sql")] if tr.pre_sql else []) + \
            ([Candidate(prompts.parse_sql(from_base[k]), "base ts")] if base else []) + \
            [Candidate(prompts.parse_sql(sampled[k * samples + j]), f"sample {j + 1}") for j in range(samples)]
        written = [c.sql for c in cands]
        for c in cands:
            sql, res = run(i, c.sql)
            c.source += "+repair" if sql != c.sql else ""
            c.sql, c.error, c.rows = sql, res.error, res.rows
        tr.sql = tr.vote_sql = cands[vote(cands)].sql
        tr.candidates = [{"sql": c.sql, "written": w, "source": c.source, "error": c.error, "group": c.group}
                         for c, w in zip(cands, written)]

    # 3. Noise correction with execution feedback, where the candidates disagree: when two or more ran and
    # all returned one result, NC has little to add (on the validation split it fixed 1 of 187 such answers)
    # and skipping it saves most of the step's time.
    if "nc" in steps:
        todo = [i for i, tr in enumerate(traces) if not _unanimous(tr.candidates)]
        for tr in traces:
            tr.nc, tr.nc_sql = "skipped: candidates agree", tr.sql
        runs = {i: dbs[i].execute(traces[i].sql, timeout=timeout) for i in todo}
        items = [(i, full("nc", i, examples[i], sql=traces[i].sql, execution=prompts.describe_execution(runs[i])))
                 for i in todo]
        for (i, _), out in zip(items, ask("nc", items)):
            tr = traces[i]
            tr.nc_answer = out
            ok, fix = prompts.parse_verdict(out)
            if ok:
                tr.nc = "correct"
            elif fix and fix.strip() != tr.sql.strip():
                fix, res = run(i, fix)
                tr.nc, tr.sql = ("fixed", fix) if res.error is None else ("fix rejected", tr.sql)
            else:
                tr.nc = "kept"
            tr.nc_sql = tr.sql

    # 4. Continuation writing for SQL that fails or is complex (3+ tables).
    if "cw" in steps:
        todo = [i for i, (db, tr) in enumerate(zip(dbs, traces))
                if db.execute(tr.sql, timeout=timeout).error is not None or count_tables(tr.sql) >= 3]
        # "SELECT" without its space: training cuts queries at token boundaries the same way (msft.py)
        items = [(i, full("cw", i, examples[i], partial="SELECT")) for i in todo]
        for (i, _), out in zip(items, ask("cw", items)):
            tr = traces[i]
            tr.cw_answer = out
            sql, res = run(i, prompts.parse_sql(out, partial="SELECT"))
            if res.error is None and res.rows:
                tr.cw, tr.sql = "used", sql
            else:
                tr.cw = "rejected"

    for i, tr in enumerate(traces):
        tr.sql, res = run(i, tr.sql)
        tr.error, tr.rows = res.error, [list(r) for r in res.rows[:20]]
    return traces, times
