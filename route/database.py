"""SQLite databases: the schema prompt and safe, read-only execution.

ROUTE (Qin et al., ICLR 2025) shows the model a database as one `CREATE TABLE` per table followed by a few
sample rows per table (the "/* Database schema */" and "/* Sample rows of each table */" blocks of all four
task prompts, Sec. 3 and App. of the paper), prunes that schema to the tables and columns found by schema
linking (the MCP chain, Sec. 3.3), and executes SQL twice: noise correction reads the pre-SQL's execution
error, evaluation compares results (EX). Everything here reads the database itself (`PRAGMA table_info`,
`foreign_key_list`) rather than a JSON description of it, so a user's own SQLite file works the same way.

Nothing a model writes may change a database, read a file, or hold the process: connections are opened
read-only (`mode=ro`; `immutable=1` for a WAL-mode file with no `-wal` beside it, which `mode=ro` would create
`-wal` and `-shm` files for), with `PRAGMA query_only`, and SQLite's authorizer decides what runs from an
allow-list: reading actions and the built-in functions named in FUNCTIONS (no ATTACH, PRAGMA, write,
`load_extension`, `fts3_tokenizer`, ...). A short text check refuses what is not a query (EXPLAIN, a bare
transaction) in time linear in the SQL's length.

Bounded time and memory, per query:
  - time: a watchdog thread calls `Connection.interrupt()` at the deadline; SQLite checks the flag on every
    loop step (a progress handler fires at the same points, so it would add nothing but calls into Python).
    Straight-line work inside one row cannot be interrupted, which is why the next two caps exist.
  - values: no string or blob longer than MAX_VALUE (`SQLITE_LIMIT_LENGTH`, Python >= 3.11; below that only
    the heap cap holds) and no SQL longer than MAX_SQL. SQLite's `instr`, `replace` and two-argument `trim`
    are quadratic (9 s for one `instr` on 1 MiB) and `printf('%.*c', N, ...)` loops N times whatever the cap:
    these run as Python (linear searches; printf's widths checked, then SQLite's own printf), and
    `randomblob` as `os.urandom`, so that one call stays in the milliseconds and a row's worth of them in
    about a second (measured: bench/security.py).
  - memory: SQLite's heap is capped for the process (`PRAGMA hard_heap_limit`, HEAP_LIMIT, only ever
    lowered), temporary b-trees and sorts stay in that memory (never in temporary files), and the result is
    accounted row by row as it is read, so the cap holds before memory is spent.
A value or result over its cap is an error (`result too large: ...`), never a success with fewer rows; only
the row cap (max_rows) returns a prefix, marked `truncated`.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

DEFAULT_TIMEOUT = 30.0  # seconds per query
MAX_ROWS = 100_000  # rows fetched per query; more are cut off (ExecResult.truncated)
MAX_BYTES = 64 << 20  # approximate size of a result, bytes; a larger one is an error
MAX_VALUE = 1 << 20  # longest string or blob a query may build or return (randomblob of this size: ~3 ms)
MAX_SQL = 10_000  # characters of SQL a model's query may have (Spider's longest gold query: about 600)
HEAP_LIMIT = 1 << 30  # SQLite's memory for the whole process, page caches included
SAMPLE_CHARS = 100  # ROUTE cuts long strings in sample rows at 100 characters


@dataclass(frozen=True)
class Column:
    name: str
    type: str  # as declared in the database ("varchar(20)"); the prompt shows ROUTE's coarse type


@dataclass(frozen=True)
class ForeignKey:
    columns: tuple[str, ...]
    ref_table: str
    ref_columns: tuple[str, ...]


@dataclass
class Table:
    name: str
    columns: list[Column]
    primary_key: list[str] = field(default_factory=list)
    foreign_keys: list[ForeignKey] = field(default_factory=list)

    def column(self, name: str) -> Column | None:
        """Look a column up the way SQLite does: case-insensitively."""
        name = name.lower()
        return next((c for c in self.columns if c.name.lower() == name), None)


@dataclass
class ExecResult:
    rows: list[tuple]
    columns: list[str]
    error: str | None = None
    truncated: bool = False  # a cap on rows or bytes stopped the fetch; rows holds what came before it
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.error is None


# -- reading the schema ------------------------------------------------------------------------------------


def _read_tables(conn: sqlite3.Connection) -> list[Table]:
    names = [r[0] for r in conn.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite\\_%' ESCAPE '\\' "
        "ORDER BY rowid")]  # creation order: deterministic, and the order the database's author chose
    tables = []
    for name in names:
        info = conn.execute("SELECT name, type, pk FROM pragma_table_info(?)", (name,)).fetchall()
        pk = [col for col, _, pos in sorted((r for r in info if r[2]), key=lambda r: r[2])]
        tables.append(Table(name, [Column(r[0], r[1] or "") for r in info], pk))
    by_name = {t.name.lower(): t for t in tables}
    for t in tables:
        # rows of a composite key share an id; `to` is NULL when the key points at the parent's primary key
        groups: dict[int, list] = {}
        for fk_id, _seq, ref, frm, to in conn.execute(
                'SELECT id, seq, "table", "from", "to" FROM pragma_foreign_key_list(?) ORDER BY id, seq',
                (t.name,)):
            groups.setdefault(fk_id, []).append((ref, frm, to))
        for parts in groups.values():
            fk = _resolve_fk(t, by_name.get(parts[0][0].lower()), parts)
            if fk is not None:
                t.foreign_keys.append(fk)
    return tables


def _resolve_fk(table: Table, parent: Table | None, parts: list) -> ForeignKey | None:
    """Spell a foreign key with the schema's own names; drop it if it points at nothing (a few Spider
    databases declare keys to columns that do not exist: showing those would mislead the model)."""
    if parent is None:
        return None
    targets = [to for _, _, to in parts]
    if any(to is None for to in targets):
        targets = parent.primary_key
    if len(targets) != len(parts):
        return None
    cols = [table.column(frm) for _, frm, _ in parts]
    refs = [parent.column(to) for to in targets]
    if None in cols or None in refs:
        return None
    return ForeignKey(tuple(c.name for c in cols), parent.name, tuple(c.name for c in refs))


# -- rendering the prompt ----------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def quote(name: str) -> str:
    """An identifier as SQLite accepts it: bare when it parses as a plain name, else double-quoted.
    SQLite itself decides what is a keyword (`order` must be quoted, `year` need not)."""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        probe = sqlite3.connect(":memory:")
        try:  # bare, the name must still mean the column: `null` or `current_date` would not
            if probe.execute(f'SELECT {name} FROM (SELECT \'probe\' AS "{name}")').fetchall() == [("probe",)]:
                return name
        except sqlite3.Error:
            pass
        finally:
            probe.close()
    return '"' + name.replace('"', '""') + '"'


def coarse_type(declared: str) -> str:
    """ROUTE's column types: TEXT, NUMBER, TIME, BOOLEAN or OTHERS (the official code's mapping)."""
    t = declared.lower()
    if "char" in t or t == "" or "text" in t or "var" in t:
        return "TEXT"
    if any(k in t for k in ("int", "numeric", "decimal", "number", "id", "real", "double", "float")):
        return "NUMBER"
    if any(k in t for k in ("date", "time", "year")):
        return "TIME"
    if "boolean" in t:
        return "BOOLEAN"
    return "OTHERS"


def _cut(value):
    if isinstance(value, str) and len(value) > SAMPLE_CHARS:
        return value[:SAMPLE_CHARS] + "..."
    if isinstance(value, bytes):  # a blob's repr can be megabytes; its size says enough
        return f"<blob {len(value)} bytes>"
    return value


# -- execution ---------------------------------------------------------------------------------------------

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


_WATCHDOG = _Watchdog()
_FORMAT = sqlite3.connect(":memory:", check_same_thread=False)  # renders floats as SQLite does
_FORMAT_LOCK = threading.Lock()


def _text(v):
    """A function argument as SQLite converts it to text (floats: `1.0e+20`, not Python's `1e+20`)."""
    if isinstance(v, str):
        return v
    if isinstance(v, bytes):
        return v.decode("utf-8", errors="replace")
    if isinstance(v, float):
        with _FORMAT_LOCK:
            return _FORMAT.execute("SELECT CAST(? AS TEXT)", (v,)).fetchone()[0]
    return str(v)


class _TooLarge(Exception):
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
        raise _TooLarge(f"result too large: replace() would build a string over {limit} characters")
    return x.replace(y, z)


def _trim(x, y, left: bool, right: bool):
    # SQLite compares each character of x with each character of y: quadratic (4.8 s for 100k x 10k)
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
    # os.urandom: 7x faster than SQLite's generator, and the cost of one call is what bounds a row's time
    if not isinstance(n, int):
        with _FORMAT_LOCK:
            n = _FORMAT.execute("SELECT CAST(? AS INTEGER)", (n,)).fetchone()[0] or 0
    if n > limit:
        raise _TooLarge(f"result too large: a string or blob over {limit} bytes")
    return os.urandom(max(1, n))


_NUMBER = re.compile(r"\d+")


def _c_int(v) -> int:
    """What SQLite's printf makes of an argument it reads for a `*`: a 64-bit integer cut to a C int."""
    if not isinstance(v, int):
        with _FORMAT_LOCK:
            v = _FORMAT.execute("SELECT CAST(? AS INTEGER)", (v,)).fetchone()[0] or 0
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
        raise _TooLarge(f"result too large: a printf() width or precision over {limit}")
    with _FORMAT_LOCK:
        if hasattr(_FORMAT, "setlimit"):
            _FORMAT.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, limit)
        try:
            return _FORMAT.execute(f"SELECT printf({', '.join('?' * (1 + len(args)))})", (fmt, *args)).fetchone()[0]
        except sqlite3.DataError:
            raise _TooLarge(f"result too large: a string or blob over {limit} bytes") from None


def _lenient_text(b: bytes) -> str:
    return b.decode("utf-8", errors="replace")


def _size(row: tuple) -> int:
    return sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row) + 16


def _open_readonly(path: Path) -> sqlite3.Connection:
    """A read-only connection that creates no file beside the database."""
    with path.open("rb") as f:
        wal = f.read(20)[18:20] == b"\x02\x02"  # header bytes 18-19: file format versions, 2 = WAL
    # mode=ro on a WAL database creates -wal and -shm (and leaves them); with no -wal there is nothing
    # beyond the file to read, and immutable=1 reads the file alone. A -wal present belongs to a writer.
    immutable = "&immutable=1" if wal and not path.with_name(path.name + "-wal").exists() else ""
    return sqlite3.connect(f"{path.as_uri()}?mode=ro{immutable}", uri=True, isolation_level=None,
                           check_same_thread=False)


_HEAP_LOCK = threading.Lock()


def _cap_heap(conn: sqlite3.Connection) -> None:
    """Lower SQLite's process-wide hard heap limit to HEAP_LIMIT (never raise one set lower, e.g. by a test)."""
    with _HEAP_LOCK:
        row = conn.execute("PRAGMA hard_heap_limit").fetchone()  # None before SQLite 3.31: no cap to set
        if row is not None and (row[0] == 0 or row[0] > HEAP_LIMIT):
            conn.execute(f"PRAGMA hard_heap_limit = {int(HEAP_LIMIT)}")


class Database:
    """One SQLite file: its tables, its schema prompt, and a reused read-only connection."""

    def __init__(self, path: str | Path, cache_size: int = 1024):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"no SQLite database at {self.path}")
        self.name = self.path.stem
        self._conn = _open_readonly(self.path)
        try:
            self._conn.execute("PRAGMA query_only = 1")
            self._conn.execute("PRAGMA temp_store = MEMORY")  # sorts and temporary b-trees: under the heap cap
            _cap_heap(self._conn)
            self.tables = _read_tables(self._conn)
        except sqlite3.DatabaseError as e:
            self._conn.close()
            raise ValueError(f"{self.path}: not a readable SQLite database ({e})") from e
        self._value_limit = MAX_VALUE
        self._function_error: str | None = None  # why our own instr/replace refused, for the error message
        # SQLite's versions of these can spend seconds in one call, where no interrupt reaches them
        for name, n, fn in [("instr", 2, _instr), ("replace", 3, lambda x, y, z: _replace(x, y, z, self._value_limit)),
                            ("trim", 2, lambda x, y: _trim(x, y, True, True)),
                            ("ltrim", 2, lambda x, y: _trim(x, y, True, False)),
                            ("rtrim", 2, lambda x, y: _trim(x, y, False, True)),
                            ("randomblob", 1, lambda n: _randomblob(n, self._value_limit)),
                            ("printf", -1, lambda *a: _printf(self._value_limit, *a)),
                            ("format", -1, lambda *a: _printf(self._value_limit, *a))]:
            self._conn.create_function(name, n, self._guard(fn), deterministic=name != "randomblob")
        self._conn.set_authorizer(_authorize)  # after our own PRAGMAs; from here on, reading only
        self._lock = threading.Lock()
        self._results: OrderedDict = OrderedDict()
        self._cache_size = cache_size
        self._samples: dict[int, dict[str, list[tuple]]] = {}
        self._prompts: dict = {}

    def __repr__(self) -> str:
        return f"Database({str(self.path)!r}, {len(self.tables)} tables)"

    def table(self, name: str) -> Table | None:
        name = name.lower()
        return next((t for t in self.tables if t.name.lower() == name), None)

    def close(self) -> None:
        self._conn.close()
        if _OPEN.get(str(self.path)) is self:
            del _OPEN[str(self.path)]

    # -- execution --

    def execute(self, sql: str, timeout: float = DEFAULT_TIMEOUT, max_rows: int = MAX_ROWS,
                max_bytes: int = MAX_BYTES) -> ExecResult:
        """Run one query; never raises. Errors (syntax, timeout, refused writes) come back as `error`, a
        non-empty string. Results are cached per (sql, limits): treat the returned rows as read-only."""
        key = (sql, timeout, max_rows, max_bytes)
        with self._lock:  # one connection, one query at a time
            if key in self._results:
                self._results.move_to_end(key)
                return self._results[key]
            result = self._execute(sql, timeout, max_rows, max_bytes)
            # a timeout depends on the machine's load, and huge results would hold memory: keep neither
            if not (result.error or "").startswith("timeout") and len(result.rows) <= 10_000:
                self._results[key] = result
                if len(self._results) > self._cache_size:
                    self._results.popitem(last=False)
            return result

    def _guard(self, fn):
        """A Python function for SQLite that reports why it refused (SQLite only says that it raised)."""
        def call(*args):
            try:
                return fn(*args)
            except _TooLarge as e:
                self._function_error = str(e)
                raise
        return call

    def _execute(self, sql, timeout, max_rows, max_bytes, ours: bool = False) -> ExecResult:
        """`ours`: SQL this module wrote (sample rows): any length, values up to max_bytes."""
        start = time.monotonic()
        if not isinstance(sql, str) or not sql.strip():
            return ExecResult([], [], "empty SQL")
        if len(sql) > MAX_SQL and not ours:
            return ExecResult([], [], f"SQL too long: {len(sql)} characters, at most {MAX_SQL} may run")
        if not is_query(sql):
            return ExecResult([], [], "only queries (SELECT / WITH / VALUES) may run")
        deadline = start + timeout
        # a value longer than the result may hold could never be returned: cap it inside SQLite, where the
        # cap also bounds what one uninterruptible function call can build
        self._value_limit = max_bytes if ours else min(MAX_VALUE, max_bytes)
        if hasattr(self._conn, "setlimit"):  # Python >= 3.11; below, only HEAP_LIMIT bounds a value
            self._conn.setlimit(sqlite3.SQLITE_LIMIT_LENGTH, self._value_limit)
        self._function_error = None
        watch = _WATCHDOG.arm(self._conn, deadline)
        try:
            try:
                rows, columns, truncated = self._fetch(sql, deadline, max_rows, max_bytes)
            except sqlite3.OperationalError as e:
                if "decode" not in str(e):
                    raise
                self._conn.text_factory = _lenient_text  # bad UTF-8 in the data: decode what can be
                try:
                    rows, columns, truncated = self._fetch(sql, deadline, max_rows, max_bytes)
                finally:
                    self._conn.text_factory = str
        except Exception as e:  # noqa: BLE001 - anything a query does is reported, never raised
            return ExecResult([], [], self._message(e, timeout, deadline), seconds=time.monotonic() - start)
        finally:
            _WATCHDOG.disarm(watch)
        return ExecResult(rows, columns, None, truncated, time.monotonic() - start)

    def _message(self, e: Exception, timeout: float, deadline: float) -> str:
        # SQLite's own words ("no such column: x") are what noise correction shows the model
        text = str(e)
        if text == "interrupted":
            return f"timeout: the query ran longer than {timeout:g} s"
        if isinstance(e, _TooLarge) or text.startswith("result too large"):
            return text
        if self._function_error:
            return self._function_error
        if isinstance(e, sqlite3.DataError) or text == "string or blob too big":
            return f"result too large: a string or blob over {self._value_limit} bytes"
        if isinstance(e, MemoryError) or text == "out of memory":
            return f"result too large: the query needs more than SQLite's {HEAP_LIMIT >> 20} MiB of memory"
        return text if isinstance(e, sqlite3.Error) and text else f"{type(e).__name__}: {e}"

    def _fetch(self, sql, deadline, max_rows, max_bytes):
        cursor = self._conn.execute(sql)
        try:
            if cursor.description is None:
                raise sqlite3.ProgrammingError("not a query")
            columns = [d[0] for d in cursor.description]
            rows, size = [], 0
            for row in cursor:  # one row at a time: the byte cap is checked before the next row is read
                if len(rows) >= max_rows:
                    return rows, columns, True
                size += _size(row)
                if size > max_bytes:
                    raise _TooLarge(f"result too large: over {max_bytes} bytes after {len(rows)} rows")
                rows.append(row)
                if len(rows) % 1024 == 0 and time.monotonic() > deadline:  # Python's own time counts too
                    raise sqlite3.OperationalError("interrupted")
            return rows, columns, False
        finally:
            cursor.close()

    # -- prompt --

    def sample_rows(self, k: int = 3) -> dict[str, list[tuple]]:
        """The first k rows of every table (in storage order, which is stable for a given file)."""
        if k not in self._samples:
            samples = {}
            for t in self.tables:
                cols = ", ".join(quote(c.name) for c in t.columns)
                with self._lock:  # values beyond MAX_VALUE (a photo) are cut to a placeholder here, not refused
                    result = self._execute(f"SELECT {cols} FROM {quote(t.name)} LIMIT {int(k)}", DEFAULT_TIMEOUT,
                                           k, MAX_BYTES, ours=True)
                samples[t.name] = [tuple(_cut(v) for v in row) for row in result.rows]
            self._samples[k] = samples
        return self._samples[k]

    def schema_prompt(self, keep: dict[str, set[str]] | None = None, sample_rows: int = 3) -> str:
        """The database as ROUTE's prompts show it: the DDL block, then (if sample_rows > 0) k rows per table.

        keep=None renders every table and column. keep={table: {columns}} renders only those (names matched
        case-insensitively, unknown ones ignored), plus the key columns needed to join the kept tables.
        The string depends only on (keep, sample_rows), never on a question: it is a reusable cache prefix.
        """
        cache_key = None if keep is None else tuple(sorted(
            (t.lower(), tuple(sorted(c.lower() for c in cols))) for t, cols in keep.items()))
        cache_key = (cache_key, sample_rows)
        if cache_key not in self._prompts:
            shown = self._shown_columns(keep)
            text = "/* Database schema */\n" + self._ddl(shown)
            if sample_rows > 0:
                text += "\n\n/* Sample rows of each table */\n" + self._rows_text(shown, sample_rows)
            self._prompts[cache_key] = text
        return self._prompts[cache_key]

    def _shown_columns(self, keep) -> dict[str, list[str]]:
        """table name -> the column names to render, in schema order."""
        if keep is None:
            return {t.name: [c.name for c in t.columns] for t in self.tables}
        wanted = {}
        for name, cols in keep.items():
            if (t := self.table(name)) is not None:
                wanted.setdefault(t.name, set()).update(c.lower() for c in cols)
        for t in self.tables:  # the join keys between kept tables
            for fk in t.foreign_keys:
                if t.name in wanted and fk.ref_table in wanted:
                    wanted[t.name].update(c.lower() for c in fk.columns)
                    wanted[fk.ref_table].update(c.lower() for c in fk.ref_columns)
        shown = {}
        for t in self.tables:
            if t.name in wanted:
                cols = [c.name for c in t.columns if c.name.lower() in wanted[t.name]]
                # a table kept without columns (`SELECT count(*) FROM t`) still needs a body
                shown[t.name] = cols or (t.primary_key or [t.columns[0].name] if t.columns else [])
        return shown

    def _ddl(self, shown: dict[str, list[str]]) -> str:
        lines = []
        for t in self.tables:
            if t.name not in shown:
                continue
            cols = set(shown[t.name])
            parts = [f"{quote(c.name)} {coarse_type(c.type)}" for c in t.columns if c.name in cols]
            if t.primary_key and set(t.primary_key) <= cols:
                parts.append(f"PRIMARY KEY({', '.join(map(quote, t.primary_key))})")
            for fk in t.foreign_keys:
                if fk.ref_table in shown and set(fk.columns) <= cols and set(fk.ref_columns) <= set(
                        shown[fk.ref_table]):
                    parts.append(f"FOREIGN KEY ({', '.join(map(quote, fk.columns))}) REFERENCES "
                                 f"{quote(fk.ref_table)}({', '.join(map(quote, fk.ref_columns))})")
            lines.append(f"CREATE TABLE {quote(t.name)} ({', '.join(parts)});")
        return "\n".join(lines)

    def _rows_text(self, shown: dict[str, list[str]], k: int) -> str:
        samples = self.sample_rows(k)
        lines = []
        for t in self.tables:
            if t.name not in shown:
                continue
            idx = [i for i, c in enumerate(t.columns) if c.name in set(shown[t.name])]
            rows = [tuple(row[i] for i in idx) for row in samples[t.name]]
            lines.append(f"{quote(t.name)}: {rows}")
        return "\n".join(lines)


_OPEN: dict[str, Database] = {}
_OPEN_LOCK = threading.Lock()


def open_database(path: str | Path) -> Database:
    """The Database for a file, opened once per process and reused (its connection and caches too)."""
    key = str(Path(path).resolve())
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = Database(key)
        return _OPEN[key]
