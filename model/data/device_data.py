"""Training batches made on the training device: the whole aligned-face cache as
one uint8 tensor there, augmentation as one batched affine warp, no per-sample
Python. It keeps a GPU busy (a DataLoader's per-image cv2 work does not) and
spares the CPU's cores the worker processes.

The augmentation matches `data.FaceDataset` in kind and range: horizontal flip
(negates yaw and roll), rotation up to `max_rotate` degrees (added to roll's
opposite, as there), scale 1 +- `max_scale`, shift up to `max_shift` of the side,
border replicated. Batches are dicts with the same keys and dtypes as the
DataLoader's, so the training step cannot tell them apart."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from model.data.datasets import FaceSet


class DeviceBatches:
    """Shuffled, augmented batches of several FaceSets, on `device`.

    Iterating gives one epoch; `set_epoch(e)` picks its shuffle (seed + e), so a
    resumed run sees the same order. With `world_size` > 1 each rank takes every
    world_size-th item of the shared permutation (what DistributedSampler does)."""

    def __init__(self, parts: list[FaceSet], batch_size: int, device: torch.device | str, *,
                 seed: int = 0, rank: int = 0, world_size: int = 1, max_rotate: float = 10.0,
                 max_scale: float = 0.08, max_shift: float = 0.06):
        self.device = torch.device(device)
        cat = lambda xs, dtype: torch.from_numpy(np.concatenate(xs).astype(dtype)).to(self.device)  # noqa: E731
        self.images = cat([np.asarray(p.images) for p in parts], np.uint8)           # (N, S, S)
        self.labels = cat([p.labels for p in parts], np.int64)
        self.pose = cat([p.pose for p in parts], np.float32)
        self.identity = cat([p.identity for p in parts], np.float32)
        self.pose_valid = cat([~p.fallback for p in parts], np.float32)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.max_rotate, self.max_scale, self.max_shift = max_rotate, max_scale, max_shift
        self.epoch = 0

    def __len__(self) -> int:
        return (len(self.labels) // self.world_size) // self.batch_size   # drop_last

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self.labels), generator=g)[self.rank::self.world_size]
        aug = torch.Generator(device=self.device).manual_seed(self.seed * 1000 + self.epoch * 10 + self.rank)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size].to(self.device)
            image, pose = self.augment(self.images[idx], self.pose[idx], aug)
            yield {"image": image, "label": self.labels[idx], "pose": pose,
                   "identity": self.identity[idx], "pose_valid": self.pose_valid[idx]}

    def augment(self, images: torch.Tensor, pose: torch.Tensor, g: torch.Generator
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (B,S,S) -> float (B,1,S,S) in [-1,1], randomly warped; pose to match."""
        n = images.shape[0]
        u = lambda *shape: torch.rand(n, *shape, device=self.device, generator=g) * 2 - 1  # noqa: E731
        flip = torch.rand(n, device=self.device, generator=g) < 0.5
        return warp(images, pose, flip, angle=u() * self.max_rotate, scale=1 + u() * self.max_scale,
                    shift=u(2) * self.max_shift)


def warp(images: torch.Tensor, pose: torch.Tensor, flip: torch.Tensor, angle: torch.Tensor,
         scale: torch.Tensor, shift: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror where `flip`, then rotate by `angle` degrees (> 0 counter-clockwise, as
    cv2.getRotationMatrix2D), scale, and shift by `shift` (x, y) fractions of the side,
    border replicated: FaceDataset's cv2 warp, batched. Pose: a mirror negates yaw and
    roll; a counter-clockwise rotation lowers roll."""
    n = images.shape[0]
    x = images.unsqueeze(1).float() / 127.5 - 1
    x = torch.where(flip.view(n, 1, 1, 1), x.flip(3), x)
    # grid_sample wants output -> input in normalised coordinates: the inverse of
    # p_out = scale * R(angle) p_in + t, with R as cv2 builds it (y axis down)
    a = torch.deg2rad(angle)
    cos, sin = torch.cos(a) / scale, torch.sin(a) / scale
    t = -2 * shift                                       # fraction of the side -> normalised units
    theta = torch.stack([torch.stack([cos, -sin, cos * t[:, 0] - sin * t[:, 1]], 1),
                         torch.stack([sin, cos, sin * t[:, 0] + cos * t[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    sign = torch.where(flip, -1.0, 1.0)
    return x, torch.stack([pose[:, 0] * sign, pose[:, 1], pose[:, 2] * sign - angle], 1)
