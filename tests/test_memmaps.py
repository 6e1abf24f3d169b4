"""brainvae.memmaps.MatrixFile: a 2-D .npy written by rows and read by column blocks without a memory map."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from brainvae.analysis.normative import group_map
from brainvae.memmaps import MatrixFile


def test_rows_written_in_any_order_read_back_by_np_load_and_by_column_blocks(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = rng.normal(size=(7, 23)).astype(np.float32)
    path = tmp_path / "m.npy"
    with MatrixFile(path, data.shape, np.float32) as matrix:
        for i in (3, 0, 6, 1, 5, 2):  # row 4 never written: zeros
            matrix.write_row(i, data[i])
        with pytest.raises(ValueError, match="23 values"):
            matrix.write_row(0, data[0, :5])
    expected = data.copy()
    expected[4] = 0
    np.testing.assert_array_equal(np.load(path), expected)
    with MatrixFile(path) as matrix:
        assert matrix.shape == (7, 23) and matrix.dtype == np.float32
        np.testing.assert_array_equal(matrix[:, 5:12], expected[:, 5:12])
        np.testing.assert_array_equal(matrix[:, 20:40], expected[:, 20:])  # clipped as a slice is
        np.testing.assert_array_equal(matrix[:, :], expected)
        with pytest.raises(IndexError):
            matrix[1:3, 0:2]


def test_opens_a_file_np_save_wrote_and_refuses_other_shapes(tmp_path: Path) -> None:
    data = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "a.npy", data)
    with MatrixFile(tmp_path / "a.npy") as matrix:
        np.testing.assert_array_equal(matrix[:, 1:3], data[:, 1:3])
    np.save(tmp_path / "b.npy", np.zeros((2, 3, 4)))
    with pytest.raises(ValueError, match="not a 2-D C-order array"):
        MatrixFile(tmp_path / "b.npy")


def test_group_map_from_a_matrix_file_equals_the_array(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    mask = rng.random((4, 5, 6)) > 0.4
    values = rng.normal(size=(10, int(mask.sum()))).astype(np.float32)
    with MatrixFile(tmp_path / "z.npy", values.shape) as matrix:
        for i, row in enumerate(values):
            matrix.write_row(i, row)
        from_file = group_map(matrix, np.arange(10) < 4, mask, n_permutations=30, block_voxels=9)
    in_memory = group_map(values, np.arange(10) < 4, mask, n_permutations=30)
    np.testing.assert_allclose(from_file.t, in_memory.t, rtol=1e-6, atol=1e-6)
    assert from_file.threshold == pytest.approx(in_memory.threshold)
