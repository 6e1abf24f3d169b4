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
"""

from __future__ import annotations

import mmap
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

__all__ = ["RELEASE_EVERY", "mean_of_rows", "paged", "release_pages"]

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
