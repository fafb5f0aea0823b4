"""The validation protocol's databases: how they were drawn, and their profile beside Spider dev's.

    python bench/split.py [--data DIR]                        # profile of val, val2 and dev_sample
    python bench/split.py --draw                              # redo the draw (prints the tuples in datasets.py)

Spider dev asks about databases it never trains on, and its databases are bigger and its queries harder than
an average handful of small training databases. So the split is whole training databases, drawn at random across
all sizes, and kept only if the draw's profile looks like dev's. The profile is of gold SQL and schemas, never
of a model's score, so printing it beside dev_sample.json's spends nothing.

The draw: 4,000 random sets of 20 databases of train_spider.json (seeded), those with 900-1,100 questions; the one
whose profile is nearest dev's (the profile of dev_sample.json's questions, standing in for dev) is `val`. Then
the same on the databases left, 10 at a time with 450-550 questions: `val2`, the second check. Distance: the
sum over the profile's entries of the squared difference in units of a typical spread (tables 1, columns 5,
shares 0.05).

train_others.json (geo, restaurants, academic, scholar, imdb, yelp) would be a natural second check, but every
one of its six databases is empty in Spider's release: each gold query returns no rows, so execution accuracy
there only says whether the SQL runs. It stays in training, and val2 is the second check.
"""
import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from route.datasets import VALIDATION_DBS, VALIDATION_DBS_2, default_root  # noqa: E402
from route.sql import LEVELS, difficulty, parse  # noqa: E402
from sqlglot import exp  # noqa: E402

# the split issues 12-18 chose on: the 69 training databases with at most 40 questions, shuffled, the first 15
EARLIER = ("epinions_1", "station_weather", "wedding", "news_report", "farm", "mountain_photos", "local_govt_in_alabama",
           "school_bus", "railway", "game_injury", "party_host", "body_builder", "entertainment_awards",
           "riding_club", "company_1")
KEYS = ("tables", "columns", "join", "nested", "group", "easy", "medium", "hard", "extra")
SCALE = {"tables": 1.0, "columns": 5.0}  # the shares' scale is 0.05


def query_features(sql: str) -> dict:
    tree = parse(sql)
    level = difficulty(sql)
    f = {"join": 0, "nested": 0, "group": 0, **{lv: level == lv for lv in LEVELS}}
    if tree is not None:
        f["join"] = any(True for _ in tree.find_all(exp.Join))
        f["nested"] = any(isinstance(s, exp.Select) and s is not tree for s in tree.find_all(exp.Select)) \
            or any(True for _ in tree.find_all(exp.Union, exp.Intersect, exp.Except))
        f["group"] = any(True for _ in tree.find_all(exp.Group))
    return f


def db_sums(records, schemas) -> dict:
    """Per question: its database's tables and columns, and the gold query's features; summed."""
    s = schemas[records[0]["db_id"]]
    out = {k: 0.0 for k in KEYS}
    for r in records:
        f = {"tables": len(s["table_names_original"]), "columns": len(s["column_names_original"]) - 1,
             **query_features(r["query"])}
        for k in KEYS:
            out[k] += float(f[k])
    out["questions"], out["dbs"] = len(records), 1
    return out


def profile(sums) -> dict:
    """The averages over a set of databases' questions (db_sums of each)."""
    total = {k: sum(s[k] for s in sums) for k in KEYS + ("questions", "dbs")}
    return {**{k: total[k] / total["questions"] for k in KEYS}, "questions": total["questions"], "dbs": total["dbs"]}


def distance(p, q) -> float:
    return sum(((p[k] - q[k]) / SCALE.get(k, 0.05)) ** 2 for k in KEYS)


def draw(sums, target, pool, size, lo, hi, seed, tries=4000):
    rng, best = random.Random(seed), None
    pool = sorted(pool)
    for _ in range(tries):
        dbs = rng.sample(pool, size)
        if lo <= sum(sums[d]["questions"] for d in dbs) <= hi:
            d = distance(profile([sums[db] for db in dbs]), target)
            if best is None or d < best[0]:
                best = (d, tuple(sorted(dbs)))
    return best[1]


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(default_root()))
    ap.add_argument("--draw", action="store_true", help="redo the draw and print the database tuples")
    args = ap.parse_args(argv)
    root = Path(args.data)
    schemas = {s["db_id"]: s for s in json.load(open(root / "tables.json"))}
    train = json.load(open(root / "train_spider.json"))
    dev = json.load(open(root / "dev_sample.json"))
    by_db = defaultdict(list)
    for r in train:
        if (root / "database" / r["db_id"] / f"{r['db_id']}.sqlite").is_file():
            by_db[r["db_id"]].append(r)
    sums = {db: db_sums(rs, schemas) for db, rs in by_db.items()}
    per_db = lambda records: [db_sums([r for r in records if r["db_id"] == d], schemas)  # noqa: E731
                              for d in {r["db_id"] for r in records}]
    target = profile(per_db(dev))
    val, val2 = VALIDATION_DBS, VALIDATION_DBS_2
    if args.draw:
        val = draw(sums, target, sums, 20, 900, 1100, seed=0)
        val2 = draw(sums, target, set(sums) - set(val), 10, 450, 550, seed=1)
        print(f"VALIDATION_DBS = {val}\nVALIDATION_DBS_2 = {val2}\n")
    rows = [("dev_sample.json (dev)", target),
            ("val", profile([sums[d] for d in val])),
            ("val2", profile([sums[d] for d in val2])),
            ("the earlier split (15 small dbs)", profile([sums[d] for d in EARLIER])),
            ("training databases left", profile([sums[d] for d in set(sums) - set(val) - set(val2)])),
            ("train_others.json (empty dbs)", profile(per_db(json.load(open(root / "train_others.json")))))]
    print(f"{'':32}{'dbs':>5}{'qs':>6}{'tables':>8}{'cols':>7}" + "".join(f"{k:>8}" for k in KEYS[2:]))
    for name, p in rows:
        print(f"{name:32}{p['dbs']:>5}{p['questions']:>6}{p['tables']:>8.1f}{p['columns']:>7.1f}"
              + "".join(f"{100 * p[k]:>7.1f}%" for k in KEYS[2:]))
    for name, p in rows[1:3]:
        print(f"distance to dev: {name} {distance(p, target):.2f}")


if __name__ == "__main__":
    main()
