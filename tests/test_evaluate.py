"""route.evaluate: execution accuracy with Spider's and BIRD's semantics, and its command line (score.py).

The databases: the demo's concert_singer and pets_1 (Spider's files), and small ones written here in the shape
of Spider's world_1, car_1 and orchestra where the cases read them."""
import json
import shutil

import pytest

from conftest import DEMO, demo_db, write_db
from route.datasets import load_dataset
from route.evaluate import compare, evaluate, execution_match, results_match
from score import main


@pytest.fixture(scope="module")
def dbs(world, tmp_path_factory):
    """{db_id: path}. car_1's Horsepower is TEXT, as in Spider; one car has exactly 150 (> and >= differ)."""
    tmp = tmp_path_factory.mktemp("dbs")
    car = write_db(tmp / "car_1.sqlite", """
        CREATE TABLE MODEL_LIST (ModelId INTEGER PRIMARY KEY, Maker INTEGER, Model TEXT UNIQUE);
        CREATE TABLE CARS_DATA (Id INTEGER PRIMARY KEY, MPG TEXT, Cylinders INTEGER, Horsepower TEXT, Year INTEGER);""",
                   {"MODEL_LIST": [(1, 1, "amc"), (2, 2, "audi"), (3, 3, "bmw"), (4, 4, "buick"), (5, 4, "volvo")],
                    "CARS_DATA": [(1, "18", 8, "130", 1970), (2, "15", 8, "165", 1970), (3, "18", 8, "150", 1970),
                                  (4, "16", 8, "150", 1971), (5, "17", 8, "140", 1972), (6, "26", 4, "46", 1973)]})
    orchestra = write_db(tmp / "orchestra.sqlite", """
        CREATE TABLE conductor (Conductor_ID INT PRIMARY KEY, Name TEXT, Age INT, Nationality TEXT, Year_of_Work INT);
        CREATE TABLE orchestra (Orchestra_ID INT PRIMARY KEY, Orchestra TEXT, Conductor_ID INT, Record_Company TEXT,
                                Year_of_Founded REAL, Major_Record_Format TEXT);""",
                         {"conductor": [(1, "Antal Dorati", 40, "USA", 10), (2, "Igor Stravinsky", 41, "UK", 11),
                                        (3, "Colin Davis", 42, "USA", 20), (4, "Paul Jorgensen", 43, "UK", 11),
                                        (5, "Antal Brown", 43, "USA", 16)],
                          "orchestra": [(1, "London Symphony", 1, "Mercury Records", 2003, "CD"),
                                        (2, "Chicago Symphony", 2, "Columbia Masterworks", 2009, "CD / LP"),
                                        (3, "Philharmonia", 3, "Decca Records", 2008, "CD"),
                                        (4, "Royal Concertgebouw", 4, "Decca Records", 2002, "DVD")]})
    return {"concert_singer": demo_db("concert_singer"), "pets_1": demo_db("pets_1"), "world_1": world,
            "car_1": car, "orchestra": orchestra}


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


def test_dev_sample_gold_scores_100(spider, dev_sample):  # all of dev_sample.json: real Spider only
    data = load_dataset(spider, dev_sample)
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


def test_wrong_predictions_score_0(dbs):
    cases = WRONG + WRONG_ORDER
    assert [execution_match(pred, gold, dbs[db]) for db, gold, pred in cases] == [False] * len(cases)
    assert [execution_match(pred, gold, dbs[db], "bird") for db, gold, pred in WRONG] == [False] * len(WRONG)
    assert all(execution_match(pred, gold, dbs[db], "bird") for db, gold, pred in WRONG_ORDER)


def test_spider_row_and_column_order(dbs):
    car, world, concert = dbs["car_1"], dbs["world_1"], dbs["concert_singer"]
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


def test_bird_compares_sets():
    concert = demo_db("concert_singer")
    assert execution_match("SELECT DISTINCT country FROM singer", "SELECT country FROM singer", concert, mode="bird")
    assert not execution_match("SELECT capacity, name FROM stadium", "SELECT name, capacity FROM stadium", concert,
                               mode="bird")
    with pytest.raises(ValueError):
        compare("SELECT 1", "SELECT 1", concert, mode="nope")


def test_errors_are_reported():
    correct, pred_error, gold_error = compare("SELECT nope FROM singer", "SELECT name FROM singer",
                                              demo_db("concert_singer"))
    assert not correct and "no such column" in pred_error and gold_error is None
    correct, _, gold_error = compare("SELECT 1", "SELECT broken FROM", demo_db("concert_singer"))
    assert not correct and gold_error


def test_evaluate_by_index_and_levels():
    examples = load_dataset(DEMO, "dev").examples[:3]  # dev_sample.json's first three
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
def db_root(dbs, tmp_path):
    """A --db-root folder (<db_id>/<db_id>.sqlite) holding concert_singer and world_1."""
    for name in ("concert_singer", "world_1"):
        (tmp_path / "database" / name).mkdir(parents=True)
        shutil.copy(dbs[name], tmp_path / "database" / name / f"{name}.sqlite")
    return tmp_path / "database"


@pytest.fixture
def gold_file(tmp_path):
    lines = ["SELECT name FROM singer ORDER BY age\tconcert_singer",
             "SELECT count(*) FROM ghosts\tno_such_db",  # database missing: skipped and counted
             "SELECT count(*) FROM city\tworld_1"]
    path = tmp_path / "gold.sql"
    path.write_text("\n".join(lines) + "\n")
    return path


def run(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr()


def test_cli_spider_format(gold_file, db_root, tmp_path, capsys):
    pred = tmp_path / "pred.sql"
    pred.write_text("SELECT name FROM singer ORDER BY age\nSELECT 1\nSELECT count(*) FROM country\n")
    code, out = run(capsys, "--pred", pred, "--gold", gold_file, "--db-root", db_root)
    assert code == 0
    assert "all                 2        1    50.0" in out.out and "skipped 1 examples whose database is missing (no_such_db)" in out.out
    results = [json.loads(line) for line in (tmp_path / "pred.results.jsonl").read_text().splitlines()]
    assert [(r["db_id"], r["correct"]) for r in results] == [("concert_singer", True), ("world_1", False)]


def test_cli_jsonl_and_bird_json(gold_file, db_root, tmp_path, capsys):
    jsonl = tmp_path / "pred.jsonl"
    jsonl.write_text("\n".join(json.dumps({"index": i, "sql": s}) for i, s in
                               [(2, "SELECT count(*) FROM city"), (0, "SELECT name FROM singer")]))
    code, out = run(capsys, "--pred", jsonl, "--gold", gold_file, "--db-root", db_root,
                    "--out", tmp_path / "r.jsonl")
    assert code == 0 and "all                 2        1    50.0" in out.out  # index 0 is unordered: wrong
    bird = tmp_path / "predict_dev.json"
    bird.write_text(json.dumps({"0": "SELECT name FROM singer ORDER BY age\t----- bird -----\tconcert_singer",
                                "1": "x", "2": "SELECT count(*) FROM city\t----- bird -----\tworld_1"}))
    code, out = run(capsys, "--pred", bird, "--gold", gold_file, "--db-root", db_root, "--mode", "bird")
    assert code == 0 and "all                 2        2   100.0" in out.out


def test_cli_dataset_json_gold_and_count_mismatch(tmp_path, capsys):
    records = json.loads((DEMO / "dev.json").read_text())[:4]  # dev_sample.json's first four
    pred = tmp_path / "pred.txt"
    pred.write_text("\n".join(r["query"] for r in records) + "\n")
    gold = tmp_path / "gold.json"
    gold.write_text(json.dumps(records))
    code, out = run(capsys, "--pred", pred, "--gold", gold, "--db-root", DEMO / "database")
    assert code == 0 and "all                 4        4   100.0" in out.out
    pred.write_text("SELECT 1\n")
    code, out = run(capsys, "--pred", pred, "--gold", gold, "--db-root", DEMO / "database")
    assert code == 2 and "1 predictions" in out.err
