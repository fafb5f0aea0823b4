"""Execution accuracy (EX): does the predicted SQL return what the gold SQL returns?

The metric ROUTE (Qin et al., ICLR 2025) reports on Spider and BIRD (Sec. 4.1), as each official script computes it:

  spider  rows compared as a multiset (as lists when the gold query has a top-level ORDER BY; Spider's script
          looks for "order by" anywhere, so there a sorted subquery made order matter too), and a permutation
          of the columns still matches (test-suite-sql-eval's `result_eq`); DISTINCT is removed from both
          queries first, as that script does by default (keep_distinct=True turns this off).
  bird    the two results compared as sets (BIRD's evaluation.py), columns in their order.

The official prediction files are written here too (write_spider_preds / write_bird_preds, used by infer.py);
score.py reads them back and scores any prediction file from the command line.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

from route.database import DEFAULT_TIMEOUT, open_database
from route.datasets import Dataset, Example
from route.sql import LEVELS, difficulty, order_matters, remove_distinct


def results_match(pred_rows, gold_rows, ordered: bool) -> bool:
    """Spider's equivalence of two results: some order of pred's columns makes its rows equal gold's, as
    lists when `ordered`, else as multisets. Two empty results match whatever their columns."""
    if not pred_rows and not gold_rows:
        return True
    if len(pred_rows) != len(gold_rows) or len(pred_rows[0]) != len(gold_rows[0]):
        return False
    pred_rows, gold_rows = [tuple(r) for r in pred_rows], [tuple(r) for r in gold_rows]
    if ordered and pred_rows == gold_rows or not ordered and Counter(pred_rows) == Counter(gold_rows):
        return True
    # Which of pred's columns could stand in for each gold column: those holding the same values (in
    # order, or as a bag). This prunes the permutations that the official script samples rows to prune.
    same = (lambda a, b: a == b) if ordered else (lambda a, b: Counter(a) == Counter(b))
    pred_cols, gold_cols = list(zip(*pred_rows)), list(zip(*gold_rows))
    candidates = [[j for j, p in enumerate(pred_cols) if same(p, g)] for g in gold_cols]
    gold_bag = Counter(gold_rows)

    def search(perm: list[int]) -> bool:
        if len(perm) == len(gold_cols):
            rows = [tuple(r[j] for j in perm) for r in pred_rows]
            return rows == gold_rows if ordered else Counter(rows) == gold_bag
        tried = set()
        for j in candidates[len(perm)]:
            if j not in perm and pred_cols[j] not in tried:  # identical columns: one of them is enough
                tried.add(pred_cols[j])
                if search(perm + [j]):
                    return True
        return False

    return search([])


@dataclass
class Result:
    index: int
    db_id: str
    difficulty: str
    pred: str
    gold: str
    correct: bool
    pred_error: str | None = None
    gold_error: str | None = None


def compare(pred_sql: str, gold_sql: str, db, mode: str = "spider", timeout: float = DEFAULT_TIMEOUT,
            keep_distinct: bool = False) -> tuple[bool, str | None, str | None]:
    """(correct, pred's error, gold's error). `db` is a Database or a path to one."""
    if mode not in ("spider", "bird"):
        raise ValueError(f"mode must be 'spider' or 'bird', not {mode!r}")
    if isinstance(db, (str, Path)):
        db = open_database(db)
    if mode == "spider" and not keep_distinct:
        pred_sql, gold_sql = remove_distinct(pred_sql or ""), remove_distinct(gold_sql)
    gold = db.execute(gold_sql, timeout=timeout)
    pred = db.execute(pred_sql or "", timeout=timeout)
    if gold.error is not None or pred.error is not None:
        return False, pred.error, gold.error
    if pred.truncated or gold.truncated:  # a prefix of a result proves nothing about the rest: never a match
        return False, *(f"result truncated at {len(r.rows)} rows" if r.truncated else None for r in (pred, gold))
    if mode == "bird":
        return set(pred.rows) == set(gold.rows), None, None
    return results_match(pred.rows, gold.rows, order_matters(gold_sql)), None, None


def execution_match(pred_sql: str, gold_sql: str, db, mode: str = "spider", **kwargs) -> bool:
    return compare(pred_sql, gold_sql, db, mode, **kwargs)[0]


@dataclass
class Report:
    results: list[Result]
    mode: str = "spider"
    skipped: int = 0  # examples whose database is missing
    seconds: float = 0.0
    missing_dbs: set[str] = field(default_factory=set)

    @property
    def accuracy(self) -> float:
        return sum(r.correct for r in self.results) / max(1, len(self.results))

    def by_level(self) -> dict[str, tuple[int, int]]:
        """level -> (correct, count), Spider's levels first, then any others (BIRD's) in sorted order."""
        levels = {r.difficulty for r in self.results}
        order = [lv for lv in LEVELS if lv in levels] + sorted(levels - set(LEVELS))
        return {lv: (sum(r.correct for r in self.results if r.difficulty == lv),
                     sum(r.difficulty == lv for r in self.results)) for lv in order}

    def __str__(self) -> str:
        rows = list(self.by_level().items()) + [("all", (sum(r.correct for r in self.results), len(self.results)))]
        lines = [f"{'EX (' + self.mode + ')':<14}{'count':>7}{'correct':>9}{'EX %':>8}"]
        lines += [f"{lv:<14}{n:>7}{c:>9}{100 * c / max(1, n):>8.1f}" for lv, (c, n) in rows]
        if gold_errors := sum(r.gold_error is not None for r in self.results):
            lines.append(f"{gold_errors} gold queries failed to execute (scored as wrong)")
        if self.skipped:
            dbs = f" ({', '.join(sorted(self.missing_dbs))})" if self.missing_dbs else ""
            lines.append(f"skipped {self.skipped} examples whose database is missing{dbs}")
        lines.append(f"{len(self.results)} examples scored in {self.seconds:.2f} s")
        return "\n".join(lines)

    def write_jsonl(self, path: str | Path) -> None:
        with open(path, "w", encoding="utf-8") as f:
            for r in self.results:
                f.write(json.dumps(asdict(r), ensure_ascii=False) + "\n")


def evaluate(preds, examples: list[Example] | Dataset, mode: str = "spider", timeout: float = DEFAULT_TIMEOUT,
             keep_distinct: bool = False, skipped: int = 0) -> Report:
    """Score predictions: a list aligned with `examples`, or a dict keyed by Example.index (a missing key scores
    as wrong). Levels are Spider's difficulty of the gold query unless the example has its own label (BIRD).
    `skipped` (examples dropped for a missing database) is only reported; a Dataset brings its own count."""
    missing = set()
    if isinstance(examples, Dataset):
        skipped, missing, examples = examples.skipped, examples.missing_dbs, examples.examples
    if not isinstance(preds, dict) and len(preds) != len(examples):
        raise ValueError(f"{len(preds)} predictions for {len(examples)} examples")
    start = time.perf_counter()
    results = []
    for i, ex in enumerate(examples):
        pred = preds.get(ex.index, "") if isinstance(preds, dict) else preds[i]
        level = ex.difficulty or difficulty(ex.gold_sql)
        try:
            correct, pred_error, gold_error = compare(pred, ex.gold_sql, ex.db_path, mode, timeout, keep_distinct)
        except (OSError, ValueError) as e:  # an unreadable database file
            correct, pred_error, gold_error = False, None, str(e)
        results.append(Result(ex.index, ex.db_id, level, pred or "", ex.gold_sql, correct, pred_error, gold_error))
    return Report(results, mode, skipped, time.perf_counter() - start, missing)


# -- files -------------------------------------------------------------------------------------------------
PLACEHOLDER = "SELECT 1"  # the answer of a question the chain could not answer: it runs, scores wrong, holds the line
BIRD_SEP = "\t----- bird -----\t"  # BIRD's predict_dev.json values are "SQL<BIRD_SEP>db_id"
_QUOTED = re.compile(r"""('(?:[^']|'')*'|"(?:[^"]|"")*")""")


def flatten_sql(sql: str) -> str:
    """SQL on one line (Spider's evaluator reads a query per line, split at its first tab; a blank line ends a
    session): outside string literals each whitespace run becomes a space, inside them each line break or tab."""
    parts = _QUOTED.split(sql or "")  # even parts lie outside quotes, odd parts are whole literals
    return "".join(re.sub(r"\s+", " ", p) if i % 2 == 0 else re.sub(r"[\r\n\t]", " ", p)
                   for i, p in enumerate(parts)).strip()


def _in_file_order(examples, sqls, skipped) -> list[tuple[Example, str]]:
    """(example, one-line SQL) for every position of the input file up to the last one given; skipped examples
    (database missing) and empty answers get PLACEHOLDER."""
    if len(sqls) != len(examples):
        raise ValueError(f"{len(sqls)} SQL queries for {len(examples)} examples")
    by_position = {e.position: (e, PLACEHOLDER) for e in skipped}
    by_position |= {e.position: (e, flatten_sql(sql) or PLACEHOLDER) for e, sql in zip(examples, sqls)}
    n = max(by_position, default=-1) + 1
    if gaps := [p for p in range(n) if p not in by_position]:
        raise ValueError(f"positions {gaps[:5]} are neither answered nor skipped: the file would shift lines")
    return [by_position[p] for p in range(n)]


def write_spider_preds(path: str | Path, examples, sqls, skipped=()) -> Path:
    """Spider's official prediction file (test-suite-sql-eval's --pred): line N is question N of the input
    file, including questions whose database is missing (`skipped`, answered with PLACEHOLDER)."""
    rows = _in_file_order(examples, sqls, skipped)
    Path(path).write_text("".join(sql + "\n" for _, sql in rows), encoding="utf-8")
    return Path(path)


def write_bird_preds(path: str | Path, examples, sqls, skipped=()) -> Path:
    """BIRD's official predict_<split>.json: {"question_id": "SQL\t----- bird -----\tdb_id"} in file order
    (its evaluator pairs the dict's values with the gold in order, so no question may be left out)."""
    rows = _in_file_order(examples, sqls, skipped)
    data = {str(e.index): f"{sql}{BIRD_SEP}{e.db_id}" for e, sql in rows}
    Path(path).write_text(json.dumps(data, indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return Path(path)
