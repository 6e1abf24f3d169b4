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


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, real_t1w_dir) -> dict:
    """The one real workflow run most workflow tests read: the tiny four-site demo (test_workflow_pipeline.TINY_SITES) plus a dataset of bad, unusual and
    real scans (tests/test_bad_inputs.py builds it), run twice with --keep-going. Costly, so computed once per
    test session; the modules that use it run on one pytest-xdist worker (pytest_xdist_make_scheduler below)."""
    from test_bad_inputs import build_tiny_run

    return build_tiny_run(tmp_path_factory.mktemp("tiny_run"), real_t1w_dir)


#: Test modules that read the session's tiny run: pytest-xdist sends them to one worker, which builds it once.
TINY_RUN_MODULES = {"test_bad_inputs.py", "test_workflow_pipeline.py"}


def pytest_xdist_make_scheduler(config, log):
    """Distribute a module at a time (like `--dist loadfile`, so each module's fixtures are built once), with the
    modules of TINY_RUN_MODULES as one unit. (xdist's `loadgroup` marks do not work with pytest 9.2: xdist 3.8
    renames the node ID through an attribute pytest no longer reads.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesSharingTheTinyRun(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tiny_run" if Path(path).name in TINY_RUN_MODULES else path

    return ModulesSharingTheTinyRun(config, log)
