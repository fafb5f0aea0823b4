"""Official prediction files: infer.py --out writes Spider's and BIRD's formats beside its trace, the official
evaluators' own reading of those formats lines them up with the gold, and score.py reads all three."""
import json
import shutil
import sys
from pathlib import Path

import pytest

from conftest import demo_db
from route.datasets import load_dataset
from route.evaluate import PLACEHOLDER, flatten_sql, write_bird_preds, write_spider_preds
from score import main as evaluate_main
from route.mcp import Trace
from tiny import write_music_db, write_tiny, write_tiny_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import infer  # noqa: E402


# -- small copies of how the official evaluators read these files ---------------------------------------------


def spider_read(path):
    """test-suite-sql-eval's evaluation.py: a blank line ends a session (multi-turn); each line is split at its
    tabs and its first field is the SQL. Spider's gold has one session, so the predictions must too."""
    sessions, one = [], []
    with open(path) as f:
        for line in f.readlines():
            if len(line.strip()) == 0:
                sessions.append(one)
                one = []
            else:
                one.append(line.strip().split("\t"))
    if one:
        sessions.append(one)
    return sessions


def bird_read(path, db_root):
    """BIRD's evaluation.py (package_sqls, mode 'gpt'): the dict's values in order, each split into SQL and
    db_id; the i-th is compared with the i-th gold query."""
    sqls, dbs = [], []
    for _, sql_str in json.load(open(path)).items():
        sql, db_name = sql_str.split("\t----- bird -----\t")
        sqls.append(sql)
        dbs.append(f"{db_root}{db_name}/{db_name}.sqlite")
    return sqls, dbs


# -- fixtures: a Spider layout with a missing database in the middle, and a BIRD layout -----------------------


@pytest.fixture
def spider_root(tmp_path):
    root = tmp_path / "spider"
    (root / "database" / "concert_singer").mkdir(parents=True)
    shutil.copy(demo_db("concert_singer"), root / "database/concert_singer/")
    (root / "tables.json").write_text("[]")
    (root / "dev.json").write_text(json.dumps([
        {"db_id": "concert_singer", "question": "How many singers?", "query": "SELECT count(*) FROM singer",
         "dev_index": 10},
        {"db_id": "gone", "question": "Lost?", "query": "SELECT 1", "dev_index": 11},
        {"db_id": "concert_singer", "question": "Names?", "query": "SELECT name FROM singer", "dev_index": 12},
        {"db_id": "concert_singer", "question": "Stadiums?", "query": "SELECT count(*) FROM stadium",
         "dev_index": 13},
    ]))
    return root


@pytest.fixture
def bird_root(tmp_path):
    root = tmp_path / "bird"
    (root / "dev_databases" / "music").mkdir(parents=True)
    write_music_db(root / "dev_databases/music/music.sqlite")
    (root / "dev_tables.json").write_text("[]")
    (root / "dev.json").write_text(json.dumps([
        {"question_id": 0, "db_id": "music", "question": "How many singers?", "evidence": "",
         "SQL": "SELECT count(*) FROM singer", "difficulty": "simple"},
        {"question_id": 1, "db_id": "lost", "question": "?", "evidence": "", "SQL": "SELECT 1",
         "difficulty": "simple"},
        {"question_id": 2, "db_id": "music", "question": "Names, twice?", "evidence": "",
         "SQL": "SELECT name FROM singer UNION ALL SELECT name FROM singer", "difficulty": "moderate"},
    ]))
    return root


def test_flatten_sql():
    assert flatten_sql("SELECT a,\n\tb  FROM t\r\nWHERE x = 1 ") == "SELECT a, b FROM t WHERE x = 1"
    # inside literals: spaces kept, line breaks and tabs (which the line format cannot hold) become spaces
    assert flatten_sql("SELECT *\nFROM t WHERE n = 'a  b\nc' AND m = \"x\ty\"") == \
        "SELECT * FROM t WHERE n = 'a  b c' AND m = \"x y\""
    assert flatten_sql("SELECT 'it''s'  ,\n 2") == "SELECT 'it''s' , 2"
    assert flatten_sql("") == "" and flatten_sql(None) == ""


def test_spider_file_lines_up_with_the_input(spider_root, tmp_path):
    ds = load_dataset(spider_root, "dev")
    assert ds.skipped == 1 and [e.position for e in ds] == [0, 2, 3] and ds.id_key == "dev_index"
    sqls = ["SELECT count(*)\nFROM singer", "SELECT name\tFROM singer", ""]  # multi-line, a tab, no answer
    path = write_spider_preds(tmp_path / "p.sql", ds.examples, sqls, ds.skipped_examples)
    sessions = spider_read(path)
    gold = [r["query"] for r in json.loads((spider_root / "dev.json").read_text())]
    assert len(sessions) == 1 and len(sessions[0]) == len(gold)  # one session, one line per input question
    assert [p[0] for p in sessions[0]] == ["SELECT count(*) FROM singer", PLACEHOLDER, "SELECT name FROM singer",
                                           PLACEHOLDER]


def test_bird_file_has_every_question_in_order(bird_root, tmp_path):
    ds = load_dataset(bird_root, "dev")
    assert ds.kind == "bird" and ds.id_key == "question_id" and ds.skipped == 1
    path = write_bird_preds(tmp_path / "predict_dev.json", ds.examples, ["SELECT count(*)\nFROM singer", ""],
                            ds.skipped_examples)
    assert list(json.loads(path.read_text())) == ["0", "1", "2"]
    sqls, dbs = bird_read(path, "db/")
    assert sqls == ["SELECT count(*) FROM singer", PLACEHOLDER, PLACEHOLDER]
    assert dbs == ["db/music/music.sqlite", "db/lost/lost.sqlite", "db/music/music.sqlite"]


def test_a_gap_is_refused(spider_root, tmp_path):
    ds = load_dataset(spider_root, "dev")
    with pytest.raises(ValueError, match="neither answered nor skipped"):  # the skipped one left out
        write_spider_preds(tmp_path / "p.sql", ds.examples, ["SELECT 1"] * 3)


def traces_for(ds, sqls):
    return [Trace(e.question, e.db_id, sql=s) for e, s in zip(ds.examples, sqls)]


def test_write_outputs_and_evaluate_reads_all_three(spider_root, tmp_path, capsys):
    ds = load_dataset(spider_root, "dev")
    traces = traces_for(ds, ["SELECT count(*) FROM singer", "SELECT name FROM singer ORDER BY age",
                             "SELECT count(*) FROM concert"])  # right, right (unordered gold), wrong
    written = infer.write_outputs(tmp_path / "run.jsonl", ds, traces, None, {"ex": None})
    assert [(w, p.name) for w, p in written] == [("traces", "run.jsonl"), ("Spider predictions", "run.sql")]
    rows = [json.loads(line) for line in (tmp_path / "run.jsonl").read_text().splitlines()]
    assert [(r["dev_index"], r["position"]) for r in rows[:-1]] == [(10, 0), (12, 2), (13, 3)]
    assert "summary" in rows[-1]
    for pred in ("run.jsonl", "run.sql"):
        assert evaluate_main(["--pred", str(tmp_path / pred), "--gold", str(spider_root / "dev.json"),
                              "--db-root", str(spider_root / "database")]) == 0
        out = capsys.readouterr().out
        # 2 of the 3 questions whose database exists; the trace is matched by dev_index, the .sql by line
        assert "EX (spider)" in out and "all                 3        2    66.7" in out, out


def test_bird_outputs_are_scored_with_birds_rules(bird_root, tmp_path, capsys):
    ds = load_dataset(bird_root, "dev")
    # a set comparison (BIRD) calls the UNION ALL gold's 6 rows equal to these 3; Spider's multisets would not
    traces = traces_for(ds, ["SELECT count(*) FROM singer", "SELECT name FROM singer"])
    written = dict(infer.write_outputs(tmp_path / "bird.jsonl", ds, traces, None, {}))
    assert written["BIRD predictions"].name == "bird.predict_dev.json"
    for pred in ("bird.jsonl", "bird.predict_dev.json"):
        assert evaluate_main(["--pred", str(tmp_path / pred), "--gold", str(bird_root / "dev.json"),
                              "--db-root", str(bird_root / "dev_databases")]) == 0
        out = capsys.readouterr().out
        assert "EX (bird)" in out and "all                 2        2   100.0" in out, out
    assert evaluate_main(["--pred", str(tmp_path / "bird.jsonl"), "--gold", str(bird_root / "dev.json"),
                          "--db-root", str(bird_root / "dev_databases"), "--mode", "spider"]) == 0
    assert "all                 2        1    50.0" in capsys.readouterr().out


def test_infer_out_end_to_end_with_a_tiny_model(bird_root, tmp_path, capsys):
    """infer.py itself: --limit, BIRD's mode for BIRD data, both files written (a random model: EX is 0)."""
    model = tmp_path / "tiny"
    write_tiny(model)
    write_tiny_tokenizer(model)
    out = tmp_path / "run.jsonl"
    infer.main(["--model", str(model), "--data", str(bird_root), "--steps", "none", "--quiet",
                "--out", str(out), "--device", "cpu", "--dtype", "fp32"])
    printed = capsys.readouterr().out
    assert "EX (bird)" in printed
    preds = json.loads((tmp_path / "run.predict_dev.json").read_text())
    assert list(preds) == ["0", "1", "2"] and preds["1"] == f"{PLACEHOLDER}\t----- bird -----\tlost"
    assert all("\n" not in v for v in preds.values())
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r.get("question_id") for r in rows] == [0, 2, None] and "summary" in rows[-1]
