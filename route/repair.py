"""Deterministic SQL repair from the schema: the chain's first answer to a failing query (MCP, Sec. 3.3).

A small model's failing queries mostly make one of these mistakes, each repaired from the schema with sqlglot
only where exactly one repair exists:

  column under the wrong alias   T2.name -> T1.name, when exactly one table of the query has the column
  near-miss column or table      song_nam -> song_name (difflib, one close match among the tables in scope)
  join without its key           JOIN b (no ON) -> JOIN b ON a.x = b.y, from the one foreign key between them
  join left out                  columns only one other table has -> JOIN it on the one foreign key to it

The caller executes the result and keeps it only if it runs (mcp.py). Nothing here asks the model.
"""
from difflib import get_close_matches

from sqlglot import exp

from .sql import from_items, parse, to_sql

CUTOFF = 0.8  # difflib ratio for a near miss: "song_nam"/"song_name" 0.94, "name"/"age" 0.57


def _close(name: str, candidates) -> str | None:
    """The one candidate spelled like `name` (case aside), or None if none or several are close."""
    by_lower = {c.lower(): c for c in candidates}
    if name.lower() in by_lower:
        return by_lower[name.lower()]
    hits = get_close_matches(name.lower(), list(by_lower), 2, CUTOFF)
    return by_lower[hits[0]] if len(hits) == 1 else None


def _sources(select: exp.Select, db) -> dict[str, object]:
    """alias (lower case) -> the schema Table it names, or None for a derived table or an unknown name."""
    return {n.alias_or_name.lower(): db.table(n.name) if isinstance(n, exp.Table) else None for n in from_items(select)}


def _links(a, b) -> list:
    """(child, foreign key) for each single-column foreign key between tables a and b, either way."""
    return [(x, fk) for x, y in ((a, b), (b, a)) for fk in x.foreign_keys
            if fk.ref_table.lower() == y.name.lower() and len(fk.columns) == 1 and fk.ref_columns]


def _fix_tables(tree: exp.Expression, db) -> bool:
    ctes = {c.alias_or_name.lower() for c in tree.find_all(exp.CTE)}
    changed = False
    for node in tree.find_all(exp.Table):
        if node.name and node.name.lower() not in ctes and db.table(node.name) is None:
            name = _close(node.name, [t.name for t in db.tables])
            if name:
                node.set("this", exp.to_identifier(name))
                changed = True
    return changed


def _fix_columns(select: exp.Select, db, outer: list[dict]) -> bool:
    tables = _sources(select, db)
    if None in tables.values():
        return False  # a derived table's columns are not in the schema: leave this query alone
    out_aliases = {e.alias.lower() for e in select.expressions if isinstance(e, exp.Alias)}
    changed, missing = False, set()
    for col in _scope_columns(select):
        name, qual = col.name, col.table.lower()
        if qual:
            table = tables.get(qual)
            if table is None or table.column(name) is not None:
                continue
            owners = [a for a, t in tables.items() if t.column(name) is not None]
            if len(owners) == 1:  # the column is real, under another alias of this query
                col.set("table", exp.to_identifier(_alias_as_written(select, owners[0])))
                changed = True
            elif not owners and (fixed := _close(name, [c.name for c in table.columns])):
                col.set("this", exp.to_identifier(fixed))
                changed = True
        elif (name.lower() not in out_aliases and not any(t.column(name) for t in tables.values())
              and not any(t is not None and t.column(name) for s in outer for t in s.values())):
            fixed = _close(name, {c.name for t in tables.values() for c in t.columns})
            if fixed:
                col.set("this", exp.to_identifier(fixed))
                changed = True
            else:
                missing.add(name.lower())
    return (missing and _join_owner(select, db, missing, tables)) or changed


def _scope_columns(select: exp.Select):
    """The columns of this SELECT itself (a nested query's columns are its own scope), `*` aside."""
    return [c for c in select.find_all(exp.Column)
            if c.find_ancestor(exp.Select) is select and not isinstance(c.this, exp.Star)]


def _join_owner(select: exp.Select, db, names: set[str], sources: dict) -> bool:
    """Columns no table of the query has, all in one other table that one foreign key links to a table of
    the query: the query forgot a join. Join that table on the key and qualify the columns (and those that
    the join makes ambiguous) with their tables."""
    used = {t.name.lower() for t in sources.values()}
    owners = [t for t in db.tables if t.name.lower() not in used and all(t.column(n) for n in names)]
    links = [(t, alias, child is t, fk) for t in owners for alias, s in sources.items() for child, fk in _links(t, s)]
    if len(links) != 1:
        return False
    owner, alias, owner_refers, fk = links[0]
    src = _alias_as_written(select, alias)
    left, right = (owner.name, src) if owner_refers else (src, owner.name)
    for col in _scope_columns(select):
        if col.table:
            continue
        if col.name.lower() in names:
            col.set("table", exp.to_identifier(owner.name))
        elif owner.column(col.name) and (have := [a for a, t in sources.items() if t.column(col.name)]):
            if len(have) == 1:  # the new table has it too: keep the meaning it had
                col.set("table", exp.to_identifier(_alias_as_written(select, have[0])))
    select.append("joins", exp.Join(this=exp.to_table(owner.name), on=exp.EQ(
        this=exp.column(fk.columns[0], left), expression=exp.column(fk.ref_columns[0], right))))
    return True


def _alias_as_written(select: exp.Select, alias_lower: str) -> str:
    return next((n.alias_or_name for n in from_items(select) if n.alias_or_name.lower() == alias_lower), alias_lower)


def _fix_joins(select: exp.Select, db) -> bool:
    """Give a JOIN without ON/USING the key of the one foreign key between it and the tables before it."""
    sources = [select.args.get("from_")] + list(select.args.get("joins") or [])
    changed = False
    for k, join in enumerate(sources[1:], start=1):
        on = join.args.get("on")  # sqlglot reads a bare JOIN as ON TRUE
        if (on is not None and on != exp.true()) or join.args.get("using") or not isinstance(join.this, exp.Table):
            continue
        right = db.table(join.this.name)
        keys = []
        for src in sources[:k]:
            left = db.table(src.this.name) if src is not None and isinstance(src.this, exp.Table) else None
            if right is None or left is None:
                continue
            for child, fk in _links(left, right):
                ta, tb = (src.this, join.this) if child is left else (join.this, src.this)
                keys.append(exp.EQ(this=exp.column(fk.columns[0], ta.alias_or_name),
                                   expression=exp.column(fk.ref_columns[0], tb.alias_or_name)))
        if len(keys) == 1:
            join.set("on", keys[0])
            join.set("kind", None)
            changed = True
    return changed


def repair(sql: str, db) -> str | None:
    """`sql` with its unambiguous schema mistakes repaired, or None when there is nothing to repair (or the
    text is not a readable query). The repair is not executed here."""
    tree = parse(sql)
    if tree is None:
        return None
    changed = _fix_tables(tree, db)
    for select in list(tree.find_all(exp.Select)):
        outer, node = [], select.parent  # the enclosing queries: a correlated subquery may name their columns
        while node is not None:
            if isinstance(node, exp.Select):
                outer.append(_sources(node, db))
            node = node.parent
        changed |= _fix_columns(select, db, outer)
        changed |= _fix_joins(select, db)
    return to_sql(tree) if changed else None
