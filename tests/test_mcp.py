"""The MCP chain: acceptance rules with a scripted model, garbage from a random model, prefix reuse."""
import re
import sqlite3

import pytest

from route import prompts
from route.database import open_database
from route.datasets import Example
from route.mcp import run_chain
from route.tokenizer import Tokenizer
from route.weights import load_model
from tiny import write_music_db, write_tiny, write_tiny_tokenizer


@pytest.fixture(scope="module")
def db_path(tmp_path_factory):
    return write_music_db(tmp_path_factory.mktemp("db") / "music.sqlite")


@pytest.fixture(scope="module")
def tiny_engine(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny(path, "qwen2")
    write_tiny_tokenizer(path, "qwen2")
    return load_model(path), Tokenizer.from_dir(path)


# What the scripted model answers, per question and task. Missing entries answer garbage.
SCRIPT = {
    "How many singers are there?": {
        "sl": '{"singer": ["id"]}', "ts": "SELECT count(*) FROM singer", "nc": "correct"},
    "List the singer names.": {  # TS fails, NC's fix fails too (rejected), CW rescues it
        "sl": '{"singer": ["name"]}', "ts": "SELECT song FROM singer",
        "nc": "wrong\n```sql\nSELECT label FROM singer\n```", "cw": " name FROM singer```"},
    "How old is each singer?": {  # TS misspells a column: repaired from the schema before anything else
        "sl": '{"singer": ["name", "age"]}', "ts": "SELECT nme, age FROM singer", "nc": "correct"},
    "Which singers are from France?": {  # SL names no join key: pruning must add it
        "sl": '{"singer": ["name"], "country": ["name"]}',
        "ts": "SELECT T1.name FROM singer AS T1 JOIN country AS T2 ON T1.country_id = T2.id "
              "WHERE T2.name = 'France'", "nc": "correct"},
    "Who is the oldest singer?": {  # NC's fix runs and sides with the pre-SQL: it wins the vote, accepted
        "sl": "not json at all, but singer is mentioned", "ts": "SELECT name FROM singer ORDER BY age",
        "pre-sql": "SELECT name FROM singer ORDER BY age DESC LIMIT 1",
        "nc": "wrong\n```sql\nSELECT name FROM singer ORDER BY age DESC LIMIT 1\n```"},
    "What is the singers' average age?": {  # NC's fix runs, but its result is new: it loses to TS, rejected
        "sl": '{"singer": ["age"]}', "ts": "SELECT avg(age) FROM singer",
        "nc": "wrong\n```sql\nSELECT max(age) FROM singer\n```"},
    "Which concerts had singers from France?": {  # 3 tables: CW is asked; its empty result is rejected
        "sl": '{"concert": ["id"]}',
        "ts": "SELECT T1.id FROM concert AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id JOIN country AS T3 "
              "ON T2.country_id = T3.id WHERE T3.name = 'France'",
        "nc": "correct", "cw": " id FROM concert WHERE year > 3000```"},
    "Which concerts had singers from Peru?": {  # 3 tables, but TS and the pre-SQL agree (none): CW not asked
        "sl": '{"concert": ["id"]}',
        "ts": "SELECT T1.id FROM concert AS T1 JOIN singer AS T2 ON T1.singer_id = T2.id JOIN country AS T3 "
              "ON T2.country_id = T3.id WHERE T3.name = 'Peru'", "nc": "correct", "cw": " 1```"},
}
TASKS = {"### Task: text-to-SQL": "ts", "### Task: schema linking": "sl", "### Task: noise correction": "nc",
         "### Task: continuation writing": "cw"}


def scripted(calls):
    def fake_generate(model, tok, prompt_list, **kw):
        outs = []
        for parts in prompt_list:
            text = "".join(x if isinstance(x, str) else tok.decode(x, skip_special=False) for x in parts)
            task = next(t for marker, t in TASKS.items() if marker in text)
            question = re.search(r"### Question: (.*?)(?:<\|im_end\|>|\n)", text).group(1)
            calls.append((task, question, text))
            script = SCRIPT.get(question, {})
            out = script.get(task, "%% garbage {[ ```")
            # unless scripted, the pre-SQL returns no rows, so it agrees with TS only where TS returns none:
            # NC, which skips answers that all candidates agree on, has its say on every other question
            if kw.get("desc") == "sl" and task == "ts":  # SL and the pre-SQL go in one batch
                out = script.get("pre-sql", out + " LIMIT 0")
            outs.append(out)
        return outs
    return fake_generate


def test_acceptance_rules(db_path, tiny_engine):
    model, tok = tiny_engine
    examples = [Example(q, "music", db_path) for q in SCRIPT]
    calls = []
    traces, times = run_chain(model, tok, examples, generate_fn=scripted(calls), progress=False)
    by_q = {t.question: t for t in traces}

    count = by_q["How many singers are there?"]
    assert count.sql == "SELECT count(*) FROM singer" and count.nc == "correct" and count.cw == ""
    assert count.rows == [[3]]

    names = by_q["List the singer names."]
    assert names.nc == "fix rejected"  # the correction does not execute
    assert names.cw == "used" and names.sql == "SELECT name FROM singer" and len(names.rows) == 3

    france = by_q["Which singers are from France?"]
    # linked = SL's answer + what the pre-SQL uses (here the join keys too)
    assert france.linked == {"singer": {"name", "country_id"}, "country": {"name", "id"}}
    assert "age" not in france.pruned_schema and "concert" not in france.pruned_schema
    sl_only = open_database(db_path).schema_prompt(keep={"singer": {"name"}, "country": {"name"}})
    assert "country_id" in sl_only and "age" not in sl_only  # pruning alone keeps the join key
    assert sorted(france.rows) == [["Ana"], ["Cy"]]

    oldest = by_q["Who is the oldest singer?"]
    assert oldest.linked.keys() == {"singer"}  # recovered from prose + the pre-SQL
    assert oldest.vote_sql == oldest.ts_sql  # a tie between TS and the pre-SQL goes to TS...
    assert oldest.nc == "fixed" and oldest.rows == [["Bo"]] and oldest.agree == (2, 3)  # ...until NC sides

    average = by_q["What is the singers' average age?"]
    assert average.nc == "fix rejected" and average.sql == "SELECT avg(age) FROM singer" and average.agree == (1, 3)

    old = by_q["How old is each singer?"]
    assert old.ts_sql == "SELECT nme, age FROM singer" and old.candidates[0]["source"] == "ts+repair"
    assert old.sql == "SELECT name, age FROM singer" and len(old.rows) == 3

    france_concerts = by_q["Which concerts had singers from France?"]
    assert france_concerts.cw == "rejected" and france_concerts.sql.count("JOIN") == 2  # empty: not accepted
    peru = by_q["Which concerts had singers from Peru?"]
    assert peru.nc.startswith("skipped") and peru.cw == "" and peru.agree == (2, 2)

    cw_asked = {q for task, q, _ in calls if task == "cw"}
    assert cw_asked == {"List the singer names.", "Which concerts had singers from France?"}
    assert set(times) == {"sl", "ts", "nc", "cw"}


def test_steps_can_be_switched_off(db_path, tiny_engine):
    model, tok = tiny_engine
    calls = []
    examples = [Example(q, "music", db_path) for q in SCRIPT]
    traces, _ = run_chain(model, tok, examples, steps=(), generate_fn=scripted(calls), progress=False)
    assert {task for task, _, _ in calls} == {"ts"}
    assert traces[1].sql == "SELECT song FROM singer" and traces[1].error  # nothing rescued it
    with pytest.raises(ValueError, match="unknown MCP steps"):
        run_chain(model, tok, examples, steps=("sl", "xx"), progress=False)


def test_random_model_end_to_end_and_prefix_reuse(db_path, tiny_engine):
    """A random model writes garbage: every parser must survive it, and reuse must not change a thing."""
    model, tok = tiny_engine
    examples = [Example(q, "music", db_path) for q in SCRIPT]
    a, _ = run_chain(model, tok, examples, progress=False)
    b, _ = run_chain(model, tok, examples, reuse_prefix=False, progress=False)
    assert a == b
    # each trace's outcome is what SQLite itself says about its final SQL (read-only): the rows, or a failure
    con = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    for t, e in zip(a, examples):
        assert t.question == e.question and t.db_id == "music"
        try:
            want = [list(r) for r in con.execute(t.sql).fetchall()[:20]]
        except (sqlite3.Error, ValueError) as err:  # ValueError: SQLite refuses NUL characters
            assert t.error and t.rows == [], (t.sql, err)
        else:
            assert t.error is None and t.rows == want, t.sql


def test_parsers_survive_garbage(db_path):
    db = open_database(db_path)
    for junk in ["", "{", "}{", '{"singer": 3}', '{"nope": ["x"]}', "[1, 2]", "```json\n{\"singer\": [\"AGE\", \"zz\"]}",
                 None, "\x00\xff", '{"singer": {"a": 1}}']:
        links = prompts.parse_links(junk, db)
        assert all(t in {"singer", "country", "concert"} for t in links)
    assert prompts.parse_links('```json\n{"SINGER": ["AGE", "zz"]}\n', db) == {"singer": {"age"}}
    assert prompts.parse_verdict("Correct.") == (True, "")
    assert prompts.parse_verdict("wrong\n```sql\nSELECT 1\n```") == (False, "SELECT 1")
    assert prompts.parse_verdict("correct\n") == (True, "")
    assert prompts.parse_verdict(None) == (False, "")
    assert prompts.parse_sql(" name FROM singer\n```", partial="SELECT") == "SELECT name FROM singer"
    assert prompts.parse_sql("") == ""


def test_prompt_parts_and_targets(tiny_engine, db_path):
    _, tok = tiny_engine
    schema = open_database(db_path).schema_prompt()
    sl = prompts.build(tok, "sl", schema, "Q?", fewshot=True)
    ts = prompts.build(tok, "ts", schema, "Q?", evidence="age is in years")
    assert sl[0] == ts[0] and sl[0].endswith(schema)  # the shared, cacheable part: system + schema
    assert "Examples on another database" in sl[1] and "Examples" not in ts[1]
    assert ts[2].endswith("<|im_start|>assistant\n```sql\n") and "### Hint: age is in years" in ts[2]
    cw = prompts.build(tok, "cw", schema, "Q?", partial="SELECT name FROM")
    assert cw[2].endswith("```sql\nSELECT name FROM")
    assert prompts.target("sl", {"singer": {"name", "age"}}) == '{"singer": ["age", "name"]}\n```'
    assert prompts.target("nc", None) == "correct"
    assert prompts.target("nc", "SELECT 1") == "wrong\n```sql\nSELECT 1\n```"


def test_samples_vote(db_path, tiny_engine):
    """The greedy TS answer and the pre-SQL fail, two of three samples agree on one result: the vote answers
    with that result, and every candidate is in the trace. The samples are asked on the greedy answer's pruned
    prompt, with the step's temperature and seed."""
    model, tok = tiny_engine
    asked = []

    def fake(lm, tok, prompt_list, **kw):
        text = lambda p: "".join(x if isinstance(x, str) else tok.decode(x, skip_special=False) for x in p)  # noqa
        tasks = [next(t for marker, t in TASKS.items() if marker in text(p)) for p in prompt_list]
        asked.append((tasks[-1], lm is model, kw.get("temperature", 0.0), kw.get("seed"), [text(p) for p in prompt_list]))
        if kw.get("temperature"):
            return ["SELECT name FROM singer", "SELECT name FROM singer WHERE age > 30", "SELECT name FROM singer "
                    "WHERE 30 < age"]
        # SL names columns; greedy TS and the pre-SQL write SQL that does not run
        return ['{"singer": ["name", "age"]}' if t == "sl" else "SELECT song FROM singer" for t in tasks]

    ex = Example("Which singers are older than 30?", "music", db_path)
    traces, times = run_chain(model, tok, [ex], steps=("sl",), samples=3, temperature=0.7, seed=5,
                              generate_fn=fake, progress=False)
    tr = traces[0]
    assert [c["source"] for c in tr.candidates] == ["ts", "pre-sql", "sample 1", "sample 2", "sample 3"]
    assert [c["group"] for c in tr.candidates] == [-1, -1, 0, 1, 1]
    assert tr.vote_sql == tr.sql == "SELECT name FROM singer WHERE age > 30"  # the majority, not the first sample
    assert tr.rows == [list(r) for r in open_database(db_path).execute(tr.sql).rows] and tr.rows
    ts_calls = [a for a in asked if a[0] == "ts"]
    pruned = [a for a in ts_calls if "### Task: text-to-SQL" in a[4][0] and "concert" not in a[4][0]]
    assert len(pruned) == 2 and all(a[4] == pruned[0][4][:1] * len(a[4]) for a in pruned)  # one prompt, 2 askers
    assert [(a[1], a[2], a[3]) for a in pruned] == [(True, 0.0, None), (True, 0.7, 5)]
    assert "samples" in times


def test_nc_skips_answers_the_candidates_agree_on(db_path, tiny_engine):
    model, tok = tiny_engine
    asked = []

    def fake(lm, tok, prompt_list, **kw):
        asked.append(kw.get("desc"))
        sl = ["### Task: schema linking" in "".join(map(str, p)) for p in prompt_list]
        return ['{"singer": ["name"]}' if s else "SELECT count(*) FROM singer" for s in sl]

    traces, _ = run_chain(model, tok, [Example("How many singers?", "music", db_path)], steps=("sl", "nc"),
                          samples=2, generate_fn=fake, progress=False)
    assert traces[0].nc == "skipped: candidates agree" and "nc" not in asked
    assert [c["group"] for c in traces[0].candidates] == [0, 0, 0, 0] and traces[0].rows == [[3]]


def test_each_pruned_prompt_is_prefilled_once_for_greedy_and_samples(db_path, tiny_engine, monkeypatch):
    """Under memory pressure (a TS cache that holds one prefix), the greedy pass and the samples pass of a
    question still share its pruned prompt's prefill: questions go in chunks whose cache dies with the chunk."""
    from collections import Counter

    from route import generate as gen, mcp
    model, tok = tiny_engine
    misses, default_init, default_get = Counter(), gen.PrefixCache.__init__, gen.PrefixCache.get

    def small_init(self, max_bytes=4 << 30):  # the chain's own cache (default bound) is left alone
        default_init(self, max_bytes if max_bytes == 4 << 30 else 1)

    def counting_get(self, model, levels, stats):
        if self.max_bytes == 1:
            misses[levels] += levels not in self.entries
        return default_get(self, model, levels, stats)

    def real_ts(lm, tok, prompt_list, **kw):  # SL names the columns, so every TS prompt is pruned
        if kw["desc"] == "sl":  # SL's answer names the columns; the pre-SQL (same batch) is the same text: no SQL
            return ['{"singer": ["name", "age"]}'] * len(prompt_list)
        return gen.generate(lm, tok, prompt_list, **kw)

    monkeypatch.setattr(gen.PrefixCache, "__init__", small_init)
    monkeypatch.setattr(gen.PrefixCache, "get", counting_get)
    monkeypatch.setattr(mcp, "TS_CHUNK_TOKENS", 1, raising=False)
    monkeypatch.setitem(mcp.MAX_NEW_TOKENS, "ts", 4)  # a random model's answers: short is enough
    examples = [Example(q, "music", db_path) for q in list(SCRIPT)[:4]]
    run_chain(model, tok, examples, steps=("sl",), samples=2, generate_fn=real_ts, progress=False, repair=False)
    assert len(misses) == len(examples) and set(misses.values()) == {1}  # one prefill per question, not two
