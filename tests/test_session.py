"""The interactive session (`infer.py --db F` with no --question): through a pipe with a tiny random model
(the model is loaded once, every line is a question, an empty line / end of input / Ctrl-C end it with
status 0), and its printout with a scripted chain."""
import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from route.mcp import Trace
from route.session import format_table, run_session
from tiny import write_music_db, write_tiny, write_tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("session")
    write_tiny(d / "tiny")
    write_tiny_tokenizer(d / "tiny")
    return d / "tiny", write_music_db(d / "music.sqlite")


def infer(model, db, *extra, **kw):
    cmd = [sys.executable, str(ROOT / "infer.py"), "--model", str(model), "--db", str(db), "--steps", "none",
           "--device", "cpu", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT, env=env, **kw)


def test_piped_questions_one_model_load(setup):
    model, db = setup
    p = infer(model, db, "--explain", input="How many singers?\nName every singer.\n\nnever asked\n")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert out.count("steps: plain text-to-SQL") == 1  # the model was set up once for both questions
    assert "> How many singers?" in out and "> Name every singer." in out
    assert out.count("SQL: ") == 2 and out.count(" s)\n") == 2 and out.count("  steps:") == 2
    assert "never asked" not in out  # the empty line ended the session (end of input does too: below)
    assert out.rstrip().endswith("bye") and "Traceback" not in p.stderr


def test_ctrl_c_ends_it_cleanly(setup):
    model, db = setup
    cmd = [sys.executable, str(ROOT / "infer.py"), "--model", str(model), "--db", str(db), "--steps", "none"]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    banner = ""
    deadline = time.time() + 120
    while "Ask a question" not in banner and time.time() < deadline:  # waiting for input now
        banner += proc.stdout.readline()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "bye" in out and "Traceback" not in err, err


def test_a_bad_database_fails_before_loading_the_model(setup, tmp_path):
    model, _ = setup
    (tmp_path / "x.sqlite").write_text("not a database")
    p = infer(model, tmp_path / "x.sqlite", input="q\n")
    assert p.returncode != 0 and "not a SQLite database" in p.stderr and "steps:" not in p.stdout


def test_printout_with_a_scripted_chain(setup):
    _, db = setup
    asked = []  # the input ends without an empty line: end of input ends the session

    def chain(examples, progress=True):
        asked.append((examples[0].question, progress))
        sql = {"names": "SELECT name, age FROM singer ORDER BY age", "bad": "SELECT nope FROM singer"}
        t = Trace(examples[0].question, examples[0].db_id, ts_sql="SELECT 1", nc="correct",
                  sql=sql[examples[0].question])
        return [t], {}

    out = io.StringIO()
    assert run_session(chain, db, stdin=io.StringIO("names\nbad\n.explain\n"), out=out) == 0
    text = out.getvalue()
    assert asked == [("names", False), ("bad", False)]  # no progress bars in a session
    assert "name  age\n----  ---\nCy     25\nAna    30\nBo     41\n(3 rows)" in text
    assert "error: no such column: nope" in text
    assert "NC         correct" in text  # .explain: the steps behind the last answer


def test_format_table():
    rows = [(i, f"name {i}", None if i % 2 else 1.5) for i in range(12)]
    text = format_table(["id", "name", "score"], rows, limit=3)
    assert text.splitlines() == ["id  name    score", "--  ------  -----", " 0  name 0    1.5",
                                 " 1  name 1   NULL", " 2  name 2    1.5", "(12 rows, first 3 shown)"]
    assert format_table(["n"], [], truncated=False).endswith("(0 rows)")
    assert format_table(["t"], [("x" * 100,)]).splitlines()[2] == "x" * 37 + "..."
    assert format_table(["n"], [(1,)] * 5, truncated=True).endswith("(at least 5 rows)")


def test_a_session_keeps_the_schema_cache_runs_each_query_once_and_says_when_candidates_disagree(setup,
                                                                                                   monkeypatch):
    from functools import partial

    from route import mcp
    from route.database import open_database
    from route.generate import PrefixCache, generate
    from route.session import answer
    from route.tokenizer import Tokenizer
    from route.weights import load_model

    model_dir, db = setup
    model, tok = load_model(model_dir), Tokenizer.from_dir(model_dir)
    writes = iter(["SELECT name FROM singer", "SELECT name FROM singer WHERE age > 26", "SELECT 1"] * 2)

    def first_real_then_scripted(lm, tok, prompt_list, **kw):  # a real prefill fills the cache; the SQL is ours
        generate(lm, tok, prompt_list, **{**kw, "max_new_tokens": 1})
        return [next(writes) for _ in prompt_list]

    runs = []
    open_database(db).schema_prompt()  # its sample-row queries are not the question's
    real = open_database(db)._execute
    monkeypatch.setattr(open_database(db), "_execute", lambda sql, *a, **kw: runs.append(sql) or real(sql, *a, **kw))
    cache = PrefixCache()
    chain = partial(mcp.run_chain, model, tok, steps=(), samples=2, prefix_cache=cache,
                    generate_fn=first_real_then_scripted)
    out = io.StringIO()
    tr = answer(chain, db, "Who sings?", False, out)
    assert tr.sql == "SELECT name FROM singer" and tr.agree == (1, 3)
    assert "only 1 of 3 candidate queries return this result" in out.getvalue()
    assert sorted(runs) == sorted(["SELECT name FROM singer", "SELECT name FROM singer WHERE age > 26", "SELECT 1"])
    schema_levels = set(cache.entries)
    answer(chain, db, "Who sings again?", False, io.StringIO())
    assert schema_levels <= set(cache.entries) and len(cache.entries) == len(schema_levels)  # reused, not redone
