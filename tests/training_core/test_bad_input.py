"""Every bad input of issue 2: a DatasetError naming the file and the problem, and nothing half-written.

Each build test starts from a good build of the same dataset, breaks the data, rebuilds with overwrite and
checks that the processed root is byte-for-byte what it was (no partial output, no temp folder left).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import yaml

from runtime_export.errors import DatasetError
from training_core.datasets.scan import extract_header, scan_dataset
from training_core.datasets.schema import HEADER_FILENAME, dump_header
from training_core.headers import main as headers_main
from training_core.shards.index import INDEX_FILENAME, read_index, shard_dirs
from training_core.shards.verify import verify_shards
from training_core.shards.write import build_shards

REPO = Path(__file__).resolve().parents[2]


def tree(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def built(make_dataset: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path, dict[str, str]]:
    """A good toy dataset (3 unlabeled, 2 labeled), its processed root after one build, and that root's tree."""
    dataset = make_dataset("toy", n_unlabeled=3, n_labeled=2)
    processed = tmp_path / "processed"
    build_shards(dataset.parent, processed, "toy")
    return dataset, processed, tree(processed)


def rebuild_fails(built: tuple[Path, Path, dict[str, str]], match: str) -> DatasetError:
    dataset, processed, before = built
    with pytest.raises(DatasetError, match=match) as caught:
        build_shards(dataset.parent, processed, "toy", overwrite=True)
    assert tree(processed) == before, "the previous output must stay exactly as it was"
    return caught.value


def commit_header(dataset: Path, edit: Callable[[dict], None]) -> Path:
    data = extract_header(dataset).model_dump(mode="json")
    edit(data)
    path = dataset / HEADER_FILENAME
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_malformed_yaml_names_file_and_line(built) -> None:
    dataset = built[0]
    (dataset / HEADER_FILENAME).write_text("dataset_id: toy\nversion: 0\nmodalities: [\n  {name: rgb\n")
    rebuild_fails(built, rf"{HEADER_FILENAME}:5:1: malformed YAML: ")


def test_unknown_header_key_is_named(built) -> None:
    commit_header(built[0], lambda data: data["modalities"][0].update(colour="red"))
    rebuild_fails(built, rf"{HEADER_FILENAME}: invalid dataset header: unknown key 'modalities.0.colour'")


def test_missing_header_key_is_named(built) -> None:
    commit_header(built[0], lambda data: data.pop("pairing"))
    rebuild_fails(built, rf"{HEADER_FILENAME}: invalid dataset header: missing key 'pairing'")


def test_target_without_input(built, write_tif) -> None:
    write_tif(built[0] / "masks" / "orphan.tif", np.ones((1, 16, 16), np.uint8))
    rebuild_fails(built, r"masks/orphan.tif: target without input")


def test_input_with_fewer_than_three_bands(built, write_tif) -> None:
    write_tif(built[0] / "images" / "u1.tif", np.zeros((2, 16, 16), np.uint8))
    rebuild_fails(built, r"images/u1.tif: bands: has 2, an input needs at least 3 \(R, G, B\)")


def test_inputs_with_different_band_counts(built, write_tif) -> None:
    write_tif(built[0] / "images" / "u1.tif", np.zeros((4, 16, 16), np.uint8))
    rebuild_fails(built, r"images/u1.tif: channels: has 4 bands but .*images/(l0|l1|u0).tif has 3")


def test_band_count_short_of_the_declared_bands(built) -> None:
    commit_header(built[0], lambda data: data["modalities"][0].update(bands=[1, 2, 4], channels=None))
    rebuild_fails(built, r"images/\w+.tif: modality 'rgb': bands: has 3 bands, the header reads bands \[1, 2, 4\]")


def test_dtype_without_a_scaling_rule(built, write_tif) -> None:
    commit_header(built[0], lambda data: data["modalities"][0].update(dtype=None))
    write_tif(built[0] / "images" / "u1.tif", np.zeros((3, 16, 16), np.uint16))
    rebuild_fails(built, r"images/u1.tif: modality 'rgb': dtype uint16 has no scaling rule: declare value_range")


def test_header_declaring_no_scaling_for_uint16_is_rejected(built) -> None:
    commit_header(built[0], lambda data: data["modalities"][0].update(dtype="uint16"))
    rebuild_fails(built, rf"{HEADER_FILENAME}: invalid dataset header: .*dtype uint16 has no scaling rule")


def test_target_crs_differs_from_input(built, write_tif) -> None:
    write_tif(built[0] / "masks" / "l1.tif", np.ones((1, 16, 16), np.uint8), crs="EPSG:4326")
    rebuild_fails(built, r"masks/l1.tif: crs: target is in EPSG:4326 but its input .*images/l1.tif in EPSG:3857")


def test_target_size_differs_from_input(built, write_tif) -> None:
    write_tif(built[0] / "masks" / "l1.tif", np.ones((1, 8, 16), np.uint8))
    rebuild_fails(built, r"masks/l1.tif: size: target is 16x8 \(WxH\) but its input .*images/l1.tif is 16x16")


def test_georef_required_without_crs(built, write_tif) -> None:
    commit_header(built[0], lambda data: None)  # the inferred header: georef_required is true
    write_tif(built[0] / "images" / "u2.tif", np.zeros((3, 16, 16), np.uint8), crs=None)
    rebuild_fails(built, r"images/u2.tif: modality 'rgb': georef_required: the file has no CRS")


def test_truncated_tiff(built, sample_extracted: Path) -> None:
    real_tile = next((sample_extracted / "kampala_buildings" / "images").glob("*.tif")).read_bytes()
    (built[0] / "images" / "u0.tif").write_bytes(real_tile[: len(real_tile) // 2])
    rebuild_fails(built, r"images/u0.tif: cannot read pixels \(truncated or corrupt TIFF\?\)")


def test_corrupt_tiff(built) -> None:
    (built[0] / "masks" / "l0.tif").write_bytes(b"II*\x00 this is not a real TIFF")
    rebuild_fails(built, r"masks/l0.tif: cannot open as a GeoTIFF")


def test_empty_dataset(built) -> None:
    shutil.rmtree(built[0] / "images")
    rebuild_fails(built, r"toy: empty dataset: no images/ folder")
    (built[0] / "images").mkdir()
    shutil.rmtree(built[0] / "masks")
    rebuild_fails(built, r"toy: empty dataset: no file matches input pattern 'images/\*.tif'")


def test_duplicate_stems_differing_in_case(built) -> None:
    shutil.copyfile(built[0] / "images" / "u0.tif", built[0] / "images" / "u0.TIF")
    rebuild_fails(built, r"images/u0.(tif|TIF): duplicate item stem 'u0' in modality 'rgb': .*images/u0.(TIF|tif)")


def test_duplicate_stems_in_two_raw_split_folders(tmp_path: Path, write_tif) -> None:
    dataset = tmp_path / "extracted" / "raw"
    for split in ("train", "val"):
        write_tif(dataset / "images" / split / "same.tif", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"images/val/same.tif: duplicate item stem 'same'.*images/train/same.tif"):
        build_shards(dataset.parent, tmp_path / "processed", "raw")
    assert not (tmp_path / "processed").exists() or not any((tmp_path / "processed").iterdir())


@pytest.mark.parametrize(
    ("bad_path", "problem"),
    [
        ("../escape.tif", "leaves the shard directory"),
        ("inputs/../../x.tif", "leaves the shard directory"),
        ("/etc/passwd", "absolute path"),
        ("C:\\tiles\\a.tif", "absolute path"),
    ],
)
def test_index_line_with_escaping_or_absolute_path(built, bad_path: str, problem: str) -> None:
    _, processed, _ = built
    (shard,) = shard_dirs(processed, "toy", "train")
    lines = (shard / INDEX_FILENAME).read_text().splitlines()
    lines[1] = json.dumps(json.loads(lines[1]) | {"input": bad_path})
    (shard / INDEX_FILENAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{INDEX_FILENAME}:2: input: .*{problem}"):
        read_index(shard)
    assert any(f"{INDEX_FILENAME}:2" in p and problem in p for p in verify_shards(processed, "toy"))


def test_index_symlink_leaving_the_shard(built, tmp_path: Path) -> None:
    _, processed, _ = built
    (shard,) = shard_dirs(processed, "toy", "train")
    (shard / "inputs" / "link.tif").symlink_to(tmp_path / "outside.tif")
    lines = (shard / INDEX_FILENAME).read_text().splitlines()
    lines[0] = json.dumps(json.loads(lines[0]) | {"input": "inputs/link.tif"})
    (shard / INDEX_FILENAME).write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=rf"{INDEX_FILENAME}:1: input: .*resolves outside the shard directory"):
        read_index(shard)


KILL_MIDWAY = """
import os, signal, sys
from training_core.shards import write

real_write_item, written = write._write_item, []

def write_then_die(task, **kwargs):
    if len(written) == 20:
        os.kill(os.getpid(), signal.SIGKILL)
    written.append(task)
    return real_write_item(task, **kwargs)

write._write_item = write_then_die
write.build_shards(sys.argv[1], sys.argv[2], "kampala_buildings", seed=5, overwrite=True, workers=1)
"""


def test_build_killed_midway_keeps_previous_output_and_rerun_equals_clean_build(
    kampala_copy: Path, tmp_path: Path
) -> None:
    processed, clean = tmp_path / "processed", tmp_path / "clean"
    build_shards(kampala_copy, processed, "kampala_buildings", seed=1)
    previous = tree(processed / "kampala_buildings")
    killed = subprocess.run([sys.executable, "-c", KILL_MIDWAY, str(kampala_copy), str(processed)], cwd=REPO)
    assert killed.returncode == -signal.SIGKILL
    assert tree(processed / "kampala_buildings") == previous
    (leftover,) = processed.glob(".kampala_buildings.building-*")  # the dead build's hidden temp folder
    assert len(list(leftover.rglob("*.tif"))) >= 20
    build_shards(kampala_copy, processed, "kampala_buildings", seed=5, overwrite=True)
    build_shards(kampala_copy, clean, "kampala_buildings", seed=5)
    assert tree(processed) == tree(clean)


def test_header_cli_writes_nothing_on_bad_input(built, tmp_path: Path, capsys) -> None:
    dataset = built[0]
    header = extract_header(dataset)
    header.target.label_values = [1, 2]
    dump_header(header, dataset / HEADER_FILENAME)
    out = tmp_path / "headers"
    assert headers_main(["--extracted-root", str(dataset.parent), "--out", str(out)]) == 2
    assert "masks/l0.tif: modality 'labels' label_values: holds [0], not in [1, 2]" in capsys.readouterr().err
    assert not out.exists()


def test_header_stating_other_channels_is_rejected(built) -> None:
    commit_header(built[0], lambda data: data["modalities"][0].update(channels=4))
    rebuild_fails(built, r"images/\w+.tif: modality 'rgb': channels: has 3 bands, expected 4")


def test_valid_pixels_are_counted_strip_by_strip(tmp_path: Path, write_tif, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validity is counted one bounded strip at a time (memory does not grow with the raster): a raster whose only
    valid pixels are in its last strip passes; with that row nodata too it is refused, named."""
    monkeypatch.setattr("runtime_export.rasters.BLOCK_BYTES", 3 * 16 * 2)  # 2-row strips of a 16-wide raster
    pixels = np.zeros((3, 16, 16), np.uint8)
    pixels[:, 15, 3] = 200
    dataset = tmp_path / "extracted" / "sparse"
    write_tif(dataset / "images" / "a.tif", pixels, nodata=0)
    write_tif(dataset / "images" / "b.tif", np.full((3, 16, 16), 9, np.uint8), nodata=0)
    scan = scan_dataset(dataset, workers=1)
    assert [f.valid_pixels for f in scan.facts] == [1, 256]
    pixels[:, 15, 3] = 0
    write_tif(dataset / "images" / "a.tif", pixels, nodata=0)
    with pytest.raises(DatasetError, match=r"images/a.tif: no valid pixel \(every pixel is nodata, masked or alpha 0"):
        scan_dataset(dataset, workers=1)
    for path in (dataset / "images").iterdir():
        write_tif(path, np.zeros((3, 16, 16), np.uint8), nodata=0)
    with pytest.raises(DatasetError, match=r"dataset 'sparse': no valid input pixel in any of its 2 files"):
        scan_dataset(dataset, workers=1)
