"""Training grids, the single native -> MNI resampling, and intensity normalisation.

A :class:`Grid` is a voxel grid in MNI world (RAS mm) space: shape, isotropic voxel size and the
world position of the centre of voxel (0, 0, 0). The named training grids share one field of view,
the box [-80.5, 79.5] x [-113.5, 78.5] x [-75.5, 84.5] mm (160 x 192 x 160 mm), which contains the
whole MNI152 2009a brain mask (x -72..72, y -107..73, z -72..82) with >= 2.5 mm to spare; the
``1mm`` grid's voxel centres fall on the integer MNI template grid so it is an exact sub-grid.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import nibabel as nib
import numpy as np
from scipy import ndimage

#: Lower corner (voxel edge, not centre) and size of the shared training field of view, RAS mm.
FOV_LOWER = (-80.5, -113.5, -75.5)
FOV_SIZE = (160.0, 192.0, 160.0)


@dataclass(frozen=True)
class Grid:
    """Voxel grid in world RAS mm: ``world = origin + voxel_size * index`` (axis-aligned).

    Grids taken from images (:meth:`from_image`) keep that image's exact affine instead.
    """

    shape: tuple[int, int, int]
    voxel_size: float
    origin: tuple[float, float, float]  #: world RAS position of voxel (0, 0, 0)'s centre
    name: str = ""
    exact_affine: np.ndarray | None = field(default=None, compare=False, repr=False)

    @property
    def affine(self) -> np.ndarray:
        if self.exact_affine is not None:
            return self.exact_affine.copy()
        a = np.diag([self.voxel_size] * 3 + [1.0])
        a[:3, 3] = self.origin
        return a

    @classmethod
    def from_fov(cls, name: str, voxel_size: float, lower=FOV_LOWER, size=FOV_SIZE) -> Grid:
        shape = tuple(int(round(s / voxel_size)) for s in size)
        origin = tuple(float(lo + voxel_size / 2) for lo in lower)
        return cls(shape, float(voxel_size), origin, name)  # type: ignore[arg-type]

    @classmethod
    def from_image(cls, img: nib.Nifti1Image, name: str = "image") -> Grid:
        a = np.asarray(img.affine, dtype=float)
        return cls(tuple(int(s) for s in img.shape[:3]),  # type: ignore[arg-type]
                   float(np.linalg.norm(a[:3, 0])), tuple(a[:3, 3]), name, a.copy())

    def subsample(self, step: int) -> Grid:
        """Every ``step``-th voxel of this grid (same first voxel)."""
        a = self.affine
        a[:3, :3] *= step
        shape = tuple(-(-s // step) for s in self.shape)
        return Grid(shape, self.voxel_size * step, self.origin, self.name, a)  # type: ignore[arg-type]


#: Named training grids (all share the FOV above). Shapes divisible by 8 for the VAE.
#: The training grid when none is named (the schema's preprocess.grid default: the demo's 4 mm grid).
DEFAULT_GRID = "demo"

GRIDS: dict[str, Grid] = {
    "1mm": Grid.from_fov("1mm", 1.0),  # 160 x 192 x 160
    "2mm": Grid.from_fov("2mm", 2.0),  # 80 x 96 x 80
    "demo": Grid.from_fov("demo", 4.0),  # 40 x 48 x 40
}


def get_grid(grid: str | Grid) -> Grid:
    """A named grid ('1mm', '2mm', 'demo', or 'mni1mm' = the 1 mm MNI152 template grid)."""
    if isinstance(grid, Grid):
        return grid
    if grid == "mni1mm":
        from brainvae.templates import mni152_brain

        return Grid.from_image(mni152_brain(1))
    try:
        return GRIDS[grid]
    except KeyError:
        raise ValueError(f"unknown grid {grid!r}; choose from {sorted(GRIDS) + ['mni1mm']}") from None


def _voxel_map(img: nib.Nifti1Image, affine_ras: np.ndarray, grid: Grid) -> np.ndarray:
    """Target voxel -> source voxel (4x4): grid voxel -> MNI world -> native world -> voxel."""
    return np.linalg.inv(img.affine) @ np.linalg.inv(affine_ras) @ grid.affine


#: Voxels kept around the part of a native image that the target grids see: the cubic B-spline
#: prefilter is a recursive filter whose boundary effect decays as 0.268**n, < 1e-4 after 8 voxels.
CROP_MARGIN_VOXELS = 8


def _crop_to_grids(img: nib.Nifti1Image, affine_ras: np.ndarray, grids: Sequence[Grid],
                   margin: int = CROP_MARGIN_VOXELS) -> nib.Nifti1Image:
    """The native box that the target grids map into (plus ``margin``), with its own affine.

    Why: the spline prefilter costs ~2-3 s for a 1 mm head with neck; a training grid sees only
    the brain's box of it. World positions are unchanged, so the result resamples identically
    (to the prefilter's boundary effect, see :data:`CROP_MARGIN_VOXELS`).
    """
    shape = np.asarray(img.shape[:3])
    lo, hi = np.full(3, np.inf), np.full(3, -np.inf)
    for g in grids:
        m = _voxel_map(img, affine_ras, g)
        corners = np.array([[i, j, k] for i in (0, g.shape[0] - 1) for j in (0, g.shape[1] - 1)
                            for k in (0, g.shape[2] - 1)], dtype=float)
        native = corners @ m[:3, :3].T + m[:3, 3]
        lo, hi = np.minimum(lo, native.min(axis=0)), np.maximum(hi, native.max(axis=0))
    start = np.clip(np.floor(lo).astype(int) - margin, 0, shape)
    stop = np.clip(np.ceil(hi).astype(int) + margin + 1, 0, shape)
    if np.any(stop - start < 2):  # the grids miss the image: keep it whole (output = cval)
        return img
    if np.all(start == 0) and np.all(stop == shape):
        return img
    box = tuple(slice(a, b) for a, b in zip(start, stop))
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3, :3] @ start + img.affine[:3, 3]
    return nib.Nifti1Image(np.asarray(img.dataobj)[box], affine)


def interpolation_threads() -> int:
    """Threads for spline filtering and interpolation: the job's thread count.

    ``brainvae.runtime.set_thread_count`` (every job) and ``brainvae.bias.set_threads`` put it in
    ``OMP_NUM_THREADS``; unset (a plain Python session) it is 1.
    """
    try:
        return max(1, int(os.environ.get("OMP_NUM_THREADS", "1")))
    except ValueError:
        return 1


def _chunks(n: int, parts: int) -> list[tuple[int, int]]:
    edges = np.linspace(0, n, min(parts, n) + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def _spline_filter(data: np.ndarray, order: int, threads: int) -> np.ndarray:
    """``ndimage.spline_filter(data, order, output=float32)``, each axis's lines split over threads.

    Every 1D line is filtered independently, so the result is bitwise that of one thread.
    """
    if threads <= 1 or data.ndim != 3:
        return ndimage.spline_filter(data, order=order, output=np.float32)
    out = np.empty(data.shape, dtype=np.float32)
    source = data
    with ThreadPoolExecutor(threads) as pool:
        for axis in range(3):
            across = (axis + 1) % 3  # split along another axis, so each thread filters whole lines

            def run(bounds, axis=axis, across=across, source=source):
                index = [slice(None)] * 3
                index[across] = slice(*bounds)
                part = tuple(index)
                ndimage.spline_filter1d(source[part], order, axis, output=out[part], mode="mirror")

            list(pool.map(run, _chunks(data.shape[across], threads)))
            source = out  # as scipy's spline_filter: later axes filter the result in place
    return out


def _affine_transform(coeffs: np.ndarray, m: np.ndarray, shape: tuple[int, ...], order: int, cval: float,
                      threads: int) -> np.ndarray:
    """``ndimage.affine_transform`` (prefiltered input), output slabs along axis 0 over threads.

    scipy releases the GIL while interpolating. A slab starting at row r maps through the offset
    moved by r rows, which can change the last bit of a coordinate: outputs with several threads
    equal one thread's to float rounding, not bitwise (one thread is the exact reference).
    """
    kwargs = dict(order=order, mode="constant", cval=cval, prefilter=False)
    if threads <= 1 or shape[0] < 2 * threads:
        return ndimage.affine_transform(coeffs, m[:3, :3], m[:3, 3], output_shape=shape, output=np.float32,
                                        **kwargs)
    out = np.empty(shape, dtype=np.float32)

    def run(bounds):
        a, b = bounds
        offset = m[:3, 3] + m[:3, 0] * a
        ndimage.affine_transform(coeffs, m[:3, :3], offset, output_shape=(b - a, *shape[1:]), output=out[a:b],
                                 **kwargs)

    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, _chunks(shape[0], threads)))
    return out


def resample_to_grids(
    img: nib.Nifti1Image,
    affine_ras: np.ndarray,
    grids: Sequence[str | Grid],
    *,
    order: int = 3,
    cval: float = 0.0,
) -> list[nib.Nifti1Image]:
    """Resample ``img`` (native) once per target grid through the native->MNI ``affine_ras``.

    Each output is a single interpolation straight from the native voxels (no intermediate
    grids). For cubic splines the prefilter (the expensive part) is computed once and shared.
    Outputs are float32; cubic ringing below the input minimum is clipped to it. Both run on
    :func:`interpolation_threads` threads.
    """
    grids = [get_grid(g) for g in grids]
    data = np.asarray(img.dataobj, dtype=np.float32)
    lo, hi = float(data.min()), float(data.max())
    img = _crop_to_grids(nib.Nifti1Image(data, img.affine), affine_ras, grids)
    data = np.asarray(img.dataobj)
    threads = interpolation_threads()
    coeffs = _spline_filter(data, order, threads) if order > 1 else data
    out = []
    for g in grids:
        res = _affine_transform(coeffs, _voxel_map(img, affine_ras, g), tuple(g.shape), order, cval, threads)
        if order > 1:
            np.clip(res, min(lo, cval), max(hi, cval), out=res)
        out.append(nib.Nifti1Image(res, g.affine))
    return out


def resample_to_grid(img: nib.Nifti1Image, affine_ras: np.ndarray, grid: str | Grid, *,
                     order: int = 3, cval: float = 0.0) -> nib.Nifti1Image:
    """One grid version of :func:`resample_to_grids`."""
    return resample_to_grids(img, affine_ras, [grid], order=order, cval=cval)[0]


def resample_mask(mask: nib.Nifti1Image, affine_ras: np.ndarray, grid: str | Grid,
                  threshold: float = 0.5) -> nib.Nifti1Image:
    """Binary mask through the same transform: linear interpolation, then ``>= threshold``."""
    m = nib.Nifti1Image((np.asarray(mask.dataobj) > 0).astype(np.float32), mask.affine)
    r = resample_to_grid(m, affine_ras, grid, order=1)
    return nib.Nifti1Image((r.get_fdata(dtype=np.float32) >= threshold).astype(np.uint8), r.affine)


def normalise_intensity(
    img: nib.Nifti1Image,
    mask: nib.Nifti1Image,
    *,
    method: str = "zscore",
    percentiles: tuple[float, float] = (1.0, 99.0),
    background: float = 0.0,
) -> nib.Nifti1Image:
    """Normalise intensities using brain-mask statistics; voxels outside the mask = background.

    * ``zscore``: ``(x - mean) / std`` over the mask.
    * ``percentile``: the ``percentiles`` of the mask map to 0 and 1, clipped to [0, 1].
    """
    x = np.asarray(img.dataobj, dtype=np.float32)
    m = np.asarray(mask.dataobj) > 0
    if m.shape != x.shape:
        raise ValueError(f"mask shape {m.shape} != image shape {x.shape}")
    if m.sum() < 10:
        raise ValueError("brain mask is (nearly) empty after resampling")
    v = x[m]
    if method == "zscore":
        sd = float(v.std())
        out = (x - float(v.mean())) / (sd if sd > 0 else 1.0)
    elif method == "percentile":
        lo, hi = np.percentile(v, percentiles)
        out = np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    else:
        raise ValueError(f"normalisation method must be 'zscore' or 'percentile', not {method!r}")
    out = np.where(m, out, background).astype(np.float32)
    return nib.Nifti1Image(out, img.affine)
