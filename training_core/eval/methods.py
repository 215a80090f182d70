"""Evaluation methods: the clusterings scored, each fitting one set of cluster centres per dataset from
pixels alone, then labelling every tile.

- ``model``: the trained model, run by the numpy runtime exactly as ``runtime_export.segment`` runs it
  (invalid pixels filled with the mean colour, tiles padded to the stride, one lattice sample of cells
  over all the dataset's tiles: ``runtime_export.numpy_runtime.prototypes``), so the score describes what a user gets;
- ``untrained_model``: the same architecture with the weights training starts from (same seed), the same
  inference: does training help on this data?
- ``kmeans_rgb``: k-means on the pixels' colours;
- ``constant``: every pixel in one cluster, what an imbalanced label set gives for nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from runtime_export.artifact import runtime_meta
from runtime_export.numpy_runtime.prototypes import PrototypeSample, cell_grid, encoder_input, valid_cells
from runtime_export.numpy_runtime.runtime import Embedding, RuntimeModel
from training_core.baseline import fit_rgb_centres, nearest_centre_labels
from training_core.config import TrainConfig
from training_core.eval.report import BASELINE, CONSTANT, MODEL, UNTRAINED
from training_core.eval.tiles import LabeledTile
from training_core.export import runtime_arrays
from training_core.model import SegmentationModel

MAX_FIT_PIXELS = 65_536  # pixels sampled (on a lattice) to fit the k-means-on-RGB centres


class Method(Protocol):
    """A clustering method: sees every tile once to draw its fit sample, fits, then labels tiles."""

    def observe(self, tile: LabeledTile, index: int) -> None: ...

    def fit(self, ks: Sequence[int]) -> None: ...

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]: ...


class RuntimeMethod:
    """A model run by the numpy runtime as ``segment`` runs it: fill, pad, embed, lattice sample, assign."""

    def __init__(self, model: RuntimeModel, step: int) -> None:
        self.model = model
        self.sample = PrototypeSample(step)
        self.prototypes: dict[int, np.ndarray] = {}

    def _embed(self, rgb: np.ndarray, valid: np.ndarray | None) -> Embedding:
        return self.model.embed(encoder_input(self.model, rgb, valid))

    def observe(self, tile: LabeledTile, index: int) -> None:
        embedding = self._embed(tile.rgb, tile.valid)
        h, w = cell_grid(*tile.rgb.shape[1:])
        usable = None if tile.valid is None else valid_cells(tile.valid)
        self.sample.add(embedding, slice(0, h), slice(0, w), (0, 0), usable, raster=index)

    def fit(self, ks: Sequence[int]) -> None:
        self.prototypes = {k: self.sample.fit(k, self.model.cluster_iters, self.model.temperature) for k in ks}

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        embedding = self._embed(rgb, valid)
        height, width = rgb.shape[1:]
        return {
            k: self.model.labels_from_assignment(self.model.assign(embedding, prototypes), embedding)[:height, :width]
            for k, prototypes in self.prototypes.items()
        }


class KMeansRGB:
    """k-means on colours, fitted on valid pixels on a lattice over all tiles."""

    def __init__(self, step: int, seed: int) -> None:
        self.step, self.seed = step, seed
        self._pixels: list[np.ndarray] = []
        self.centres: dict[int, np.ndarray] = {}

    def observe(self, tile: LabeledTile, index: int) -> None:
        pixels = tile.rgb[:, :: self.step, :: self.step]
        keep = None if tile.valid is None else tile.valid[:: self.step, :: self.step]
        self._pixels.append(pixels.reshape(3, -1) if keep is None else pixels[:, keep])

    def fit(self, ks: Sequence[int]) -> None:
        pixels = np.concatenate(self._pixels, axis=1)[:, None, :]  # one [3, 1, N] "tile"
        self.centres = {k: fit_rgb_centres([pixels], k, seed=self.seed, max_fit_pixels=MAX_FIT_PIXELS) for k in ks}

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        return {k: nearest_centre_labels(rgb, centres) for k, centres in self.centres.items()}


class Constant:
    """Every pixel in cluster 0: the mapping sends it to the most frequent class."""

    def observe(self, tile: LabeledTile, index: int) -> None:
        pass

    def fit(self, ks: Sequence[int]) -> None:
        self.ks = list(ks)

    def predict(self, rgb: np.ndarray, valid: np.ndarray | None) -> dict[int, np.ndarray]:
        return {k: np.zeros(rgb.shape[1:], np.uint8) for k in self.ks}


def runtime_of(model: SegmentationModel, config: TrainConfig) -> RuntimeModel:
    """The numpy runtime of a torch model, in memory: the arrays and fields an export would write."""
    return RuntimeModel(runtime_meta(config, {}, {}, {}), runtime_arrays(model.eval()))


def untrained_twin(config: TrainConfig) -> SegmentationModel:
    """The weights training starts from: the same architecture and seed (``training_core.train``)."""
    torch.manual_seed(config.seed)
    return SegmentationModel(config.model).eval()


def checked_runtime(model: SegmentationModel, config: TrainConfig, k: int) -> RuntimeModel:
    """The model's runtime, once ``k`` is known to be in its range (the runtime's own check, the one ``segment``
    applies), before any tile is read."""
    runtime = runtime_of(model, config)
    runtime.check_k(k)
    return runtime


def control_methods(
    runtime: RuntimeModel, config: TrainConfig, cell_step: int, pixel_step: int, seed: int
) -> dict[str, Method]:
    """The model (its runtime) beside its controls: its untrained twin, k-means on RGB, the constant predictor."""
    return {
        MODEL: RuntimeMethod(runtime, cell_step),
        UNTRAINED: RuntimeMethod(runtime_of(untrained_twin(config), config), cell_step),
        BASELINE: KMeansRGB(pixel_step, seed),
        CONSTANT: Constant(),
    }
