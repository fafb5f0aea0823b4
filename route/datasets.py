"""Text-to-SQL datasets: Spider, BIRD, or one SQLite file of the user's, as a list of Examples.

ROUTE (Qin et al., ICLR 2025) trains on Spider's and BIRD's training sets and evaluates on their dev sets
(Sec. 4.1). Their layouts as downloaded:

    Spider: dev.json, train_spider.json, train_others.json, test.json, tables.json,
            database/<db>/<db>.sqlite (test_database/ for the test split)
    BIRD:   dev.json (with "evidence" and "difficulty"), dev_tables.json, dev_databases/<db>/<db>.sqlite,
            and the same with train_ for the training split

An example whose database file is missing is skipped and counted; malformed JSON is an error naming file and place.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path


class DatasetError(ValueError):
    pass


# The validation protocol: whole databases of Spider's train_spider.json held out of MSFT training (msft.build
# skips them), so that every choice (recipe, data mix, prompts, which adapter ships) is made cross-database, as
# Spider dev tests it, and never on dev questions. `val`: 20 databases, 922 questions, drawn at random across all
# sizes so that its profile (tables and columns per database, JOIN / nested / GROUP BY shares, hardness mix)
# matches dev's; `val2`: 10 other databases, 461 questions, drawn the same way, the second check. A change counts
# when it wins on both. bench/split.py redoes the draw and prints both profiles beside dev_sample.json's.
# `load_dataset(root, "val")` / `"val2"` read them.
VALIDATION_DBS = ("aircraft", "candidate_poll", "chinook_1", "decoration_competition", "e_learning", "election",
                  "entrepreneur", "game_injury", "insurance_fnol", "insurance_policies", "manufactory_1", "music_4",
                  "network_2", "party_host", "phone_1", "riding_club", "school_bus", "school_player", "ship_1",
                  "workshop_paper")
VALIDATION_DBS_2 = ("apartment_rentals", "company_employee", "driving_school", "epinions_1", "farm",
                    "flight_company", "perpetrator", "pilot_record", "soccer_2", "tracking_share_transactions")
HELD_OUT_DBS = VALIDATION_DBS + VALIDATION_DBS_2  # never in MSFT training data

MAX_QUESTION = 2000  # characters; Spider's longest question has about 200. A longer one is refused, not cut:
                     # a question cut short is a different question, and the model would answer that one


def check_question(question: str, where: str) -> str:
    if len(question) > MAX_QUESTION:
        raise DatasetError(f"{where} is {len(question)} characters long; at most {MAX_QUESTION} are answered "
                           "(route.datasets.MAX_QUESTION)")
    return question


@dataclass
class Example:
    question: str
    db_id: str
    db_path: Path
    gold_sql: str = ""
    evidence: str = ""  # BIRD's external knowledge: the prompt shows it as a hint
    index: int = 0  # the official id where the file has one (BIRD question_id, dev_index), else the position
    difficulty: str = ""  # the dataset's own label (BIRD: simple / moderate / challenging); "" for Spider
    position: int = 0  # where it stands in the input file(s), counting skipped examples: line N of a prediction file


@dataclass
class Dataset:
    name: str
    examples: list[Example]
    skipped: int = 0  # examples dropped because their database file is missing
    missing_dbs: set[str] = field(default_factory=set)
    skipped_examples: list[Example] = field(default_factory=list)  # in file order; their db_path does not exist
    id_key: str = "position"  # the file's own id field: "question_id" (BIRD), "dev_index", or none (position)

    @property
    def kind(self) -> str:
        """'spider', 'bird' or 'sqlite': which official prediction format fits (the name's first part)."""
        return self.name.split("/")[0]

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __repr__(self) -> str:
        skipped = f", {self.skipped} skipped (missing databases: {sorted(self.missing_dbs)})" if self.skipped else ""
        return f"Dataset({self.name!r}, {len(self.examples)} examples{skipped})"


def read_json(path: Path):
    try:
        text = path.read_text(encoding="utf-8-sig")  # some BIRD files start with a BOM
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DatasetError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def default_root() -> Path:
    """--data when none is given (train.py, route.msft, bench/): $ROUTE_DATA, else data/spider in the repository."""
    return Path(os.environ.get("ROUTE_DATA") or Path(__file__).resolve().parents[1] / "data" / "spider")


def layout(root: Path) -> str:
    """'spider' or 'bird', from the files in root."""
    if (root / "database").is_dir() or (root / "tables.json").is_file():
        return "spider"
    if any(root.glob("*_databases")) or any(root.glob("*_tables.json")):
        return "bird"
    raise DatasetError(f"{root}: neither a Spider layout (database/, tables.json) nor a BIRD layout (dev_databases/, "
                       "dev_tables.json); download Spider (https://yale-lily.github.io/spider) or BIRD "
                       "(https://bird-bench.github.io), unzip it there or name it with --data or ROUTE_DATA")


def _files_and_db_dirs(root: Path, kind: str, split: str) -> tuple[list[Path], list[Path]]:
    if split.endswith(".json") or "/" in split or "\\" in split:  # a file, not a split name
        as_path = Path(split)
        path = as_path if as_path.is_absolute() or as_path.is_file() else root / as_path
        stem = path.stem.split("_")[0]  # dev_sample.json -> dev: which database folder to look in first
        if kind == "spider":
            db_dirs = [root / "test_database", root / "database"] if stem == "test" else [root / "database"]
        else:
            db_dirs = [root / f"{stem}_databases"] + sorted(root.glob("*_databases"))
        return [path], db_dirs
    if kind == "spider":
        files = {"train": [root / "train_spider.json", root / "train_others.json"],
                 "val": [root / "train_spider.json"],
                 "val2": [root / "train_spider.json"]}.get(split, [root / f"{split}.json"])
        db_dirs = [root / "test_database", root / "database"] if split == "test" else [root / "database"]
        return files, db_dirs
    return [root / f"{split}.json"], [root / f"{split}_databases"]


def load_dataset(root: str | Path, split: str = "dev") -> Dataset:
    """Examples of a Spider or BIRD split. `split` is a name ("dev", "train", "test"; Spider's train is
    train_spider.json + train_others.json; "val" and "val2" are this project's validation checks, the questions
    of VALIDATION_DBS and VALIDATION_DBS_2 in train_spider.json) or a JSON file in the official format (e.g.
    dev_sample.json)."""
    root = Path(root)
    kind = layout(root)
    files, db_dirs = _files_and_db_dirs(root, kind, str(split))
    val = {"val": VALIDATION_DBS, "val2": VALIDATION_DBS_2}.get(split) if kind == "spider" else None
    # val's id is the question's position in train_spider.json; others name the file's own id field
    ds = Dataset(f"{kind}/{Path(split).stem}", [], id_key="train_index" if val else "position")
    seen = 0  # records read from the files: the id of a record without one (a split's position may differ: val)
    for path in files:
        records = read_json(path)
        if not isinstance(records, list):
            raise DatasetError(f"{path}: expected a JSON list of examples, got {type(records).__name__}")
        for i, r in enumerate(records):
            try:
                question, db_id = r["question"].strip(), str(r["db_id"])
                gold = (r.get("query", r.get("SQL")) or "").strip()
                evidence = (r.get("evidence") or "").strip()
                index = int(r.get("question_id", r.get("dev_index", seen)))
            except (KeyError, TypeError, AttributeError, ValueError):
                raise DatasetError(f"{path}: example {i} is not a dict with a 'question' string and a 'db_id'"
                                   ) from None
            if seen == 0 and not val:
                ds.id_key = next((k for k in ("question_id", "dev_index") if k in r), "position")
            seen += 1
            if val and db_id not in val:
                continue  # not in the split: its prediction file counts the split's questions only
            check_question(question, f"{path}: the question of example {i}")
            candidates = [d / db_id / f"{db_id}.sqlite" for d in db_dirs]
            db_path = next((c for c in candidates if c.is_file()), None)
            ex = Example(question, db_id, db_path or candidates[0], gold, evidence, index, r.get("difficulty", ""),
                         position=len(ds.examples) + ds.skipped)
            if db_path is None:
                ds.skipped += 1
                ds.missing_dbs.add(db_id)
                ds.skipped_examples.append(ex)
            else:
                ds.examples.append(ex)
    return ds


def load_sqlite(path: str | Path, questions) -> Dataset:
    """A user's own database and questions: a string, a list of strings, or dicts with "question" (and
    optionally "query"/"SQL" and "evidence")."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no SQLite database at {path}")
    with path.open("rb") as f:
        if f.read(16) != b"SQLite format 3\x00":
            raise DatasetError(f"{path}: not a SQLite database file")
    if isinstance(questions, (str, dict)):
        questions = [questions]
    examples = []
    for i, q in enumerate(questions):
        q = {"question": q} if isinstance(q, str) else q
        check_question(q["question"], "the question" if len(questions) == 1 else f"question {i + 1}")
        gold = q.get("query", q.get("SQL", ""))
        examples.append(Example(q["question"].strip(), path.stem, path, gold, q.get("evidence", ""), i, position=i))
    return Dataset(f"sqlite/{path.stem}", examples)
