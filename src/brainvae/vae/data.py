"""Memory-mapped cohort arrays as a torch Dataset."""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["CohortDataset", "seed_worker"]


class CohortDataset(Dataset):
    """Volumes ``rows`` of an ``N x X x Y x Z`` ``.npy`` (and its mask array) as float32 tensors.

    Items are ``(volume, mask)`` with shape ``(1, X, Y, Z)``; ``mask`` is float32 0/1. The arrays
    are opened lazily with ``mmap_mode="r"`` in each process (DataLoader workers included), so
    nothing large is pickled to workers and all of them share the OS page cache.
    """

    def __init__(self, array_path: str | os.PathLike[str], mask_path: str | os.PathLike[str] | None,
                 rows: Sequence[int]) -> None:
        self.array_path = Path(array_path)
        self.mask_path = None if mask_path is None else Path(mask_path)
        self.rows = [int(r) for r in rows]
        self._array: np.ndarray | None = None
        self._mask: np.ndarray | None = None

    def _open(self) -> None:
        self._array = np.load(self.array_path, mmap_mode="r")
        if self.mask_path is not None:
            self._mask = np.load(self.mask_path, mmap_mode="r")
            if self._mask.shape != self._array.shape:
                raise ValueError(f"mask array {self.mask_path} has shape {self._mask.shape}, "
                                 f"volumes {self._array.shape}")

    @property
    def volume_shape(self) -> tuple[int, int, int]:
        if self._array is None:
            self._open()
        assert self._array is not None
        return tuple(int(s) for s in self._array.shape[1:])  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self._array is None:
            self._open()
        assert self._array is not None
        row = self.rows[i]
        x = torch.from_numpy(np.asarray(self._array[row], dtype=np.float32)).unsqueeze(0)
        if self._mask is None:
            m = torch.ones_like(x)
        else:
            m = torch.from_numpy(np.asarray(self._mask[row], dtype=np.float32)).unsqueeze(0)
        return x, m

    def __getstate__(self) -> dict:
        # Never pickle open memmaps into worker processes; each worker reopens the file.
        state = self.__dict__.copy()
        state["_array"] = state["_mask"] = None
        return state


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: derive numpy/python seeds from torch's per-worker seed.

    torch seeds each worker from the loader's generator, so with a seeded generator this makes
    any numpy/python randomness in workers (augmentation) reproducible too.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
