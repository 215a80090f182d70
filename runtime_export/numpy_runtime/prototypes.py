"""One set of cluster prototypes for many tiles: the procedure ``segment`` ships and evaluation scores.

Cells (stride-4 embedding positions) are kept on a global lattice: every ``step``-th cell in both
directions of each raster, ``step`` chosen so that at most ``max_fit_cells`` cells are kept over all
rasters (``lattice_step``), and only cells whose 4x4 block is mostly valid pixels (``valid_cells``).
The kept cells are put in raster order (raster index, row, column), so the result does not depend on
how a raster was cut into tiles, and the model's soft k-means runs once over them, seeded by its own
seed channels. Numpy alone, like the runtime it belongs to.
"""

from __future__ import annotations

import math

import numpy as np

from .runtime import STRIDE, Embedding, RuntimeModel, check_k_range, soft_kmeans

DEFAULT_MAX_FIT_CELLS = 65_536


def lattice_step(total_cells: int, max_fit_cells: int = DEFAULT_MAX_FIT_CELLS) -> int:
    """The lattice spacing, in cells, that keeps at most about ``max_fit_cells`` of ``total_cells``."""
    if max_fit_cells < 1:
        raise ValueError(f"max fit cells {max_fit_cells}: the prototypes need at least one cell to be fitted on")
    return max(1, math.ceil(math.sqrt(total_cells / max_fit_cells)))


def cell_grid(height: int, width: int) -> tuple[int, int]:
    """Stride-4 cells covering a height x width raster (partial edge blocks included)."""
    return math.ceil(height / STRIDE), math.ceil(width / STRIDE)


def valid_cells(valid: np.ndarray) -> np.ndarray:
    """Cells whose 4x4 block is mostly valid pixels (partial edge blocks: of the pixels they have)."""
    h, w = cell_grid(*valid.shape)
    padded = np.zeros((h * STRIDE, w * STRIDE), np.float32)
    padded[: valid.shape[0], : valid.shape[1]] = valid
    present = np.zeros_like(padded)
    present[: valid.shape[0], : valid.shape[1]] = 1
    blocks = (h, STRIDE, w, STRIDE)
    return padded.reshape(blocks).sum(axis=(1, 3)) > 0.5 * present.reshape(blocks).sum(axis=(1, 3))


class PrototypeSample:
    """Lattice cells of many tiles, collected one tile at a time (memory: the kept cells only)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self._keys: list[np.ndarray] = []
        self._embeddings: list[np.ndarray] = []
        self._seeds: list[np.ndarray] = []

    def keep_mask(self, rows: np.ndarray, cols: np.ndarray, usable: np.ndarray | None) -> np.ndarray:
        """[len(rows), len(cols)] cells on the lattice (global cell coordinates) that are ``usable``."""
        keep = (rows[:, None] % self.step == 0) & (cols[None, :] % self.step == 0)
        return keep if usable is None else keep & usable

    def add(
        self,
        embedding: Embedding,
        rows: slice,
        cols: slice,
        origin: tuple[int, int],
        usable: np.ndarray | None,
        raster: int = 0,
    ) -> None:
        """Keep the lattice cells of ``embedding[rows, cols]``, whose first cell is ``origin`` (global row, column
        of the raster numbered ``raster``); ``usable`` [rows, cols] masks cells (valid pixels), None = all."""
        h, w = embedding.grid
        local_r, local_c = np.arange(h)[rows], np.arange(w)[cols]
        global_r, global_c = local_r - local_r[0] + origin[0], local_c - local_c[0] + origin[1]
        keep = self.keep_mask(global_r, global_c, usable)
        if not keep.any():
            return
        flat = (local_r[:, None] * w + local_c[None, :])[keep]
        key_r, key_c = np.broadcast_to(global_r[:, None], keep.shape)[keep], np.broadcast_to(global_c, keep.shape)[keep]
        self._keys.append(np.stack([np.full(flat.size, raster), key_r, key_c]).astype(np.int64))
        self._embeddings.append(embedding.embeddings[flat])
        self._seeds.append(embedding.seed_logits[flat])

    @property
    def n_cells(self) -> int:
        return sum(keys.shape[1] for keys in self._keys)

    def fit(self, k: int, iters: int, temperature: np.float32) -> np.ndarray:
        """Prototypes [K, D'] of the model's soft k-means over the kept cells in raster order."""
        if not self._keys:
            raise ValueError("no valid cells to fit cluster prototypes on (all nodata?)")
        check_k_range(k, max_k=self._seeds[0].shape[1])  # the model's seed channels
        keys = np.concatenate(self._keys, axis=1)
        order = np.lexsort((keys[2], keys[1], keys[0]))
        embeddings = np.concatenate(self._embeddings)[order]
        seeds = np.concatenate(self._seeds)[order][:, :k]
        return soft_kmeans(embeddings, seeds, iters, temperature)[1]


def fill_colour(model: RuntimeModel) -> np.ndarray:
    """uint8 [3]: the model's mean colour, which normalises to about 0 (what invalid pixels are filled with)."""
    return np.rint(model.mean.ravel() * model.input_divisor).astype(np.uint8)


def encoder_input(model: RuntimeModel, rgb: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    """What the encoder is fed for a window: invalid pixels filled with ``fill_colour``, then edge-padded to
    multiples of the stride (the labels of the padding are cropped away)."""
    if valid is not None:
        rgb = rgb.copy()
        rgb[:, ~valid] = fill_colour(model)[:, None]
    pad_h, pad_w = (-rgb.shape[1]) % STRIDE, (-rgb.shape[2]) % STRIDE
    if pad_h or pad_w:
        rgb = np.pad(rgb, ((0, 0), (0, pad_h), (0, pad_w)), mode="edge")
    return rgb
