"""The hostile queries of tests/test_security.py, timed one by one: seconds, memory and what came back.

    python bench/security.py [--repo DIR] [--timeout 1] [--limit 60]

Each query runs in a fresh process (so its peak memory is its own) on a fresh copy of Spider's concert_singer
with an FTS4 table added, through route.database as found in --repo (default: this checkout; give an older
checkout to measure the code before a change). A query still running after --limit seconds is killed.
"""
import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DB = ROOT / "data" / "demo" / "database" / "concert_singer" / "concert_singer.sqlite"  # Spider's, as shipped

ATTACKS = {
    "fts3_tokenizer('simple')": "SELECT fts3_tokenizer('simple')",
    "28 /**/ comments before x": "/**/" * 28 + "x",
    "instr on a 1e8-character string": "SELECT instr(printf('%.*c', 100000000, 'a'), 'x')",
    "zeroblob(1e9)": "SELECT zeroblob(1e9)",
    "randomblob(5e8)": "SELECT randomblob(5e8)",
    "printf('%900000000s')": "SELECT printf('%900000000s')",
    "1,024 rows of 2 MB": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1024) "
                          "SELECT randomblob(2000000) FROM c",
    "1,024 rows of 1 MB": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c WHERE x < 1024) "
                          "SELECT randomblob(1000000) FROM c",
    "randomblob(7e7) FROM singer": "SELECT randomblob(70000000) FROM singer",
    "instr, 1 MB in 0.5 MB (quadratic)": "WITH s(a) AS (SELECT printf('%.*c', 1000000, 'a')) "
                                        "SELECT instr(a, substr(a, 1, 500000) || 'b') FROM s",
    "ltrim, 1 MB by 80k characters": "WITH s(a) AS (SELECT printf('%.*c', 1000000, 'a')) "
                                     "SELECT length(ltrim(a, printf('%.*c', 80000, 'b') || 'a')) FROM s",
    "printf('%.*c', 2e9, 'a')": "SELECT length(printf('%.*c', 2000000000, 'a'))",
    "recursive CTE without end": "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) "
                                 "SELECT count(*) FROM c",
    "cartesian product, 6^12 rows": "SELECT count(*) FROM " + ", ".join(f"singer s{i}" for i in range(12)),
}

CHILD = """
import json, sys, time
sys.path.insert(0, sys.argv[1])
from route.database import Database
def peak():
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith('VmHWM'))
db = Database(sys.argv[2])
before = peak()
start = time.monotonic()
r = db.execute(sys.argv[3], timeout=float(sys.argv[4]))
print(json.dumps({"seconds": time.monotonic() - start, "grown": peak() - before, "error": r.error,
                  "rows": len(r.rows), "truncated": r.truncated}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(ROOT), help="the checkout whose route.database runs the queries")
    ap.add_argument("--timeout", type=float, default=1.0, help="the query timeout given to execute()")
    ap.add_argument("--limit", type=float, default=60.0, help="kill a query's process after this many seconds")
    args = ap.parse_args()
    print(f"route.database from {args.repo}, timeout {args.timeout:g} s\n")
    print(f"| {'query':<36} | seconds | memory | result |\n| --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory() as tmp:
        for name, sql in ATTACKS.items():
            path = Path(tmp) / f"{len(list(Path(tmp).iterdir()))}.sqlite"
            shutil.copy(DB, path)
            conn = sqlite3.connect(path)
            conn.executescript("CREATE VIRTUAL TABLE notes USING fts4(body); INSERT INTO notes VALUES ('hello');")
            conn.close()
            start = time.monotonic()
            try:
                done = subprocess.run([sys.executable, "-c", CHILD, args.repo, str(path), sql, str(args.timeout)],
                                      capture_output=True, text=True, timeout=args.limit)
                out = json.loads(done.stdout) if done.returncode == 0 else None
                result = (out["error"] or f"{out['rows']} rows" + (" (truncated)" if out["truncated"] else "")
                          if out else f"exit {done.returncode}")
                seconds = f"{out['seconds']:.2f}" if out else f"{time.monotonic() - start:.1f}"
                memory = f"{out['grown'] / 2**20:.0f} MB" if out else "?"
            except subprocess.TimeoutExpired:
                seconds, memory, result = f"> {args.limit:g}", "?", "killed"
            print(f"| {name:<36} | {seconds} | {memory} | {result[:70]} |", flush=True)


if __name__ == "__main__":
    main()
