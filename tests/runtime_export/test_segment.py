"""Whole-raster segmentation: one prototype set, seam-free tiling, nodata, georeferencing, atomic output."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from runtime_export import segment as segment_module
from runtime_export.export import export_model
from runtime_export.runtime import load_runtime_model
from runtime_export.segment import main, segment_raster, tile_windows
from training_core.config import ModelConfig, TrainConfig

from .conftest import SAMPLE_ROOT, calibrated_model

# 791 x 718 (not multiples of 4), EPSG:32618, nodata=0 collar around the scene.
SCENE = SAMPLE_ROOT / "unlabeled_scenes" / "images" / "RGB.byte.tif"


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory: pytest.TempPathFactory, sample_tiles) -> Path:
    config = TrainConfig(model=ModelConfig(embed_dim=16, max_k=8, luminance_weight=0.5, chroma_weight=1.0))
    model = calibrated_model(config, sample_tiles, seed=1)
    return export_model(model, config, tmp_path_factory.mktemp("seg") / "model", {}, {})


def test_tiles_cover_the_raster_once() -> None:
    covered = np.zeros((718, 791), int)
    for tile in tile_windows(791, 718, 256, 40):
        core = tile.core
        covered[core.row_off : core.row_off + core.height, core.col_off : core.col_off + core.width] += 1
        assert tile.read.col_off % 4 == 0 and tile.read.row_off % 4 == 0
    assert (covered == 1).all()


def test_one_tile_and_many_tiles_agree_and_output_is_georeferenced(small_artifact: Path, tmp_path: Path) -> None:
    model = load_runtime_model(small_artifact)
    whole = segment_raster(model, SCENE, tmp_path / "whole.tif", k=6, tile_size=1024)
    tiled = segment_raster(model, SCENE, tmp_path / "tiled.tif", k=6, tile_size=256)
    assert (whole.tiles, tiled.tiles) == (1, 12)
    assert whole.fit_cells == tiled.fit_cells
    with rasterio.open(SCENE) as src:
        valid = src.dataset_mask() > 0
        crs, transform = src.crs, src.transform
    with rasterio.open(tmp_path / "whole.tif") as a, rasterio.open(tmp_path / "tiled.tif") as b:
        assert (a.crs, a.transform, a.nodata, a.dtypes, a.count) == (crs, transform, 255, ("uint8",), 1)
        assert (b.crs, b.transform, b.nodata) == (crs, transform, 255)
        one, many = a.read(1), b.read(1)
    np.testing.assert_array_equal(one[valid], many[valid])
    assert (one[~valid] == 255).all() and (one[valid] < 6).all()
    assert whole.nodata_pixels == int((~valid).sum())
    assert len(np.unique(one[valid])) >= 2


def test_cli_writes_labels_and_reports_json(small_artifact: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "labels" / "out.tif"
    argv = ["--model", str(small_artifact), "--input", str(SCENE), "--output", str(out), "--k", "3"]
    assert main([*argv, "--max-fit-cells", "1000"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output"] == str(out) and report["lattice_step"] == 6 and report["fit_cells"] <= 1000
    with rasterio.open(out) as dst:
        assert dst.read(1).max() == 255 and sorted(np.unique(dst.read(1)))[:-1] == [0, 1, 2]


def _write_rgb(path: Path, rgb: np.ndarray, nodata: int | None) -> Path:
    profile = {"driver": "GTiff", "height": rgb.shape[1], "width": rgb.shape[2], "count": 3, "dtype": "uint8"}
    with rasterio.open(
        path, "w", crs="EPSG:3857", transform=Affine(1, 0, 500, 0, -1, 900), nodata=nodata, **profile
    ) as dst:
        dst.write(rgb)
    return path


def test_all_nodata_is_a_clear_error(small_artifact: Path, tmp_path: Path) -> None:
    empty = _write_rgb(tmp_path / "empty.tif", np.zeros((3, 40, 40), np.uint8), nodata=0)
    with pytest.raises(ValueError, match="empty.tif.*no valid pixels"):
        segment_raster(load_runtime_model(small_artifact), empty, tmp_path / "out.tif", k=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.tif"]


def test_bad_arguments(small_artifact: Path, tmp_path: Path) -> None:
    model = load_runtime_model(small_artifact)
    rgb = _write_rgb(tmp_path / "in.tif", np.full((3, 40, 40), 9, np.uint8), nodata=None)
    with pytest.raises(ValueError, match="k=9"):
        segment_raster(model, rgb, tmp_path / "out.tif", k=9)
    with pytest.raises(ValueError, match="nodata label 3"):
        segment_raster(model, rgb, tmp_path / "out.tif", k=4, nodata_label=3)


def test_failure_leaves_no_output(small_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    rgb = _write_rgb(tmp_path / "in.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 64), np.uint8), None)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(segment_module, "_assign_tile", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        segment_raster(load_runtime_model(small_artifact), rgb, tmp_path / "out.tif", k=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]
