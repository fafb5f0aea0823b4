"""route.values: the database's cells that a question mentions, found despite case, accents and typos, bounded
on hostile databases, cached by file hash, and shown to SL and TS by the chain."""
import sqlite3

import pytest

from route import values
from route.database import open_database
from route.datasets import Example
from route.mcp import run_chain
from route.values import ValueLinker, build_index, describe, load_index


@pytest.fixture
def shop(tmp_path):
    path = tmp_path / "shop.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript("""
        CREATE TABLE customer (id INTEGER PRIMARY KEY, name TEXT, city varchar(30), country TEXT, age INT,
                               note TEXT, photo BLOB);
        CREATE TABLE "order item" (id INT, customer_id INT REFERENCES customer(id), "product name" TEXT);
    """)
    rows = [(1, "Diana Smith", "Zürich", "Switzerland", 31), (2, "Ann O'Neil", "New York City", "United States", 40),
            (3, "Bob Stone", "Metallica Town", "United Kingdom", 22), (4, "Zoe Park", "Calgary", "Canada", 50)]
    conn.executemany("INSERT INTO customer VALUES (?, ?, ?, ?, ?, ?, ?)",
                     [r + ("x" * 5000, b"\xff" * 70000) for r in rows])  # a huge string and a blob per row
    conn.executemany('INSERT INTO "order item" VALUES (?, ?, ?)',
                     [(1, 1, "Espresso Machine"), (2, 2, "Blue Kettle"), (3, 4, "The Who")])
    conn.commit()
    conn.close()
    return path


def test_index_holds_short_text_cells_only(shop):
    index = build_index(open_database(shop))
    cells = {tuple(c) for c in index["cells"]}
    assert ("customer", "city", "Zürich") in cells and ("order item", "product name", "Blue Kettle") in cells
    assert not any(c[1] in ("note", "photo", "age", "id") for c in cells)  # huge strings, blobs, numbers: out
    assert index["partial"] is False


@pytest.mark.parametrize("question, expected", [
    ("How old is the customer from zurich?", ("customer", "city", "Zürich")),          # accent and case
    ("Which customers live in CALGARY?", ("customer", "city", "Calgary")),
    ("Who ordered the blue kettle?", ("order item", "product name", "Blue Kettle")),
    ("How many customers come from Switzerlnd?", ("customer", "country", "Switzerland")),  # a letter missing
    ("How many customers come from Swtizerland?", ("customer", "country", "Switzerland")),  # two swapped
    ("List customers whose name contains \"Diana\".", ("customer", "name", "Diana Smith")),  # a quoted name
    ("Who bought the espresso machine?", ("order item", "product name", "Espresso Machine")),
])
def test_matches_as_stored(shop, question, expected):
    found = ValueLinker(build_index(open_database(shop))).match(question)
    assert found[0] == expected


def test_no_noise_from_common_words(shop):
    linker = ValueLinker(build_index(open_database(shop)))
    assert linker.match("How many customers are there?") == []
    assert linker.match("Show the name of the oldest customer.") == []
    # "united" alone is half of two countries' names, and not a name the question capitalizes: neither matches
    assert linker.match("Which customers are united?") == []
    assert linker.match("Which customers are from the United Kingdom?")[0] == ("customer", "country", "United Kingdom")
    # short words never match fuzzily: "who" is not a typo of "Who" in 'The Who' (a cell of stop words only)
    assert ("order item", "product name", "The Who") not in linker.match("Who is the oldest customer?")


def test_prompt_lines_quote_names_and_values(shop):
    linker = ValueLinker(build_index(open_database(shop)))
    text = describe(linker.match("Which customer is named \"Ann O'Neil\"?") + linker.match("the blue kettle")
                    + [("customer", "city", "Calgary"), ("order item", "product name", "Calgary")])
    assert text.splitlines() == ["'Ann O''Neil' (customer.name)", "'Blue Kettle' (\"order item\".\"product name\")",
                                 "'Calgary' (customer.city, \"order item\".\"product name\")"]
    conn = sqlite3.connect(shop)  # each line's value, as SQL, is stored in the first column it names
    for line in text.splitlines():
        value, columns = line.rsplit(" (", 1)
        column = columns.rstrip(")").split(", ")[0]
        table = column.rsplit(".", 1)[0]
        assert conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = {value}").fetchone()[0] == 1


def test_named_things_crowd_out_common_words(shop):
    """A small model turns every value it is shown into a condition: where the question names something, only
    the cells holding that name are shown; a schema's own words never match a value by a typo."""
    index = build_index(open_database(shop))
    linker = ValueLinker(index)
    assert linker.match("Which buyers are from calgary?") == [("customer", "city", "Calgary")]
    # ... but beside things the question names (quoted, capitalized), an unnamed match is left out
    assert set(linker.match("Which \"Blue Kettle\" buyers from calgary live in New York City?")) == {
        ("order item", "product name", "Blue Kettle"), ("customer", "city", "New York City")}
    assert linker.match("Who ordered the blue kettle?") == [("order item", "product name", "Blue Kettle")]
    assert linker.match("which customers are in canad?") == [("customer", "country", "Canada")]  # a typo
    # ... unless the word is one of the schema's names: then it means the column, not a misspelt value
    assert ValueLinker(index, names={"canad"}).match("which customers are in canad?") == []


def test_empty_database_and_read_only(tmp_path):
    path = tmp_path / "empty.sqlite"
    sqlite3.connect(path).execute("CREATE TABLE t (a TEXT)").connection.close()
    before = path.read_bytes()
    index = build_index(open_database(path))
    assert index == {"cells": [], "partial": False}
    assert ValueLinker(index).match("anything at all?") == []
    assert path.read_bytes() == before


def test_bounded_in_time_and_size(tmp_path, monkeypatch):
    path = tmp_path / "big.sqlite"
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE t (a TEXT, b TEXT)")
    conn.executemany("INSERT INTO t VALUES (?, ?)", ((f"value {i}", "same") for i in range(3000)))
    conn.commit()
    conn.close()
    monkeypatch.setattr(values, "MAX_PER_COLUMN", 1000)
    index = build_index(open_database(path))
    assert index["partial"] and len(index["cells"]) == 1000 + 1  # 1,000 of a's distinct cells, b's one
    assert build_index(open_database(path), seconds=0)["partial"]  # no time at all: nothing read, and it says so


def test_cached_by_file_hash(shop, tmp_path, capsys):
    db = open_database(shop)
    first = load_index(db, home=tmp_path)
    files = list((tmp_path / "values").glob("*.json"))
    assert len(files) == 1 and load_index(db, home=tmp_path) == first
    files[0].write_text("{ not json")  # a damaged cache file is rebuilt, not an error
    assert load_index(db, home=tmp_path) == first


def test_chain_shows_values_to_sl_and_ts_only(shop, tmp_path, monkeypatch):
    import re

    from test_mcp import TASKS  # the task markers of the prompts
    monkeypatch.setenv("ROUTE_HOME", str(tmp_path))
    seen = []

    def fake(lm, tok, prompt_list, **kw):
        outs = []
        for parts in prompt_list:
            text = "".join(x if isinstance(x, str) else tok.decode(x, skip_special=False) for x in parts)
            task = next(t for marker, t in TASKS.items() if marker in text)
            seen.append((task, "'Calgary' (customer.city)" in text))
            outs.append({"sl": '{"customer": ["name"]}', "nc": "correct"}.get(task, "SELECT name FROM customer"))
        return outs

    from tiny import write_tiny, write_tiny_tokenizer
    from route.tokenizer import Tokenizer
    from route.weights import load_model
    write_tiny(tmp_path / "m", "qwen2")
    write_tiny_tokenizer(tmp_path / "m", "qwen2")
    model, tok = load_model(tmp_path / "m"), Tokenizer.from_dir(tmp_path / "m")
    ex = Example("Who lives in Calgary?", "shop", shop)
    traces, times = run_chain(model, tok, [ex], values=True, generate_fn=fake, progress=False)
    assert traces[0].values == "'Calgary' (customer.city)" and "values" in times
    assert {t for t, shown in seen if shown} == {"sl", "ts"} and not any(s for t, s in seen if t in ("nc", "cw"))
    assert "city" in re.sub(r"\s+", " ", traces[0].pruned_schema)  # the value's column stays in the pruned schema
    plain, _ = run_chain(model, tok, [ex], generate_fn=fake, progress=False)
    assert plain[0].values == ""
