"""Shared test helpers: where the benchmark data lives (read-only input next to the repo, never copied in)."""
from pathlib import Path

import pytest

SPIDER = Path(__file__).resolve().parents[1].parent / "shared/data/spider"


def spider_db(name: str) -> Path:
    return SPIDER / "database" / name / f"{name}.sqlite"


@pytest.fixture
def spider():
    if not (SPIDER / "database").is_dir():
        pytest.skip(f"Spider data not found at {SPIDER}")
    return SPIDER
