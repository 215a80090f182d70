"""Encode once: ``segment`` writes the labels of the encode-twice version it replaced, and the cells pass 2 reads
back from the scratch file are the numbers a fresh encode gives, whatever the tiling.

Both hold up to float32 rounding, which differs between BLAS kernels when the same cell is encoded inside
differently shaped tiles: labels agree except at near-ties, embeddings within ``EMBEDDING_ATOL``
(``tests.numerics``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from runtime_export.numpy_runtime.prototypes import cell_grid, encoder_input
from runtime_export.numpy_runtime.runtime import STRIDE, load_runtime_model
from runtime_export.numpy_runtime.whole_raster import (
    EmbeddingSpill,
    Window,
    core_cells,
    fit_raster_prototypes,
    margin_pixels,
    tile_windows,
)
from runtime_export.rasters import InputReader
from runtime_export.segment import RasterioSource, choose_file_rule, segment_raster
from tests.numerics import EMBEDDING_ATOL, assert_labels_equal_off_near_ties
from training_core.config import ModelConfig, TrainConfig
from training_core.export import export_model

from .conftest import SAMPLE_ROOT, calibrated_model, read_rgb
from .reference_segment import encode_twice

CONFIGS = {
    "small": TrainConfig(model=ModelConfig(embed_dim=16, max_k=8, luminance_weight=0.5, chroma_weight=1.0)),
    # No smoothing (labels reach one cell), no colour channels.
    "plain": TrainConfig(
        model=ModelConfig(embed_dim=16, max_k=8, smoothing="none", luminance_weight=0.0, chroma_weight=0.0)
    ),
}
MOSAIC_TILES = (
    "quebec_buildings/images/tile_1.tif",
    "quebec_buildings/images/tile_2.tif",
    "kampala_buildings/images/OAM-1238448-1046532-21.tif",
)


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory, sample_tiles, artifact_dir: Path) -> dict[str, Path]:
    """Two small models, and the default-size one with learned smoothing (conftest)."""
    folder = tmp_path_factory.mktemp("artifacts")
    made = {
        name: export_model(calibrated_model(config, sample_tiles, seed=1), config, folder / name, {}, {})
        for name, config in CONFIGS.items()
    }
    return {**made, "learned": artifact_dir}


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The scene with its nodata collar (791 x 718); a 1536 x 1536 mosaic of sample tiles, some mirrored; and a
    1301 x 1103 crop of it with a nodata=0 border (700 columns on the left: whole tiles never encoded, 20 rows on
    top) and a hole."""
    folder = tmp_path_factory.mktemp("rasters")
    tiles = [read_rgb(SAMPLE_ROOT / name) for name in MOSAIC_TILES]
    tiles = [np.pad(t, ((0, 0), (0, 512 - t.shape[1]), (0, 512 - t.shape[2])), mode="reflect") for t in tiles]
    rows = [np.concatenate([tiles[(r + c) % 3][:, :, :: 1 - 2 * (c % 2)] for c in range(3)], axis=2) for r in range(3)]
    mosaic = np.concatenate(rows, axis=1)
    border = mosaic[:, :1103, :1301].copy()
    border[:, :, :700] = border[:, :20] = border[:, 600:700, 900:1000] = 0
    geo = {"driver": "GTiff", "crs": "EPSG:3857", "transform": Affine(1, 0, 500, 0, -1, 900)}
    for name, pixels, nodata in (("mosaic", mosaic, None), ("border", border, 0)):
        _, height, width = pixels.shape
        with rasterio.open(
            folder / f"{name}.tif", "w", **geo, height=height, width=width, count=3, dtype="uint8", nodata=nodata
        ) as dst:
            dst.write(pixels)
    return {
        "scene": SAMPLE_ROOT / "unlabeled_scenes/images/RGB.byte.tif",
        "mosaic": folder / "mosaic.tif",
        "border": folder / "border.tif",
    }


@pytest.mark.parametrize(
    ("artifact", "raster", "k", "tile_size"),
    [
        ("small", "scene", 6, 256),
        ("learned", "scene", 8, 512),
        ("small", "mosaic", 8, 512),  # lattice step 2
        ("plain", "mosaic", 5, 256),
        ("small", "border", 4, 256),
        ("plain", "border", 3, 384),
    ],
)
def test_labels_equal_the_encode_twice_segment(
    artifacts: dict[str, Path], rasters: dict[str, Path], artifact: str, raster: str, k: int, tile_size: int, tmp_path
) -> None:
    model = load_runtime_model(artifacts[artifact])
    segment_raster(model, rasters[raster], tmp_path / "labels.tif", k, tile_size=tile_size)
    with rasterio.open(tmp_path / "labels.tif") as src:
        labels = src.read(1)
    expected, gap = encode_twice(model, rasters[raster], k, tile_size)
    assert_labels_equal_off_near_ties(labels, expected, gap)
    assert len(np.unique(labels)) > 2


def test_spilled_cells_are_a_fresh_encode_whatever_the_tiling(
    artifacts: dict[str, Path], rasters: dict[str, Path], tmp_path: Path
) -> None:
    """The margin exceeds the receptive field: a core cell's embedding is the same numbers (up to rounding) in any
    window that holds the core and its margin, here each tile's own and the whole raster."""
    model = load_runtime_model(artifacts["small"])
    path = rasters["mosaic"]
    with InputReader(path, choose_file_rule(model.meta, path)[0]) as opened:
        reader = RasterioSource(opened)
        width, height, grid = reader.width, reader.height, cell_grid(reader.height, reader.width)
        whole = model.embed(encoder_input(model, *reader.read(Window(0, 0, width, height))))
        expected = whole.embeddings.reshape(*grid, -1)
        for tile_size in (384, 512):
            tiles = list(tile_windows(width, height, tile_size, margin_pixels(model.smooth_iters)))
            with EmbeddingSpill(tmp_path / f"cells-{tile_size}.f32", grid, expected.shape[-1]) as spill:
                fit_raster_prototypes(model, reader, 4, tiles, 1, spill)
                whole_cells = spill.read(slice(0, grid[0]), slice(0, grid[1]))
                np.testing.assert_allclose(whole_cells, expected, rtol=0, atol=EMBEDDING_ATOL)
                for tile in tiles:
                    fresh = model.embed(encoder_input(model, *reader.read(tile.read)))
                    rows, cols = core_cells(tile)
                    r0, c0 = tile.core.row_off // STRIDE, tile.core.col_off // STRIDE
                    spilled = spill.read(slice(r0, r0 + rows.stop - rows.start), slice(c0, c0 + cols.stop - cols.start))
                    fresh_cells = fresh.embeddings.reshape(*fresh.grid, -1)[rows, cols]
                    np.testing.assert_allclose(spilled, fresh_cells, rtol=0, atol=EMBEDDING_ATOL)
