"""Similar solved questions as examples in the text-to-SQL prompt (DAIL-SQL's example selection, simplified).

A small model writes a query shape it has seen ("airports with no flights": NOT IN, "for each": GROUP BY) far
more reliably than one it must invent. DAIL-SQL (Gao et al., VLDB 2024) shows the model solved questions whose
*skeleton* is like the new one: names and values masked, so that "How many singers are from France?" and "How
many ships were built in 1990?" look alike. Here: a pool of question/SQL pairs (Spider's training files, or a
user's own), each question masked with its own database's names, BM25 over the masked words and word pairs
(numpy), and the k best from *other* databases. Never the question's own database: on Spider, a figure stays
cross-database.
"""
from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

SHOWN = 3   # examples per question
_SQL_WORDS = set("SELECT FROM WHERE JOIN ON AS AND OR NOT IN GROUP BY ORDER HAVING LIMIT DISTINCT COUNT AVG SUM MIN MAX "
                 "UNION INTERSECT EXCEPT LIKE BETWEEN DESC ASC IS NULL EXISTS CASE WHEN THEN ELSE END".split())
_SQL_WORDS |= {w.lower() for w in _SQL_WORDS}
_WORD = re.compile(r"\"[^\"]*\"|'[^']*'|\d+(?:\.\d+)?|[A-Za-z_]\w*")


def name_words(names) -> set[str]:
    """The lower-case words of table and column names: "Home_Town" and "homeTown" -> home, town (+ plurals)."""
    out = set()
    for name in names:
        for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name):
            out |= {w.lower(), w.lower() + "s", w.lower() + "es"}
    return out


def skeleton(question: str, names: set[str]) -> list[str]:
    """The question's words, with its schema's names, values and numbers masked (DAIL-SQL's skeleton)."""
    out = []
    for i, m in enumerate(_WORD.finditer(question)):
        w = m.group()
        if w[0] in "\"'" or w[0].isdigit() or (i > 0 and w[0].isupper()):
            out.append("<value>")
        else:
            out.append("<name>" if w.lower() in names else w.lower())
    return out


def _terms(words: list[str]) -> list[str]:
    return words + [f"{a} {b}" for a, b in zip(words, words[1:])]


class DemoPool:
    """Question/SQL pairs and a BM25 index over their skeletons."""

    def __init__(self, pairs: list[dict], names_of: dict[str, set[str]], k1: float = 1.2, b: float = 0.75):
        self.pairs, self.k1 = pairs, k1
        # a pair's names: its database's (tables.json) and the identifiers its own SQL uses
        docs = [_terms(skeleton(p["question"], names_of.get(p.get("db_id", ""), set())
                                | name_words(set(re.findall(r"[A-Za-z_]\w*", p["sql"])) - _SQL_WORDS)))
                for p in pairs]
        self.db = np.array([p.get("db_id", "") for p in pairs])
        lengths = np.array([len(d) for d in docs], dtype=np.float32)
        norm = k1 * (1 - b + b * lengths / max(1.0, lengths.mean()))
        postings = defaultdict(list)
        for i, d in enumerate(docs):
            for term, tf in Counter(d).items():
                postings[term].append((i, tf * (k1 + 1) / (tf + norm[i])))
        n = len(docs)
        self.index = {t: (np.array([i for i, _ in ps]), np.array([w for _, w in ps], dtype=np.float32)
                          * math.log(1 + (n - len(ps) + 0.5) / (len(ps) + 0.5))) for t, ps in postings.items()}

    def similar(self, question: str, names: set[str], db_id: str, k: int = SHOWN) -> list[dict]:
        """The k pairs whose skeleton is nearest the question's, none on the database db_id."""
        scores = np.zeros(len(self.pairs), dtype=np.float32)
        for term in set(_terms(skeleton(question, names))):
            if term in self.index:
                ids, weights = self.index[term]
                scores[ids] += weights
        scores[self.db == db_id] = -1.0
        best = np.argsort(-scores, kind="stable")[:k]
        return [self.pairs[i] for i in best if scores[i] > 0]


def load_pool(source: str | Path) -> DemoPool:
    """A Spider root (train_spider.json + train_others.json, names from tables.json) or a JSON file: a list of
    {"question", "query" or "SQL", optional "db_id"}."""
    from .datasets import DatasetError, read_json
    source = Path(source)
    files = [source / "train_spider.json", source / "train_others.json"] if source.is_dir() else [source]
    pairs, seen = [], set()
    for f in files:
        records = read_json(f)
        if not isinstance(records, list):
            raise DatasetError(f"{f}: expected a JSON list of question/SQL pairs")
        for i, r in enumerate(records):
            sql = r.get("query", r.get("SQL")) if isinstance(r, dict) else None
            if not isinstance(sql, str) or not isinstance(r.get("question"), str):
                raise DatasetError(f"{f}: pair {i} has no 'question' and 'query' (or 'SQL') strings")
            pair = {"question": r["question"].strip(), "sql": " ".join(sql.split()), "db_id": str(r.get("db_id", ""))}
            if (pair["question"], pair["sql"]) not in seen:  # Spider repeats some pairs word for word
                seen.add((pair["question"], pair["sql"]))
                pairs.append(pair)
    names_of = {}
    if (source / "tables.json").is_file():
        for s in read_json(source / "tables.json"):
            names_of[s["db_id"]] = name_words(s["table_names_original"]
                                              + [c for _, c in s["column_names_original"]])
    return DemoPool(pairs, names_of)


def describe(pairs: list[dict]) -> str:
    """The prompt's block: one solved example per pair."""
    return "\n".join(f"Question: {p['question']}\nSQL: {p['sql']}" for p in pairs)
