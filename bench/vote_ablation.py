"""Offline ablation of the vote (step 2 of the chain) from traces written with --samples N.

    python bench/vote_ablation.py runs/val_a.jsonl [runs/val_b.jsonl] --data data/spider --split val

For each setting it re-runs the vote on the candidates a trace recorded (re-executing them), so one chain run
answers: how many samples pay, what repair adds, and, given two traces (say the untuned model's and the
adapter's), what a vote over both models' candidates would answer. It scores the vote's answer, i.e. the
chain cut before NC and CW.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.steps import read_traces, traces_and_split  # noqa: E402
from route.database import open_database  # noqa: E402
from route.evaluate import evaluate  # noqa: E402
from route.repair import repair  # noqa: E402
from route.vote import Candidate, vote  # noqa: E402


def run(db, sql, cache):
    if (db.path, sql) not in cache:
        cache[db.path, sql] = db.execute(sql, timeout=10)
    return cache[db.path, sql]


def answer(dbs_rows, k: int, repaired: bool, cache: dict) -> list[str]:
    preds = []
    for db, rows in dbs_rows:
        cands = []
        for tr in rows:  # several traces: their candidates in turn (the first trace's greedy TS breaks ties)
            for c in tr["candidates"]:
                src = c["source"].split("+")[0]
                if src.startswith("sample") and int(src.split()[1]) > k:
                    continue
                sql = c.get("written", c["sql"])
                res = run(db, sql, cache)
                if res.error is not None and repaired and (fixed := repair(sql, db)):  # today's repair.py
                    if (res2 := run(db, fixed, cache)).error is None:
                        sql, res = fixed, res2
                cands.append(Candidate(sql, src, res.error, res.rows))
        preds.append(cands[vote(cands)].sql if cands else "")
    return preds


def main(argv=None):
    args, ds = traces_and_split(argv)
    traces = {p: read_traces(p, len(ds.examples))[0] for p in args.traces}
    n = max(sum(c["source"].startswith("sample") for c in tr[0]["candidates"]) for tr in traces.values())
    dbs = [open_database(e.db_path) for e in ds.examples]
    cache: dict = {}
    settings = [(k, rep) for k in sorted({0, 1, 2, 4, n}) if k <= n for rep in (False, True)]
    print(f"{'traces':50}{'samples':>8}{'repair':>8}{'EX':>7}{'fails':>7}")
    groups = [[p] for p in args.traces] + ([args.traces] if len(args.traces) > 1 else [])
    for group in groups:
        for k, rep in settings:
            preds = answer([(db, [traces[p][i] for p in group]) for i, db in enumerate(dbs)], k, rep, cache)
            fails = sum(cache[db.path, s].error is not None for db, s in zip(dbs, preds) if (db.path, s) in cache)
            ex = 100 * evaluate(preds, ds.examples).accuracy
            name = " + ".join(Path(p).name for p in group)
            print(f"{name:50}{k:>8}{'yes' if rep else 'no':>8}{ex:>7.1f}{100 * fails / len(preds):>6.1f}%")


if __name__ == "__main__":
    main()
