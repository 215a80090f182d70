"""Chipped shards on real sample rasters: the chip grid and its clipped edge chips, pixels, mask bands and targets
cut with one window, every chip in its source's split, the verifier, and a build's memory bounded by the chip."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio import windows
from rasterio.windows import Window

from runtime_export.errors import DatasetError
from runtime_export.rasters import has_mask_band
from training_core.datasets.discovery import discover_items
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_FILENAME, dump_header, header_from_dict, load_header
from training_core.shards.index import (
    INDEX_FILENAME,
    IndexEntry,
    iter_split_items,
    read_index,
    read_manifest,
    shard_dirs,
)
from training_core.shards.plan import chip_windows
from training_core.shards.verify import entries_by_source, verify_shards
from training_core.shards.write import build_shards
from training_core.splits import SPLITS, assign_splits

CHIP = 256
CUTS = "rgb_byte_cuts"  # three rasters cut from unlabeled_scenes/RGB.byte.tif, two labeled from quebec's masks
V0_KEYS = {"dataset_id", "item_id", "raw_split", "split", "input", "has_target", "target", "input_sha256"}


def commit_header(dataset_dir: Path, **sharding: object) -> None:
    """Commit the dataset's extracted header, with these sharding settings."""
    data = extract_header(dataset_dir).model_dump()
    data["sharding"] |= sharding
    dump_header(header_from_dict(data, dataset_dir), dataset_dir / HEADER_FILENAME)


def chip_transform(window: tuple[int, int, int, int], transform: Affine) -> Affine:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # rasterio 1.4 multiplies Affines with `*`
        return windows.transform(Window(*window), transform)


def built_entries(processed: Path, dataset_id: str) -> list[tuple[Path, IndexEntry]]:
    return [pair for split in SPLITS for pair in iter_split_items(processed, dataset_id, split)]


def assert_chip_is_its_window(shard_dir: Path, entry: IndexEntry, input_path: Path, target_path: Path | None) -> None:
    """The chip's tiles hold its window of the source: every band, the mask band, CRS, nodata, the window's
    transform; its target the same window of the source's target, on the same grid."""
    window = Window(*entry.window)
    with rasterio.open(shard_dir / entry.input) as tile, rasterio.open(input_path) as src:
        assert (tile.width, tile.height) == entry.window[2:]
        assert (tile.crs, tile.nodata, tile.dtypes, tile.compression) == (src.crs, src.nodata, src.dtypes, None)
        assert tile.transform == chip_transform(entry.window, src.transform)
        np.testing.assert_array_equal(tile.read(), src.read(window=window))
        assert has_mask_band(tile) == has_mask_band(src)
        np.testing.assert_array_equal(tile.read_masks(1), src.read_masks(1, window=window))
        input_transform = tile.transform
    assert (entry.target is None) == (target_path is None)
    if target_path is not None:
        with rasterio.open(shard_dir / entry.target) as tile, rasterio.open(target_path) as src:
            assert tile.transform == input_transform
            np.testing.assert_array_equal(tile.read(), src.read(window=window))


def assert_chips_follow_sources(extracted: Path, processed: Path, dataset_id: str) -> dict[str, list[IndexEntry]]:
    """Every source's items: one whole item when it fits a chip, else the chip grid (ids, windows) in order;
    all of them in the split the rule gives the source; every chip's tiles equal to its window of the source."""
    dataset_dir = extracted / dataset_id
    header = load_header(dataset_dir / HEADER_FILENAME)
    chip = header.sharding.chip_size
    items = {item.item_id: item for item in discover_items(dataset_dir, header)}
    rule = assign_splits(list(items.values()), header)
    built = built_entries(processed, dataset_id)
    of_source = entries_by_source(entry for _, entry in built)
    assert sorted(of_source) == sorted(items)
    for source, chips in of_source.items():
        with rasterio.open(items[source].input_path) as src:
            height, width = src.height, src.width
        if height <= chip and width <= chip:
            assert [(e.item_id, e.source_item, e.window) for e in chips] == [(source, None, None)]
        else:
            grid = chip_windows(height, width, chip)
            assert [e.window for e in chips] == grid
            assert [e.item_id for e in chips] == [f"{source}@r{row}_c{col}" for col, row, _, _ in grid]
            assert {e.source_item for e in chips} == {source}
        assert {e.split for e in chips} == {rule[source]}
    for shard_dir, entry in built:
        if entry.window is not None:
            item = items[entry.source]
            assert_chip_is_its_window(shard_dir, entry, item.input_path, item.target_path)
    return of_source


# ------------------------------------------------------------------------------ sample datasets at chip 256


@pytest.fixture(scope="module")
def sample_chipped(tmp_path_factory: pytest.TempPathFactory, sample_extracted: Path) -> tuple[Path, Path, dict]:
    """unlabeled_scenes (400x400, 791x718, 485x373) and quebec_buildings (two labeled 512x512) at chip 256."""
    root = tmp_path_factory.mktemp("chipped")
    extracted, processed = root / "extracted", root / "processed"
    reports = {}
    for dataset_id, workers in (("unlabeled_scenes", 2), ("quebec_buildings", 1)):
        shutil.copytree(sample_extracted / dataset_id, extracted / dataset_id)
        commit_header(extracted / dataset_id, chip_size=CHIP)
        reports[dataset_id] = build_shards(extracted, processed, dataset_id, workers=workers)
    return extracted, processed, reports


def test_large_rasters_become_chips_on_a_grid_from_the_origin(sample_chipped) -> None:
    extracted, processed, reports = sample_chipped
    report = reports["unlabeled_scenes"]
    # Sources: 400x400 -> 2x2 chips, 791x718 -> 4x3, 485x373 -> 2x2.
    assert (report.counts, report.tile_counts) == (
        {"train": 3, "metrics_train": 0, "val": 0},
        {"train": 20, "metrics_train": 0, "val": 0},
    )
    manifest = read_manifest(processed, "unlabeled_scenes")
    assert (manifest["counts"], manifest["tile_counts"], manifest["chip_size"]) == (
        report.counts,
        report.tile_counts,
        CHIP,
    )
    of_source = assert_chips_follow_sources(extracted, processed, "unlabeled_scenes")
    byte = of_source["RGB.byte"]
    assert [e.item_id for e in byte[:2]] == ["RGB.byte@r0_c0", "RGB.byte@r0_c256"]
    # 791 = 3 x 256 + 23 and 718 = 2 x 256 + 206: the last column and row are clipped.
    assert (byte[-1].item_id, byte[-1].window) == ("RGB.byte@r512_c768", (768, 512, 23, 206))
    assert sum(w * h for *_, w, h in (e.window for e in byte)) == 791 * 718
    assert verify_shards(processed, "unlabeled_scenes") == []


def test_targets_are_cut_with_their_inputs_window_and_chips_stay_in_their_sources_split(sample_chipped) -> None:
    extracted, processed, reports = sample_chipped
    report = reports["quebec_buildings"]
    assert (report.counts, report.tile_counts) == (
        {"train": 0, "metrics_train": 1, "val": 1},
        {"train": 0, "metrics_train": 4, "val": 4},
    )
    assert report.label_values == [1, 2]
    of_source = assert_chips_follow_sources(extracted, processed, "quebec_buildings")
    assert {source: len(chips) for source, chips in of_source.items()} == {"tile_1": 4, "tile_2": 4}
    assert verify_shards(processed, "quebec_buildings") == []


def test_rasters_that_fit_a_chip_stay_one_item_with_a_v0_index_line(sample_extracted: Path, tmp_path: Path) -> None:
    extracted = tmp_path / "extracted"
    shutil.copytree(sample_extracted / "quebec_buildings", extracted / "quebec_buildings")
    commit_header(extracted / "quebec_buildings", chip_size=512)  # the tiles are 512x512: not larger
    report = build_shards(extracted, tmp_path / "processed", "quebec_buildings", workers=1)
    assert report.tile_counts == report.counts == {"train": 0, "metrics_train": 1, "val": 1}
    for shard_dir, entry in built_entries(tmp_path / "processed", "quebec_buildings"):
        assert entry.item_id in ("tile_1", "tile_2") and entry.window is None and entry.source == entry.item_id
        line = json.loads((shard_dir / INDEX_FILENAME).read_text())
        assert line.keys() == V0_KEYS | {"target_sha256"}


# ------------------------------------------------------------------- sizes not a multiple of the chip


def write_raster(path: Path, pixels: np.ndarray, src: rasterio.DatasetReader, window: Window, **extra: object) -> None:
    """pixels as a GeoTIFF on ``window``'s grid of src; ``mask`` (extra) is written as an internal mask band."""
    mask = extra.pop("mask", None)
    profile = {
        "driver": "GTiff",
        "count": pixels.shape[0],
        "height": pixels.shape[1],
        "width": pixels.shape[2],
        "dtype": pixels.dtype.name,
        "crs": src.crs,
        "transform": chip_transform((int(window.col_off), int(window.row_off), 0, 0), src.transform),
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
        if mask is not None:
            dst.write_mask(mask)


@pytest.fixture(scope="module")
def cuts(tmp_path_factory: pytest.TempPathFactory, sample_extracted: Path) -> tuple[Path, Path, object]:
    """``scene`` 700x530 with a mask band and labels, ``small`` 200x188 (labeled, mask band) and ``strip`` 91x300
    (nodata, unlabeled): real pixels of RGB.byte and real labels of quebec's masks (reflected to size)."""
    root = tmp_path_factory.mktemp("cuts")
    dataset = root / "extracted" / CUTS
    with rasterio.open(sample_extracted / "unlabeled_scenes" / "images" / "RGB.byte.tif") as byte:
        labels = {}
        for name in ("tile_1", "tile_2"):
            with rasterio.open(sample_extracted / "quebec_buildings" / "masks" / f"{name}.tif") as mask:
                labels[name] = mask.read()
        for name, window, label in (
            ("scene", Window(0, 0, 700, 530), np.pad(labels["tile_1"], ((0, 0), (0, 18), (0, 188)), mode="reflect")),
            ("small", Window(0, 530, 200, 188), labels["tile_2"][:, :188, :200]),
        ):
            pixels = byte.read(window=window)
            valid = np.where((pixels != 0).any(axis=0), 255, 0).astype(np.uint8)  # RGB.byte's nodata border
            write_raster(dataset / "images" / f"{name}.tif", pixels, byte, window, mask=valid)
            write_raster(dataset / "masks" / f"{name}.tif", label, byte, window)
        strip = Window(700, 0, 91, 300)
        write_raster(dataset / "images" / "strip.tif", byte.read(window=strip), byte, strip, nodata=0)
    commit_header(dataset, chip_size=CHIP)
    report = build_shards(root / "extracted", root / "processed", CUTS, workers=1)
    return root / "extracted", root / "processed", report


def test_sizes_not_a_multiple_of_the_chip_give_clipped_edge_chips(cuts) -> None:
    extracted, processed, report = cuts
    assert report.counts == {"train": 1, "metrics_train": 1, "val": 1}
    assert report.tile_counts["train"] == 2 and sorted(report.tile_counts.values()) == [1, 2, 9]
    of_source = assert_chips_follow_sources(extracted, processed, CUTS)
    assert [e.window for e in of_source["scene"]] == [
        (0, 0, 256, 256), (256, 0, 256, 256), (512, 0, 188, 256),
        (0, 256, 256, 256), (256, 256, 256, 256), (512, 256, 188, 256),
        (0, 512, 256, 18), (256, 512, 256, 18), (512, 512, 188, 18),
    ]  # fmt: skip
    assert of_source["scene"][-1].item_id == "scene@r512_c512"
    assert [e.window for e in of_source["strip"]] == [(0, 0, 91, 256), (0, 256, 91, 44)]
    assert [(e.item_id, e.window) for e in of_source["small"]] == [("small", None)]
    assert verify_shards(processed, CUTS) == []


def test_chips_put_back_together_are_the_source_pixel_for_pixel(cuts) -> None:
    """No pixel twice, none lost: the scene's chips stitched on their windows are the scene, mask band and labels."""
    extracted, processed, _ = cuts
    scene = [(d, e) for d, e in built_entries(processed, CUTS) if e.source == "scene"]
    image, valid, labels = np.zeros((3, 530, 700), np.uint8), np.zeros((530, 700), np.uint8), np.zeros((530, 700))
    covered = np.zeros((530, 700), np.int64)
    for shard_dir, entry in scene:
        col, row, width, height = entry.window
        where = np.s_[row : row + height, col : col + width]
        with rasterio.open(shard_dir / entry.input) as tile, rasterio.open(shard_dir / entry.target) as target:
            image[(slice(None), *where)] = tile.read()
            valid[where] = tile.read_masks(1)
            labels[where] = target.read(1)
        covered[where] += 1
    assert (covered == 1).all()
    with rasterio.open(extracted / CUTS / "images" / "scene.tif") as src:
        np.testing.assert_array_equal(image, src.read())
        np.testing.assert_array_equal(valid, src.read_masks(1))
        assert 0 < (valid == 0).sum() < valid.size  # the border is invalid, the rest valid
    with rasterio.open(extracted / CUTS / "masks" / "scene.tif") as src:
        np.testing.assert_array_equal(labels, src.read(1))


# -------------------------------------------------------------------------------------------- verifying


def tamper(processed: Path, tmp_path: Path, edit) -> Path:
    """A copy of the cuts build whose index lines of the scene pass through ``edit(split, line) -> lines``."""
    copy = Path(shutil.copytree(processed, tmp_path / "processed"))
    for split in SPLITS:
        for shard_dir in shard_dirs(copy, CUTS, split):
            index = shard_dir / INDEX_FILENAME
            lines = [json.loads(line) for line in index.read_text().splitlines()]
            edited = [out for line in lines for out in (edit(split, line) if line["item_id"] != "small" else [line])]
            index.write_text("".join(json.dumps(line) + "\n" for line in edited))
    return copy


def test_verify_finds_a_lost_chip(cuts, tmp_path: Path) -> None:
    processed = tamper(cuts[1], tmp_path, lambda split, line: [] if line["item_id"] == "scene@r256_c256" else [line])
    problems = verify_shards(processed, CUTS)
    assert any("scene: pixel (row 256, col 256) is in no chip" in p for p in problems)
    assert any("tile counts" in p for p in problems)


def test_verify_finds_overlapping_chips(cuts, tmp_path: Path) -> None:
    def shift(split: str, line: dict) -> list[dict]:
        return [line | {"window": [200, 0, 256, 256]} if line["item_id"] == "scene@r0_c256" else line]

    problems = verify_shards(tamper(cuts[1], tmp_path, shift), CUTS)
    assert any("scene: pixel (row 0, col 200) is in more than one chip" in p for p in problems)
    assert any("scene: pixel (row 0, col 456) is in no chip" in p for p in problems)


def test_verify_finds_a_source_in_two_splits(cuts, tmp_path: Path) -> None:
    """One chip of the scene relabelled to the other labeled split: the source is in two splits."""
    scene_split = next(e.split for _, e in built_entries(cuts[1], CUTS) if e.source == "scene")
    other = "val" if scene_split == "metrics_train" else "metrics_train"

    def move(split: str, line: dict) -> list[dict]:
        return [line | {"split": other} if line["item_id"] == "scene@r0_c0" else line]

    problems = verify_shards(tamper(cuts[1], tmp_path, move), CUTS)
    assert any(f"scene: its chips are in splits {sorted([scene_split, other])}" in p for p in problems)


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        ({"source_item": "scene"}, "source_item and window go together"),
        ({"window": [0, 0, 256, 256]}, "source_item and window go together"),
        ({"source_item": "scene", "window": [0, 0, "256", 256]}, "window: expected"),
        ({"source_item": "scene", "window": [0, -1, 256, 256]}, "window: expected"),
        ({"source_item": "scene", "window": [0, 0, 0, 256]}, "window: expected"),
        ({"source_item": "scene", "window": [0, 0, 256]}, "window: expected"),
        ({"source_item": "scene", "window": [True, 0, 256, 256]}, "window: expected"),
        ({"source_item": 7, "window": [0, 0, 256, 256]}, "source_item: unexpected value"),
    ],
)
def test_index_parser_checks_the_chip_keys(tmp_path: Path, keys: dict, message: str) -> None:
    line = {
        "dataset_id": CUTS,
        "item_id": "scene@r0_c0",
        "raw_split": None,
        "split": "train",
        "input": "inputs/scene@r0_c0.tif",
        "has_target": False,
    }
    (tmp_path / INDEX_FILENAME).write_text(json.dumps(line | keys) + "\n")
    with pytest.raises(DatasetError, match=rf"{INDEX_FILENAME}:1: {message}"):
        read_index(tmp_path)


@pytest.mark.parametrize(("chip_size", "ok"), [(1024, True), (64, True), (272, True), (48, False), (1000, False)])
def test_chip_size_is_at_least_64_and_a_multiple_of_16(chip_size: int, ok: bool) -> None:
    data = {
        "dataset_id": "toy",
        "version": 0,
        "modalities": [{"name": "rgb", "role": "input", "pattern": "images/*.tif"}],
        "pairing": {"input_modality": "rgb"},
        "sharding": {"chip_size": chip_size},
    }
    if ok:
        assert header_from_dict(data, "test").sharding.chip_size == chip_size
    else:
        with pytest.raises(DatasetError, match="sharding.chip_size"):
            header_from_dict(data, "test")


# ---------------------------------------------------------------------------------------------- memory

PROBE = """
import json, resource, sys
from training_core.shards.write import build_shards

before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
report = build_shards(sys.argv[1], sys.argv[2], "ortho", workers=1)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"grown_kb": after - before, "tile_counts": report.tile_counts}))
"""


@pytest.mark.timeout(120)
def test_peak_memory_of_a_build_is_bounded_by_the_chip_not_the_raster(tmp_path: Path) -> None:
    """A 4096x4096 4-band uint16 raster (128 MiB) at chip 1024 (8 MiB), without a committed header (so the value
    range is sampled too): the build's peak RSS grows by well under the raster's size. Measured: about 45 MiB;
    the whole-raster copy before chips grew by about 220 MiB."""
    side, bands = 4096, 4
    raster_bytes = side * side * bands * 2
    path = tmp_path / "extracted" / "ortho" / "images" / "ortho.tif"
    path.parent.mkdir(parents=True)
    profile = {
        "driver": "GTiff",
        "width": side,
        "height": side,
        "count": bands,
        "dtype": "uint16",
        "crs": "EPSG:3857",
        "transform": Affine(0.5, 0, 500_000, 0, -0.5, 4_000_000),
        "tiled": True,  # as orthophotos (COGs) are: a chip reads its own blocks
        "blockxsize": 512,
        "blockysize": 512,
    }
    rows = 256
    ramp = (np.arange(bands * rows * side, dtype=np.uint32).reshape(bands, rows, side) % 4000 + 100).astype(np.uint16)
    with rasterio.open(path, "w", **profile) as dst:
        for top in range(0, side, rows):
            dst.write(ramp, window=Window(0, top, side, rows))
    # Started through a small interpreter: a child's ru_maxrss starts at its parent's RSS (this test process).
    launcher = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    args = [sys.executable, "-c", launcher, sys.executable, "-c", PROBE, str(tmp_path / "extracted")]
    repo = Path(__file__).resolve().parents[2]
    done = subprocess.run([*args, str(tmp_path / "processed")], capture_output=True, text=True, check=True, cwd=repo)
    probe = json.loads(done.stdout)
    assert probe["tile_counts"] == {"train": 16, "metrics_train": 0, "val": 0}
    assert probe["grown_kb"] * 1024 < raster_bytes / 2, probe
    header = load_header(tmp_path / "processed" / "ortho" / HEADER_FILENAME)
    lo, hi = header.input.value_range  # pooled from the 16 chips' samples of the uniform ramp 100..4099
    assert 100 <= lo < 300 and 3900 < hi <= 4100
    assert verify_shards(tmp_path / "processed", "ortho") == []


def test_an_all_nodata_chip_is_kept_and_an_all_nodata_raster_is_refused(tmp_path: Path, write_tif) -> None:
    """The no-valid-pixel rule is per file: a chip of nodata border is part of a raster with valid pixels and is
    built; a chipped raster that is nodata in every chip is refused, named."""
    dataset = tmp_path / "extracted" / "border"
    pixels = np.full((3, 64, 128), 90, np.uint8)
    pixels[:, :, :64] = 0  # the left chip is all nodata
    write_tif(dataset / "images" / "scene.tif", pixels, nodata=0)
    write_tif(dataset / "images" / "small.tif", np.full((3, 32, 32), 90, np.uint8), nodata=0)
    commit_header(dataset, chip_size=64)
    report = build_shards(dataset.parent, tmp_path / "processed", "border", workers=1)
    assert report.tile_counts["train"] == 3  # scene@r0_c0 (nodata), scene@r0_c64, small
    write_tif(dataset / "images" / "scene.tif", np.zeros((3, 64, 128), np.uint8), nodata=0)
    with pytest.raises(DatasetError, match=r"images/scene.tif: no valid pixel .*1 of the 2 input files have none"):
        build_shards(dataset.parent, tmp_path / "again", "border", workers=1)
    assert not (tmp_path / "again" / "border").exists()
