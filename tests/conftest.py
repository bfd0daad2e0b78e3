"""Fixtures shared by several test modules."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ilseg import methods
from ilseg.data.synth import generate_synth


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny synthetic dataset (60 images of 32 px, seed 3), made afresh for each module that uses it.

    Per module, not per session: some modules damage files in it on purpose.
    """
    root = tmp_path_factory.mktemp("synth")
    generate_synth(root, seed=3, num_images=60, size=32, workers=1)
    return root


@pytest.fixture
def method_registry() -> Iterator[None]:
    """Puts ``ilseg.methods.METHODS`` and ``METHOD_PRESETS`` back as they were after the test.

    A test registers its own method (:func:`ilseg.methods.register_method`) in
    a fixture that uses this one, so no other test sees that method.
    """
    kinds, presets = dict(methods.METHODS), dict(methods.METHOD_PRESETS)
    try:
        yield
    finally:
        methods.METHODS.clear()
        methods.METHODS.update(kinds)
        methods.METHOD_PRESETS.clear()
        methods.METHOD_PRESETS.update(presets)
