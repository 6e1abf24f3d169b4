"""Shared test setup: deterministic, single-threaded numerics and paths to bundled data."""

import os
from pathlib import Path

# Before numpy/ITK/torch are imported by any test module: results must not depend on core count.
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
    os.environ.setdefault(_variable, "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
REAL_T1W = REPO / "tests" / "data" / "real_t1w"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def real_t1w_dir() -> Path:
    return REAL_T1W
