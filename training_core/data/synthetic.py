"""Deterministic synthetic RGB tiles: the default, dependency-free data source for smoke runs.

Each tile is a handful of regions (a Voronoi partition with wavy borders), each region with its own
colour and its own striped texture plus pixel noise, so a segmentation model has both colour and
texture to separate. Tile ``i`` depends only on (seed, i): any worker, any rank, any run draws the
same pixels. The region index (1..n) is returned as ``target``, so metrics work on synthetic data too.
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

MIN_REGIONS = 3
MAX_REGIONS = 8


def synthetic_tile(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(image uint8 [3, size, size], region labels uint8 [size, size] in 1..n) for tile ``index``."""
    rng = np.random.default_rng([seed, index])
    n_regions = int(rng.integers(MIN_REGIONS, MAX_REGIONS + 1))
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) / size

    # Wavy borders: displace the coordinates by a low-frequency field before the Voronoi assignment.
    amp, freq, phase = rng.uniform(0.0, 0.05, 2), rng.uniform(1.0, 4.0, 2), rng.uniform(0, 2 * np.pi, 2)
    wy = ys + amp[0] * np.sin(2 * np.pi * freq[0] * xs + phase[0])
    wx = xs + amp[1] * np.sin(2 * np.pi * freq[1] * ys + phase[1])
    centres = rng.uniform(0.0, 1.0, (n_regions, 2)).astype(np.float32)
    distances = (wy[None] - centres[:, 0, None, None]) ** 2 + (wx[None] - centres[:, 1, None, None]) ** 2
    region = distances.argmin(axis=0)

    # Per-region colour and oriented stripes, gathered per pixel so the cost does not grow with n.
    colours = rng.uniform(0.1, 0.9, (n_regions, 3)).astype(np.float32)
    stripe_amp = rng.uniform(0.0, 0.12, n_regions).astype(np.float32)
    stripe_freq = rng.uniform(4.0, 40.0, n_regions).astype(np.float32)
    angle = rng.uniform(0.0, np.pi, n_regions).astype(np.float32)
    stripe_phase = rng.uniform(0.0, 2 * np.pi, n_regions).astype(np.float32)
    along = np.cos(angle)[region] * xs + np.sin(angle)[region] * ys
    texture = stripe_amp[region] * np.sin(2 * np.pi * stripe_freq[region] * along + stripe_phase[region])
    noise = rng.normal(0.0, 0.03, (3, size, size)).astype(np.float32)
    rgb = colours[region].transpose(2, 0, 1) + texture[None] + noise
    image = np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)
    return image, (region + 1).astype(np.uint8)


class SyntheticTiles(Dataset):
    """``n_items`` synthetic tiles of ``patch_size`` pixels, as sample dicts (all pixels valid)."""

    def __init__(self, n_items: int, patch_size: int = 512, seed: int = 42) -> None:
        self.n_items = n_items
        self.patch_size = patch_size
        self.seed = seed

    def __len__(self) -> int:
        return self.n_items

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.n_items:
            raise IndexError(f"synthetic tile {index} outside [0, {self.n_items})")
        image, region = synthetic_tile(self.seed, index, self.patch_size)
        return {
            "image": torch.from_numpy(image),
            "target": torch.from_numpy(region.astype(np.int64)),
            "valid": torch.ones((self.patch_size, self.patch_size), dtype=torch.bool),
            "item_id": f"synthetic-{self.seed}-{index:06d}",
        }
