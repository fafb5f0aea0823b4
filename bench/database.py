"""How fast route.database and route.evaluate answer: the figures the tests used to assert as time limits.

    python bench/database.py [--data DIR]     # default: $ROUTE_DATA, else data/spider

Timings depend on the machine and its load, so they live here, printed, not in the tests (which check only
what happens: a runaway query ends with a timeout error, a huge junk query is refused). Each figure is the
best of --repeat runs (scoring: one cold run), with the target it used to be held to:

  - refusing 100,000 spaces + "x"           (no regex backtracking in the query check)   target < 0.5 s
  - a runaway query with timeout=0.5 s      (how late the interrupt comes)                target < 1.5 s
  - 500 distinct point queries on world_1   (connection reuse, no reopen per query)       target < 1.0 s
  - scoring dev_sample's 200 gold queries   (route.evaluate, Spider semantics)            target < 2.0 s
"""
import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from route.database import Database  # noqa: E402
from route.datasets import default_root, layout, load_dataset  # noqa: E402
from route.evaluate import evaluate  # noqa: E402

RUNAWAY = ["WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c) SELECT count(*) FROM c",
           "SELECT count(*) FROM city a, city b, city c"]


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(default_root()))
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    layout(Path(args.data))
    world = Path(args.data) / "database" / "world_1" / "world_1.sqlite"
    rows = []

    def fresh():  # a new connection each run: Database caches results by SQL
        return Database(world)

    rows.append(("refuse 100k spaces + 'x'", best(lambda: fresh().execute(" " * 100_000 + "x"), args.repeat), 0.5))
    for sql in RUNAWAY:
        def runaway():
            r = fresh().execute(sql, timeout=0.5)
            assert (r.error or "").startswith("timeout"), r.error
        rows.append((f"runaway query, timeout 0.5 s: {sql[:30]}...", best(runaway, args.repeat), 1.5))

    def points():
        db = fresh()
        for i in range(500):
            assert db.execute(f"SELECT Name FROM city WHERE ID = {i + 1}").ok
    rows.append(("500 distinct point queries (world_1)", best(points, args.repeat), 1.0))

    data = load_dataset(args.data, "dev_sample.json")
    golds = [e.gold_sql for e in data.examples]

    def score():  # once, cold: open_database keeps each database and its result cache for the process
        report = evaluate(golds, data)
        assert report.accuracy == 1.0
    rows.append(("evaluate dev_sample's 200 gold queries (cold)", best(score, 1), 2.0))

    width = max(len(name) for name, _, _ in rows)
    print(f"{'':{width}}  seconds  target")
    for name, seconds, target in rows:
        print(f"{name:{width}}  {seconds:7.3f}  < {target:g}{'' if seconds < target else '  (over)'}")


if __name__ == "__main__":
    from route.cli import run
    run(main)  # a missing dataset: one line naming it
