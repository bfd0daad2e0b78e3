"""The documentation's claims that can be checked mechanically."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROTOCOL = ROOT / "docs" / "protocol.md"


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


# -- the repository stands alone ---------------------------------------------------------------
# The project's facts were first gathered in internal notes that are not part of the repository;
# docs/protocol.md holds them now, with their public sources.  (The notes' names are spelt in
# pieces here, so that this file does not match its own check.)
INTERNAL_NOTES = re.compile("REFERENCE" + r"(?:-METHODS)?(?:\.md|\s*\u00a7)")


def _repository_text_files() -> list[Path]:
    """Every file git tracks or would track (untracked but not ignored), that exists and is text."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                cwd=ROOT, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout (or no git): nothing to list")
    files = []
    for name in sorted(set(listed.decode().split("\0")) - {""}):
        path = ROOT / name
        if path.is_file() and b"\0" not in path.read_bytes()[:8192]:
            files.append(path)
    return files


def test_no_file_cites_the_internal_notes():
    """Every citation points at docs/protocol.md or at a public source, never at the old notes."""
    here = Path(__file__).resolve()
    offenders = []
    for path in _repository_text_files():
        if path.resolve() == here:
            continue
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if INTERNAL_NOTES.search(line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not offenders, f"{len(offenders)} lines cite the internal notes:\n" + "\n".join(offenders[:40])


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    anchors: set[str] = set()
    fenced = False
    for line in markdown.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (match := re.match(r"#{1,6} (.+)", line)):
            anchor = github_anchor(match[1])
            n = 1
            while anchor in anchors:  # GitHub numbers repeated headings: x, x-1, x-2 ...
                anchor = f"{github_anchor(match[1])}-{n}"
                n += 1
            anchors.add(anchor)
    return anchors


def test_github_anchor():
    assert github_anchor("The ILT paper's DeepLab-v2") == "the-ilt-papers-deeplab-v2"
    assert github_anchor("Where MiB, PLOP and `cssegmentation` differ") == "where-mib-plop-and-cssegmentation-differ"


def test_every_link_to_a_protocol_section_finds_its_heading():
    """Markdown links to docs/protocol.md#... (README, docs/, protocol.md's own #...) and the
    docs/protocol.md#... references in code comments name headings that exist."""
    anchors = _anchors(PROTOCOL)
    assert {"sources", "incremental-protocol", "model", "training-recipe", "evaluation", "ilt-losses",
            "published-numbers"} <= anchors
    wrong = []
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)#([^)\s]+)\)", doc.read_text()):
            points_here = (doc.parent / target).resolve() == PROTOCOL.resolve() if target else doc == PROTOCOL
            if points_here and anchor not in anchors:
                wrong.append(f"{doc.relative_to(ROOT)}: {target}#{anchor}")
    for path in _repository_text_files():
        for anchor in re.findall(r"docs/protocol\.md#([\w-]+)", path.read_text(errors="replace")):
            if anchor not in anchors:
                wrong.append(f"{path.relative_to(ROOT)}: docs/protocol.md#{anchor}")
    assert not wrong, "no such heading in docs/protocol.md:\n" + "\n".join(wrong)


# -- supported versions --------------------------------------------------------------------------
def test_lowest_versions_script_pins_the_floors_of_pyproject():
    """.ci/lowest-versions installs exactly the floors pyproject.toml declares (one pin per requirement)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    expected = []
    for requirement in [*project["dependencies"], *project["optional-dependencies"]["test"]]:
        name, _, floor = (part.strip() for part in requirement.partition(">="))
        expected.append(f"{name}=={floor}" if floor else name)
    pins = subprocess.run(["bash", str(ROOT / ".ci" / "lowest-versions"), "--pins"], cwd=ROOT, capture_output=True,
                          text=True, check=True, env={**os.environ, "PYTHON": sys.executable}).stdout
    assert pins.split() == expected
