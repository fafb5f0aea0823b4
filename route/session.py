"""An interactive session over one SQLite file: questions in, SQL and its result out, the model loaded once.

    python infer.py --db my.sqlite            # type questions; an empty line, Ctrl-D or Ctrl-C ends it
    printf 'How many singers?\\n' | python infer.py --db my.sqlite

Each question runs through the same chain as a dataset run (a callable from infer.py, with its options). It
prints the SQL, the result as an aligned table, the time, and with --explain (or `.explain` after a question)
what each step of the chain did. A pipe's lines are echoed, so that the output reads as a transcript.
"""
import sys
import time

from .database import open_database
from .datasets import load_sqlite
from .mcp import TIMEOUT

SHOW_ROWS = 10
MAX_WIDTH = 40  # a cell wider than this is cut: one long text column must not push the others off screen


def _cell(v) -> str:
    s = "NULL" if v is None else str(v).replace("\n", " ")
    return s if len(s) <= MAX_WIDTH else s[:MAX_WIDTH - 3] + "..."


def format_table(columns, rows, limit: int = SHOW_ROWS, truncated: bool = False) -> str:
    """The first `limit` rows under their column names, numbers right-aligned, then how many rows there are
    ("at least" when the fetch stopped at a cap)."""
    shown = [[_cell(v) for v in r] for r in rows[:limit]]
    cols = [_cell(c) for c in columns] or [""] * len(rows[0] if rows else [])
    widths = [max([len(c)] + [len(r[j]) for r in shown]) for j, c in enumerate(cols)]
    numeric = [all(isinstance(r[j], (int, float)) for r in rows[:limit] if r[j] is not None) and bool(rows)
               for j in range(len(cols))]

    def line(cells):
        return "  ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(cells, widths, numeric)).rstrip()

    out = [line(cols), "  ".join("-" * w for w in widths)] + [line(r) for r in shown]
    n = len(rows)
    more = f", first {limit} shown" if n > limit else ""
    out.append(f"({'at least ' if truncated else ''}{n} row{'s' if n != 1 else ''}{more})")
    return "\n".join(out)


def explain(t) -> str:
    """What each step of the chain did for one question (the fields of its mcp.Trace that are set)."""
    steps = [("SL answer", t.sl_answer),
             ("linked", ", ".join(f"{table}({', '.join(sorted(c))})" for table, c in t.linked.items())),
             ("pre-SQL", t.pre_sql), ("TS", t.ts_sql),
             ("votes", "; ".join(f"{c['source']}: {c['error'] or 'group %d' % c['group']}" for c in t.candidates)),
             ("NC", " -> ".join(x for x in (t.nc, t.nc_sql) if x) if t.nc else ""),
             ("CW", " -> ".join(x for x in (t.cw, t.cw_answer) if x) if t.cw else "")]
    shown = [(k, " ".join(str(v).split())) for k, v in steps if v]
    if not shown:
        return "  steps: plain text-to-SQL (no MCP steps ran)"
    return "  steps:\n" + "\n".join(f"    {k:<10} {v}" for k, v in shown)


def answer(chain, db_path, question: str, show_steps: bool, out, progress: bool = False):
    """Run one question through `chain` and print what it gave; returns its trace. progress: each step's
    progress bar on stderr while it runs."""
    t0 = time.perf_counter()
    traces, _ = chain(load_sqlite(db_path, question).examples, progress=progress)
    seconds, tr = time.perf_counter() - t0, traces[0]
    print(f"SQL: {tr.sql or '(none)'}", file=out)
    # the chain ran the final SQL already, with the same timeout: this is the cached result, not a second run
    res = open_database(db_path).execute(tr.sql, timeout=TIMEOUT) if tr.sql and not tr.error else None
    if res is None or res.error:
        print(f"error: {res.error if res else tr.error or 'the model wrote no SQL'}", file=out)
    else:
        print(format_table(res.columns, res.rows, truncated=res.truncated), file=out)
    if tr.agree and tr.agree[0] < tr.agree[1]:
        print(f"note: only {tr.agree[0]} of {tr.agree[1]} candidate queries return this result: check it "
              "(.explain shows them)", file=out)
    print(f"({seconds:.1f} s)", file=out)
    if show_steps:
        print(explain(tr), file=out)
    return tr


def _questions(stdin, out):
    """Questions until an empty line or end of input: a terminal's with a prompt (input(), with readline's line
    editing where Python has it), a pipe's echoed."""
    tty = stdin.isatty()
    if tty:
        try:
            import readline  # noqa: F401  (importing it gives input() line editing and history)
        except ImportError:  # not on every platform (Windows)
            pass
    while True:
        line = input("question> ") if tty else stdin.readline()
        if line and not tty:
            print(f"> {line.rstrip()}", file=out)
        if not line.strip():
            return
        yield line.strip()


def run_session(chain, db_path, show_steps: bool = False, stdin=None, out=None) -> int:
    """The loop: answer each question as it comes. Ends cleanly, with status 0, on an empty line, end of
    input (Ctrl-D) or Ctrl-C, including one that arrives while the model is writing."""
    stdin, out = stdin or sys.stdin, out or sys.stdout
    db = open_database(db_path)  # fails here, before any question, on a file that is not SQLite
    tables = ", ".join(t.name for t in db.tables[:8]) + (", ..." if len(db.tables) > 8 else "")
    hint = "" if show_steps else " Type .explain to see the steps behind the last answer."
    last = None
    try:
        print(f"{db.name}: {len(db.tables)} tables ({tables}). Ask a question; an empty line, Ctrl-D or Ctrl-C "
              f"ends.{hint}", file=out, flush=True)
        for q in _questions(stdin, out):
            if q == ".explain":
                print(explain(last) if last else "no question answered yet", file=out)
                continue
            last = answer(chain, db_path, q, show_steps, out, progress=out is sys.stdout and sys.stderr.isatty())
            print(file=out, flush=True)
    except (KeyboardInterrupt, EOFError):  # Ctrl-C anywhere, Ctrl-D at input()
        print(file=out)
    print("bye", file=out, flush=True)
    return 0
