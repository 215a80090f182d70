"""Shard build on the real sample data: layout v0, round trip, manifest, reuse, determinism, reader, verifier."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import rasterio

from runtime_export.errors import DatasetError
from training_core.datasets.scan import extract_header
from training_core.datasets.schema import HEADER_FILENAME, dump_header, header_hash
from training_core.shards.__main__ import main
from training_core.shards.index import (
    INDEX_FILENAME,
    MANIFEST_FILENAME,
    iter_split_items,
    read_index,
    read_manifest,
    shard_dirs,
)
from training_core.shards.verify import verify_shards
from training_core.shards.write import build_shards
from training_core.splits import SPLITS

KAMPALA = "kampala_buildings"


def tree(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file under root, hidden ones included."""
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def kampala_built(tmp_path_factory: pytest.TempPathFactory, sample_extracted: Path) -> tuple[Path, object]:
    processed = tmp_path_factory.mktemp("processed")
    return processed, build_shards(sample_extracted, processed, KAMPALA)


def test_kampala_counts_manifest_and_layout(kampala_built, sample_extracted: Path) -> None:
    processed, report = kampala_built
    assert report.counts == {"train": 32, "metrics_train": 4, "val": 12}
    assert (report.n_items, report.n_labeled, report.label_values, report.crs) == (48, 16, [0, 1, 2], ["EPSG:3857"])
    manifest = read_manifest(processed, KAMPALA)
    header = extract_header(sample_extracted / KAMPALA)
    assert manifest["counts"] == report.counts and manifest["seed"] == 42
    # 256x256 tiles fit the default 1024 chip: one item each, so tiles and sources count alike.
    assert manifest["tile_counts"] == report.tile_counts == report.counts and manifest["chip_size"] == 1024
    assert manifest["header_hash"] == header_hash(header) == report.header_hash
    assert manifest["data_version"] == report.data_version and len(report.data_version) == 64
    assert sorted(p.name for p in (processed / KAMPALA).iterdir()) == sorted(
        [*SPLITS, MANIFEST_FILENAME, HEADER_FILENAME]
    )
    assert [p.name for p in processed.iterdir()] == [KAMPALA]  # no temp or aside folder left
    for split in SPLITS:
        (shard,) = shard_dirs(processed, KAMPALA, split)
        assert shard.name == "shard-00000"
        labeled = split != "train"
        assert sorted(p.name for p in shard.iterdir()) == sorted(
            [INDEX_FILENAME, "inputs", *(["targets"] if labeled else [])]
        )
        entries = read_index(shard)
        assert len(entries) == report.counts[split]
        assert all(e.split == split and e.has_target == labeled and e.dataset_id == KAMPALA for e in entries)


def test_index_lines_follow_layout_v0(kampala_built) -> None:
    processed, _ = kampala_built
    (shard,) = shard_dirs(processed, KAMPALA, "val")
    first = json.loads((shard / INDEX_FILENAME).read_text().splitlines()[0])
    assert first.keys() == {
        *("dataset_id", "item_id", "raw_split", "split", "input", "has_target", "target"),
        *("input_sha256", "target_sha256"),
    }
    assert first["input"] == f"inputs/{first['item_id']}.tif" and first["target"] == f"targets/{first['item_id']}.tif"
    (train,) = shard_dirs(processed, KAMPALA, "train")
    assert "target" not in json.loads((train / INDEX_FILENAME).read_text().splitlines()[0])


def assert_same_raster(copy: Path, source: Path) -> None:
    with rasterio.open(copy) as out, rasterio.open(source) as src:
        assert out.compression is None, copy
        assert out.crs == src.crs and out.transform == src.transform and out.nodata == src.nodata
        assert out.dtypes == src.dtypes
        np.testing.assert_array_equal(out.read(), src.read())


def test_round_trip_pixels_crs_transform_uncompressed(kampala_built, sample_extracted: Path) -> None:
    processed, _ = kampala_built
    source = sample_extracted / KAMPALA
    for split in SPLITS:
        for shard_dir, entry in iter_split_items(processed, KAMPALA, split):
            assert_same_raster(shard_dir / entry.input, source / "images" / f"{entry.item_id}.tif")
            if entry.has_target:
                assert_same_raster(shard_dir / entry.target, source / "masks" / f"{entry.item_id}.tif")


def test_round_trip_keeps_nodata_and_mixed_crs(sample_extracted: Path, tmp_path: Path) -> None:
    report = build_shards(sample_extracted, tmp_path, "unlabeled_scenes", workers=1)
    assert report.counts == {"train": 3, "metrics_train": 0, "val": 0}
    assert shard_dirs(tmp_path, "unlabeled_scenes", "val") == []
    nodata = {}
    for shard_dir, entry in iter_split_items(tmp_path, "unlabeled_scenes", "train"):
        assert_same_raster(
            shard_dir / entry.input, sample_extracted / "unlabeled_scenes" / "images" / f"{entry.item_id}.tif"
        )
        with rasterio.open(shard_dir / entry.input) as tile:
            nodata[entry.item_id] = tile.nodata
    assert nodata == {"OSBS_029": 255.0, "RGB.byte": 0.0, "rmnp-rgb": 255.0}
    assert verify_shards(tmp_path, "unlabeled_scenes") == []


def test_committed_header_can_keep_source_compression(sample_extracted: Path, tmp_path: Path) -> None:
    extracted = tmp_path / "extracted"
    shutil.copytree(sample_extracted / "quebec_buildings", extracted / "quebec_buildings")
    header = extract_header(extracted / "quebec_buildings")
    header.sharding.force_uncompressed_tiff = False
    dump_header(header, extracted / "quebec_buildings" / HEADER_FILENAME)
    build_shards(extracted, tmp_path / "processed", "quebec_buildings", workers=1)
    for shard_dir, entry in iter_split_items(tmp_path / "processed", "quebec_buildings", "val"):
        with rasterio.open(shard_dir / entry.input) as tile:
            assert tile.compression == rasterio.enums.Compression.deflate


def test_verify_accepts_a_fresh_build(kampala_built) -> None:
    assert verify_shards(kampala_built[0], KAMPALA) == []


def test_shard_size_and_serial_equals_parallel(kampala_copy: Path, tmp_path: Path) -> None:
    serial = build_shards(kampala_copy, tmp_path / "serial", KAMPALA, shard_size=10, workers=1)
    parallel = build_shards(kampala_copy, tmp_path / "parallel", KAMPALA, shard_size=10, workers=2)
    assert [d.name for d in shard_dirs(tmp_path / "serial", KAMPALA, "train")] == [f"shard-0000{i}" for i in range(4)]
    assert [len(read_index(d)) for d in shard_dirs(tmp_path / "serial", KAMPALA, "train")] == [10, 10, 10, 2]
    assert serial.shards["val"] == ["val/shard-00000", "val/shard-00001"]
    assert tree(tmp_path / "serial") == tree(tmp_path / "parallel")  # byte-identical, manifest included
    assert parallel.counts == {"train": 32, "metrics_train": 4, "val": 12}
    assert verify_shards(tmp_path / "parallel", KAMPALA) == []


def test_existing_output_is_reused_or_needs_overwrite(kampala_copy: Path, tmp_path: Path) -> None:
    processed = tmp_path / "processed"
    first = build_shards(kampala_copy, processed, KAMPALA, workers=1)
    before = tree(processed)
    again = build_shards(kampala_copy, processed, KAMPALA, workers=1)
    assert again.reused and not first.reused and again.data_version == first.data_version
    assert tree(processed) == before
    with pytest.raises(DatasetError, match=rf"{KAMPALA}: exists and was built from other data or settings"):
        build_shards(kampala_copy, processed, KAMPALA, seed=7, workers=1)
    assert tree(processed) == before
    reseeded = build_shards(kampala_copy, processed, KAMPALA, seed=7, overwrite=True, workers=1)
    assert reseeded.seed == 7 and reseeded.counts == first.counts and reseeded.header_hash != first.header_hash
    assert [p.name for p in processed.iterdir()] == [KAMPALA]
    # changed data: a new data version
    tile = next((kampala_copy / KAMPALA / "images").iterdir())
    tile.unlink()
    shrunk = build_shards(kampala_copy, processed, KAMPALA, seed=7, overwrite=True, workers=1)
    assert shrunk.n_items == 47 and shrunk.data_version != first.data_version


def test_rebuild_equals_clean_build_after_crash_between_renames(kampala_copy: Path, tmp_path: Path) -> None:
    """A crash after the old folder was renamed aside (before the new one moved in) is undone by the next build."""
    build_shards(kampala_copy, tmp_path / "clean", KAMPALA, workers=1)
    processed = tmp_path / "processed"
    build_shards(kampala_copy, processed, KAMPALA, seed=1, workers=1)
    old = tree(processed / KAMPALA)
    os.rename(processed / KAMPALA, processed / f".{KAMPALA}.old-999999-dead")  # the crash point
    (processed / f".{KAMPALA}.building-999999-dead").mkdir()  # and a dead build's temp folder
    with pytest.raises(DatasetError, match="built from other data or settings"):
        build_shards(kampala_copy, processed, KAMPALA, workers=1)  # recovered the old folder first
    assert tree(processed / KAMPALA) == old and [p.name for p in processed.iterdir()] == [KAMPALA]
    build_shards(kampala_copy, processed, KAMPALA, overwrite=True, workers=1)
    assert tree(processed) == tree(tmp_path / "clean")


def test_verify_reports_tampering(kampala_copy: Path, tmp_path: Path) -> None:
    build_shards(kampala_copy, tmp_path, KAMPALA, workers=1)
    (val,) = shard_dirs(tmp_path, KAMPALA, "val")
    (metrics,) = shard_dirs(tmp_path, KAMPALA, "metrics_train")
    lines = (val / INDEX_FILENAME).read_text().splitlines()
    moved = json.loads(lines[0]) | {"split": "metrics_train"}
    (val / INDEX_FILENAME).write_text("\n".join(lines[1:]) + "\n")
    with (metrics / INDEX_FILENAME).open("a") as index:
        index.write(json.dumps(moved) + "\n")
    problems = verify_shards(tmp_path, KAMPALA)
    assert any("split counts" in p for p in problems)
    assert any("not where the split rule puts them" in p and moved["item_id"] in p for p in problems)
    assert any(f"{moved['item_id']}.tif" in p for p in problems)  # its tiles are not in that shard


def test_verify_catches_replaced_truncated_and_altered_tiles(kampala_copy: Path, tmp_path: Path, write_tif) -> None:
    build_shards(kampala_copy, tmp_path, KAMPALA, workers=1)
    assert verify_shards(tmp_path, KAMPALA) == []
    entries = list(iter_split_items(tmp_path, KAMPALA, "train"))[:3]
    replaced, truncated, altered = (shard_dir / entry.input for shard_dir, entry in entries)
    write_tif(replaced, np.zeros((1, 256, 256), np.uint8))
    truncated.write_bytes(truncated.read_bytes()[:-1000])
    data = bytearray(altered.read_bytes())
    data[-100] ^= 0xFF  # one pixel byte: the file still opens and reads
    altered.write_bytes(bytes(data))
    changed = "contents differ from the checksum the build recorded (truncated or altered)"
    assert verify_shards(tmp_path, KAMPALA) == [f"{path}: {changed}" for path in (replaced, truncated, altered)]


def test_verify_without_build(tmp_path: Path) -> None:
    (problem,) = verify_shards(tmp_path, KAMPALA)
    assert MANIFEST_FILENAME in problem and "no manifest" in problem


def test_cli_builds_and_dry_run_writes_nothing(kampala_copy: Path, tmp_path: Path, capsys) -> None:
    args = ["--extracted-root", str(kampala_copy), "--processed-root", str(tmp_path / "p"), "--workers", "1"]
    assert main([*args, "--dry-run", "--shard-size", "20"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["counts"] == plan["tile_counts"] == {"train": 32, "metrics_train": 4, "val": 12}
    assert plan["shards"]["train"] == 2
    assert not (tmp_path / "p").exists()
    assert main([*args, "--dataset-id", KAMPALA, "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["seed"] == 3 and report["counts"]["train"] == 32
    assert main([*args, "--dataset-id", KAMPALA, "--seed", "4"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main([*args, "--dataset-id", KAMPALA, "--seed", "4", "--overwrite"]) == 0


def test_tiles_stream_in_strips(sample_extracted: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Rasters larger than BLOCK_BYTES are copied strip by strip (bounded memory), still exactly."""
    monkeypatch.setattr("runtime_export.rasters.BLOCK_BYTES", 7 * 280 * 3)  # 7-row strips, a ragged last one
    report = build_shards(sample_extracted, tmp_path, "new_brunswick_landcover", workers=1)
    assert report.label_values == [1, 2, 3, 4, 5, 6]
    source = sample_extracted / "new_brunswick_landcover"
    for split in ("metrics_train", "val"):
        for shard_dir, entry in iter_split_items(tmp_path, "new_brunswick_landcover", split):
            assert_same_raster(shard_dir / entry.input, source / "images" / f"{entry.item_id}.tif")
            assert_same_raster(shard_dir / entry.target, source / "masks" / f"{entry.item_id}.tif")


def append_line(index: Path, line: str) -> None:
    with index.open("a") as handle:
        handle.write(line + "\n")


def test_an_item_listed_twice_is_refused_by_the_readers_and_reported_by_the_verifier(
    make_dataset, tmp_path: Path
) -> None:
    """A repeated index line would be trained on and scored twice: the reader names the index file, the line and
    the item, in one shard or across the shards of a split; the verifier reports each repeat, across splits too."""
    dataset = make_dataset("toy", n_unlabeled=3, n_labeled=2)
    build_shards(dataset.parent, tmp_path, "toy", shard_size=2, workers=1)
    first, second = shard_dirs(tmp_path, "toy", "train")
    (val,) = shard_dirs(tmp_path, "toy", "val")
    clean = {
        path: path.read_bytes() for path in (first / INDEX_FILENAME, second / INDEX_FILENAME, val / INDEX_FILENAME)
    }
    line = (first / INDEX_FILENAME).read_text().splitlines()[0]
    item = json.loads(line)["item_id"]

    append_line(first / INDEX_FILENAME, line)
    repeat = f"{first / INDEX_FILENAME}:3: item {item!r} is listed again, first at {first / INDEX_FILENAME}:1"
    with pytest.raises(DatasetError, match=repeat):
        read_index(first)
    with pytest.raises(DatasetError, match=repeat):
        list(iter_split_items(tmp_path, "toy", "train"))
    assert verify_shards(tmp_path, "toy") == [f"{repeat} (an item is listed once)"]

    (first / INDEX_FILENAME).write_bytes(clean[first / INDEX_FILENAME])
    append_line(second / INDEX_FILENAME, line)
    assert len(read_index(second)) == 2  # each shard alone is sound
    repeat = f"{second / INDEX_FILENAME}:2: item {item!r} is listed again, first at {first / INDEX_FILENAME}:1"
    with pytest.raises(DatasetError, match=repeat):
        list(iter_split_items(tmp_path, "toy", "train"))
    assert repeat in verify_shards(tmp_path, "toy")[0]

    (second / INDEX_FILENAME).write_bytes(clean[second / INDEX_FILENAME])
    append_line(val / INDEX_FILENAME, json.dumps(json.loads(line) | {"split": "val"}))
    assert any(
        f"{val / INDEX_FILENAME}:2: item {item!r} is listed again, first at {first}" in p
        for p in verify_shards(tmp_path, "toy")
    )

    (val / INDEX_FILENAME).write_bytes(clean[val / INDEX_FILENAME])
    append_line(first / INDEX_FILENAME, json.dumps(json.loads(line) | {"item_id": "other"}))
    with pytest.raises(DatasetError, match=rf"index.jsonl:3: item 'other': tile 'inputs/{item}.tif' is listed again"):
        read_index(first)
    (first / INDEX_FILENAME).write_bytes(clean[first / INDEX_FILENAME])
    assert verify_shards(tmp_path, "toy") == []
