"""Hostile SQL against route.database: every attack runs on a fresh copy of a real Spider database (as it is,
with an FTS4 table, and in WAL mode) and must leave the file byte-identical with the same mtime, create no file
beside it, return within its timeout + 1 s, and grow the process's memory by less than 256 MB.

Limits are the defaults except the timeout (1 s) and SQLite's heap (128 MiB, set process-wide by a fixture
and restored after), so the whole file runs in seconds.
"""
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest

import route.database as database
from conftest import demo_db
from route.database import Database, is_query
from route.evaluate import compare

TIMEOUT = 1.0
MB = 1 << 20

LONG = "WITH s(a) AS (SELECT printf('%.*c', 1000000, 'a')) "  # a 1 MB string, just under MAX_VALUE
ROWS_1024 = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1024) "
CROSS = "SELECT count(*) FROM " + ", ".join(f"singer s{i}" for i in range(12))  # 6^12 rows

# (sql, what the error starts with, or a tuple of such; None: the query runs; "": any outcome within the bounds.
# Where the work is heavy, a loaded machine may reach the timeout first: both end the query, as they should.)
BOUNDED = ("result too large", "timeout")
ATTACKS = [
    # the table
    ("SELECT fts3_tokenizer('simple')", "not authorized"),
    ("SELECT fts3_tokenizer('simple', x'4141414141414141')", "not authorized"),
    ("/**/" * 28 + "x", "only queries"),
    ("/**/" * 2400 + "x", "only queries"),
    ("SELECT instr(printf('%.*c', 100000000, 'a'), 'x')", "result too large"),
    ("SELECT zeroblob(1e9)", "result too large"),
    ("SELECT randomblob(5e8)", "result too large"),
    ("SELECT printf('%900000000s')", "result too large"),
    (ROWS_1024 + "SELECT randomblob(2000000) FROM c", "result too large"),
    (ROWS_1024 + "SELECT randomblob(1000000) FROM c", BOUNDED),  # each value fits, the result does not
    ("SELECT randomblob(70000000) FROM singer", "result too large"),
    # single calls SQLite cannot interrupt: quadratic instr / replace / trim, printf's precision loop
    (LONG + "SELECT instr(a, substr(a, 1, 500000) || 'b') FROM s", None),
    (LONG + "SELECT length(replace(a, substr(a, 1, 500000) || 'b', 'c')) FROM s", None),
    (LONG + "SELECT length(replace(a, 'a', a)) FROM s", "result too large"),
    ("SELECT length(ltrim(printf('%.*c', 200000, 'a'), printf('%.*c', 20000, 'b') || 'a'))", None),  # SQLite: 20 s
    ("SELECT length(printf('%.*c', 2000000000, 'a'))", "result too large"),
    ("SELECT length(format('%.*c', 2000000000, 'a'))", "result too large"),
    # memory: a sort of 1,296 one-megabyte rows stays in SQLite's capped heap, never in temporary files
    ("SELECT zeroblob(1000000) || a.Name FROM singer a, singer b, singer c, singer d ORDER BY 1", BOUNDED),
    ("SELECT " + ", ".join(["length(randomblob(1000000))"] * 100), ""),  # straight-line work in one row
    # other functions outside the allow-list
    ("SELECT load_extension('/tmp/nothing.so')", "not authorized"),
    ("SELECT sqlite_compileoption_get(0)", "not authorized"),
    ("SELECT readfile('/etc/passwd')", "no such function"),
    # writes, ATTACH, PRAGMA, transactions
    ("DROP TABLE singer", "only queries"), ("DELETE FROM singer", "only queries"),
    ("UPDATE singer SET Age = 0", "only queries"), ("INSERT INTO singer (Name) VALUES ('x')", "only queries"),
    ("CREATE TABLE t (a)", "only queries"), ("CREATE TEMP TABLE t (a)", "only queries"),
    ("CREATE INDEX i ON singer (Age)", "only queries"), ("ALTER TABLE singer ADD z", "only queries"),
    ("ATTACH DATABASE '{tmp}/new.sqlite' AS other", "only queries"),
    ("VACUUM INTO '{tmp}/copy.sqlite'", "only queries"),
    ("VACUUM", "only queries"), ("REINDEX", "only queries"), ("ANALYZE", "only queries"),
    ("PRAGMA query_only = 0", "only queries"), ("PRAGMA journal_mode = WAL", "only queries"),
    ("PRAGMA writable_schema = 1", "only queries"), ("BEGIN IMMEDIATE", "only queries"),
    ("SELECT * FROM pragma_table_info('singer')", "not authorized"),
    ("EXPLAIN SELECT 1", "only queries"),
    # multi-statements, comments hiding statements, writes in CTEs, RETURNING
    ("SELECT 1; DROP TABLE singer", "You can only execute one statement"),
    ("SELECT 1 /* ; */; DELETE FROM singer", "You can only execute one statement"),
    ("/* SELECT */ DELETE FROM singer", "only queries"), ("-- SELECT\nDROP TABLE singer", "only queries"),
    ("(DELETE FROM singer)", "only queries"),
    ("WITH x AS (SELECT 1) DELETE FROM singer", "not authorized"),
    ("WITH x AS (SELECT 1) UPDATE singer SET Age = 1 RETURNING *", "not authorized"),
    ("WITH x AS (SELECT 1) INSERT INTO singer (Name) SELECT * FROM x RETURNING Name", "not authorized"),
    ("DELETE FROM singer RETURNING *", "only queries"),
    # time: recursion and cartesian products end at the timeout
    ("WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c", "timeout"),
    ("WITH RECURSIVE c(s) AS (SELECT 'a' UNION ALL SELECT s || s FROM c) SELECT length(s) FROM c", "result too large"),
    (CROSS, "timeout"),
    # full-text reads still work, full-text writes do not
    ("SELECT count(*) FROM notes WHERE notes MATCH 'hello'", None),
    ("SELECT snippet(notes), offsets(notes), matchinfo(notes) FROM notes WHERE notes MATCH 'hello'", None),
    ("INSERT INTO notes(notes) VALUES ('optimize')", "only queries"),
]


def _make_fts(path):
    conn = sqlite3.connect(path)
    conn.executescript("CREATE VIRTUAL TABLE notes USING fts4(body);"
                       "INSERT INTO notes VALUES ('hello world'), ('hello there'), ('goodbye');")
    conn.commit()
    conn.close()


@pytest.fixture(params=["spider", "fts4", "wal"])
def db_file(request, tmp_path):
    """A fresh copy of concert_singer: as is, with an FTS4 table added, or in WAL mode."""
    path = tmp_path / "db" / "concert_singer.sqlite"
    path.parent.mkdir()
    shutil.copy(demo_db("concert_singer"), path)
    _make_fts(path)  # every copy has the table (the attacks name it); "spider" gets it removed again
    conn = sqlite3.connect(path)
    if request.param == "spider":
        conn.execute("DROP TABLE notes")
    if request.param == "wal":
        conn.execute("PRAGMA journal_mode = WAL")
    conn.commit()
    conn.close()
    return path


@pytest.fixture(autouse=True)
def small_heap():
    """SQLite's heap cap is process-wide: lower it for these tests, put it back after."""
    conn = sqlite3.connect(":memory:")
    before = conn.execute("PRAGMA hard_heap_limit").fetchone()[0]
    conn.execute(f"PRAGMA hard_heap_limit = {128 * MB}")
    yield
    conn.execute(f"PRAGMA hard_heap_limit = {before}")
    conn.close()


def _fingerprint(path):
    return (hashlib.sha256(path.read_bytes()).hexdigest(), path.stat().st_mtime_ns,
            sorted(p.name for p in path.parent.iterdir()))


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS"))


def _peak_since_reset() -> int:
    """The peak RSS since _reset_peak() (VmHWM)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="measures memory through Linux's /proc")
def test_attacks(db_file, tmp_path):
    before = _fingerprint(db_file)
    db = Database(db_file)
    failures = []
    for sql, expected in ATTACKS:
        sql = sql.format(tmp=tmp_path)
        if "notes" in sql and "notes" not in [t.name for t in db.tables]:
            continue
        can_reset = _reset_peak()
        rss, start = _rss(), time.monotonic()
        result = db.execute(sql, timeout=TIMEOUT)
        seconds = time.monotonic() - start
        grown = (_peak_since_reset() if can_reset else _rss()) - rss
        del result.rows  # the next attack's memory is measured from here
        if expected is None and not result.ok or expected and not (result.error or "").startswith(expected):
            failures.append(f"{sql[:70]!r}: {result.error or 'ran'} (expected {expected or 'to run'})")
        if seconds > TIMEOUT + 1:
            failures.append(f"{sql[:70]!r}: took {seconds:.1f} s")
        if grown > 256 * MB:
            failures.append(f"{sql[:70]!r}: memory grew by {grown / MB:.0f} MB")
        assert _fingerprint(db_file) == before, sql  # checked while the connection is open...
    assert db.execute("SELECT count(*) FROM singer").rows == [(6,)]  # ...the connection still works
    db.close()
    assert _fingerprint(db_file) == before  # ...and after it is closed (a WAL database leaves no -wal, -shm)
    assert not failures, "\n".join(failures)


def test_fts3_tokenizer_cannot_crash_the_process(tmp_path):
    """The two-argument form overwrote a pointer inside SQLite, and the next full-text query crashed the process:
    run that sequence in a child so a regression fails this test instead of killing the test run."""
    path = tmp_path / "fts.sqlite"
    shutil.copy(demo_db("concert_singer"), path)
    _make_fts(path)
    code = ("import sys; from route.database import Database; db = Database(sys.argv[1]); "
            "print(db.execute(\"SELECT fts3_tokenizer('simple', x'4141414141414141')\").error); "
            "print(db.execute(\"SELECT count(*) FROM notes WHERE notes MATCH 'hello'\").rows)")
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["not authorized to use function: fts3_tokenizer", "[(2,)]"]


def test_statement_check_is_linear():
    # the old regular expression took 39 s on 28 comments and 4x longer for every 2 more
    for n in (28, 2400):
        for sql in ("/**/" * n + "x", "/**/" * n + "SELECT 1", "(/* c */ -- d\n" * n + "SELECT 1"):
            start = time.monotonic()
            is_query(sql)
            assert time.monotonic() - start < 0.5, (n, sql[:20])
    assert is_query("/* a */ -- b\n ( SELECT 1)") and is_query("VALUES (1)")
    assert is_query("with x as (select 1) select 1")
    assert not is_query("/* unterminated SELECT 1") and not is_query("-- SELECT 1") and not is_query("selectx")


def test_our_functions_agree_with_sqlite(tmp_path):
    """instr, replace, trim, printf and randomblob run as Python (linear, capped); they must answer what
    SQLite's own would."""
    ref = sqlite3.connect(":memory:")
    sqlite3.connect(tmp_path / "empty.sqlite").close()
    ours = Database(tmp_path / "empty.sqlite")
    exprs = ["instr('héllo', 'l')", "instr(x'00ff01', x'ff')", "instr(12345, 34)", "instr(1.5e20, 'e')",
             "instr('abc', '')", "instr(NULL, 'a')", "replace('a.b.c', '.', '--')", "replace(12, 2, 9)",
             "replace(1.5e20, '.', ',')", "replace(0.1 + 0.2, '3', 'x')", "replace('abc', '', 'x')",
             "typeof(replace(7, '', 'x'))", "replace('abc', 'b', NULL)", "replace(NULL, 'a', 'b')",
             "trim('xxhixx', 'x')", "ltrim('  hi ', ' ')", "rtrim('héé', 'é')", "trim(1200, '0')",
             "trim('abc', NULL)", "printf('%5.2f|%-4d|%s|%q', 3.14159, 7, 'x', 'it''s')", "printf(NULL)",
             "printf('%.*c', 3, 'z')", "printf('%*d', '4', 7)", "format('%d%%', 50)", "printf('%s', x'41')",
             "length(randomblob(10))", "length(randomblob(0))", "length(randomblob('5'))", "length(randomblob(NULL))",
             "typeof(randomblob(3))"]
    for e in exprs:
        assert ours.execute(f"SELECT {e}").rows == ref.execute(f"SELECT {e}").fetchall(), e
    ours.close()


def test_truncated_or_oversized_never_matches():
    db = Database(demo_db("concert_singer"))
    # the issue: an oversized value used to come back as success with no rows, matching any empty gold result
    assert compare("SELECT randomblob(70000000) FROM singer", "SELECT * FROM singer WHERE 0", db) == (
        False, f"result too large: a string or blob over {database.MAX_VALUE} bytes", None)
    # a result cut at max_rows is a prefix: not evidence of a match, even against itself
    many = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 200000) SELECT x FROM c"
    correct, pred_error, gold_error = compare(many, many, db)
    assert not correct and pred_error == gold_error == f"result truncated at {database.MAX_ROWS} rows"
    db.close()
