"""Shared fixtures: a model with non-trivial batch-norm statistics and smoothing, its artifact, real tiles."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

from runtime_export.numpy_runtime.pixels import PixelRule
from training_core.config import ModelConfig, TrainConfig
from training_core.export import export_model
from training_core.model import SegmentationModel

SAMPLE_ROOT = Path(__file__).resolve().parents[2] / "sample_data" / "extracted"
# Two 512x512 tiles, a 256x256 one, and one whose sides are not multiples of 4 (ceil pooling, odd upsampling).
PARITY_TILES = (
    "quebec_buildings/images/tile_1.tif",
    "quebec_buildings/images/tile_2.tif",
    "kampala_buildings/images/OAM-1238448-1046532-21.tif",
    "new_brunswick_landcover/images/23322E759967N_clipped_1m_1of2.tif",
)


def read_rgb(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read([1, 2, 3])


def calibrated_model(config: TrainConfig, tiles: list[np.ndarray], seed: int = 0) -> SegmentationModel:
    """A seeded model whose batch norm has real running statistics and whose smoothing kernel is not a box."""
    torch.manual_seed(seed)
    model = SegmentationModel(config.model)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # cumulative average over the calibration tiles
    model.train()
    with torch.no_grad():
        for rgb in tiles:
            model(torch.from_numpy(rgb).float()[None] / 255.0, 2)
        model.smooth_logits.normal_()
    return model.eval()


@pytest.fixture(scope="session")
def sample_tiles() -> list[np.ndarray]:
    return [read_rgb(SAMPLE_ROOT / name) for name in PARITY_TILES]


@pytest.fixture(scope="session")
def learned_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(smoothing="learned", luminance_weight=0.5, chroma_weight=1.0))


@pytest.fixture(scope="session")
def model(learned_config: TrainConfig, sample_tiles: list[np.ndarray]) -> SegmentationModel:
    return calibrated_model(learned_config, sample_tiles)


QUEBEC_RULE = {"dtype": "uint8", **PixelRule().to_dict()}


@pytest.fixture(scope="session")
def artifact_dir(tmp_path_factory: pytest.TempPathFactory, model: SegmentationModel, learned_config) -> Path:
    lineage = {"dataset_ids": ["quebec_buildings"], "data_versions": {"quebec_buildings": "abc"}}
    out_dir = tmp_path_factory.mktemp("artifact") / "model"
    rules = {"quebec_buildings": QUEBEC_RULE}
    return export_model(model, learned_config, out_dir, lineage, {"val_miou": 0.5}, rules)


@pytest.fixture
def umask_022() -> Iterator[None]:
    previous = os.umask(0o022)
    yield
    os.umask(previous)
