"""The MSFT data builder: every task's target is right, NC labels agree with execution, CW cuts are prefixes."""
import json
import random
import shutil
import sqlite3
from collections import Counter

import pytest

from conftest import DEMO, demo_db
from route import msft, prompts
from route.database import open_database
from route.datasets import HELD_OUT_DBS, VALIDATION_DBS, VALIDATION_DBS_2, Example, load_dataset
from route.sql import parse
from tiny import write_music_db

GOLDS = [
    "SELECT count(*) FROM singer",
    "SELECT name FROM singer WHERE age > 28 ORDER BY age DESC",
    "SELECT T2.name, count(*) FROM singer AS T1 JOIN country AS T2 ON T1.country_id = T2.id GROUP BY T2.name",
    "SELECT DISTINCT country_id FROM singer",
    "SELECT max(age), min(age) FROM singer",
    "SELECT name FROM singer ORDER BY age LIMIT 1",
    "SELECT name FROM singer WHERE age > 20 AND country_id = 1",
    "SELECT nme FROM singer",  # does not execute: dropped, counted
]


@pytest.fixture(scope="module")
def examples(tmp_path_factory):
    path = write_music_db(tmp_path_factory.mktemp("db") / "music.sqlite")
    return [Example(f"question {i}?", "music", path, gold) for i, gold in enumerate(GOLDS)]


# What the records of each gold must teach besides the gold itself (the TS and CW targets, as written), written
# out by hand: the tables and columns it reads (SL), and whether its row order is part of the answer (NC labels:
# a top-level ORDER BY).
TAUGHT = {
    GOLDS[0]: ({"singer": []}, False),
    GOLDS[1]: ({"singer": ["age", "name"]}, True),
    GOLDS[2]: ({"singer": ["country_id"], "country": ["id", "name"]}, False),
    GOLDS[3]: ({"singer": ["country_id"]}, False),
    GOLDS[4]: ({"singer": ["age"]}, False),
    GOLDS[5]: ({"singer": ["age", "name"]}, True),
    GOLDS[6]: ({"singer": ["age", "country_id", "name"]}, False),
}


def sqlite_rows(path, sql):
    """The candidate's rows by SQLite itself (None if it fails): the independent side of an NC label."""
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute(sql).fetchall()
    except sqlite3.Error:
        return None
    finally:
        con.close()


def test_targets_and_labels(examples):
    records, counts = msft.build_examples(examples * 6, seed=1)  # repeats: several edits per gold
    assert counts["dropped: gold does not execute"] == 6
    db = open_database(examples[0].db_path)
    gold_of = {e.question: e.gold_sql for e in examples}
    seen = set()
    for r in records:
        seen.add(r["task"])
        question = r["messages"][1]["content"].split("### Question: ")[1].split("\n")[0]
        gold = gold_of[question]
        tables, ordered = TAUGHT[gold]
        if r["task"] == "ts":
            assert r["target"] == gold + "\n```" and r["answer_start"] == "```sql\n"
        elif r["task"] == "sl":
            assert json.loads(r["target"].removesuffix("\n```")) == tables
        elif r["task"] == "cw":
            partial = r["answer_start"].removeprefix("```sql\n")
            assert partial and gold.startswith(partial) and partial + r["target"].removesuffix("\n```") == gold
        elif r["task"] == "nc":
            cand = r["messages"][1]["content"].split("### SQL: ")[1].split("\n### Execution:")[0]
            got, want = sqlite_rows(examples[0].db_path, cand), sqlite_rows(examples[0].db_path, gold)
            same = got is not None and (got == want if ordered else Counter(got) == Counter(want))
            assert r["target"] == ("correct" if same else f"wrong\n```sql\n{gold}\n```"), cand  # label = execution
            assert r["messages"][1]["content"].endswith(prompts.describe_execution(db.execute(cand)))
    assert seen == set(msft.TASKS)
    assert counts["nc correct"] and counts["nc wrong"]
    assert sum(v for k, v in counts.items() if k.strip().startswith("nc candidates from")) == \
        counts["nc correct"] + counts["nc wrong"]


def test_edits_change_what_they_say(examples):
    db = open_database(examples[0].db_path)
    rng = random.Random(0)
    tree = parse(GOLDS[1])
    assert "DESC" not in msft._edit(tree, "order", db, rng).sql()  # the gold orders DESC
    assert "<" in msft._edit(tree, "comparison", db, rng).sql()
    assert "WHERE" not in msft._edit(tree, "drop_condition", db, rng).sql()
    assert msft._edit(tree, "group", db, rng) is None  # no GROUP BY to drop
    assert "DISTINCT" not in msft._edit(parse(GOLDS[3]), "distinct", db, rng).sql()
    agg = msft._edit(parse(GOLDS[4]), "aggregate", db, rng).sql()
    assert agg != parse(GOLDS[4]).sql()


def test_deterministic_and_written_atomically(examples, tmp_path):
    a, _ = msft.build_examples(examples, seed=3)
    b, _ = msft.build_examples(examples, seed=3)
    assert a == b
    msft.write_jsonl(a, tmp_path / "train.jsonl")
    assert [json.loads(x) for x in open(tmp_path / "train.jsonl")] == a
    assert not list(tmp_path.glob("*.tmp"))


def test_build_from_spider(spider, tmp_path):
    counts = msft.build(spider, tmp_path, limit=60, seed=0)
    # counted, not an error: the build machines' copy lacks soccer_1 and baseball_1 (test_datasets checks the count)
    assert counts["skipped: database missing"] == load_dataset(spider, "train").skipped
    n = sum(1 for _ in open(tmp_path / "train.jsonl"))
    assert n == counts["train records"] and n > 150
    # both validation checks are disjoint from training by database: val's questions make the held-out loss only
    train = {json.loads(x)["db_id"] for x in open(tmp_path / "train.jsonl")}
    val = {json.loads(x)["db_id"] for x in open(tmp_path / "val.jsonl")}
    assert not train & set(HELD_OUT_DBS) and val <= set(VALIDATION_DBS) and len(val) > 5
    assert counts["held out: questions on validation databases"] == 922 + 461


def test_validation_checks_are_whole_training_databases(spider, dev_sample):
    val, val2 = load_dataset(spider, "val"), load_dataset(spider, "val2")
    assert len(val) == 922 and {e.db_id for e in val} == set(VALIDATION_DBS)
    assert len(val2) == 461 and {e.db_id for e in val2} == set(VALIDATION_DBS_2)
    assert not set(VALIDATION_DBS) & set(VALIDATION_DBS_2)
    train = load_dataset(spider, "train")
    assert sum(e.db_id in VALIDATION_DBS for e in train) == 922  # every question on those databases
    assert sum(e.db_id in VALIDATION_DBS_2 for e in train) == 461
    dev = json.load(open(dev_sample))
    assert not {r["db_id"] for r in dev} & set(HELD_OUT_DBS)
    # the ids are positions in train_spider.json: the gold of each is that file's record
    records = json.load(open(spider / "train_spider.json"))
    assert all(records[e.index]["query"].strip() == e.gold_sql for e in val2)


def test_model_written_nc_candidates(examples, tmp_path):
    """--nc-from-model: the SQL a model wrote becomes one more NC record per question, labelled by execution
    (a right answer in another spelling is "correct"; a wrong one, or one that fails, gets the gold)."""
    exs = examples[:3]
    written = ["SELECT COUNT(*) FROM singer AS s",                   # same result as the gold: correct
               "SELECT name FROM singer ORDER BY age DESC",          # drops the filter: wrong
               "SELECT nosuch FROM country"]                         # fails to run: wrong
    records, counts = msft.build_examples(exs, tasks=("nc",), model_sql=written)
    assert counts["  nc candidates from model"] == 3
    by_sql = {r["messages"][1]["content"].split("### SQL: ")[1].split("\n### Execution:")[0]: r for r in records}
    assert by_sql[written[0]]["target"] == "correct"
    assert by_sql[written[1]]["target"] == f"wrong\n```sql\n{exs[1].gold_sql}\n```"  # the fix: the gold as written
    assert by_sql[written[2]]["target"] == f"wrong\n```sql\n{exs[2].gold_sql}\n```"
    assert "no such column" in by_sql[written[2]]["messages"][1]["content"]


@pytest.fixture
def demo_train(tmp_path):
    """The demo's 12 questions as a Spider training split, concert_singer's 4 under the name of a validation
    database (aircraft: held out of training), pets_1's and poker_player's 8 to train on."""
    root = tmp_path / "demo"
    records = json.loads((DEMO / "dev.json").read_text())
    for r in records:
        r["db_id"] = VALIDATION_DBS[0] if r["db_id"] == "concert_singer" else r["db_id"]
    for name in {r["db_id"] for r in records}:
        (root / "database" / name).mkdir(parents=True)
        shutil.copy(demo_db("concert_singer" if name == VALIDATION_DBS[0] else name),
                    root / "database" / name / f"{name}.sqlite")
    (root / "train_spider.json").write_text(json.dumps(records))
    (root / "train_others.json").write_text("[]")
    return root


def test_build_asks_the_model_once_per_part(demo_train, tmp_path):
    asked = []

    def written(exs):  # a "model" that writes the gold: every such candidate must be labelled correct
        asked.append(len(exs))
        return [e.gold_sql for e in exs]

    counts = msft.build(demo_train, tmp_path, limit=5, seed=0, val_questions=3, nc_from_model=written)
    assert asked == [3, 5]  # held-out questions (validation databases), then training questions
    executed = counts.get("ts", 0) + counts.get("ts (pruned schema)", 0)
    assert counts["  nc candidates from model"] == executed
    nc = [json.loads(line) for line in open(tmp_path / "train.jsonl")]
    nc = [r for r in nc if r["task"] == "nc"]
    assert sum(r["target"] == "correct" for r in nc) >= executed
    assert msft.build(demo_train, tmp_path / "ts", limit=5, tasks=("ts",), nc_from_model=written) and len(asked) == 2


def _tokenizer(which, tmp_path, request):
    from route.tokenizer import Tokenizer
    if which == "real":
        return Tokenizer.from_dir(request.getfixturevalue("default_model"))  # (conftest: fetched once)
    from tiny import write_tiny_tokenizer
    write_tiny_tokenizer(tmp_path, "qwen2")
    return Tokenizer.from_dir(tmp_path)


@pytest.mark.parametrize("which", ["tiny", pytest.param("real", marks=pytest.mark.slow)])
def test_training_prompt_ids_are_what_inference_feeds(examples, tmp_path, which, request):
    """Every prompt the chain hands to generate() (SL, pre-SQL, TS on the pruned schema, NC, CW) becomes,
    inside generate(), exactly the token ids that train.py makes of the MSFT record with the same inputs,
    with and without prefix reuse. (Encoding the prompt as one string gives other ids at the cuts.)"""
    from route.generate import _split
    from route.mcp import run_chain
    from route.batching import IGNORE, tokenize_examples

    tok = _tokenizer(which, tmp_path, request)
    ex = examples[2]
    db = open_database(ex.db_path)
    handed = []  # (task, prompt) as run_chain passes them to generate()
    answers = {"ts": "SELECT song FROM singer", "sl": '{"singer": ["name"]}', "nc": "correct", "cw": " name FROM x"}

    def recording_generate(model, tok, prompt_list, **kw):
        outs = []
        for p in prompt_list:
            t = next(t for t in ("sl", "ts", "nc", "cw") if prompts.INSTRUCTIONS[t] in _text(tok, p))
            handed.append((t, p))
            outs.append(answers[t])
        return outs

    traces, _ = run_chain(None, tok, [ex], fewshot=False, generate_fn=recording_generate, progress=False)
    tr = traces[0]
    assert tr.pruned_schema and tr.cw  # every step ran, TS on a pruned schema
    schema = db.schema_prompt(sample_rows=3)
    run = db.execute(tr.ts_sql)
    inputs = {"sl": [(schema, {})], "ts": [(schema, {}), (tr.pruned_schema, {})],
              "nc": [(schema, {"sql": tr.ts_sql, "execution": prompts.describe_execution(run)})],
              "cw": [(schema, {"partial": "SELECT"})]}
    trained = {}
    for task, cases in inputs.items():
        for sch, kw in cases:
            r = msft._record(task, ex, sch, {"sl": {"singer": {"name"}}, "nc": None}.get(task, "SELECT 1"), **kw)
            ids = tokenize_examples(tok, [prompts.cut(tok, task, r["messages"], r["answer_start"])], [r["target"]])[0]
            trained.setdefault(task, []).append(ids["input_ids"][:ids["labels"].index(next(
                t for t in ids["labels"] if t != IGNORE))])
    assert {t for t, _ in handed} == set(inputs) and len(handed) == 5
    for task, p in handed:
        for reuse in (True, False):
            levels, rest = _split(tok.encode_parts([p])[0], reuse)
            fed = [t for level in levels for t in level] + rest
            assert fed in trained[task], (task, reuse)
    whole = [tok.encode("".join(p)) for t, p in handed if isinstance(p[0], str)]
    if which == "real":  # the old path (one string) really differs, so this test can tell them apart
        assert any(w not in trained[t] for w, (t, _) in zip(whole, [h for h in handed if isinstance(h[1][0], str)]))


def _text(tok, prompt):
    parts = prompt if isinstance(prompt, tuple) else (prompt,)
    return "".join(x if isinstance(x, str) else tok.decode(x, skip_special=False) for x in parts)


def test_model_sql_is_the_models_answer_unrepaired(tmp_path):
    """NC candidates from the model (--nc-from-model) are the mistakes it makes: a misspelled column that the
    chain's repair would fix (to `name`) comes back as written."""
    from route.tokenizer import Tokenizer
    from route.weights import load_model
    from tiny import write_tiny, write_tiny_tokenizer

    write_tiny(tmp_path / "tiny")
    write_tiny_tokenizer(tmp_path / "tiny")
    engine = load_model(tmp_path / "tiny"), Tokenizer.from_dir(tmp_path / "tiny")
    db = write_music_db(tmp_path / "music.sqlite")
    asked = []

    def writes_a_typo(lm, tok, prompt_list, **kw):
        asked.append(kw.get("desc"))
        return ["SELECT nme FROM singer"] * len(prompt_list)

    exs = [Example("Name every singer.", "music", db)]
    assert msft.model_sql(engine, exs, generate_fn=writes_a_typo, progress=False) == ["SELECT nme FROM singer"]
    assert asked == ["ts"]  # zero-shot TS only: no SL, no samples
    from route.mcp import run_chain
    repaired, _ = run_chain(*engine, exs, steps=(), repair=True, generate_fn=writes_a_typo, progress=False)
    assert repaired[0].sql == "SELECT name FROM singer"  # what it would have been with repair on
