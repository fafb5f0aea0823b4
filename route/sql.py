"""SQL analysis with sqlglot (sqlite dialect): what a query reads, where its clauses start, how hard it is.

ROUTE (Qin et al., ICLR 2025, Sec. 3.2-3.3) uses the tables and columns a gold query reads as schema-linking
labels and to prune the schema in the MCP chain, and cuts gold queries at clause boundaries for continuation
writing; Spider's difficulty levels break down EX. Model output is often not SQL at all, so every function here
takes any text and answers with an empty value instead of raising.
"""

from __future__ import annotations

import re
from functools import lru_cache

import sqlglot
from sqlglot import exp
from sqlglot.errors import ErrorLevel

DIALECT = "sqlite"
LEVELS = ("easy", "medium", "hard", "extra")

# -- extraction from model output --------------------------------------------------------------------------
_FENCE = re.compile(r"```(.*?)(?:```|\Z)", re.S)  # a fence left open runs to the end of the text
_START = [re.compile(r"\bSELECT\b"),  # upper case first: "select" is also an English word
          re.compile(r"\bWITH\s+(?:RECURSIVE\s+)?[\w\"`\[\]]+\s*(?:\([^()]*\)\s*)?AS\s*\(", re.I),
          re.compile(r"\bselect\b", re.I)]
_BLANK_LINE = re.compile(r"\n[ \t]*\n")


def _blocks(text: str):
    """(language tag, body) of each ``` block; "```sql SELECT 1```" on one line counts as tagged."""
    for raw in _FENCE.findall(text):
        if (m := re.match(r"[ \t]*([\w+-]+)[ \t]*\n", raw)) and m.group(1).lower() not in ("select", "with"):
            yield m.group(1).lower(), raw[m.end():]
        elif m := re.match(r"[ \t]*(sql|sqlite)\s", raw, re.I):
            yield "sql", raw[m.end():]
        else:
            yield "", raw


def extract_sql(text) -> str:
    """The SQL in a model's answer: the last ```sql block, else the text from the first SELECT/WITH to the
    end of that statement. Any input is accepted; no SQL found is an empty string."""
    if not isinstance(text, str):
        text = "" if text is None else str(text)
    blocks = list(_blocks(text))
    tagged = [b for tag, b in blocks if tag in ("sql", "sqlite") and b.strip()]
    bare = [b for tag, b in blocks if tag == "" and re.search(r"\b(select|with)\b", b, re.I)]
    if tagged or bare:
        return _statement((tagged or bare)[-1].strip(), stop_at_blank_line=False)
    starts = [m.start() for pattern in _START[:2] if (m := pattern.search(text))]
    if not starts and (m := _START[2].search(text)):
        starts = [m.start()]
    return _statement(text[min(starts):], stop_at_blank_line=True) if starts else ""


def _statement(text: str, stop_at_blank_line: bool) -> str:
    """`text` up to the end of its first statement: a `;` outside quotes and comments, a code fence, or (in
    free text, where prose follows the query) a blank line."""
    i, quote_char = 0, None
    while i < len(text):
        c = text[i]
        if quote_char:
            if c == quote_char:
                quote_char = None
        elif c in "'\"`":
            quote_char = c
        elif c == "[":
            quote_char = "]"
        elif text.startswith("--", i):
            i = text.find("\n", i)
            if i < 0:
                break
        elif text.startswith("/*", i):
            i = text.find("*/", i + 2)
            if i < 0:
                break
            i += 1
        elif c == ";" or text.startswith("```", i):
            return text[:i].strip()
        elif stop_at_blank_line and c == "\n" and _BLANK_LINE.match(text, i):
            return text[:i].strip()
        i += 1
    return text.strip()


# -- parsing -----------------------------------------------------------------------------------------------
# sqlglot raises ParseError, TokenError, RecursionError, ... on what a model writes: _parse, _tokens and to_sql
# are this module's only calls into it that can fail, and each turns any failure into None.
def _tree(sql) -> exp.Query | None:
    """The cached, shared tree of a query (callers in this module only read it), or None."""
    return _parse(sql) if isinstance(sql, str) and sql.strip() else None


@lru_cache(maxsize=8192)
def _parse(sql: str) -> exp.Query | None:
    try:
        trees = [t for t in sqlglot.parse(sql, read=DIALECT, error_level=ErrorLevel.RAISE) if t is not None]
    except Exception:  # noqa: BLE001
        return None
    return trees[0] if trees and isinstance(trees[0], exp.Query) else None


def _tokens(sql: str) -> list | None:
    try:
        return sqlglot.Dialect.get_or_raise(DIALECT).tokenize(sql)
    except Exception:  # noqa: BLE001
        return None


def to_sql(tree: exp.Expression) -> str | None:
    """A tree written back as SQLite SQL, or None (sqlglot cannot always write back what it read)."""
    try:
        return tree.sql(dialect=DIALECT)
    except Exception:  # noqa: BLE001
        return None


def parse(sql) -> exp.Query | None:
    """The query's sqlglot tree (a copy the caller may change), or None if it is not a readable query."""
    tree = _tree(sql)
    return tree.copy() if tree is not None else None


def normalize(sql) -> str:
    """A canonical spelling (sqlglot's) when the query parses, else the text with whitespace collapsed."""
    if not isinstance(sql, str):
        return ""
    tree = _tree(sql)
    return (tree is not None and to_sql(tree)) or " ".join(sql.split())


def _local(node: exp.Expression | None):
    """`node` and what lies under it in the same query: nested queries are yielded but not entered."""
    stack = [node] if node is not None else []
    while stack:
        n = stack.pop()
        yield n
        if n is node or not isinstance(n, exp.Query):
            stack.extend(n.iter_expressions())


def _unwrap(node):
    while isinstance(node, (exp.Subquery, exp.Paren)) and isinstance(node.this, exp.Expression):
        node = node.this
    return node


def from_items(select: exp.Select) -> list[exp.Expression]:
    """What a SELECT's FROM and JOINs name (tables, subqueries, ...), in order."""
    return [s.this for s in [select.args.get("from_"), *(select.args.get("joins") or [])] if s is not None]


def order_matters(sql: str) -> bool:
    """Does the query order its result at the top level? (Then EX compares rows in order.)
    Text that does not parse falls back to Spider's own test: 'order by' anywhere."""
    tree = _tree(sql)
    if tree is None:
        return "order by" in " ".join(str(sql).lower().split())
    return _unwrap(tree).args.get("order") is not None


def remove_distinct(sql: str) -> str:
    """The query without its DISTINCT keywords, as Spider's official EX does unless --keep_distinct."""
    if not isinstance(sql, str) or "distinct" not in sql.lower():  # most queries: skip the tokenizer
        return sql if isinstance(sql, str) else ""
    tokens = _tokens(sql)
    if tokens is None:
        return re.sub(r"\bdistinct\b", "", sql, flags=re.I)
    for t in reversed([t for t in tokens if t.token_type == sqlglot.TokenType.DISTINCT]):
        sql = sql[:t.start] + sql[t.end + 1:]
    return sql


# -- tables and columns ------------------------------------------------------------------------------------
def used_schema(sql: str, db) -> dict[str, set[str]]:
    """table -> columns the query reads, spelled as in `db`'s schema (anything with `.table(name)`), resolving
    aliases, derived tables, CTEs, correlated subqueries and set operations. `SELECT *` and `t.*` read every
    column of the table; `count(*)` reads none (its table maps to an empty set). Unknown names are left out."""
    tree = _tree(sql)
    out: dict[str, set[str]] = {}
    if tree is not None:
        _collect(tree, db, out, [], frozenset())
    return out


def _collect(query, db, out, outer: list[dict], ctes: frozenset) -> None:
    query = _unwrap(query)
    if (with_ := query.args.get("with_")) is not None:
        for cte in with_.expressions:
            _collect(cte.this, db, out, outer, ctes)
            ctes = ctes | {cte.alias_or_name.lower()}
    if isinstance(query, exp.SetOperation):
        _collect(query.left, db, out, outer, ctes)
        _collect(query.right, db, out, outer, ctes)
        return  # an ORDER BY after a set operation names output columns: nothing more to record
    if not isinstance(query, exp.Select):
        return
    sources: dict[str, object] = {}  # alias -> schema Table, or None for a derived table / unknown name
    handled = set()
    for node in from_items(query):
        if isinstance(node, exp.Table):
            table = None if node.name.lower() in ctes else db.table(node.name)
            if table is not None:
                out.setdefault(table.name, set())
            sources[node.alias_or_name.lower()] = table
        elif isinstance(node, exp.Subquery):
            _collect(node.this, db, out, outer, ctes)
            sources[node.alias_or_name.lower()] = None
            handled.add(id(node))
    scopes = [sources] + outer
    for node in _local(query):
        if node is query or id(node) in handled:
            continue
        if isinstance(node, exp.Query):
            _collect(node, db, out, scopes, ctes)
        elif isinstance(node, exp.Column):
            if isinstance(node.this, exp.Star):
                _add_star(scopes, node.table, out)
            else:
                _add_column(scopes, node.name, node.table, db, out)
        elif isinstance(node, exp.Star) and node.parent is query:
            _add_star(scopes, "", out)


def _add_column(scopes, name: str, qualifier: str, db, out) -> None:
    for sources in scopes:  # innermost first: a correlated subquery may name an outer table
        if qualifier:
            if qualifier.lower() in sources:
                table = sources[qualifier.lower()]
                if table is not None and (col := table.column(name)) is not None:
                    out[table.name].add(col.name)
                return
            continue
        hits = [t for t in sources.values() if t is not None and t.column(name) is not None]
        for t in hits:  # ambiguous names (SQLite would refuse them) are credited to every candidate
            out[t.name].add(t.column(name).name)
        if hits or None in sources.values():  # found, or a derived table's output column
            return
    if qualifier and (table := db.table(qualifier)) is not None and table.name in out:
        if (col := table.column(name)) is not None:  # `singer.name` written without the alias
            out[table.name].add(col.name)


def _add_star(scopes, qualifier: str, out) -> None:
    sources = scopes[0]
    for alias, table in sources.items():
        if table is not None and (not qualifier or alias == qualifier.lower()):
            out[table.name].update(c.name for c in table.columns)


def count_tables(sql: str) -> int:
    """How many distinct tables the query reads, anywhere in it (CTE names are not tables); 0 if unreadable."""
    tree = _tree(sql)
    if tree is None:
        return 0
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    return len({t.name.lower() for t in tree.find_all(exp.Table) if t.name and t.name.lower() not in ctes})


# -- clause boundaries -------------------------------------------------------------------------------------
_CLAUSES = {"FROM", "WHERE", "GROUP_BY", "HAVING", "ORDER_BY", "LIMIT", "UNION", "INTERSECT", "EXCEPT"}


def clause_prefixes(sql: str) -> list[str]:
    """Prefixes of `sql` (its own text, so prefix + continuation == sql) cut at top-level clause boundaries:
    after each SELECT [DISTINCT], before each FROM, WHERE, GROUP BY, HAVING, ORDER BY, LIMIT and set operator
    (not inside parentheses). The full query is not included; text that cannot be tokenized gives []."""
    if not isinstance(sql, str):
        return []
    sql = sql.strip().rstrip(";").rstrip()
    tokens = _tokens(sql)
    if tokens is None:
        return []
    cuts, depth = [], 0
    for i, t in enumerate(tokens):
        kind = t.token_type.name
        if kind == "L_PAREN":
            depth += 1
        elif kind == "R_PAREN":
            depth -= 1
        elif depth == 0 and kind in _CLAUSES:
            cuts.append(t.start)
        elif depth == 0 and kind == "SELECT":
            end = tokens[i + 1] if i + 1 < len(tokens) and tokens[i + 1].token_type.name == "DISTINCT" else t
            cuts.append(end.end + 1)
    prefixes = []
    for cut in cuts:
        p = sql[:cut].rstrip()
        if p and p != sql and p not in prefixes:
            prefixes.append(p)
    return prefixes


# -- Spider's difficulty -----------------------------------------------------------------------------------
def difficulty(sql: str) -> str:
    """Spider's hardness level (easy / medium / hard / extra), or "unknown" for text that does not parse.
    As `eval_hardness` in Spider's evaluation.py, quirks included: only the outermost SELECT is inspected (of a
    set operation, its first operand), nested queries and set operators count once each, and a NOT condition in
    WHERE and every AND/OR inside HAVING count as aggregates."""
    tree = _tree(sql)
    if tree is None:
        return "unknown"
    sel = _unwrap(tree)
    set_operation = isinstance(sel, exp.SetOperation)
    while isinstance(sel, exp.SetOperation):  # Spider's parser keeps the first SELECT as the main one
        sel = _unwrap(sel.left)
    if not isinstance(sel, exp.Select):
        return "unknown"
    c1, c2, others = _components(sel)
    c2 += set_operation
    if c1 <= 1 and others == 0 and c2 == 0:
        return "easy"
    if (others <= 2 and c1 <= 1 and c2 == 0) or (c1 <= 2 and others < 2 and c2 == 0):
        return "medium"
    if (others > 2 and c1 <= 2 and c2 == 0) or (2 < c1 <= 3 and others <= 2 and c2 == 0) or (
            c1 <= 1 and others == 0 and c2 <= 1):
        return "hard"
    return "extra"


def _is_not(node) -> bool:
    """A negated condition in Spider's sense (`x NOT IN`, `NOT LIKE`, `NOT BETWEEN`), not `IS NOT NULL`."""
    if isinstance(node, exp.Not):
        return not isinstance(_unwrap(node.this), exp.Is)
    return bool(node.args.get("negate"))


def _conditions(node) -> list:
    """The leaves of an AND/OR tree: Spider's flat list of conditions."""
    node = _unwrap(node) if isinstance(node, exp.Paren) else node
    if isinstance(node, exp.Connector):
        return _conditions(node.left) + _conditions(node.right)
    return [node] if node is not None else []


def _components(sel: exp.Select) -> tuple[int, int, int]:
    """Spider's count_component1, count_component2 (nested queries only) and count_others."""
    where, having = sel.args.get("where"), sel.args.get("having")
    group, order = sel.args.get("group"), sel.args.get("order")
    joins = sel.args.get("joins") or []
    conds = [c for c in [where, having] + [j.args.get("on") for j in joins] if c is not None]
    cond_nodes = [n for c in conds for n in _local(c)]

    c1 = sum(x is not None for x in (where, group, order, sel.args.get("limit")))
    c1 += max(0, len(from_items(sel)) - 1)  # table units beyond the first
    c1 += sum(isinstance(n, exp.Or) for n in cond_nodes)
    c1 += sum(isinstance(n, exp.Like) for n in cond_nodes)
    c2 = sum(isinstance(n, exp.Query) for n in cond_nodes)  # nested queries in conditions

    def has_agg(e):
        return any(isinstance(n, exp.AggFunc) for n in _local(e))

    group_items = group.expressions if group is not None else []
    aggs = sum(has_agg(e) for e in sel.expressions) + sum(has_agg(e) for e in group_items)
    aggs += sum(_is_not(n) for n in _local(where))
    if order is not None:
        aggs += sum(isinstance(n, exp.AggFunc) for n in _local(order))
    if having is not None:  # official quirk: count_agg over HAVING's list counts its AND/ORs and NOTs
        aggs += len(_conditions(having.this)) - 1 + sum(_is_not(n) for n in _local(having))
    others = (aggs > 1) + (len(sel.expressions) > 1) + (len(_conditions(where.this if where else None)) > 1)
    others += len(group_items) > 1
    return c1, c2, others
