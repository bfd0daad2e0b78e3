"""The documentation's claims that can be checked mechanically."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _tests_by_file() -> dict[str, set[str]]:
    return {p.name: set(re.findall(r"^def (test_\w+)", p.read_text(), re.M)) for p in (ROOT / "tests").glob("test_*.py")}


def test_every_test_named_in_the_robustness_table_exists():
    doc = (ROOT / "docs" / "robustness.md").read_text()
    tests = _tests_by_file()
    named = re.findall(r"`([\w.]+\.py)?(?:::)?(test_\w+)\b(?!\.py)", doc)
    assert len(named) > 30
    for file, name in named:
        if file:
            assert name in tests[file], f"{file}::{name}"
        else:
            assert any(name in names for names in tests.values()), name
    # every row has a test
    rows = [line for line in doc.splitlines() if line.startswith("| ") and not line.startswith("| fault")
            and not line.startswith("| bad input") and not line.startswith("| input") and "---" not in line]
    # ("`...[id]`" is the parametrised test of the row above, with that id)
    assert rows and all("test_" in row or "`...[" in row for row in rows), [r for r in rows if "test_" not in r]
