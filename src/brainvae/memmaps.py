"""Reading large memory-mapped arrays (the cohort array, the voxel matrix) a part at a time.

A page of a memory map that has been read stays in the process's resident set (``VmRSS``, as
``RssFile``) for as long as the map is open, so a loop that reads every scan of a memory-mapped
cohort once ends with the whole file resident even if it keeps only one scan in its own memory.
Those pages are reclaimable page cache, but they count against a job's memory as a scheduler or
``ulimit``/cgroup sees it, and they make a peak-RSS measurement meaningless.
:func:`release_pages` drops them from the resident set after each block (they stay in the page
cache, so reading them again is cheap); the streaming readers in :mod:`brainvae.vae.evaluate` and
:mod:`brainvae.analysis.features` call it, so their resident memory is what they allocate plus one
block of the file.

A block of *columns* of a row-major matrix (the group map's voxels of every scan) spans a little of every row, so
through a memory map it makes the whole file resident however few bytes it reads; :class:`MatrixFile` reads and
writes such a matrix with positioned I/O instead, and only the block it returns is in memory.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RELEASE_EVERY", "MatrixFile", "mean_of_rows", "paged", "release_pages"]

# Rows read between two release_pages calls in the row loops (a call costs microseconds; a read maps
# whole page-cache folios, often far more than the bytes asked for).
RELEASE_EVERY = 8


def _read_only_mmap(array: Any) -> mmap.mmap | None:
    """The ``mmap`` under ``array`` if it is a read-only ``np.memmap`` (or a view of one), else None."""
    node = array
    while node is not None:
        if isinstance(node, np.memmap) and getattr(node, "_mmap", None) is not None:
            # Only read-only maps: dropping the pages of a copy-on-write map ("c") would lose its changes.
            return node._mmap if node.mode == "r" else None
        node = getattr(node, "base", None)
    return None


def release_pages(*arrays: Any) -> None:
    """Drop the resident pages of each read-only memory map among ``arrays`` (no-op for anything else).

    ``madvise(MADV_DONTNEED)`` on the whole map: the data stay in the page cache and the next read
    faults them back in; nothing is lost (the map is read-only). Silently does nothing where the
    platform has no ``madvise``.
    """
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return
    for array in arrays:
        mm = _read_only_mmap(array)
        if mm is None:
            continue
        try:
            mm.madvise(advice)
        except (AttributeError, OSError, ValueError):
            pass


def paged(rows: Iterable[int], *arrays: Any) -> Iterator[int]:
    """Each of ``rows`` in turn, dropping the read pages of ``arrays`` every :data:`RELEASE_EVERY` rows and after
    the last: ``for r in paged(rows, volumes): use(volumes[r])`` keeps one block of the file resident."""
    for i, r in enumerate(rows):
        yield r
        if (i + 1) % RELEASE_EVERY == 0:
            release_pages(*arrays)
    release_pages(*arrays)


def mean_of_rows(array: Any, rows: Sequence[int]) -> np.ndarray:
    """Mean image of ``array[rows]`` (float32), summed row by row in float64: one volume in memory."""
    total = np.zeros(array.shape[1:], dtype=np.float64)
    for r in paged(rows, array):
        total += np.asarray(array[r])
    return (total / max(len(rows), 1)).astype(np.float32)


class MatrixFile:
    """A 2-D C-order ``.npy`` file (a standard one: ``np.load`` reads it) written a row at a time and read a block of
    columns at a time with positioned I/O (``os.pwrite``/``os.pread``), never memory-mapped.

    ``MatrixFile(path, shape, dtype)`` creates the file (zero-filled); ``MatrixFile(path)`` opens one. ``m[:, lo:hi]``
    is the (rows, hi - lo) block of columns, so it can stand for an array in code that reads column blocks.
    """

    def __init__(self, path: str | os.PathLike[str], shape: tuple[int, int] | None = None,
                 dtype: Any = np.float32) -> None:
        self.path = Path(path)
        if shape is not None:
            self.shape = (int(shape[0]), int(shape[1]))
            self.dtype = np.dtype(dtype)
            with open(self.path, "wb") as handle:
                np.lib.format.write_array_header_2_0(
                    handle, {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                             "shape": self.shape})
                self.offset = handle.tell()
                handle.truncate(self.offset + self.shape[0] * self.shape[1] * self.dtype.itemsize)
            self._fd = os.open(self.path, os.O_RDWR)
        else:
            with open(self.path, "rb") as handle:
                version = np.lib.format.read_magic(handle)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                file_shape, fortran, self.dtype = read_header(handle)
                self.offset = handle.tell()
            if len(file_shape) != 2 or fortran:
                raise ValueError(f"{self.path}: not a 2-D C-order array (shape {file_shape})")
            self.shape = (int(file_shape[0]), int(file_shape[1]))
            self._fd = os.open(self.path, os.O_RDONLY)

    def write_row(self, i: int, values: np.ndarray) -> None:
        """Row ``i`` (any order; rows not written stay 0)."""
        data = np.ascontiguousarray(values, dtype=self.dtype)
        if data.shape != (self.shape[1],):
            raise ValueError(f"{self.path}: a row has {self.shape[1]} values, got shape {data.shape}")
        os.pwrite(self._fd, data.tobytes(), self.offset + int(i) * self.shape[1] * self.dtype.itemsize)

    def columns(self, lo: int, hi: int) -> np.ndarray:
        """Columns ``lo:hi`` of every row, (rows, hi - lo)."""
        lo, hi = max(0, int(lo)), min(self.shape[1], int(hi))
        width = max(0, hi - lo)
        out = np.empty((self.shape[0], width), self.dtype)
        row_bytes, item = self.shape[1] * self.dtype.itemsize, self.dtype.itemsize
        for r in range(self.shape[0]):
            buffer = os.pread(self._fd, width * item, self.offset + r * row_bytes + lo * item)
            out[r] = np.frombuffer(buffer, self.dtype, count=width)
        return out

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) and len(key) == 2 else (None, None)
        if rows != slice(None) or not isinstance(cols, slice) or cols.step not in (None, 1):
            raise IndexError("MatrixFile supports [:, lo:hi] only")
        return self.columns(0 if cols.start is None else cols.start,
                            self.shape[1] if cols.stop is None else cols.stop)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> MatrixFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
