"""route.evaluate: execution accuracy with Spider's and BIRD's semantics, and its command line."""
import json

import pytest

from conftest import SPIDER, spider_db
from route.datasets import load_dataset
from route.evaluate import compare, evaluate, execution_match, main, results_match


def test_results_match_semantics():
    rows = [(1, "a"), (2, "b"), (2, "b")]
    assert results_match(rows, rows, ordered=True)
    assert results_match(rows[::-1], rows, ordered=False)  # row order is free without ORDER BY ...
    assert not results_match(rows[::-1], rows, ordered=True)  # ... and binding with it
    assert results_match([(b, a) for a, b in rows], rows, ordered=True)  # same columns, other order
    assert not results_match([(1, "a"), (2, "b")], rows, ordered=False)  # a multiset: duplicates count
    assert not results_match([(1, "a"), (1, "a"), (2, "b")], rows, ordered=False)
    assert not results_match([(1,), (2,), (2,)], rows, ordered=False)  # another number of columns
    assert results_match([], [], ordered=False) and not results_match([], [(1,)], ordered=False)
    # a permutation must hold for every row at once, not column by column
    assert not results_match([(1, 2), (2, 1)], [(1, 1), (2, 2)], ordered=False)
    assert results_match([(1.0, None)], [(1, None)], ordered=True)  # SQLite's 1 and 1.0 are equal
    wide = [tuple(range(i, i + 8)) for i in range(50)]  # 8! permutations: the search must prune
    assert results_match([r[::-1] for r in wide], wide, ordered=True)
    same = [(0,) * 9] * 3
    assert results_match(same, same, ordered=False)


def test_dev_sample_gold_scores_100(spider):
    data = load_dataset(SPIDER, "dev_sample.json")
    report = evaluate([ex.gold_sql for ex in data.examples], data)
    assert report.accuracy == 1.0 and len(report.results) == 200 and report.skipped == 0
    assert {lv: n for lv, (_, n) in report.by_level().items()} == {"easy": 51, "medium": 90, "hard": 33, "extra": 26}
    # (how long it takes, the figure README reports: bench/database.py)
    bird = evaluate([ex.gold_sql for ex in data.examples], data.examples, mode="bird")
    assert bird.accuracy == 1.0


# (database, gold, a wrong prediction): each must score 0
WRONG = [
    ("concert_singer", "SELECT name, capacity FROM stadium ORDER BY average DESC LIMIT 1",
     "SELECT name, location FROM stadium ORDER BY average DESC LIMIT 1"),  # wrong column
    ("concert_singer", "SELECT avg(age), min(age), max(age) FROM singer WHERE country = 'France'",
     "SELECT avg(age), min(age), max(age) FROM singer"),  # missing WHERE
    ("world_1", "SELECT Name FROM country ORDER BY Population ASC LIMIT 3",
     "SELECT Name FROM country ORDER BY Population ASC LIMIT 4"),  # wrong LIMIT
    ("concert_singer", "SELECT name FROM stadium", "SELECT name FROM singer"),  # wrong table
    ("world_1", "SELECT count(*) FROM city", "SELECT count(*) FROM country"),  # wrong table
    ("pets_1", "SELECT max(weight), petType FROM pets GROUP BY petType",
     "SELECT min(weight), petType FROM pets GROUP BY petType"),  # wrong aggregate
    ("car_1", "SELECT count(*) FROM CARS_DATA WHERE horsepower > 150",
     "SELECT count(*) FROM CARS_DATA WHERE horsepower >= 150"),  # wrong operator
    ("world_1", "SELECT Name, SurfaceArea FROM country ORDER BY SurfaceArea DESC LIMIT 5",
     "SELECT Name FROM country ORDER BY SurfaceArea DESC LIMIT 5"),  # missing column
    ("orchestra", "SELECT Record_Company, COUNT(*) FROM orchestra GROUP BY Record_Company",
     "SELECT Major_Record_Format, COUNT(*) FROM orchestra GROUP BY Major_Record_Format"),  # wrong GROUP BY
    ("concert_singer", "SELECT country FROM singer WHERE age > 40 INTERSECT SELECT country FROM singer WHERE age < 30",
     "SELECT country FROM singer WHERE age > 40 UNION SELECT country FROM singer WHERE age < 30"),  # wrong set op
    ("concert_singer", "SELECT name FROM stadium", "SELECT name FROM"),  # does not run
    ("concert_singer", "SELECT name FROM stadium", ""),  # no answer
]
WRONG_ORDER = [  # wrong for Spider, which keeps the gold's order; BIRD compares sets
    ("orchestra", "SELECT Name FROM conductor ORDER BY Year_of_Work DESC",
     "SELECT Name FROM conductor ORDER BY Year_of_Work ASC"),  # wrong ORDER BY direction
    ("orchestra", "SELECT Name FROM conductor ORDER BY Year_of_Work DESC", "SELECT Name FROM conductor"),  # no order
]


def test_wrong_predictions_score_0(spider):
    cases = WRONG + WRONG_ORDER
    assert [execution_match(pred, gold, spider_db(db)) for db, gold, pred in cases] == [False] * len(cases)
    assert [execution_match(pred, gold, spider_db(db), "bird") for db, gold, pred in WRONG] == [False] * len(WRONG)
    assert all(execution_match(pred, gold, spider_db(db), "bird") for db, gold, pred in WRONG_ORDER)


def test_spider_row_and_column_order(spider):
    car, world, concert = spider_db("car_1"), spider_db("world_1"), spider_db("concert_singer")
    # no ORDER BY in the gold: any row order, any column order
    assert execution_match("SELECT Model, Maker FROM MODEL_LIST ORDER BY Model DESC", "SELECT Maker, Model FROM MODEL_LIST", car)
    # ORDER BY in the gold: rows in that order, columns still in any order
    assert execution_match("SELECT SurfaceArea, Name FROM country ORDER BY SurfaceArea DESC LIMIT 5",
                           "SELECT Name, SurfaceArea FROM country ORDER BY SurfaceArea DESC LIMIT 5", world)
    # only a top-level ORDER BY orders the result (Spider's script would also count this subquery's)
    assert execution_match(
        "SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM singer ORDER BY age LIMIT 3) ORDER BY name DESC",
        "SELECT name FROM singer WHERE singer_id IN (SELECT singer_id FROM singer ORDER BY age LIMIT 3)", concert)
    # DISTINCT is stripped from both queries by default, as Spider's script does; keep_distinct=True compares bags
    assert execution_match("SELECT DISTINCT country FROM singer", "SELECT country FROM singer", concert)
    assert not execution_match("SELECT DISTINCT country FROM singer", "SELECT country FROM singer", concert,
                               keep_distinct=True)


def test_bird_compares_sets(spider):
    concert = spider_db("concert_singer")
    assert execution_match("SELECT DISTINCT country FROM singer", "SELECT country FROM singer", concert, mode="bird")
    assert not execution_match("SELECT capacity, name FROM stadium", "SELECT name, capacity FROM stadium", concert,
                               mode="bird")
    with pytest.raises(ValueError):
        compare("SELECT 1", "SELECT 1", concert, mode="nope")


def test_errors_are_reported(spider):
    correct, pred_error, gold_error = compare("SELECT nope FROM singer", "SELECT name FROM singer",
                                              spider_db("concert_singer"))
    assert not correct and "no such column" in pred_error and gold_error is None
    correct, _, gold_error = compare("SELECT 1", "SELECT broken FROM", spider_db("concert_singer"))
    assert not correct and gold_error


def test_evaluate_by_index_and_levels(spider):
    data = load_dataset(SPIDER, "dev_sample.json")
    examples = data.examples[:3]
    preds = {examples[0].index: examples[0].gold_sql, examples[2].index: "SELECT 1"}  # examples[1] missing
    report = evaluate(preds, examples)
    assert [r.correct for r in report.results] == [True, False, False]
    assert report.results[1].pred_error == "empty SQL"
    # levels by Spider's hardness rules, by hand: [0] avg/min/max + WHERE (1 component, 2 others) and [1] two
    # columns + ORDER BY + LIMIT (2 components, 1 other) are medium; [2] DISTINCT + WHERE (1 component) is easy
    assert report.by_level() == {"easy": (0, 1), "medium": (1, 2)}
    lines = str(report).splitlines()
    assert lines[1].split() == ["easy", "1", "0", "0.0"] and lines[2].split() == ["medium", "2", "1", "50.0"]
    assert lines[3].split() == ["all", "3", "1", "33.3"]
    with pytest.raises(ValueError):
        evaluate(["SELECT 1"], examples)


# -- command line ------------------------------------------------------------------------------------------


@pytest.fixture
def gold_file(tmp_path, spider):
    lines = ["SELECT name FROM singer ORDER BY age\tconcert_singer",
             "SELECT count(*) FROM ghosts\tno_such_db",  # database missing: skipped and counted
             "SELECT count(*) FROM city\tworld_1"]
    path = tmp_path / "gold.sql"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def test_cli_spider_format(gold_file, tmp_path, capsys):
    pred = tmp_path / "pred.sql"
    pred.write_text("SELECT name FROM singer ORDER BY age\nSELECT 1\nSELECT count(*) FROM country\n")
    code, out = run(capsys, "--pred", pred, "--gold", gold_file, "--db-root", SPIDER / "database")
    assert code == 0
    assert "all                 2        1    50.0" in out.out and "skipped 1 examples whose database is missing (no_such_db)" in out.out
    results = [json.loads(line) for line in (tmp_path / "pred.results.jsonl").read_text().splitlines()]
    assert [(r["db_id"], r["correct"]) for r in results] == [("concert_singer", True), ("world_1", False)]


def test_cli_jsonl_and_bird_json(gold_file, tmp_path, capsys):
    jsonl = tmp_path / "pred.jsonl"
    jsonl.write_text("\n".join(json.dumps({"index": i, "sql": s}) for i, s in
                               [(2, "SELECT count(*) FROM city"), (0, "SELECT name FROM singer")]))
    code, out = run(capsys, "--pred", jsonl, "--gold", gold_file, "--db-root", SPIDER / "database",
                    "--out", tmp_path / "r.jsonl")
    assert code == 0 and "all                 2        1    50.0" in out.out  # index 0 is unordered: wrong
    bird = tmp_path / "predict_dev.json"
    bird.write_text(json.dumps({"0": "SELECT name FROM singer ORDER BY age\t----- bird -----\tconcert_singer",
                                "1": "x", "2": "SELECT count(*) FROM city\t----- bird -----\tworld_1"}))
    code, out = run(capsys, "--pred", bird, "--gold", gold_file, "--db-root", SPIDER / "database", "--mode", "bird")
    assert code == 0 and "all                 2        2   100.0" in out.out


def test_cli_dataset_json_gold_and_count_mismatch(tmp_path, capsys, spider):
    records = json.loads((SPIDER / "dev_sample.json").read_text())[:4]
    pred = tmp_path / "pred.txt"
    pred.write_text("\n".join(r["query"] for r in records) + "\n")
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps(records))
    code, out = run(capsys, "--pred", pred, "--gold", gold, "--db-root", SPIDER / "database")
    assert code == 0 and "all                 4        4   100.0" in out.out
    pred.write_text("SELECT 1\n")
    code, out = run(capsys, "--pred", pred, "--gold", gold, "--db-root", SPIDER / "database")
    assert code == 2 and "1 predictions" in out.err
