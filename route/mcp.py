"""Multitask Collaboration Prompting (MCP, paper Sec. 3.3): the four tasks chained at inference.

Each step runs batched across all the questions through generate():
  1. SL  schema linking, and a first "pre-SQL" on the full schema: the pruned schema keeps the union of what SL
         names and what the pre-SQL uses, plus the keys that join the kept tables. A table SL names without a
         column it can resolve keeps all its columns: a missing column costs more than an extra one.
  2. TS  text-to-SQL on the pruned schema: the greedy answer and `samples` sampled ones (sharing the prompt's
         KV cache). Every candidate (TS, samples, pre-SQL) that fails is repaired where the repair is
         unambiguous (repair.py), then they vote by execution result (vote.py).
  3. NC  noise correction, where the candidates disagree: the model sees the SQL and its execution result (or
         error) and says `correct` or gives a fix.
  4. CW  continuation writing: SQL that fails, or joins three or more tables, is rewritten from `SELECT`.
A fix must earn its place: an NC fix or a CW completion joins the vote, and replaces the answer only if it
runs (CW: with rows) and its result wins that vote. A new result no candidate shares loses to the greedy answer;
a fix that sides with other candidates, or the only query that runs, wins.
NC and CW see the full schema: robust to pruning mistakes, and free, as its prefix is in the KV cache already.
"""
import time
from dataclasses import dataclass, field

from . import prompts
from .database import open_database
from .generate import PrefixCache, generate
from .repair import repair as repair_sql
from .sql import count_tables, used_schema
from .vote import Candidate, same_result, vote

STEPS = ("sl", "nc", "cw")
MAX_NEW_TOKENS = {"sl": 128, "ts": 256, "nc": 256, "cw": 256}  # per task
TIMEOUT = 10.0   # seconds per query run
TS_CHUNK_TOKENS = 32768  # prompt tokens of the questions whose TS prompts (greedy, then samples) share one cache


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
    agree: tuple = ()   # (candidates whose result is the answer's, candidates): (2, 4) is an answer to doubt
    error: str | None = None
    rows: list = field(default_factory=list)


def run_chain(model, tok, examples, steps=STEPS, fewshot: bool = True, samples: int = 0, temperature: float = 0.8,
              seed: int = 0, repair: bool = True, batch_tokens: int = 65536, reuse_prefix: bool = True,
              progress: bool = True, prefix_cache: PrefixCache | None = None,
              generate_fn=generate) -> tuple[list[Trace], dict[str, float]]:
    """Answer every example; returns the traces and seconds per step. steps=() is plain text-to-SQL (with
    samples=0 and repair=False, the model's greedy answer as written). samples: sampled TS candidates per
    question (temperature, seed) for the vote. prefix_cache: keep the schema prompts' KV across calls (a
    session). generate_fn stands in for generate() in tests."""
    check_steps(steps)
    chain = _Chain(model, tok, examples, fewshot, repair, generate_fn, prefix_cache or PrefixCache(),
                   dict(batch_tokens=batch_tokens, reuse_prefix=reuse_prefix, progress=progress))
    if "sl" in steps:
        chain.link_schema()
    chain.write_sql(samples, temperature, seed)
    if "nc" in steps:
        chain.correct_noise()
    if "cw" in steps:
        chain.continue_writing()
    for i, tr in enumerate(chain.traces):  # the answer: the final SQL (repaired if it fails) and its first rows
        tr.sql, res = chain.run(i, tr.sql)
        tr.error, tr.rows = res.error, [list(r) for r in res.rows[:20]]
        if res.error is None and chain.cands[i]:  # how many candidates share the answer's result
            answer = Candidate(tr.sql, "answer", None, res.rows)
            tr.agree = (sum(c.error is None and same_result(answer, c) for c in chain.cands[i]), len(chain.cands[i]))
    return chain.traces, chain.times


def check_steps(steps):
    if unknown := set(steps) - set(STEPS):
        raise ValueError(f"unknown MCP steps {sorted(unknown)}; choose from {', '.join(STEPS)}")


class _Chain:
    """One run of the chain over a list of examples: its databases, prompts, traces and times per step."""

    def __init__(self, model, tok, examples, fewshot, repair, generate_fn, cache, generate_kw):
        self.model, self.tok, self.examples, self.fewshot, self.repair = model, tok, examples, fewshot, repair
        self.generate_fn, self.generate_kw = generate_fn, generate_kw
        self.cache, self.times = cache, {}
        self.dbs = [open_database(e.db_path) for e in examples]
        self.schemas = {db.path: db.schema_prompt() for db in self.dbs}
        self.traces = [Trace(e.question, e.db_id) for e in examples]
        self.cands: list[list[Candidate]] = [[] for _ in examples]  # what voted, with results (vote.Candidate)

    def ask(self, task, items, step=None, prefix_cache=None, max_new_tokens=None, **kw):
        """The answers to one task's prompts, items (index, prompt parts), timed as `step` (the task unless
        given: the samples are TS prompts)."""
        if not items:
            return []
        t0, step = time.perf_counter(), step or task
        prefix_cache = self.cache if prefix_cache is None else prefix_cache
        outs = self.generate_fn(self.model, self.tok, [p for _, p in items],
                                max_new_tokens=max_new_tokens or MAX_NEW_TOKENS[task], stop=prompts.STOP[task],
                                keep_stop=task == "nc", prefix_cache=prefix_cache, desc=step, **self.generate_kw, **kw)
        self.times[step] = self.times.get(step, 0.0) + time.perf_counter() - t0
        return outs

    def full(self, task, i, **kw):
        """Example i's prompt for `task` on its full schema."""
        e, schema = self.examples[i], self.schemas[self.dbs[i].path]
        return prompts.build(self.tok, task, schema, e.question, e.evidence, self.fewshot,
                             **kw)

    def run(self, i, sql):
        """(sql, its execution), repaired from the schema first if it fails and a repair runs."""
        db = self.dbs[i]
        res = db.execute(sql, timeout=TIMEOUT)
        if res.error is not None and self.repair and (fixed := repair_sql(sql, db)):
            if (res2 := db.execute(fixed, timeout=TIMEOUT)).error is None:
                return fixed, res2
        return sql, res

    def join_vote(self, i, written, source) -> tuple[bool, str]:
        """A fix joins question i's vote: (whether its result wins, the fix as run, repaired if it failed)."""
        sql, res = self.run(i, written)
        c = Candidate(sql, source, res.error, res.rows)
        self.cands[i].append(c)
        won = res.error is None and self.cands[i][vote(self.cands[i])].group == c.group
        self.traces[i].candidates.append({"sql": sql, "written": written, "source": source, "error": res.error,
                                          "group": c.group})
        return won, sql

    def link_schema(self):
        """1. The SL answers, and the pre-SQL (a TS prompt on the full schema), share the full-schema prefix
        (computed once, cached); what either names makes the pruned schema. Both go in one batch (their answers
        end at the same fence): a question's two answers decode side by side, not one after the other."""
        n = len(self.examples)
        outs = self.ask("sl", [(i, self.full("sl", i)) for i in range(n)] + [(i, self.full("ts", i)) for i in range(n)],
                        max_new_tokens=max(MAX_NEW_TOKENS["sl"], MAX_NEW_TOKENS["ts"]))
        assert prompts.STOP["sl"] == prompts.STOP["ts"]
        sl_outs, pre_outs = outs[:n], outs[n:]
        for i, (db, tr) in enumerate(zip(self.dbs, self.traces)):
            tr.sl_answer, tr.pre_sql = sl_outs[i], prompts.parse_sql(pre_outs[i])
            # a table named without a column that resolves keeps all its columns
            linked = {t: cols or {c.name for c in db.table(t).columns}
                      for t, cols in prompts.parse_links(tr.sl_answer, db).items()}
            for t, cols in used_schema(tr.pre_sql, db).items():
                linked.setdefault(t, set()).update(cols)
            tr.linked = linked
            if linked:
                tr.pruned_schema = db.schema_prompt(keep=linked)

    def write_sql(self, samples: int, temperature: float, seed: int):
        """2. Text-to-SQL, on the pruned schema where there is one, then the vote. A pruned prompt is unique to
        its question: it goes as token ids (encoded part by part, as in training), all but its last token one
        cache level that the greedy answer and the samples share. Questions go in chunks of TS_CHUNK_TOKENS
        whose cache dies with the chunk: one cache for all, bounded, would drop each prefix (least recently
        used) just before the samples pass needs it again."""
        items = []
        for i, (e, tr) in enumerate(zip(self.examples, self.traces)):
            if tr.pruned_schema:
                prompt = prompts.build(self.tok, "ts", tr.pruned_schema, e.question, e.evidence)
                ids = [t for part in self.tok.encode_parts([prompt])[0] for t in part]
                items.append((i, (ids[:-1], ids[-1:])))
            else:
                items.append((i, self.full("ts", i)))
        chunks, size = [[]], 0
        for it in items:
            n = len(it[1][0]) if isinstance(it[1][0], list) else 0  # a full-schema prompt shares self.cache
            if chunks[-1] and size + n > TS_CHUNK_TOKENS:
                chunks, size = chunks + [[]], 0
            chunks[-1].append(it)
            size += n
        for chunk in chunks:
            ts_cache = PrefixCache(max_bytes=1 << 62)
            for (i, _), out in zip(chunk, self.ask("ts", chunk, prefix_cache=ts_cache)):
                self.traces[i].ts_sql = prompts.parse_sql(out)
            sampled = self.ask("ts", [it for it in chunk for _ in range(samples)], step="samples",
                               prefix_cache=ts_cache, temperature=temperature, seed=seed)
            for k, (i, _) in enumerate(chunk):
                self.vote(i, [prompts.parse_sql(sampled[k * samples + j]) for j in range(samples)])

    def vote(self, i, sampled: list[str]):
        tr = self.traces[i]
        cands = [Candidate(tr.ts_sql, "ts")] + ([Candidate(tr.pre_sql, "pre-sql")] if tr.pre_sql else []) + \
            [Candidate(sql, f"sample {j + 1}") for j, sql in enumerate(sampled)]
        written = [c.sql for c in cands]
        for c in cands:
            sql, res = self.run(i, c.sql)
            c.source += "+repair" if sql != c.sql else ""
            c.sql, c.error, c.rows = sql, res.error, res.rows
        tr.sql = tr.vote_sql = cands[vote(cands)].sql
        tr.candidates = [{"sql": c.sql, "written": w, "source": c.source, "error": c.error, "group": c.group}
                         for c, w in zip(cands, written)]
        self.cands[i] = cands

    def agreed(self, i) -> bool:
        """Two or more candidates ran and all returned one result: NC and CW have little to add."""
        groups = [c.group for c in self.cands[i] if c.error is None]
        return len(groups) >= 2 and len(set(groups)) == 1

    def correct_noise(self):
        """3. Noise correction with execution feedback, where the candidates disagree (where they agreed, NC
        fixed 1 of 187 answers on the validation split: skipping them saves most of the step's time)."""
        todo = []
        for i, tr in enumerate(self.traces):
            tr.nc, tr.nc_sql = "skipped: candidates agree", tr.sql
            if not self.agreed(i):
                todo.append(i)
        items = [(i, self.full("nc", i, sql=self.traces[i].sql, execution=prompts.describe_execution(
            self.dbs[i].execute(self.traces[i].sql, timeout=TIMEOUT)))) for i in todo]
        for (i, _), out in zip(items, self.ask("nc", items)):
            tr = self.traces[i]
            tr.nc_answer = out
            ok, fix = prompts.parse_verdict(out)
            if ok:
                tr.nc = "correct"
            elif fix and fix.strip() != tr.sql.strip():
                won, fix = self.join_vote(i, fix, "nc")
                tr.nc, tr.sql = ("fixed", fix) if won else ("fix rejected", tr.sql)
            else:
                tr.nc = "kept"
            tr.nc_sql = tr.sql

    def continue_writing(self):
        """4. Continuation writing for SQL that fails, or is complex (3+ tables) where the candidates disagree;
        the completion must return rows and win the vote."""
        todo = [i for i, (db, tr) in enumerate(zip(self.dbs, self.traces))
                if db.execute(tr.sql, timeout=TIMEOUT).error is not None
                or count_tables(tr.sql) >= 3 and not self.agreed(i)]
        # "SELECT" without its space: training cuts queries at token boundaries the same way (msft.py)
        items = [(i, self.full("cw", i, partial="SELECT")) for i in todo]
        for (i, _), out in zip(items, self.ask("cw", items)):
            tr = self.traces[i]
            tr.cw_answer = out
            won, sql = self.join_vote(i, prompts.parse_sql(out, partial="SELECT"), "cw")
            tr.cw, tr.sql = ("used", sql) if won and self.cands[i][-1].rows else ("rejected", tr.sql)
