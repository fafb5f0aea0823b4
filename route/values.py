"""Value linking: the database's own text cells that the question mentions, shown to the model as stored.

A small model invents values ("USA" where the table says "United States") or puts them in the wrong column.
CodeS (Li et al., SIGMOD 2024) retrieves the cells a question matches and shows them in the prompt; ROUTE's
prompts show only three sample rows per table. Here, per database, an index of its distinct short text cells is
built once (read-only, through the sandboxed connection, bounded in time) and cached under `$ROUTE_HOME/values/`
keyed by the file's sha256. A question's words are matched against the index's words exactly or within one edit
(a typo, a plural), case and accents folded; a cell matches when most of its words do. The best few become
`table.column = 'value'` lines in the SL and TS prompts, spelled as the database stores them.
"""
from __future__ import annotations

import json
import re
import sys
import time
import unicodedata
from collections import defaultdict
from pathlib import Path

from .database import coarse_type, quote
from .files import atomic_file, sha256_file

MAX_CHARS = 60          # longer cells (addresses, descriptions, blobs as text) are not values a question names
MAX_PER_COLUMN = 5000   # distinct cells read per column
BUILD_SECONDS = 20.0    # the whole index; past it the index is partial, and says so
SHOWN = 3               # distinct values shown per question
FUZZY = 5               # words this long or longer may match with one letter wrong
STOP = set("a an and are as at be by did do does for from give has have how i in is it its list many me much "
           "name names number of on or show than that the their them there these they this those to was were "
           "what when where which who whose with without all any each every find return".split())


def fold(text: str) -> str:
    """Lower case, accents dropped, anything not a letter or digit a space: how question and cells compare."""
    text = unicodedata.normalize("NFKD", text.casefold())
    text = "".join(c for c in text if not unicodedata.combining(c))
    return " ".join(re.sub(r"[^\w]+|_", " ", text).split())


def build_index(db, seconds: float = BUILD_SECONDS) -> dict:
    """{"cells": [[table, column, value], ...], "partial": bool}: the distinct text cells of every TEXT column."""
    cells, deadline, partial = [], time.monotonic() + seconds, False
    for t in db.tables:
        for c in t.columns:
            if coarse_type(c.type) != "TEXT":
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                partial = True
                break
            sql = (f"SELECT DISTINCT {quote(c.name)} FROM {quote(t.name)} WHERE typeof({quote(c.name)}) = 'text' "
                   f"AND length({quote(c.name)}) BETWEEN 1 AND {MAX_CHARS} LIMIT {MAX_PER_COLUMN + 1}")
            res = db.execute(sql, timeout=min(left, 5.0), max_rows=MAX_PER_COLUMN)
            partial |= res.error is not None or res.truncated
            cells += [[t.name, c.name, row[0]] for row in res.rows if isinstance(row[0], str) and fold(row[0])]
    return {"cells": cells, "partial": partial}


def load_index(db, home: Path | None = None) -> dict:
    """The database's index, from the cache when its file is unchanged, else built (and cached)."""
    from .hub import home as route_home
    path = (home or route_home()) / "values" / f"{sha256_file(db.path)}.json"
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass  # absent or unreadable: rebuild
    t0 = time.perf_counter()
    index = build_index(db)
    if index["partial"]:
        print(f"route: {db.path}: value index partial (a column over {MAX_PER_COLUMN} distinct values, or the "
              f"{BUILD_SECONDS:.0f} s bound reached); {len(index['cells'])} cells in "
              f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(index), encoding="utf-8")
    except OSError:
        pass  # a read-only cache costs a rebuild next time, nothing else
    return index


# what a question quotes, and capitalized words not at its start: names, worth matching part of a cell
_NAMES = re.compile(r"\"([^\"]+)\"|(?<!\w)'([^']+)'(?!\w)|“([^”]+)”|(?<=[\w,;:)] )([A-Z][\w.-]*)")


def name_words(names) -> set[str]:
    """The lower-case words of table and column names: "Home_Town" and "homeTown" -> home, town (+ plurals)."""
    out = set()
    for name in names:
        for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name):
            out |= {w.lower(), w.lower() + "s", w.lower() + "es"}
    return out


def _deletes(word: str) -> set[str]:
    return {word[:i] + word[i + 1:] for i in range(len(word))}


def _one_edit(a: str, b: str) -> bool:
    """a and b differ by one inserted, deleted or replaced letter, or two adjacent letters swapped."""
    if len(a) > len(b):
        a, b = b, a
    i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))
    if len(a) != len(b):
        return len(b) - len(a) == 1 and a[i:] == b[i + 1:]
    return a[i + 1:] == b[i + 1:] or (a[i + 2:] == b[i + 2:] and a[i:i + 2] == b[i:i + 2][::-1])


class ValueLinker:
    """Matches questions against one database's index (built or loaded once)."""

    def __init__(self, index: dict, names: set[str] = frozenset()):
        self.cells, self.names = index["cells"], set(names)  # names: the schema's words (no fuzzy match there)
        self.words = defaultdict(set)   # folded word -> ids of the cells that contain it
        self.near = defaultdict(set)    # a word with one letter deleted -> the words it came from (SymSpell)
        self.cell_words = [fold(value).split() for _, _, value in self.cells]
        for i, words in enumerate(self.cell_words):
            for w in words:
                self.words[w].add(i)
        for w in self.words:
            if len(w) >= FUZZY:
                for d in _deletes(w):
                    self.near[d].add(w)

    def _spellings(self, w: str) -> set[str]:
        """The index's words within one edit of the question's word w (w itself if present)."""
        found = {w} & self.words.keys()
        if len(w) >= FUZZY and w not in STOP:  # shorter words are too easily one edit from another
            found |= self.near.get(w, set())  # an index word with one letter more
            for d in _deletes(w):
                found |= ({d} & self.words.keys() if len(d) >= FUZZY else set()) | self.near.get(d, set())
        return {s for s in found if s == w or _one_edit(s, w)}  # two words sharing a deletion may be 2 apart

    def match(self, question: str, k: int = SHOWN) -> list[tuple[str, str, str]]:
        """The best (table, column, value) for the question, at most k distinct values. A cell matches whole
        when its words are in the question (one letter wrong allowed in words of 5 or more letters that are not
        the schema's own names; words like "the" need not be), all but one if it has three or more; in part when
        a name the question quotes or capitalizes is one of its words ("Diana" -> 'Diana Smith') and no cell
        holds that name whole. A question that names something sees only the cells that hold such a name: a
        small model turns every value it is shown into a condition."""
        words = fold(question).split()
        present = set(words)
        names = {w for spans in _NAMES.findall(question) for w in fold(" ".join(spans)).split()} - STOP
        triggers = {w for w in words if w not in STOP and len(w) > 1 and not (w.isdigit() and len(w) < 4)}
        triggers |= {w for w in names if len(w) == 1}  # "sex is M"
        fuzzy = {s for w in triggers - self.names for s in self._spellings(w)} - present
        found = {}
        for i in {i for w in triggers | fuzzy for i in self.words.get(w, ())}:
            cw = self.cell_words[i]
            content = [w for w in cw if w not in STOP] or cw  # a cell of stop words only ("The Who") needs all
            missing = sum(w not in present and w not in fuzzy for w in content)
            named = bool(names & set(content))
            if missing <= (len(content) >= 3) and missing < len(content):
                found[i] = (not named, 0, -sum(len(w) for w in cw if w in present or w in fuzzy))
            elif named and any(len(w) >= 3 for w in names & set(content)):
                found[i] = (False, 1, -sum(len(w) for w in cw if w in names))
        if any(not named for named, _, _ in found.values()):
            found = {i: f for i, f in found.items() if not f[0]}  # the question names something: only those
        if any(whole == 0 for _, whole, _ in found.values()):
            found = {i: f for i, f in found.items() if f[1] == 0}  # a name held whole: no partial matches
        best, values = [], []
        for i in sorted(found, key=lambda i: (*found[i], i)):
            v = self.cells[i][2]
            if v not in values and len(values) == k:
                continue
            values += [v] if v not in values else []
            best.append(tuple(self.cells[i]))
        return best


_LINKERS: dict = {}  # (path, size, mtime) -> ValueLinker: a session's questions pay neither hash nor load again


def linker(db) -> "ValueLinker":
    """The database's ValueLinker, kept in memory while its file is unchanged."""
    st = db.path.stat()
    key = (str(db.path), st.st_size, st.st_mtime_ns)
    if key not in _LINKERS:
        if len(_LINKERS) >= 64:  # a bound, for a process that visits many databases
            _LINKERS.clear()
        _LINKERS[key] = ValueLinker(load_index(db), name_words([t.name for t in db.tables]
                                                               + [c.name for t in db.tables for c in t.columns]))
    return _LINKERS[key]


def describe(matches) -> str:
    """The prompt's lines, one per value: `'value' (table.column, ...)`, the value quoted as SQL writes it and
    spelled as stored. Not `table.column = 'value'`: a small model copies such lines into WHERE, every one."""
    columns = defaultdict(list)
    for t, c, v in matches:
        columns[v].append(f"{quote(t)}.{quote(c)}")
    return "\n".join(f"'{v.replace(chr(39), chr(39) * 2)}' ({', '.join(cols)})" for v, cols in columns.items())
