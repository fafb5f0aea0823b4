"""route.demos: solved questions chosen by skeleton, never from the question's own database, shown to TS."""
import json

import pytest

from route import prompts
from route.datasets import DatasetError
from route.demos import DemoPool, describe, load_pool, name_words, skeleton

PAIRS = [
    {"question": "How many singers are from France?", "query": "SELECT count(*) FROM singer WHERE country = 'France'",
     "db_id": "music"},
    {"question": "How many ships were built in 1990?", "query": "SELECT count(*) FROM ship WHERE built = 1990",
     "db_id": "navy"},
    {"question": "List the names of airports with no flights.",
     "query": "SELECT name FROM airport WHERE id NOT IN (SELECT src FROM flight UNION SELECT dst FROM flight)",
     "db_id": "air"},
    {"question": "How many students does each teacher have?",
     "query": "SELECT teacher_id, count(*) FROM student GROUP BY teacher_id", "db_id": "school"},
]


@pytest.fixture
def pool(tmp_path):
    path = tmp_path / "demos.json"
    path.write_text(json.dumps(PAIRS + PAIRS[:1]))  # a repeated pair is kept once
    return load_pool(path)


def test_skeleton_masks_names_values_and_numbers():
    names = name_words(["ship", "Built_Year", "countryName"])
    assert {"ship", "ships", "built", "year", "country", "name"} <= names
    assert skeleton("How many ships were built in 1990 by \"Acme\" in France?", names) == \
        ["how", "many", "<name>", "were", "<name>", "in", "<value>", "by", "<value>", "in", "<value>"]


def test_nearest_skeleton_from_other_databases(pool):
    assert len(pool.pairs) == 4
    names = name_words(["car", "maker", "country"])
    best = pool.similar("How many cars are from Germany?", names, db_id="cars")
    assert best[0]["db_id"] == "music"  # "how many <name> are from <value>": the same shape
    # the question's own database is never shown, however similar its questions are
    assert all(p["db_id"] != "music" for p in pool.similar("How many singers are from France?", set(), "music"))
    shapes = pool.similar("Give the names of stations with no trains.", name_words(["station", "train"]), db_id="rail")
    assert shapes[0]["db_id"] == "air"
    assert pool.similar("zzz qqq", set(), "x") == []  # nothing in common: no examples rather than random ones


def test_spider_pool_and_bad_files(spider, tmp_path):
    pool = load_pool(spider)
    assert len(pool.pairs) > 8000 and all(p["db_id"] for p in pool.pairs)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(DatasetError, match="bad.json: pair 0"):
        load_pool(bad)


def test_prompt_shows_demos_to_ts_only(tmp_path):
    demos = describe([{"question": "How many ships?", "sql": "SELECT count(*) FROM ship"}])
    ts, _ = prompts.messages("ts", "SCHEMA", "How many cars?", demos=demos)
    text = ts[1]["content"]
    assert text.index("Question: How many ships?\nSQL: SELECT count(*) FROM ship") < text.index("### Question: How")
    for task in ("sl", "nc", "cw"):
        assert "How many ships" not in prompts.messages(task, "SCHEMA", "How many cars?", demos=demos)[0][1]["content"]
