"""Runtime concerns every stage shares: thread counts, random seeds, the compute device.

Imported by the Snakefile (through :mod:`brainvae.workflow`) and by every job's library code, so it
imports no numerical library itself: each function acts on the libraries the process has loaded.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

__all__ = ["THREAD_VARIABLES", "resolve_device", "seed_everything", "set_thread_count"]

#: Environment variables that ITK, OpenMP, OpenBLAS and MKL read for their thread pools.
THREAD_VARIABLES = ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS")


def set_thread_count(threads: int) -> None:
    """Make ITK, BLAS and torch use the job's ``threads``.

    Call it before their first use: ANTsPy's bundled ITK and the BLAS libraries read the environment
    once, when they create their thread pools; SimpleITK and torch, if already imported, are set
    directly.
    """
    threads = max(1, int(threads))
    for variable in THREAD_VARIABLES:
        os.environ[variable] = str(threads)
    if "SimpleITK" in sys.modules:
        sys.modules["SimpleITK"].ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(threads)


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and (when loaded) torch's global generators with ``seed``."""
    random.seed(seed)
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed(seed % 2**32)
    if "torch" in sys.modules:
        sys.modules["torch"].manual_seed(seed)


def resolve_device(device: str = "auto") -> Any:
    """The ``torch.device`` for a configured ``device``: ``auto`` is CUDA if available, else CPU.

    An unavailable CUDA request falls back to CPU with a warning in the log.
    """
    import logging

    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        logging.getLogger(__name__).warning("CUDA requested but not available; running on CPU")
        dev = torch.device("cpu")
    return dev
