"""Shared fixtures. Real CT comes from ``$PGL_DATA_DIR`` (default ``../shared/data`` beside the checkout).

Tests that need it FAIL when it is missing: a skipped real-data test would let CI pass without testing.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def shared_data() -> Path:
    path = Path(os.environ.get("PGL_DATA_DIR", REPO_ROOT.parent / "shared" / "data")).resolve()
    if not (path / "sts" / "dataset.json").is_file():
        pytest.fail(f"real CT data not found at {path}: set PGL_DATA_DIR to the shared data folder")
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(autouse=True)
def keep_error_reporting():
    """The configs install an excepthook and a log record factory (pgl_bundle.errors); give the previous ones back
    after each test that runs a config in this process."""
    hook, factory = sys.excepthook, logging.getLogRecordFactory()
    yield
    sys.excepthook = hook
    logging.setLogRecordFactory(factory)
