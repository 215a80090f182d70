"""The encode-twice segmentation ``segment`` ran before it encoded each tile once, kept as a test oracle.

Pass 1 encodes the tiles and fits the prototypes on the lattice cells in raster order; pass 2 encodes every
tile again (margin: receptive field + smoothing + 2 cells) and keeps the labels of its core. Besides the
labels it returns each pixel's lead of the best cluster over the second (``tests.numerics.top2_gap``), so a
test can tell a real difference from a near-tie that float32 rounding may flip.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from runtime_export.numpy_runtime.prototypes import DEFAULT_MAX_FIT_CELLS, cell_grid, encoder_input, valid_cells
from runtime_export.numpy_runtime.runtime import STRIDE, RuntimeModel, soft_kmeans, upsample_bilinear
from runtime_export.numpy_runtime.whole_raster import (
    DEFAULT_NODATA_LABEL,
    ENCODER_REACH_CELLS,
    core_cells,
    tile_windows,
)
from runtime_export.rasters import InputReader
from runtime_export.segment import RasterioSource, choose_file_rule
from tests.numerics import top2_gap


def encode_twice(model: RuntimeModel, path: Path, k: int, tile_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(labels [H, W] uint8 with nodata pixels ``DEFAULT_NODATA_LABEL``, top-2 gap [H, W] float32; inf at nodata)."""
    rule, _ = choose_file_rule(model.meta, path)
    with InputReader(path, rule) as opened:
        reader = RasterioSource(opened)
        width, height = reader.width, reader.height
        tiles = list(tile_windows(width, height, tile_size, STRIDE * (ENCODER_REACH_CELLS + model.smooth_iters + 2)))
        step = max(1, math.ceil(math.sqrt(math.prod(cell_grid(height, width)) / DEFAULT_MAX_FIT_CELLS)))
        keys, embeddings, seeds = [], [], []
        for tile in tiles:
            rgb, valid = reader.read(tile.read)
            rgb = encoder_input(model, rgb, valid)
            h, w = rgb.shape[1] // STRIDE, rgb.shape[2] // STRIDE
            rs, cs = core_cells(tile)
            cell_r = np.arange(h)[rs] + tile.read.row_off // STRIDE  # global cell coordinates
            cell_c = np.arange(w)[cs] + tile.read.col_off // STRIDE
            keep = (cell_r[:, None] % step == 0) & (cell_c[None, :] % step == 0)
            keep = keep if valid is None else keep & valid_cells(valid)[rs, cs]
            if keep.any():
                embedding = model.embed(rgb)
                local = (np.arange(h)[rs][:, None] * w + np.arange(w)[cs][None, :])[keep]
                keys.append((cell_r[:, None] * (1 << 31) + cell_c[None, :])[keep])
                embeddings.append(embedding.embeddings[local])
                seeds.append(embedding.seed_logits[local, :k])
        order = np.argsort(np.concatenate(keys), kind="stable")
        fit = (np.concatenate(embeddings)[order], np.concatenate(seeds)[order])
        _, prototypes = soft_kmeans(*fit, model.cluster_iters, model.temperature)
        labels = np.empty((height, width), np.uint8)
        gap = np.empty((height, width), np.float32)
        for tile in tiles:
            rgb, valid = reader.read(tile.read)
            embedding = model.embed(encoder_input(model, rgb, valid))
            low_res = model.low_res_from_assignment(model.assign(embedding, prototypes), embedding)
            probs = upsample_bilinear(low_res, embedding.size)
            y, x = tile.core.row_off - tile.read.row_off, tile.core.col_off - tile.read.col_off
            core = (slice(y, y + tile.core.height), slice(x, x + tile.core.width))
            tile_labels, tile_gap = probs.argmax(axis=0)[core].astype(np.uint8), top2_gap(probs)[core]
            if valid is not None:
                tile_labels = np.where(valid[core], tile_labels, DEFAULT_NODATA_LABEL)
                tile_gap = np.where(valid[core], tile_gap, np.inf)
            out = (
                slice(tile.core.row_off, tile.core.row_off + tile.core.height),
                slice(tile.core.col_off, tile.core.col_off + tile.core.width),
            )
            labels[out], gap[out] = tile_labels, tile_gap
    return labels, gap
