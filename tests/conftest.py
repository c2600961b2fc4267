"""Shared fixtures.

``ct_examples``: the folder of small real CT volumes (see its NOTICE.md). It is
not part of the repository: it sits beside the clone at
``../shared/data/ct_examples`` and can be pointed elsewhere with the
environment variable ``POCKETSEG_CT_EXAMPLES``. Tests that use the fixture are
skipped when the folder is absent. Never copy these files into the repository;
copies into pytest's ``tmp_path`` are fine.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CT_EXAMPLES_ENV = "POCKETSEG_CT_EXAMPLES"


def ct_examples_dir() -> Path:
    """Where the real CT examples are expected (the folder may not exist)."""
    override = os.environ.get(CT_EXAMPLES_ENV)
    if override:
        return Path(override)
    return Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ct_examples"


@pytest.fixture(scope="session")
def ct_examples() -> Path:
    """The real CT examples folder; skips the test when it is absent."""
    folder = ct_examples_dir()
    if not folder.is_dir():
        pytest.skip(f"real CT examples not found at {folder} (set {CT_EXAMPLES_ENV} to their folder)")
    return folder
