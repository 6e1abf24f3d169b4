"""Runtime concerns every stage shares: thread counts, random seeds, the compute device.

Imported by the Snakefile (through :mod:`brainvae.workflow`) and by every job's library code, so it
imports no numerical library itself: each function acts on the libraries the process has loaded.
"""

from __future__ import annotations

import os
import random
import sys
from typing import Any

__all__ = ["THREAD_VARIABLES", "DeviceError", "cuda_problem", "device_problems", "resolve_device", "seed_everything",
           "set_thread_count", "uses_cuda", "visible_cuda_devices"]

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


class DeviceError(RuntimeError):
    """A configured device that this machine does not have."""


def resolve_device(device: str = "auto") -> Any:
    """The ``torch.device`` for a configured ``device``: ``auto`` is CUDA if available, else CPU.

    ``cuda`` (or ``cuda:N``) without a visible GPU raises :class:`DeviceError` saying so: a run that asked
    for a GPU must not quietly take days on the CPU.
    """
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        problem = cuda_problem(str(dev), 1, visible, _torch_description(torch.__version__, torch.version.cuda))
        if problem:
            raise DeviceError(problem)
    return dev


def uses_cuda(device: str) -> bool:
    """Whether a configured device asks for a GPU (``cuda``, ``cuda:1``); ``auto`` does not."""
    return str(device).split(":", 1)[0] == "cuda"


def _torch_description(version: str, cuda_build: str | None) -> str:
    return f"torch {version}, " + (f"CUDA {cuda_build} build" if cuda_build not in (None, "None") else "a CPU-only build")


def cuda_problem(device: str, gpus: int, visible: int, description: str) -> str | None:
    """Why ``device`` (``cuda`` or ``cuda:N``) with ``gpus`` GPUs cannot run where ``visible`` CUDA GPUs are
    seen (``description``: torch's version and build); None when it can."""
    if visible == 0:
        return (f"device {device!r} was asked for, but this machine has no usable CUDA GPU ({description}; "
                f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}). Run on a GPU node (or "
                "submit with the SLURM profile), or set device: auto (CPU when there is no GPU) or cpu.")
    index = device.split(":", 1)[1] if ":" in device else None
    if index is not None and int(index) >= visible:
        return f"device {device!r} was asked for, but only {visible} CUDA GPU(s) are visible"
    if gpus > visible:
        return f"{gpus} GPUs were asked for, but this machine has {visible} CUDA GPU(s)"
    return None


def visible_cuda_devices(python: str | None = None, timeout: float = 120.0) -> tuple[int, str]:
    """``(number of CUDA GPUs torch sees, torch's description)``, asked of a fresh Python process.

    For start-up checks in a process that must not import torch itself (the Snakefile's).
    """
    import subprocess

    code = ("import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0, "
            "torch.__version__, torch.version.cuda)")
    out = subprocess.run([python or sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)
    if out.returncode:
        return 0, f"torch failed to start: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}"
    count, version, cuda = out.stdout.split()
    return int(count), _torch_description(version, cuda)


def device_problems(devices: dict[str, tuple[str, int]], python: str | None = None) -> list[str]:
    """Start-up check of devices: ``{what: (device, GPUs per node)}``, e.g. ``{"model vae_dense": ("cuda", 2)}``.

    Empty when no model asks for CUDA (then torch is not even started) or when this machine has the GPUs.
    """
    wanted = {name: (device, gpus) for name, (device, gpus) in devices.items() if uses_cuda(device)}
    if not wanted:
        return []
    visible, description = visible_cuda_devices(python)
    problems = [(name, cuda_problem(str(device), max(1, gpus), visible, description))
                for name, (device, gpus) in sorted(wanted.items())]
    return [f"{name}: {problem}" for name, problem in problems if problem]
