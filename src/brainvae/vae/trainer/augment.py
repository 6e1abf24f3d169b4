"""Random augmentation of training batches, reproducible from a CPU generator."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["augment"]


def augment(x: torch.Tensor, m: torch.Tensor, cfg: Mapping[str, Any], generator: torch.Generator
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Random left-right flips, shifts, smooth deformations and smooth intensity fields of a batch.

    ``x``, ``m``: ``(B, 1, X, Y, Z)`` volumes and masks on any device; X is the left-right axis (RAS
    grids). ``augment_shift`` rolls by whole voxels (the field of view has zero background at its
    borders); ``augment_deform`` is the sd (voxels) of a displacement drawn on a 4x4x4 control grid
    and interpolated smoothly; ``augment_bias`` the sd of the log of a smooth multiplicative
    intensity field, like a residual MRI bias field. Every random number comes from ``generator``
    (CPU), so runs are reproducible and a resumed run augments exactly as an uninterrupted one.
    """
    flip_p, max_shift = float(cfg["augment_flip"]), int(cfg["augment_shift"])
    deform, bias = float(cfg["augment_deform"]), float(cfg["augment_bias"])
    if flip_p <= 0 and max_shift <= 0 and deform <= 0 and bias <= 0:
        return x, m
    b, shape = x.shape[0], x.shape[2:]
    flips = torch.rand(b, generator=generator) < flip_p
    shifts = torch.randint(-max_shift, max_shift + 1, (b, 3), generator=generator)
    xs, ms = [], []
    for i in range(b):
        xi, mi = x[i], m[i]
        if flips[i]:
            xi, mi = xi.flip(1), mi.flip(1)
        if max_shift > 0:
            shift = shifts[i].tolist()
            xi, mi = xi.roll(shift, dims=(1, 2, 3)), mi.roll(shift, dims=(1, 2, 3))
        xs.append(xi)
        ms.append(mi)
    x, m = torch.stack(xs), torch.stack(ms)
    if deform > 0:
        # grid_sample's last grid axis is (W, H, D) = (Z, Y, X); one voxel is 2 / (size - 1).
        voxel = torch.tensor([2.0 / (shape[2] - 1), 2.0 / (shape[1] - 1), 2.0 / (shape[0] - 1)])
        coarse = torch.randn(b, 3, 4, 4, 4, generator=generator) * deform * voxel.view(1, 3, 1, 1, 1)
        disp = torch.nn.functional.interpolate(coarse.to(x.device), size=tuple(shape), mode="trilinear",
                                               align_corners=True)
        identity = torch.eye(3, 4, device=x.device).expand(b, 3, 4)
        grid = torch.nn.functional.affine_grid(identity, [b, 1, *shape], align_corners=True)
        grid = grid + disp.permute(0, 2, 3, 4, 1)
        x = torch.nn.functional.grid_sample(x, grid, mode="bilinear", padding_mode="zeros",
                                            align_corners=True)
        m = (torch.nn.functional.grid_sample(m, grid, mode="bilinear", padding_mode="zeros",
                                             align_corners=True) > 0.5).to(m.dtype)
    if bias > 0:
        coarse = torch.randn(b, 1, 4, 4, 4, generator=generator) * bias
        field = torch.nn.functional.interpolate(coarse.to(x.device), size=tuple(shape), mode="trilinear",
                                                align_corners=True)
        x = x * field.exp()
    return x.contiguous(), m.contiguous()


