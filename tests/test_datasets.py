"""route.datasets: Spider and BIRD layouts, a user's own SQLite file, missing databases, malformed files."""
import json
import sqlite3

import pytest

from route.datasets import DatasetError, load_dataset, load_sqlite


def make_db(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a INT)")
    conn.commit()
    conn.close()
    return path


@pytest.fixture
def spider_root(tmp_path):
    make_db(tmp_path / "database" / "shop" / "shop.sqlite")
    (tmp_path / "tables.json").write_text("[]")
    (tmp_path / "dev.json").write_text(json.dumps([
        {"db_id": "shop", "question": " How many? ", "query": "SELECT count(*) FROM t"},
        {"db_id": "gone", "question": "Lost?", "query": "SELECT 1"},
        {"db_id": "shop", "question": "All?", "query": "SELECT * FROM t"},
    ]))
    (tmp_path / "train_spider.json").write_text(json.dumps([{"db_id": "shop", "question": "q1", "query": "SELECT 1"}]))
    (tmp_path / "train_others.json").write_text(json.dumps([{"db_id": "shop", "question": "q2", "query": "SELECT 2"}]))
    return tmp_path


def test_spider_layout(spider_root):
    dev = load_dataset(spider_root, "dev")
    assert len(dev) == 2 and dev.skipped == 1 and dev.missing_dbs == {"gone"} and dev.name == "spider/dev"
    first = dev[0]
    assert (first.question, first.db_id, first.gold_sql, first.index) == ("How many?", "shop", "SELECT count(*) FROM t", 0)
    assert first.db_path == spider_root / "database" / "shop" / "shop.sqlite"
    assert dev[1].index == 2  # the position in the file, counting the skipped example
    train = load_dataset(spider_root, "train")  # train_spider.json + train_others.json
    assert [ex.question for ex in train] == ["q1", "q2"] and [ex.index for ex in train] == [0, 1]


def test_bird_layout(tmp_path):
    make_db(tmp_path / "dev_databases" / "club" / "club.sqlite")
    (tmp_path / "dev_tables.json").write_text("[]")
    (tmp_path / "dev.json").write_text("\ufeff" + json.dumps([  # BIRD's files may start with a BOM
        {"question_id": 7, "db_id": "club", "question": "Who leads?", "evidence": "lead refers to rank = 1",
         "SQL": "SELECT name FROM t WHERE rank = 1", "difficulty": "simple"},
        {"question_id": 8, "db_id": "nowhere", "question": "?", "evidence": "", "SQL": "SELECT 1",
         "difficulty": "challenging"},
    ]))
    dev = load_dataset(tmp_path, "dev")
    assert dev.name == "bird/dev" and len(dev) == 1 and dev.skipped == 1
    ex = dev[0]
    assert (ex.index, ex.evidence, ex.gold_sql, ex.difficulty) == (7, "lead refers to rank = 1",
                                                                   "SELECT name FROM t WHERE rank = 1", "simple")
    assert ex.db_path == tmp_path / "dev_databases" / "club" / "club.sqlite"


def test_real_spider(spider, dev_sample):
    sample = load_dataset(spider, "dev_sample.json")
    assert len(sample) == 200 and sample.skipped == 0 and sample.name == "spider/dev_sample"
    assert sample[0].index == json.loads(dev_sample.read_text())[0]["dev_index"]
    assert load_dataset(spider, str(dev_sample)).examples == sample.examples  # a path works too
    train = load_dataset(spider, "train")
    # skipped: the questions whose database file is absent (the build machines' copy: soccer_1 and baseball_1, 96)
    records = [r for f in ("train_spider.json", "train_others.json") for r in json.loads((spider / f).read_text())]
    absent = {r["db_id"] for r in records if not (spider / "database" / r["db_id"] / f"{r['db_id']}.sqlite").is_file()}
    assert train.missing_dbs == absent and train.skipped == sum(r["db_id"] in absent for r in records)
    assert len(train) == 7000 + 1659 - train.skipped and all(ex.db_path.is_file() for ex in train)
    if (spider / "dev.json").is_file():  # the official zip has it, the build machines' copy does not
        assert len(load_dataset(spider, "dev")) == 1034
    else:
        with pytest.raises(DatasetError, match="dev.json"):
            load_dataset(spider, "dev")


def test_malformed_json_names_file_and_position(spider_root):
    (spider_root / "dev.json").write_text('[\n  {"db_id": "shop", "question": "x"},\n  {"db_id": oops}\n]')
    with pytest.raises(DatasetError, match=r"dev\.json: malformed JSON at line 3, column 13"):
        load_dataset(spider_root, "dev")
    (spider_root / "dev.json").write_text('{"db_id": "shop"}')
    with pytest.raises(DatasetError, match="expected a JSON list"):
        load_dataset(spider_root, "dev")
    (spider_root / "dev.json").write_text('[{"db_id": "shop", "question": "ok"}, {"db_id": "shop"}]')
    with pytest.raises(DatasetError, match="example 1"):
        load_dataset(spider_root, "dev")


def test_unknown_layout(tmp_path):
    with pytest.raises(DatasetError, match="neither"):
        load_dataset(tmp_path, "dev")
    with pytest.raises(DatasetError, match=r"nowhere: neither .* download Spider \(https://yale-lily"):
        load_dataset(tmp_path / "nowhere", "dev")  # a folder that is not there: the same, naming it


def test_load_sqlite(tmp_path):
    db = make_db(tmp_path / "mine.sqlite")
    one = load_sqlite(db, "How many rows?")
    assert len(one) == 1 and one[0].db_id == "mine" and one[0].db_path == db and one.name == "sqlite/mine"
    many = load_sqlite(db, ["a?", {"question": "b?", "query": "SELECT 1", "evidence": "hint"}])
    assert [(ex.question, ex.gold_sql, ex.evidence, ex.index) for ex in many] == [("a?", "", "", 0),
                                                                                 ("b?", "SELECT 1", "hint", 1)]
    with pytest.raises(FileNotFoundError):
        load_sqlite(tmp_path / "nope.sqlite", "q")
    (tmp_path / "text.sqlite").write_text("hello")
    with pytest.raises(DatasetError, match="not a SQLite"):
        load_sqlite(tmp_path / "text.sqlite", "q")
