"""Seconds per question in an interactive session (`infer.py --db F`), as a user meets them.

    python bench/session.py [--fast] [--db PATH] [--model DIR] [--quant int8]

Pipes questions into one session and reads back each answer's SQL, result and time. Without --db it writes the
issue's two-table shop (customers, orders) and asks its questions, with their expected results; with --db it
asks the --questions given. The first question pays for the schema's prefill; later ones reuse it.
"""
import argparse
import re
import sqlite3
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from route.evaluate import results_match  # noqa: E402  (Spider's equality: row order and column order free)
SHOP = [("Which city has the most customers?", [("Lyon",)]),
        ("What is the total spent by each customer, highest first?", [("Ana", 170.0), ("Bo", 40.0), ("Cy", 15.0)]),
        ("How many orders are there?", [(4,)]),
        ("Which customers have no orders?", [("Dee",)]),
        ("What is the average order total?", [(56.25,)])]


def write_shop(path: Path) -> Path:
    con = sqlite3.connect(path)
    con.executescript("""
        CREATE TABLE customers (id INTEGER PRIMARY KEY, name TEXT, city TEXT);
        CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER REFERENCES customers(id), total REAL);
        INSERT INTO customers VALUES (1, 'Ana', 'Lyon'), (2, 'Bo', 'Lyon'), (3, 'Cy', 'Nice'), (4, 'Dee', 'Paris');
        INSERT INTO orders VALUES (1, 1, 120.0), (2, 1, 50.0), (3, 2, 40.0), (4, 3, 15.0);""")
    con.commit()
    con.close()
    return path


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default=None)
    ap.add_argument("--questions", nargs="*", default=[])
    args, extra = ap.parse_known_args()  # the rest are infer.py's options (--fast, --model ...): --mcp unless --fast
    db = Path(args.db) if args.db else write_shop(Path(tempfile.mkdtemp()) / "shop.sqlite")
    asked = [(q, None) for q in args.questions] if args.db else SHOP
    cmd = [sys.executable, str(ROOT / "infer.py"), "--db", str(db)]
    cmd += extra if "--fast" in extra else ["--mcp", *extra]
    out = subprocess.run(cmd, input="".join(q + "\n" for q, _ in asked), capture_output=True, text=True,
                         cwd=ROOT).stdout
    answers = out.split("\n> ")[1:]
    for (q, want), text in zip(asked, answers):
        secs = re.search(r"\((\d+\.\d) s\)", text)
        sql = re.search(r"SQL: (.*?)\n(?:error:|[^\n]*\n-+(?:  -+)*\n)", text, re.S)  # up to the table's header
        got = None
        if want is not None and sql:
            try:
                got = sqlite3.connect(f"file:{db}?mode=ro", uri=True).execute(sql.group(1)).fetchall()
            except sqlite3.Error:
                got = "error"
        ok = isinstance(got, list) and results_match(got, want, False)
        right = "" if want is None else "right" if ok else "wrong"
        note = " (candidates disagree)" if "candidate queries return" in text else ""
        shown = " ".join(sql.group(1).split()) if sql else "-"  # on one line (literals' spacing aside)
        print(f"{secs.group(1) if secs else '?':>6} s  {right:5}  {q}{note}\n         {shown}")
    if len(answers) < len(asked):
        print(out[-2000:])


if __name__ == "__main__":
    main()
