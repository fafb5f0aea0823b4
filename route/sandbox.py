"""What a model's SQL may do on a database: read it, in bounded time and memory (used by database.py).

Nothing a model writes may change a database, read a file, or hold the process:
  - reading only: connections are opened `mode=ro` (`immutable=1` for a WAL-mode file with no `-wal` beside it,
    where `mode=ro` would create `-wal` and `-shm` files) with `PRAGMA query_only`, and SQLite's authorizer allows
    only reading actions and the built-in functions in FUNCTIONS (no ATTACH, PRAGMA, write, `load_extension`,
    `fts3_tokenizer`, ...). A text check, linear in the SQL's length, refuses what is not a query (EXPLAIN, BEGIN).
  - time: a watchdog thread calls `Connection.interrupt()` at the deadline; SQLite checks the flag on every loop
    step (where a progress handler would fire too, adding only calls into Python). Straight-line work inside one
    row cannot be interrupted, which is why the next two caps exist.
  - values: no string or blob over MAX_VALUE (`SQLITE_LIMIT_LENGTH`, Python >= 3.11; below, only the heap cap
    holds) and no SQL over MAX_SQL. SQLite's `instr`, `replace` and two-argument `trim` are quadratic (seconds for
    one `instr` on 1 MiB) and `printf('%.*c', N, ...)` loops N times whatever the cap: these run as Python (linear
    searches; printf's widths checked, then SQLite's own printf), `randomblob` as `os.urandom`, so one call stays
    in the milliseconds and a row's worth of them in about a second (measured: bench/security.py).
  - memory: SQLite's heap is capped for the process (`PRAGMA hard_heap_limit`, HEAP_LIMIT, only ever lowered),
    temporary b-trees and sorts stay in that memory (never in files), and the result is counted row by row as
    it is read, so the cap holds before memory is spent.
A value or result over its cap is an error (`result too large: ...`), never a success with fewer rows; only
the row cap (max_rows) returns a prefix, marked `truncated`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable

MAX_VALUE = 1 << 20  # longest string or blob a query may build or return
MAX_SQL = 10_000  # characters of SQL a model's query may have (Spider's longest gold query: about 600)
HEAP_LIMIT = 1 << 30  # SQLite's memory for the whole process, page caches included

# Built-in functions a query may call: core scalars, aggregates, window functions, dates, math, JSON, and the
# FTS3/4/5 auxiliaries that reading a full-text table needs. Not here, so refused: load_extension (loads
# code), fts3_tokenizer (reads and writes a pointer inside SQLite), sqlite_* introspection, changes() etc.
FUNCTIONS = frozenset("""
    abs char coalesce concat concat_ws format glob hex ifnull iif instr length like likelihood likely lower
    ltrim max min nullif octet_length printf quote random randomblob replace round rtrim sign soundex substr
    substring trim typeof unhex unicode unlikely upper zeroblob
    avg count group_concat string_agg sum total
    row_number rank dense_rank percent_rank cume_dist ntile lag lead first_value last_value nth_value
    date time datetime julianday unixepoch strftime timediff current_date current_time current_timestamp
    acos acosh asin asinh atan atan2 atanh ceil ceiling cos cosh degrees exp floor ln log log10 log2 mod pi
    pow power radians sin sinh sqrt tan tanh trunc
    json jsonb json_array jsonb_array json_array_length json_error_position json_extract jsonb_extract -> ->>
    json_insert jsonb_insert json_object jsonb_object json_patch jsonb_patch json_pretty json_remove
    jsonb_remove json_replace jsonb_replace json_set jsonb_set json_type json_valid json_quote
    json_group_array jsonb_group_array json_group_object jsonb_group_object
    match snippet offsets matchinfo highlight bm25
""".split())
_READING = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, 33}  # 33: SQLITE_RECURSIVE (no name before 3.11)


def _authorize(action, arg1, arg2, *_):
    # Allow-list, not deny-list: ATTACH (which can create a file), PRAGMA (which could undo query_only),
    # every write, every transaction statement and every function not named above are refused by SQLite
    # while it compiles the statement, before anything runs. For a function, arg2 is its (lower-case) name.
    if action in _READING or action == sqlite3.SQLITE_FUNCTION and arg2 in FUNCTIONS:
        return sqlite3.SQLITE_OK
    return sqlite3.SQLITE_DENY


_SKIP = re.compile(r"[\s(]*")  # one character class, no nesting: a linear scan
_QUERY_WORD = re.compile(r"(?:select|with|values)\b", re.I)


def is_query(sql: str) -> bool:
    """Does the statement start (after spaces, comments, parentheses) with SELECT, WITH or VALUES? One pass
    over the text: a regular expression for this backtracked for minutes on a run of `/**/` comments."""
    i = 0
    while True:
        i = _SKIP.match(sql, i).end()
        if sql.startswith("--", i):
            i = sql.find("\n", i)
            if i < 0:
                return False
        elif sql.startswith("/*", i):
            i = sql.find("*/", i + 2)
            if i < 0:
                return False
            i += 2
        else:
            return _QUERY_WORD.match(sql, i) is not None


class _Watchdog:
    """One thread for the process that interrupts each query still running at its deadline. SQLite checks
    the interrupt flag between steps, so this also ends a statement stuck where Python code never runs."""

    def __init__(self):
        self._cv = threading.Condition()
        self._armed: dict[object, tuple[float, sqlite3.Connection]] = {}
        self._thread = None
        self._wakes_at = float("inf")  # when the thread will look next: earlier deadlines must wake it

    def arm(self, conn: sqlite3.Connection, deadline: float) -> object:
        token = object()
        with self._cv:
            self._armed[token] = (deadline, conn)
            if self._thread is None or not self._thread.is_alive():  # not yet started, or lost in a fork
                self._thread = threading.Thread(target=self._run, name="route-sql-watchdog", daemon=True)
                self._thread.start()
            if deadline < self._wakes_at:  # most queries end long before the thread next looks: no wake-up
                self._cv.notify()
        return token

    def disarm(self, token: object) -> None:
        with self._cv:
            self._armed.pop(token, None)

    def _run(self):
        with self._cv:
            while True:
                now = time.monotonic()
                for token, (deadline, conn) in list(self._armed.items()):
                    if deadline <= now:
                        del self._armed[token]
                        conn.interrupt()  # a flag SQLite reads; cleared when the connection's next query starts
                self._wakes_at = min((d for d, _ in self._armed.values()), default=float("inf"))
                self._cv.wait(None if self._wakes_at == float("inf") else self._wakes_at - now)


WATCHDOG = _Watchdog()
_FORMAT = sqlite3.connect(":memory:", check_same_thread=False)  # converts and formats values as SQLite does
_FORMAT_LOCK = threading.Lock()


def _cast(v, kind: str):
    with _FORMAT_LOCK:
        return _FORMAT.execute(f"SELECT CAST(? AS {kind})", (v,)).fetchone()[0]


def _text(v):
    """A function argument as SQLite converts it to text (floats: `1.0e+20`, not Python's `1e+20`)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    return _cast(v, "TEXT") if isinstance(v, float) else str(v)


class TooLarge(Exception):
    pass


def _instr(x, y):
    if x is None or y is None:
        return None
    if isinstance(x, bytes) and isinstance(y, bytes):
        return x.find(y) + 1
    return _text(x).find(_text(y)) + 1


def _replace(x, y, z, limit: int):
    if x is None or y is None:
        return None
    y = _text(y)
    if not y:
        return x  # SQLite returns X itself, type and all
    if z is None:
        return None
    x, z = _text(x), _text(z)
    if len(x) + x.count(y) * (len(z) - len(y)) > limit:  # measured before the string is built
        raise TooLarge(f"result too large: replace() would build a string over {limit} characters")
    return x.replace(y, z)


def _trim(x, y, left: bool, right: bool):
    # SQLite compares each character of x with each character of y: quadratic
    if x is None or y is None:
        return None
    x, chars = _text(x), set(_text(y))
    i, j = 0, len(x)
    while left and i < j and x[i] in chars:
        i += 1
    while right and j > i and x[j - 1] in chars:
        j -= 1
    return x[i:j]


def _randomblob(n, limit: int) -> bytes:
    # os.urandom: several times faster than SQLite's generator, and one call's cost bounds a row's time
    if not isinstance(n, int):
        n = _cast(n, "INTEGER") or 0
    if n > limit:
        raise TooLarge(f"result too large: a string or blob over {limit} bytes")
    return os.urandom(max(1, n))


_NUMBER = re.compile(r"\d+")


def _c_int(v) -> int:
    """What SQLite's printf makes of an argument it reads for a `*`: a 64-bit integer cut to a C int."""
    if not isinstance(v, int):
        v = _cast(v, "INTEGER") or 0
    v = max(-(1 << 63), min((1 << 63) - 1, v))
    return (v + (1 << 31)) % (1 << 32) - (1 << 31)


def _printf(limit: int, fmt, *args):
    """SQLite's own printf, run on a private connection after refusing any width or precision over the value
    cap: `printf('%.*c', 1e9, 'a')` loops a billion times inside one call even when its result is refused."""
    if fmt is None:
        return None
    text = _text(fmt)
    # every number in the format counts, and with a `*` every argument: safe, and simple
    if any(len(n) > 9 or int(n) > limit for n in _NUMBER.findall(text)) or "*" in text and any(
            abs(_c_int(a)) > limit for a in args):
        raise TooLarge(f"result too large: a printf() width or precision over {limit}")
    with _FORMAT_LOCK:
        if hasattr(_FORMAT, "setlimit"):
            _FORMAT.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)
        try:
            return _FORMAT.execute(f"SELECT printf({', '.join('?' * (1 + len(args)))})", (fmt, *args)).fetchone()[0]
        except sqlite3.DataError:
            raise TooLarge(f"result too large: a string or blob over {limit} bytes") from None


_HEAP_LOCK = threading.Lock()


def connect(path: Path) -> sqlite3.Connection:
    """A read-only connection that creates no file beside the database, its temporary b-trees and sorts in
    memory under SQLite's heap cap. Still to be locked down (lock_down) once its schema is read."""
    with path.open("rb") as f:
        wal = f.read(20)[18:20] == b"\x02\x02"  # header bytes 18-19: file format versions, 2 = WAL
    # mode=ro on a WAL database creates -wal and -shm (and leaves them); with no -wal there is nothing
    # beyond the file to read, and immutable=1 reads the file alone. A -wal present belongs to a writer.
    immutable = "&immutable=1" if wal and not path.with_name(path.name + "-wal").exists() else ""
    conn = sqlite3.connect(f"{path.as_uri()}?mode=ro{immutable}", uri=True, isolation_level=None,
                           check_same_thread=False)
    try:
        conn.execute("PRAGMA query_only = 1")
        conn.execute("PRAGMA temp_store = MEMORY")
        with _HEAP_LOCK:  # the heap limit is the process's: lower it to HEAP_LIMIT, never raise one set lower
            row = conn.execute("PRAGMA hard_heap_limit").fetchone()  # None before SQLite 3.31: no cap to set
            if row is not None and (row[0] == 0 or row[0] > HEAP_LIMIT):
                conn.execute(f"PRAGMA hard_heap_limit = {int(HEAP_LIMIT)}")
    except sqlite3.DatabaseError:
        conn.close()
        raise
    return conn


def lock_down(conn: sqlite3.Connection, limit: Callable[[], int], refused: Callable[[str], None]) -> None:
    """From here on `conn` only reads: the authorizer's allow-list, and Python versions of the functions whose
    SQLite versions can spend seconds in one call, where no interrupt reaches them. limit() is the current
    value cap; refused(message) hears why one of them refused (SQLite itself only says that it raised)."""
    def guarded(fn):
        def call(*args):
            try:
                return fn(*args)
            except TooLarge as e:
                refused(str(e))
                raise
        return call

    for name, n, fn in [("instr", 2, _instr), ("replace", 3, lambda x, y, z: _replace(x, y, z, limit())),
                        ("trim", 2, lambda x, y: _trim(x, y, True, True)),
                        ("ltrim", 2, lambda x, y: _trim(x, y, True, False)),
                        ("rtrim", 2, lambda x, y: _trim(x, y, False, True)),
                        ("randomblob", 1, lambda n: _randomblob(n, limit())),
                        ("printf", -1, lambda *a: _printf(limit(), *a)),
                        ("format", -1, lambda *a: _printf(limit(), *a))]:
        conn.create_function(name, n, guarded(fn), deterministic=name != "randomblob")
    conn.set_authorizer(_authorize)
