"""route.database: schema read from SQLite, the ROUTE-format prompt, and safe read-only execution."""
import hashlib
import re
import shutil
import sqlite3
from pathlib import Path

import pytest

import route.database as database
from conftest import demo_db
from route.database import Database, open_database


@pytest.fixture
def tricky(tmp_path):
    """Names that need quoting, keys SQLite must report (composite, implicit target, dangling), long values."""
    path = tmp_path / "tricky.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE "Home Town" (id INTEGER PRIMARY KEY, "order" TEXT, "a""b" REAL, note varchar(300),
                                  pic BLOB, flag boolean, born DATE);
        CREATE TABLE pet (pid INT, owner INT REFERENCES "Home Town", kind TEXT, PRIMARY KEY (pid));
        CREATE TABLE visit (vid INT, pid INT, owner INT, ghost INT,
                            FOREIGN KEY (pid, owner) REFERENCES pet(pid, owner),
                            FOREIGN KEY (ghost) REFERENCES nowhere(x));
    """)
    conn.execute('INSERT INTO "Home Town" VALUES (1, ?, 1.5, ?, ?, 1, ?)', ("x", "n" * 150, b"\0" * 1000, "2020-01-01"))
    conn.executemany("INSERT INTO pet VALUES (?, 1, ?)", [(i, f"kind{i}") for i in range(5)])
    conn.commit()
    conn.close()
    return Database(path)


def test_keys_come_from_sqlite(tricky):
    home, pet, visit = tricky.tables
    assert [t.name for t in tricky.tables] == ["Home Town", "pet", "visit"]
    assert home.primary_key == ["id"] and pet.primary_key == ["pid"] and visit.primary_key == []
    assert [(fk.columns, fk.ref_table, fk.ref_columns) for fk in pet.foreign_keys] == [(("owner",), "Home Town", ("id",))]
    # composite key kept whole; the key to a table that does not exist is dropped
    assert [(fk.columns, fk.ref_table, fk.ref_columns) for fk in visit.foreign_keys] == [(("pid", "owner"), "pet", ("pid", "owner"))]
    assert home.column("ORDER").name == "order"


def test_prompt_format(tricky):
    assert tricky.schema_prompt(sample_rows=1) == (
        "/* Database schema */\n"
        'CREATE TABLE "Home Town" (id NUMBER, "order" TEXT, "a""b" NUMBER, note TEXT, pic OTHERS, flag BOOLEAN, '
        "born TIME, PRIMARY KEY(id));\n"
        "CREATE TABLE pet (pid NUMBER, owner NUMBER, kind TEXT, PRIMARY KEY(pid), "
        'FOREIGN KEY (owner) REFERENCES "Home Town"(id));\n'
        "CREATE TABLE visit (vid NUMBER, pid NUMBER, owner NUMBER, ghost NUMBER, "
        "FOREIGN KEY (pid, owner) REFERENCES pet(pid, owner));\n"
        "\n"
        "/* Sample rows of each table */\n"
        f"\"Home Town\": [(1, 'x', 1.5, '{'n' * 100}...', '<blob 1000 bytes>', 1, '2020-01-01')]\n"
        "pet: [(0, 1, 'kind0')]\n"
        "visit: []")
    assert tricky.schema_prompt(sample_rows=0) == tricky.schema_prompt(sample_rows=1).split("\n\n")[0]
    assert tricky.schema_prompt().count("(", tricky.schema_prompt().index("pet: ")) == 3  # k=3 rows by default


def test_quote_only_where_needed():
    assert [database.quote(n) for n in ["name", "year", "T_1"]] == ["name", "year", "T_1"]
    # keywords, and words SQLite reads as values when bare, are quoted; so are spaces and quotes
    assert [database.quote(n) for n in ["order", "select", "null", "current_date", "Home Town", 'a"b', "1st"]] == \
        ['"order"', '"select"', '"null"', '"current_date"', '"Home Town"', '"a""b"', '"1st"']


def test_spider_prompt_real_keys_and_determinism():
    path = demo_db("concert_singer")
    prompt = open_database(path).schema_prompt()
    assert prompt.count("CREATE TABLE") == 4
    # only the real primary keys (the official ROUTE code marks every column as one)
    assert "PRIMARY KEY(Singer_ID)" in prompt and "PRIMARY KEY(concert_ID, Singer_ID)" in prompt
    assert "FOREIGN KEY (Singer_ID) REFERENCES singer(Singer_ID)" in prompt
    assert "singer: [(1, 'Joe Sharp', 'Netherlands', 'You', '1992', 52, 'F'), (2," in prompt
    # byte-identical from a fresh connection: the shared KV-cache prefix of the MCP chain
    assert Database(path).schema_prompt() == prompt


def test_pruning_keeps_join_keys():
    db = open_database(demo_db("concert_singer"))
    pruned = db.schema_prompt(keep={"SINGER": {"name"}, "singer_in_concert": set(), "nope": {"x"}}, sample_rows=2)
    assert pruned == (
        "/* Database schema */\n"
        "CREATE TABLE singer (Singer_ID NUMBER, Name TEXT, PRIMARY KEY(Singer_ID));\n"
        "CREATE TABLE singer_in_concert (Singer_ID TEXT, FOREIGN KEY (Singer_ID) REFERENCES singer(Singer_ID));\n"
        "\n"
        "/* Sample rows of each table */\n"
        "singer: [(1, 'Joe Sharp'), (2, 'Timbaland')]\n"
        "singer_in_concert: [('2',), ('3',)]")
    # a table kept without columns (count(*)) shows its primary key
    assert "CREATE TABLE stadium (Stadium_ID NUMBER, PRIMARY KEY(Stadium_ID));" in db.schema_prompt({"stadium": set()})
    assert db.schema_prompt(keep={}) == "/* Database schema */\n\n\n/* Sample rows of each table */\n"


def test_execute_results_errors_and_caps(world):
    db = open_database(world)
    r = db.execute("SELECT Name, Population FROM country WHERE Code = 'NLD'")
    assert r.ok and r.rows == [("Netherlands", 15864000)] and r.columns == ["Name", "Population"]
    assert "no such column" in db.execute("SELECT nope FROM country").error
    assert db.execute("SELEC 1").error and db.execute("").error == "empty SQL" and db.execute(None).error
    assert db.execute(" " * 100_000 + "x").error  # refused (how fast, without regex backtracking: bench/database.py)
    r = db.execute("SELECT * FROM city a, city b", max_rows=1000)
    assert r.ok and r.truncated and len(r.rows) == 1000
    r = db.execute("SELECT * FROM city", max_bytes=10_000)  # too many bytes: an error, not fewer rows
    assert r.error.startswith("result too large") and not r.rows
    assert not db.execute("SELECT * FROM city").truncated


@pytest.mark.parametrize("sql", [
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
    "SELECT count(*) FROM city a, city b, city c",
])
def test_pathological_query_times_out(world, sql):
    db = open_database(world)
    r = db.execute(sql, timeout=0.5)  # interrupted with an error (how late: bench/database.py)
    assert r.error.startswith("timeout") and r.rows == []
    assert db.execute("SELECT count(*) FROM city").rows == [(4079,)]  # the connection is still usable


WRITES = [
    "DROP TABLE singer", "DELETE FROM singer", "UPDATE singer SET Age = 0", "INSERT INTO singer (Name) VALUES ('x')",
    "CREATE TABLE t (a)", "CREATE TEMP TABLE t (a)", "CREATE INDEX i ON singer (Age)", "ALTER TABLE singer ADD z",
    "ATTACH DATABASE '{tmp}/new.sqlite' AS other", "VACUUM INTO '{tmp}/copy.sqlite'", "VACUUM",
    "PRAGMA query_only = 0", "PRAGMA user_version = 7", "PRAGMA journal_mode = WAL", "BEGIN IMMEDIATE",
    "WITH x AS (SELECT 1) DELETE FROM singer", "SELECT 1; DROP TABLE singer", "REINDEX", "ANALYZE",
]


@pytest.mark.parametrize("guard", ["query check", "connection only"])
def test_nothing_can_change_the_database(tmp_path, monkeypatch, guard):
    path = tmp_path / "concert_singer.sqlite"
    shutil.copy(demo_db("concert_singer"), path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    if guard == "connection only":  # without the text check, the authorizer, mode=ro and query_only still hold
        monkeypatch.setattr(database, "is_query", lambda sql: True)
    db = Database(path)
    for sql in WRITES:
        assert db.execute(sql.format(tmp=tmp_path)).error, sql
    assert db.execute("SELECT count(*) FROM singer").rows == [(6,)]
    db.close()
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["concert_singer.sqlite"]  # no file created


def test_bad_utf8_is_decoded_not_an_error(tmp_path):
    path = tmp_path / "bytes.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (s TEXT)")
    conn.execute("INSERT INTO t VALUES (CAST(x'41ff42' AS TEXT))")
    conn.commit()
    conn.close()
    assert Database(path).execute("SELECT s FROM t").rows == [("A\ufffdB",)]


def test_connection_reuse(world):
    """One Database per file, however the path is spelled (the speed this buys: bench/database.py)."""
    path = world
    db = open_database(path)
    assert open_database(str(path)) is db and open_database(path.parent / ".." / "world_1" / path.name) is db
    assert db.execute("SELECT Name FROM city WHERE ID = 1").rows == [("Kabul",)]


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        Database(tmp_path / "missing.sqlite")
    (tmp_path / "junk.sqlite").write_text("not a database, just text " * 100)
    with pytest.raises(ValueError, match="junk.sqlite"):
        Database(tmp_path / "junk.sqlite")


def _shop(tmp_path) -> Path:
    path = tmp_path / "shop.sqlite"
    con = sqlite3.connect(path)
    con.executescript("CREATE TABLE item (id INTEGER PRIMARY KEY, name TEXT, photo BLOB);"
                      "INSERT INTO item VALUES (1, 'pen', zeroblob(5000)), (2, 'ink', NULL);"
                      "CREATE TABLE tag (item_id INTEGER, tag TEXT); INSERT INTO tag VALUES (1, 'blue');")
    con.commit()
    con.close()
    return path


def test_a_query_runs_once_whatever_its_timeout(tmp_path, monkeypatch):
    db = Database(_shop(tmp_path))
    runs = []
    real = db._execute
    monkeypatch.setattr(db, "_execute", lambda *a, **kw: runs.append(a[0]) or real(*a, **kw))
    first = db.execute("SELECT name FROM item", timeout=10)
    assert db.execute("SELECT name FROM item", timeout=30) is first and runs == ["SELECT name FROM item"]


def test_result_cache_is_bounded_in_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "_RESULTS", database._ResultCache(60_000))
    db = Database(_shop(tmp_path))
    for i in range(200):  # each result holds a 5,000-byte blob: 200 of them would be a megabyte
        assert db.execute(f"SELECT photo, {i} FROM item WHERE id = 1").ok
        assert database._RESULTS.nbytes <= 60_000
    assert 5 < len(database._RESULTS.entries) < 15
    assert database._RESULTS.get((db.path, "SELECT photo, 199 FROM item WHERE id = 1", database.MAX_ROWS,
                                  database.MAX_BYTES)) is not None  # the most recent stays


def test_unreadable_sample_rows_are_left_out_not_shown_empty(tmp_path, monkeypatch):
    monkeypatch.setattr(database, "MAX_BYTES", 1000)  # the 5,000-byte photo cannot be read for the samples
    db = Database(_shop(tmp_path))
    with pytest.warns(UserWarning, match="no sample rows for table item"):
        prompt = db.schema_prompt()
    assert "item:" not in prompt.split("Sample rows")[1] and "tag: [(1, 'blue')]" in prompt
