"""Execution-guided selection (MCP step 2): answer with the result most candidate queries agree on.

A self-consistency vote (Wang et al., 2023) over execution results, as in the text-to-SQL systems ROUTE compares
with. Queries that fail are dropped; the others are grouped by Spider's notion of equal results
(evaluate.results_match), and the largest group answers; ties go to the earliest candidate's group, so callers
list the greedy TS answer first.
"""
from dataclasses import dataclass

from .evaluate import results_match
from .sql import order_matters


@dataclass
class Candidate:
    sql: str
    source: str             # "ts", "pre-sql", "sample 3", ... ("+repair" when repair.py fixed it)
    error: str | None = None
    rows: list | None = None
    group: int = -1         # which result group it joined (-1: failed, not voted)


def vote(cands: list[Candidate]) -> int:
    """The index of the candidate that answers (the first of the largest group; 0 when every candidate failed).
    Fills each candidate's `group`."""
    groups: list[list[int]] = []
    for i, c in enumerate(cands):
        if c.error is not None:
            continue
        for g, members in enumerate(groups):
            if same_result(c, cands[members[0]]):
                members.append(i)
                c.group = g
                break
        else:
            c.group = len(groups)
            groups.append([i])
    if not groups:
        return 0
    return max(groups, key=len)[0]  # max() keeps the first of equal sizes: the earliest candidate's group


def same_result(a: Candidate, b: Candidate) -> bool:
    """Whether two queries that ran returned equal results (in order only where both ask for one)."""
    return results_match(a.rows, b.rows, order_matters(a.sql) and order_matters(b.sql))
