"""docs/architecture.md's picture of layers is what the package's imports do."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "ilseg"
# Lowest first; a module may import from its own layer's siblings only where listed together and from any
# layer below.  Keep in step with the picture in docs/architecture.md.
LAYERS = [
    {"errors"},
    {"fileio"},
    {"tasks"},
    {"data", "models", "metrics"},
    {"methods"},
    {"config"},
    {"runs", "placement"},
    {"visual"},
    {"engine"},
    {"importing", "reports"},
    {"demo"},
    {"cli", "__init__"},
    {"__main__"},
]
LAYER = {unit: level for level, units in enumerate(LAYERS) for unit in units}


def _imports(path: Path) -> set[str]:
    """The top-level units of ``ilseg`` that ``path`` imports (``ilseg.engine.step`` -> ``engine``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        found |= {n.split(".")[1] for n in names if n.startswith("ilseg.")}
    return found


def test_every_unit_of_the_package_has_a_layer():
    units = {p.relative_to(PACKAGE).parts[0].removesuffix(".py") for p in PACKAGE.glob("*")
             if p.suffix == ".py" or (p.is_dir() and (p / "__init__.py").is_file())}
    assert units == set(LAYER), f"add {units - set(LAYER)} to LAYERS and docs/architecture.md"


def test_no_module_imports_from_a_layer_above_its_own_or_a_sibling():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        unit = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        for other in _imports(path) - {unit}:
            if LAYER[other] >= LAYER[unit]:
                wrong.append(f"{path.relative_to(PACKAGE)} imports ilseg.{other}")
    assert not wrong, wrong


def test_the_engine_names_no_method():
    words = re.compile(r"\b(ilt|mib|plop|pseudo\w*|pod|thresholds?|calibrat\w*|unbiased|kd|fd)\b", re.I)
    for path in (PACKAGE / "engine").glob("*.py"):
        assert not words.findall(path.read_text()), (path.name, words.findall(path.read_text()))
