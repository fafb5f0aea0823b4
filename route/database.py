"""SQLite databases: the schema prompt and safe, read-only execution.

ROUTE (Qin et al., ICLR 2025) shows the model a database as one `CREATE TABLE` per table and a few sample rows
per table (the "/* Database schema */" and "/* Sample rows of each table */" blocks of its prompts), prunes that
schema to the schema-linking result (MCP chain, Sec. 3.3), and executes SQL: noise correction reads the error,
EX compares results. The schema is read from the file itself (`PRAGMA table_info`, `foreign_key_list`), so a
user's own SQLite file works the same way.

Nothing a model writes may change a database, read a file, or hold the process: sandbox.py opens every
connection read-only and bounds each query's time and memory (a result over a cap is an error, never fewer rows).
"""

from __future__ import annotations

import re
import sqlite3
import threading
import time
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import groupby
from pathlib import Path

from .sandbox import HEAP_LIMIT, MAX_SQL, MAX_VALUE, WATCHDOG, TooLarge, connect, is_query, lock_down

DEFAULT_TIMEOUT = 30.0  # seconds per query
MAX_ROWS = 100_000  # rows fetched per query; more are cut off (ExecResult.truncated)
MAX_BYTES = 64 << 20  # approximate size of a result, bytes; a larger one is an error
SAMPLE_CHARS = 100  # ROUTE cuts long strings in sample rows at 100 characters
SAMPLE_ROWS = 3  # per table in every schema prompt, training (msft.py) and inference (mcp.py) alike
CACHE_BYTES = 256 << 20  # results kept for reuse, all databases together (a query runs once per question)


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
    truncated: bool = False  # max_rows stopped the fetch; rows holds what came before
    seconds: float = 0.0
    nbytes: int = 0  # approximate size of rows, as the byte cap counts it

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
        rows = conn.execute('SELECT id, "table", "from", "to" FROM pragma_foreign_key_list(?) ORDER BY id, seq',
                            (t.name,))
        for _, group in groupby(rows, key=lambda r: r[0]):
            parts = [r[1:] for r in group]
            if (fk := _resolve_fk(t, by_name.get(parts[0][0].lower()), parts)) is not None:
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


class Database:
    """One SQLite file: its tables, its schema prompt, and a reused read-only connection."""

    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()
        if not self.path.is_file():
            raise FileNotFoundError(f"no SQLite database at {self.path}")
        self.name = self.path.stem
        try:
            self._conn = connect(self.path)
            try:
                self.tables = _read_tables(self._conn)
            except sqlite3.DatabaseError:
                self._conn.close()
                raise
        except sqlite3.DatabaseError as e:
            raise ValueError(f"{self.path}: not a readable SQLite database ({e})") from e
        self._value_limit = MAX_VALUE
        self._function_error: str | None = None  # why our own instr/replace refused, for the error message
        lock_down(self._conn, lambda: self._value_limit, self._refused)  # from here on, reading only
        self._lock = threading.Lock()
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
        non-empty string. Results are cached per (sql, row and byte caps), whatever the timeout (a result that
        came back does not depend on it; a timeout is never kept): treat the returned rows as read-only."""
        key = (self.path, sql, max_rows, max_bytes)
        with self._lock:  # one connection, one query at a time
            if (result := _RESULTS.get(key)) is not None:
                return result
            result = self._execute(sql, timeout, max_rows, max_bytes)
            if not (result.error or "").startswith("timeout"):  # a timeout depends on the machine's load
                _RESULTS.put(key, result)
            return result

    def _refused(self, message: str):
        self._function_error = message

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
        watch = WATCHDOG.arm(self._conn, deadline)
        try:
            try:
                rows, columns, truncated, size = self._fetch(sql, deadline, max_rows, max_bytes)
            except sqlite3.OperationalError as e:
                if "decode" not in str(e):
                    raise
                self._conn.text_factory = lambda b: b.decode("utf-8", errors="replace")  # bad UTF-8 in the data
                try:
                    rows, columns, truncated, size = self._fetch(sql, deadline, max_rows, max_bytes)
                finally:
                    self._conn.text_factory = str
        except Exception as e:  # noqa: BLE001 - anything a query does is reported, never raised
            return ExecResult([], [], self._message(e, timeout), seconds=time.monotonic() - start)
        finally:
            WATCHDOG.disarm(watch)
        return ExecResult(rows, columns, None, truncated, time.monotonic() - start, size)

    def _message(self, e: Exception, timeout: float) -> str:
        # SQLite's own words ("no such column: x") are what noise correction shows the model
        text = str(e)
        if text == "interrupted":
            return f"timeout: the query ran longer than {timeout:g} s"
        if isinstance(e, TooLarge) or text.startswith("result too large"):
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
                    return rows, columns, True, size
                size += sum(len(v) if isinstance(v, (str, bytes)) else 8 for v in row) + 16
                if size > max_bytes:
                    raise TooLarge(f"result too large: over {max_bytes} bytes after {len(rows)} rows")
                rows.append(row)
                if len(rows) % 1024 == 0 and time.monotonic() > deadline:  # Python's own time counts too
                    raise sqlite3.OperationalError("interrupted")
            return rows, columns, False, size
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
                if result.error:  # the prompt leaves the table's rows out rather than show it as empty
                    warnings.warn(f"{self.path}: no sample rows for table {t.name}: {result.error}", stacklevel=2)
                samples[t.name] = None if result.error else [tuple(_cut(v) for v in row) for row in result.rows]
            self._samples[k] = samples
        return self._samples[k]

    def schema_prompt(self, keep: dict[str, set[str]] | None = None, sample_rows: int = SAMPLE_ROWS) -> str:
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
            if t.name not in shown or samples[t.name] is None:
                continue
            idx = [i for i, c in enumerate(t.columns) if c.name in set(shown[t.name])]
            rows = [tuple(row[i] for i in idx) for row in samples[t.name]]
            lines.append(f"{quote(t.name)}: {rows}")
        return "\n".join(lines)


class _ResultCache:
    """Query results of every open database, least recently used out past CACHE_BYTES in all."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.nbytes, self.entries, self.lock = max_bytes, 0, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key not in self.entries:
                return None
            self.entries.move_to_end(key)
            return self.entries[key][0]

    def put(self, key, result: ExecResult):
        cost = result.nbytes + len(str(key[1])) + 200  # an error's entry costs its SQL and some overhead
        with self.lock:
            if key not in self.entries and cost <= self.max_bytes // 4:
                self.entries[key], self.nbytes = (result, cost), self.nbytes + cost
            while self.nbytes > self.max_bytes:
                self.nbytes -= self.entries.popitem(last=False)[1][1]


_RESULTS = _ResultCache(CACHE_BYTES)
_OPEN: dict[str, Database] = {}
_OPEN_LOCK = threading.Lock()


def open_database(path: str | Path) -> Database:
    """The Database for a file, opened once per process and reused (its connection and caches too)."""
    key = str(Path(path).resolve())
    with _OPEN_LOCK:
        if key not in _OPEN:
            _OPEN[key] = Database(key)
        return _OPEN[key]
