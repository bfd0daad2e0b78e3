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


# -- docs/fidelity.md: its tables stay true -------------------------------------------------------
# The switch column of each table names settings; `section.key: value` states what presets resolve to (the
# section's reproduce presets, or those matching the glob after "for"), `section.key=value` only shows how to set
# it.  The test reads the tables back and checks them against the config and the bundled presets.
FIDELITY = ROOT / "docs" / "fidelity.md"
_SECTIONS = ("data", "model", "method", "optim", "eval", "runtime")
_SETTING = re.compile(r"`((?:%s)\.\w+)(?:(: |=)([^`]*))?`(?: for `([^`]+)`)?" % "|".join(_SECTIONS))
_PRESET_NAME = re.compile(r"`((?:voc|ade|reproduce|synth)-[\w{},*!\[\]-]+)`")


def _expand_braces(text: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", text)
    if not match:
        return [text]
    return [expanded for choice in match[1].split(",")
            for expanded in _expand_braces(text[:match.start()] + choice + text[match.end():])]


def _presets_named(pattern: str, names: set[str]) -> set[str]:
    import fnmatch

    return {name for expanded in _expand_braces(pattern) for name in names if fnmatch.fnmatchcase(name, expanded)}


def _fidelity_sections() -> dict[str, str]:
    """Level-2 headings of docs/fidelity.md -> their text."""
    parts = re.split(r"^## (.+)$", FIDELITY.read_text(), flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _switch_cells(section: str) -> list[tuple[str, str]]:
    """(setting row, switch cell) of every table of ``section`` that has a "switch" column."""
    cells, column = [], None
    for line in section.splitlines():
        if not line.startswith("|"):
            column = None
            continue
        row = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if column is None:
            column = row.index("switch") if "switch" in row else -1
        elif column >= 0 and not set(line) <= set("|- "):
            cells.append((row[0], row[column]))
    return cells


def _section_reproduce_presets(section: str, names: set[str]) -> set[str]:
    line = next((ln for ln in section.splitlines() if ln.startswith("Reproduce presets:")), "")
    # the line may wrap: read up to the paragraph's end
    start = section.find(line)
    paragraph = section[start:section.find("\n\n", start)] if line else ""
    return {n for pattern in _PRESET_NAME.findall(paragraph) for n in _presets_named(pattern, names)
            if n.startswith("reproduce-")}


def _fidelity_claims() -> list[tuple[str, str, str, object, set[str]]]:
    """(section, row, key, value, presets it holds for) of every `key: value` in a switch column."""
    import yaml

    from ilseg.config import preset_dir

    names = {p.stem for p in preset_dir().glob("*.yaml")}
    claims = []
    for title, text in _fidelity_sections().items():
        scope = _section_reproduce_presets(text, names)
        for row, cell in _switch_cells(text):
            for key, sep, value, glob in _SETTING.findall(cell):
                if sep == ": ":
                    held_by = _presets_named(glob, names) if glob else scope
                    claims.append((title, row, key, yaml.safe_load(value), held_by))
    return claims


def _method_fields() -> set[str]:
    import dataclasses

    from ilseg.methods import METHOD_PRESETS

    return {f.name for cfg in METHOD_PRESETS.values() for f in dataclasses.fields(cfg)}


def _resolved(name: str) -> dict[str, object]:
    from ilseg.config import load_config, preset_dir

    values = load_config(preset_dir() / f"{name}.yaml").to_dict()
    return {f"{section}.{key}": value for section, keys in values.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def test_every_setting_in_the_fidelity_switch_column_exists():
    from ilseg.config import settings_of

    known = {s.key for s in settings_of()} | {f"method.{field}" for field in _method_fields()}
    sections = _fidelity_sections()
    assert {"cssegmentation, ILT", "MiB", "PLOP", "The ILT paper (official TensorFlow code)",
            "Not yet reproducible", "Which preset to use"} <= set(sections)
    named = [(title, row, key) for title, text in sections.items() for row, cell in _switch_cells(text)
             for key, *_ in _SETTING.findall(cell)]
    assert len(named) > 40
    unknown = [f"{title} / {row}: {key}" for title, row, key in named if key not in known]
    assert not unknown, "docs/fidelity.md names settings that do not exist:\n" + "\n".join(unknown)


def test_every_preset_named_in_fidelity_exists_and_every_reproduce_preset_is_there():
    from ilseg.config import preset_dir

    names = {p.stem for p in preset_dir().glob("*.yaml")}
    mentioned = _PRESET_NAME.findall(FIDELITY.read_text())
    missing = [pattern for pattern in mentioned if not _presets_named(pattern, names)]
    assert not missing, f"docs/fidelity.md names presets that do not exist: {missing}"
    reproduce = {n for n in names if n.startswith("reproduce-")}
    covered = set().union(*(_section_reproduce_presets(text, names) for text in _fidelity_sections().values()))
    assert reproduce and covered == reproduce, f"reproduce presets without a section: {sorted(reproduce - covered)}"


def test_the_values_in_the_fidelity_tables_are_what_the_presets_resolve_to():
    claims = _fidelity_claims()
    assert len(claims) > 30
    wrong = []
    for title, row, key, value, held_by in claims:
        assert held_by, f"{title} / {row}: `{key}: ...` holds for no preset; name them (`for GLOB`) or write key=value"
        for name in sorted(held_by):
            resolved = _resolved(name).get(key, "<not a field of this method>")
            if isinstance(resolved, (list, tuple)):
                resolved = list(resolved)
            if resolved != value:
                wrong.append(f"{title} / {row}: {name} resolves {key} to {resolved!r}, the table says {value!r}")
    assert not wrong, "\n".join(wrong)


def test_every_difference_of_a_reproduce_preset_from_its_recommended_preset_is_in_fidelity():
    """reproduce-<reference>-<preset> differs from <preset> only in values docs/fidelity.md states for it."""
    from ilseg.config import preset_dir

    names = {p.stem for p in preset_dir().glob("*.yaml")}
    stated: dict[str, set[str]] = {}
    for _title, _row, key, _value, held_by in _fidelity_claims():
        for name in held_by:
            stated.setdefault(name, set()).add(key)
    unstated = []
    for name in sorted(n for n in names if n.startswith("reproduce-")):
        counterpart = name.split("-", 2)[2]
        assert counterpart in names, f"{name}: no recommended preset {counterpart} to compare with"
        ours, theirs = _resolved(name), _resolved(counterpart)
        for key in sorted(set(ours) | set(theirs)):
            if key != "name" and ours.get(key) != theirs.get(key) and key not in stated.get(name, set()):
                unstated.append(f"{name}: {key} = {ours.get(key)!r} ({counterpart}: {theirs.get(key)!r})")
    assert not unstated, "differences docs/fidelity.md does not state:\n" + "\n".join(unstated)
