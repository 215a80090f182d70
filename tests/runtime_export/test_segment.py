"""Whole-raster segmentation: one prototype set, seam-free tiling, nodata, georeferencing, the pixel rule,
atomic output with ordinary permissions, the scratch file between the passes, progress on stderr."""

from __future__ import annotations

import json
import os
import re
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace
from xml.etree import ElementTree

import numpy as np
import pytest
import rasterio
from affine import Affine

from runtime_export import segment as segment_module
from runtime_export.numpy_runtime import whole_raster
from runtime_export.numpy_runtime.pixels import PixelRule
from runtime_export.numpy_runtime.runtime import load_runtime_model
from runtime_export.numpy_runtime.whole_raster import tile_windows
from runtime_export.segment import main, segment_raster
from tests.numerics import assert_labels_equal_off_near_ties
from training_core.config import ModelConfig, TrainConfig
from training_core.export import export_model
from training_core.model import SegmentationModel

from .conftest import SAMPLE_ROOT, calibrated_model, read_rgb
from .reference_segment import encode_twice

# 791 x 718 (not multiples of 4), EPSG:32618, nodata=0 collar around the scene.
SCENE = SAMPLE_ROOT / "unlabeled_scenes" / "images" / "RGB.byte.tif"


SMALL_CONFIG = TrainConfig(model=ModelConfig(embed_dim=16, max_k=8, luminance_weight=0.5, chroma_weight=1.0))
# A NAIP-like 4-band (R, G, B, NIR) uint16 dataset: model pixel v is stored as v * 40 + 300.
UINT16_RULE = PixelRule(bands=(1, 2, 3), nodata=0, value_range=(300, 255 * 40 + 300))


@pytest.fixture(scope="module")
def small_model(sample_tiles) -> SegmentationModel:
    return calibrated_model(SMALL_CONFIG, sample_tiles, seed=1)


@pytest.fixture(scope="module")
def small_artifact(tmp_path_factory: pytest.TempPathFactory, small_model: SegmentationModel) -> Path:
    """Trained on synthetic tiles: no input rules."""
    return export_model(small_model, SMALL_CONFIG, tmp_path_factory.mktemp("seg") / "model", {}, {})


@pytest.fixture(scope="module")
def naip_artifact(tmp_path_factory: pytest.TempPathFactory, small_model: SegmentationModel) -> Path:
    """The same weights, trained on the uint16 dataset ``naip`` and the uint8 RGB dataset ``quebec``."""
    rules = {
        "naip": {"dtype": "uint16", **UINT16_RULE.to_dict()},
        "quebec": {"dtype": "uint8", **PixelRule().to_dict()},
    }
    return export_model(small_model, SMALL_CONFIG, tmp_path_factory.mktemp("seg") / "model", {}, {}, rules)


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
    # Seam-free: both are the reference segmentation up to rounding (a tile's products have other shapes).
    expected, gap = encode_twice(model, SCENE, 6, tile_size=512)
    assert_labels_equal_off_near_ties(one, expected, gap)
    assert_labels_equal_off_near_ties(many, expected, gap)
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
    for k in (9, 1):
        with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 8\]"):
            segment_raster(model, rgb, tmp_path / "out.tif", k=k)
        with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 8\]"):
            whole_raster.segment_source(model, SimpleNamespace(path=rgb, width=40, height=40), k, print, tmp_path)
    with pytest.raises(ValueError, match="nodata label 3"):
        segment_raster(model, rgb, tmp_path / "out.tif", k=4, nodata_label=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]  # no scratch folder either


def test_failure_leaves_no_output(small_artifact: Path, tmp_path: Path, monkeypatch) -> None:
    rgb = _write_rgb(tmp_path / "in.tif", np.random.default_rng(0).integers(0, 255, (3, 64, 64), np.uint8), None)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(whole_raster, "assign_tile", crash)  # pass 2, the scratch file written
    with pytest.raises(RuntimeError, match="disk full"):
        segment_raster(load_runtime_model(small_artifact), rgb, tmp_path / "out.tif", k=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.tif"]  # no output, no scratch folder


BORDER = 12  # invalid pixels around the synthetic scenes


@pytest.fixture(scope="module")
def scene_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, np.ndarray]:
    """The same scene as a 4-band uint16 raster with a nodata=0 border, and as the uint8 RGBA raster the
    uint16 rule makes of it (``PixelRule.to_uint8`` by hand, the border in the alpha band); and its validity."""
    folder = tmp_path_factory.mktemp("scenes")
    rgb = read_rgb(SAMPLE_ROOT / "quebec_buildings/images/tile_1.tif")[:, :300, :270]
    valid = np.zeros(rgb.shape[1:], bool)
    valid[BORDER:-BORDER, BORDER:-BORDER] = True
    raw = rgb.astype(np.uint16) * 40 + 300
    nir = (raw[0] // 2 + 1000)[None]
    raw16 = np.where(valid, np.concatenate([raw, nir]), 0).astype(np.uint16)
    geo = {"crs": "EPSG:3857", "transform": Affine(1, 0, 500, 0, -1, 900), "height": 300, "width": 270}
    uint16_path = folder / "naip.tif"
    with rasterio.open(uint16_path, "w", driver="GTiff", count=4, dtype="uint16", nodata=0, **geo) as dst:
        dst.write(raw16)
    scaled = UINT16_RULE.to_uint8(raw16[:3])
    alpha = np.where(valid, 255, 0).astype(np.uint8)[None]
    uint8_path = folder / "rgba.tif"
    rgba = {"count": 4, "dtype": "uint8", "photometric": "RGB", "alpha": "YES"}
    with rasterio.open(uint8_path, "w", driver="GTiff", **rgba, **geo) as dst:
        dst.write(np.concatenate([scaled, alpha]))
    return uint16_path, uint8_path, valid


def _labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


def test_uint16_four_band_input_reads_as_its_uint8_twin(naip_artifact: Path, scene_pair, tmp_path: Path) -> None:
    uint16_path, uint8_path, valid = scene_pair
    model = load_runtime_model(naip_artifact)
    wide = segment_raster(model, uint16_path, tmp_path / "wide.tif", k=5, tile_size=128)
    narrow = segment_raster(model, uint8_path, tmp_path / "narrow.tif", k=5, tile_size=128)
    assert (wide.rule, wide.rule_source) == (UINT16_RULE.to_dict(), "model input_rules for uint16")
    assert narrow.rule == PixelRule(alpha_band=4).to_dict()  # quebec's rule and the file's alpha band
    assert narrow.rule_source == "model input_rules for uint8, the file's alpha band"
    a, b = _labels(tmp_path / "wide.tif"), _labels(tmp_path / "narrow.tif")
    assert (a[valid] == b[valid]).mean() == 1.0 and len(np.unique(a[valid])) >= 2
    assert (a[~valid] == 255).all() and (b[~valid] == 255).all()
    assert wide.nodata_pixels == narrow.nodata_pixels == int((~valid).sum())


def test_cli_rule_choice_and_overrides(
    naip_artifact: Path, small_artifact: Path, scene_pair, tmp_path: Path, capsys
) -> None:
    uint16_path, uint8_path, _ = scene_pair
    reference = tmp_path / "reference.tif"
    segment_raster(load_runtime_model(naip_artifact), uint16_path, reference, k=3)

    def run(artifact: Path, *flags: str) -> tuple[int, dict | str]:
        """(exit code, the JSON report or the stderr text)."""
        out = tmp_path / "out.tif"
        out.unlink(missing_ok=True)
        code = main(["--model", str(artifact), "--output", str(out), "--k", "3", *flags])
        captured = capsys.readouterr()
        if code != 0:
            assert captured.out == "" and not out.exists()
            return code, captured.err.removeprefix("python -m runtime_export.segment: ")
        np.testing.assert_array_equal(_labels(out), _labels(reference))
        return code, json.loads(captured.out)

    code, report = run(naip_artifact, "--input", str(uint16_path), "--dataset", "naip")
    assert code == 0 and report["rule_source"] == "dataset naip"
    # A model that never saw uint16 data needs a value range; with it, the same labels.
    code, error = run(small_artifact, "--input", str(uint16_path))
    assert code == 2 and error == (
        "error: the model was trained on no uint16 data (its inputs: uint8 synthetic tiles): "
        "pass --value-range LO,HI to scale the values to 0..255\n"
    )
    code, report = run(small_artifact, "--input", str(uint16_path), "--value-range", "300,10500")
    assert code == 0 and report["rule"] == {**UINT16_RULE.to_dict(), "nodata": None}  # the file declares nodata 0
    assert report["rule_source"] == "file colour interpretation, overridden: value_range"
    code, report = run(small_artifact, "--input", str(uint8_path), "--bands", "1,2,3", "--alpha-band", "4")
    assert code == 0 and report["rule"] == PixelRule(alpha_band=4).to_dict()
    # Errors are one line naming the problem.
    code, error = run(naip_artifact, "--input", str(uint8_path), "--dataset", "nope")
    assert code == 2 and error == (
        "error: dataset 'nope': the model records no input rule for it (known: ['naip', 'quebec'])\n"
    )
    code, error = run(naip_artifact, "--input", str(uint8_path), "--bands", "1,2,9")
    assert code == 2 and error == f"error: {uint8_path}: bands: has 4 bands, the rule reads bands [1, 2, 9, 4]\n"
    code, error = run(naip_artifact, "--input", str(uint8_path), "--alpha-band", "2")
    assert code == 2 and error.startswith("error: alpha_band 2: must be a 1-based band that is not one of (1, 2, 3)")


def test_output_has_ordinary_permissions(small_artifact: Path, tmp_path: Path, umask_022) -> None:
    out = tmp_path / "labels" / "out.tif"
    segment_raster(load_runtime_model(small_artifact), SCENE, out, k=2, tile_size=1024)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644
    assert stat.S_IMODE(out.parent.stat().st_mode) == 0o755


def test_output_is_paletted_with_overviews_tags_and_a_qgis_style(small_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.tif"
    segment_raster(load_runtime_model(small_artifact), SCENE, out, k=5)
    meta = json.loads((small_artifact / "meta.json").read_text())
    with rasterio.open(out) as src:
        assert (src.colorinterp[0].name, src.nodata, src.overviews(1)) == ("palette", 255, [2])
        colours = src.colormap(1)
        assert len({colours[label][:3] for label in range(5)}) == 5 and colours[255][3] == 0
        assert src.tags()["SEGPIPE_K"] == "5"
        assert src.tags()["SEGPIPE_CONFIG_HASH"] == meta["lineage"]["config_hash"]
        overview = src.read(1, out_shape=(359, 396))  # served from the overview: labels, never averaged
        assert set(np.unique(overview)) == set(np.unique(src.read(1))) == {0, 1, 2, 3, 4, 255}
    style = ElementTree.parse(tmp_path / "out.qml").getroot()
    entries = style.findall("./pipe/rasterrenderer/colorPalette/paletteEntry")
    assert [entry.get("label") for entry in entries] == [f"segment {label}" for label in range(5)]
    assert [entry.get("color") for entry in entries] == [
        "#{:02x}{:02x}{:02x}".format(*colours[i][:3]) for i in range(5)
    ]


def _ignore_file_size_signal() -> None:
    """Child: writes past RLIMIT_FSIZE fail with EFBIG (like a full disk) instead of killing the process."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)


def _limit_file_size() -> None:
    """Child: writes past 8 KiB fail, from the start."""
    _ignore_file_size_signal()
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))


# Runs segment's CLI with writes past 8 KiB failing from pass 2 on: the scratch file is written, the labels fail.
LIMIT_FROM_PASS_2 = """
import resource, sys
from runtime_export import segment
from runtime_export.numpy_runtime import whole_raster
assign = whole_raster.assign_tile
def limited(*args):
    resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))
    return assign(*args)
whole_raster.assign_tile = limited
sys.exit(segment.main(sys.argv[1:]))
"""


def test_failed_write_keeps_the_previous_output(small_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.tif"
    argv = ["--model", str(small_artifact), "--input", str(SCENE), "--output", str(out), "--k", "6"]
    assert main(argv) == 0
    assert out.stat().st_size > 8 * 1024  # the limit below cuts a rewrite short
    before = out.read_bytes()
    child = subprocess.run(
        [sys.executable, "-c", LIMIT_FROM_PASS_2, *argv[:-1], "7"],
        preexec_fn=_ignore_file_size_signal,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 2, child
    assert child.stdout == ""
    # libtiff prints its own diagnostics to the process's stderr ("_tiffWriteProc: File too large."); the
    # error is ours: one line, last.
    prefix = "python -m runtime_export.segment: error: "
    errors = [line for line in child.stderr.splitlines() if line.startswith(prefix)]
    assert errors == [child.stderr.splitlines()[-1]], child.stderr
    assert errors[0].startswith(f"{prefix}{out}: cannot write the labels, a previous file is left as it was: ")
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.qml", "out.tif"]  # no temp file, no scratch folder left


def test_no_room_for_the_scratch_file_is_one_clear_error(small_artifact: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.tif"
    out.write_bytes(b"previous")
    argv = ["--model", str(small_artifact), "--input", str(SCENE), "--output", str(out), "--k", "6"]
    child = subprocess.run(
        [sys.executable, "-m", "runtime_export.segment", *argv],
        preexec_fn=_limit_file_size,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert (child.returncode, child.stdout) == (2, "")
    assert re.fullmatch(
        rf"python -m runtime_export.segment: error: {tmp_path}: cannot reserve 3 MB of scratch space for the "
        r"cell embeddings \(free some, or choose another scratch folder\): \[Errno 27\] File too large "
        r"\(--scratch-dir\)",
        child.stderr.strip(),
    ), child.stderr
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["out.tif"]


def _nameless_files(folder: Path) -> list[int]:
    """Sizes of the files this process holds open in ``folder`` that have no name there (Linux's /proc)."""
    sizes = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # the fd that listed the folder, closed by now
            continue
        if target.startswith(f"{folder}/") and target.endswith(" (deleted)"):
            sizes.append(os.stat(f"/proc/self/fd/{fd}").st_size)
    return sizes


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads open files from Linux's /proc")
def test_scratch_file_is_nameless_beside_the_output_until_the_end(
    small_artifact: Path, tmp_path: Path, monkeypatch
) -> None:
    """The spilled cells live in the scratch folder with no name there: a killed run cannot leave them behind."""
    model = load_runtime_model(small_artifact)
    seen: list[tuple[list[str], list[int]]] = []
    assign = whole_raster.assign_tile

    def spy(model, spill, tile, prototypes):
        seen.append((sorted(p.name for p in spill.path.parent.iterdir()), _nameless_files(spill.path.parent)))
        return assign(model, spill, tile, prototypes)

    monkeypatch.setattr(whole_raster, "assign_tile", spy)
    report = segment_raster(model, SCENE, tmp_path / "out.tif", k=3, tile_size=256)
    (names, sizes), *_ = seen
    assert [re.sub(r"-\w+$", "", name) for name in names] == [f".segment-output-{os.getpid()}"]  # the labels' folder
    assert sizes == [report.scratch_bytes] == [180 * 198 * 19 * 4]  # (H/4) (W/4) D' float32, D' = 16 + 3 colours
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.qml", "out.tif"]
    assert _nameless_files(tmp_path) == []
    seen.clear()
    segment_raster(model, SCENE, tmp_path / "again.tif", k=3, tile_size=256, scratch_dir=tmp_path / "scratch")
    assert seen[0] == ([], [report.scratch_bytes])
    assert list((tmp_path / "scratch").iterdir()) == []


def test_progress_lines_on_stderr_unless_quiet(small_artifact: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    argv = ["--model", str(small_artifact), "--input", str(SCENE), "--output", str(tmp_path / "out.tif"), "--k", "3"]
    argv += ["--tile-size", "256"]  # 12 tiles
    monkeypatch.setattr(segment_module, "PROGRESS_SECONDS", 0.0)  # a line for every tile
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.count("\n") == 1 and json.loads(captured.out)["tiles"] == 12
    lines = captured.err.splitlines()
    assert all(re.fullmatch(r"segment: pass [12]/2 tile \d+/12, \d+\.\d MP/s", line) for line in lines), lines
    assert [line.split(",")[0] for line in lines] == [
        f"segment: pass {p}/2 tile {i}/12" for p in (1, 2) for i in range(1, 13)
    ]
    monkeypatch.setattr(segment_module, "PROGRESS_SECONDS", 3600.0)  # the last tile of each pass only
    assert main(argv) == 0
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == ["segment: pass 1/2 tile 12/12", "segment: pass 2/2 tile 12/12"]
    assert main([*argv, "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and json.loads(captured.out)["tiles"] == 12
