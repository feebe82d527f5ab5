"""Fixtures for the twin-model tests: a built model store."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
# `models` is a top-level package of the repository, not of the installed distribution.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="session")
def model_store() -> Path:
    """models/store, built (or found up to date) once per session."""
    from models import build

    build.build(build.DEFAULT_STORE)
    return build.DEFAULT_STORE


@pytest.fixture(scope="session")
def manifest(model_store: Path) -> dict[str, Any]:
    from models import build

    return build.read_manifest(model_store)
