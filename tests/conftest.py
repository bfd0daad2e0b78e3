"""Fixtures shared by several test modules."""

from __future__ import annotations

from pathlib import Path

import pytest

from ilseg.data.synth import generate_synth


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset (60 images of 32 px, seed 3), made afresh for each module that uses it.

    Per module, not per session: some modules damage files in it on purpose.
    """
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    return root
