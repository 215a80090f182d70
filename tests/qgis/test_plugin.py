"""The plugin in its real client: the built zip installed into a throwaway QGIS 3.22 profile, run headless.

- ``qgis_process run segpipe:segment`` on sample rasters (RGB with a nodata collar, NAIP's 4-band RGBN with
  a declared dataset rule, a 16-bit B, G, R, NIR COG scaled by the model's rule) gives the labels
  ``python -m runtime_export.segment`` gives with QGIS's own Python and numpy, on every pixel; and the labels
  of the project's environment (another numpy and OpenBLAS build: the same arithmetic up to rounding);
- the output opens in QGIS as a paletted layer of K segments, with overviews, tags and ordinary permissions;
- the Processing API reports progress, and a cancel midway leaves no output and no scratch file.

What the zip holds (the plugin and the numpy runtime, byte for byte) and that the build is reproducible need no
QGIS: tests/test_plugin_zip.py, outside the `system` tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
from PIL import Image

from runtime_export.numpy_runtime.pixels import PixelRule
from training_core.config import ModelConfig, TrainConfig
from training_core.export import export_model

from ..imagery import GAIN, OFFSET, RGB_BANDS, make_rgbn_uint16_cog
from ..runtime_export.conftest import PARITY_TILES, SAMPLE_ROOT, calibrated_model, read_rgb

pytestmark = [pytest.mark.system, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
QGIS_PROCESS = Path("/usr/bin/qgis_process.bin")  # Debian's qgis_process wrapper adds a flag 3.22 rejects
QGIS_PYTHON = Path("/usr/bin/python3")  # the interpreter QGIS embeds: its numpy, GDAL and PyQGIS
K = 4
SCENE = "unlabeled_scenes/images/RGB.byte.tif"
NAIP = "naip_rgbn_time_series/images/m_4709963_se_14_1_20090818.tif"
RULES = {
    "quebec_buildings": {"dtype": "uint8", **PixelRule().to_dict()},
    "naip_rgbn_time_series": {"dtype": "uint8", **PixelRule(bands=(1, 2, 3), nodata=0).to_dict()},
    "rgbn_uint16_cog": {
        "dtype": "uint16",
        **PixelRule(bands=RGB_BANDS, value_range=(OFFSET, OFFSET + 255 * GAIN)).to_dict(),
    },
}


def qgis_env(profile: Path) -> dict[str, str]:
    runtime_dir = profile / "xdg"
    runtime_dir.mkdir(mode=0o700, exist_ok=True)
    return {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(profile),
        "XDG_RUNTIME_DIR": str(runtime_dir),
    }


@pytest.fixture(scope="module")
def qgis_installed() -> None:
    if not QGIS_PROCESS.exists():
        subprocess.run([str(REPO / "bin/install-system-deps")], check=False)
    if not QGIS_PROCESS.exists():
        pytest.fail("QGIS is not installed and bin/install-system-deps could not install it")


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "segpipe-qgis.zip"
    subprocess.run([str(REPO / "bin/build-qgis-plugin"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def profile(qgis_installed: None, plugin_zip: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh QGIS profile root with the plugin installed from the zip and enabled."""
    root = tmp_path_factory.mktemp("qgis-profile")
    plugins = root / "profiles" / "default" / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(plugin_zip) as archive:
        archive.extractall(plugins)
    enabled = subprocess.run(
        [str(QGIS_PROCESS), "plugins", "enable", "segpipe"], env=qgis_env(root), capture_output=True, text=True
    )
    assert enabled.returncode == 0, enabled.stdout + enabled.stderr
    return root


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    config = TrainConfig(model=ModelConfig(smoothing="learned", luminance_weight=0.5, chroma_weight=1.0))
    model = calibrated_model(config, [read_rgb(SAMPLE_ROOT / name) for name in PARITY_TILES])
    lineage = {"dataset_ids": sorted(RULES), "data_versions": {name: f"v-{name}" for name in RULES}}
    return export_model(model, config, tmp_path_factory.mktemp("artifact") / "model", lineage, {}, RULES)


@pytest.fixture(scope="module")
def rasters(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[str]]]:
    """name -> (raster, extra CLI arguments naming the rule where the dtype alone does not pick it)."""
    cog_root = make_rgbn_uint16_cog(tmp_path_factory.mktemp("cog"))
    cog = sorted((cog_root / "images").glob("*.tif"))[0]
    # Copies: QGIS saves band statistics in an .aux.xml beside the rasters it opens, never in sample_data.
    copies = tmp_path_factory.mktemp("inputs")
    scene, naip = (Path(shutil.copy(SAMPLE_ROOT / name, copies)) for name in (SCENE, NAIP))
    return {
        "rgb_nodata_collar": (scene, ["--dataset", "quebec_buildings"]),
        "naip_rgbn": (naip, ["--dataset", "naip_rgbn_time_series"]),
        "uint16_bgrn_cog": (cog, []),
    }


def run_qgis_segment(
    profile: Path, raster: Path, model: Path, out: Path, extra: list[str], k: int = K
) -> subprocess.CompletedProcess:
    dataset = [f"DATASET={extra[1]}"] if extra else []
    args = [f"INPUT={raster}", f"MODEL={model}", f"K={k}", *dataset, f"OUTPUT={out}"]
    return subprocess.run(
        [str(QGIS_PROCESS), "run", "segpipe:segment", "--", *args],
        env=qgis_env(profile),
        capture_output=True,
        text=True,
        timeout=600,
    )


def segment_in_qgis(profile: Path, raster: Path, model: Path, out: Path, extra: list[str]) -> None:
    done = run_qgis_segment(profile, raster, model, out, extra)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "matrix products: " in done.stdout


def run_cli_segment(python: Path | str, raster: Path, model: Path, out: Path, extra: list[str]) -> None:
    argv = ["--model", str(model), "--input", str(raster), "--output", str(out), "--k", str(K), "--quiet", *extra]
    done = subprocess.run(
        [str(python), "-m", "runtime_export.segment", *argv], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr


def read_labels(path: Path) -> np.ndarray:
    with rasterio.open(path) as src:
        return src.read(1)


@pytest.mark.parametrize("name", ["rgb_nodata_collar", "naip_rgbn", "uint16_bgrn_cog"])
def test_qgis_process_segments_as_the_cli_does(
    profile: Path, artifact: Path, rasters: dict[str, tuple[Path, list[str]]], name: str, tmp_path: Path
) -> None:
    raster, extra = rasters[name]
    segment_in_qgis(profile, raster, artifact, tmp_path / "qgis.tif", extra)
    run_cli_segment(QGIS_PYTHON, raster, artifact, tmp_path / "cli_qgis_python.tif", extra)
    run_cli_segment(sys.executable, raster, artifact, tmp_path / "cli.tif", extra)
    labels = read_labels(tmp_path / "qgis.tif")
    np.testing.assert_array_equal(labels, read_labels(tmp_path / "cli_qgis_python.tif"))
    # The project's numpy and OpenBLAS round differently from Debian's: only near-ties may differ.
    assert (labels == read_labels(tmp_path / "cli.tif")).mean() >= 0.9999
    assert set(np.unique(labels)) - {255} == set(range(K))
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "cli.qml",
        "cli.tif",
        "cli_qgis_python.qml",
        "cli_qgis_python.tif",
        "qgis.qml",
        "qgis.tif",
    ]  # no scratch folder, no temporary file left


def test_output_opens_in_qgis_as_k_coloured_segments(
    profile: Path, artifact: Path, rasters: dict[str, tuple[Path, list[str]]], tmp_path: Path
) -> None:
    raster, extra = rasters["rgb_nodata_collar"]
    out = tmp_path / "segments.tif"
    segment_in_qgis(profile, raster, artifact, out, extra)
    rendered = subprocess.run(
        [str(QGIS_PYTHON), str(REPO / "qgis_plugin/render_example.py"), str(raster), str(out), str(tmp_path / "r.png")],
        env=qgis_env(profile),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rendered.returncode == 0, rendered.stderr
    facts = json.loads(rendered.stdout.splitlines()[-1])
    assert facts == {
        "input_valid": True,
        "segments_valid": True,
        "renderer": "paletted",
        "saved": True,
        "classes": list(range(K)),  # the .qml beside the raster: K segments, not the 256 table entries
    }
    picture = np.asarray(Image.open(tmp_path / "r.png").convert("RGB"))
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > K  # both panels drawn
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
    with rasterio.open(out) as src:
        assert src.colorinterp[0].name == "palette"
        assert src.nodata == 255
        assert src.overviews(1) == [2]  # 791 x 718: one halving keeps the longer side >= 256
        colours = src.colormap(1)
        assert len({colours[label] for label in range(K)}) == K and colours[255][3] == 0
        tags = src.tags()
    meta = json.loads((artifact / "meta.json").read_text())
    assert tags["SEGPIPE_K"] == str(K)
    assert tags["SEGPIPE_CONFIG_HASH"] == meta["lineage"]["config_hash"]
    assert json.loads(tags["SEGPIPE_DATA_VERSIONS"]) == meta["lineage"]["data_versions"]


def test_bad_model_or_k_is_one_line_error_and_no_output(
    profile: Path, artifact: Path, rasters: dict[str, tuple[Path, list[str]]], tmp_path: Path
) -> None:
    raster, extra = rasters["rgb_nodata_collar"]
    missing = run_qgis_segment(profile, raster, tmp_path / "no-model", tmp_path / "a.tif", extra)
    too_many = run_qgis_segment(profile, raster, artifact, tmp_path / "b.tif", extra, k=40)
    assert missing.returncode != 0 and f"{tmp_path / 'no-model'}: no such folder" in missing.stderr
    assert too_many.returncode != 0 and "k=40 is outside the model's k_range [2, 16]" in too_many.stderr
    assert list(tmp_path.iterdir()) == []


# Runs in QGIS's Python: the algorithm through the Processing API with a feedback that records progress and,
# when asked, cancels once progress passes 30%.
PROCESSING_RUN = """
import json, sys
from qgis.core import QgsApplication, QgsProcessingContext, QgsProcessingFeedback
app = QgsApplication([], False)
app.initQgis()
sys.path.insert(0, sys.argv[1])
from segpipe.algorithm import SegmentAlgorithm
raster, model, out, cancel = sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "cancel"
algorithm = SegmentAlgorithm()
algorithm.initAlgorithm()
feedback, progress = QgsProcessingFeedback(), []
def on_progress(value):
    progress.append(value)
    if cancel and value > 30:
        feedback.cancel()
feedback.progressChanged.connect(on_progress)
parameters = {"INPUT": raster, "MODEL": model, "K": 4, "DATASET": "quebec_buildings", "OUTPUT": out}
results, ok = algorithm.run(parameters, QgsProcessingContext(), feedback)
print(json.dumps({"ok": ok, "progress": progress, "results": results}))
"""


@pytest.mark.parametrize("cancel", [False, True])
def test_processing_api_progress_and_cancel(
    profile: Path, artifact: Path, tmp_path: Path, cancel: bool, tmp_path_factory: pytest.TempPathFactory
) -> None:
    raster = mosaic_raster(tmp_path_factory)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    plugins = profile / "profiles" / "default" / "python" / "plugins"
    argv = [str(plugins), str(raster), str(artifact), str(out_dir / "segments.tif"), "cancel" if cancel else "run"]
    done = subprocess.run(
        [str(QGIS_PYTHON), "-c", PROCESSING_RUN, *argv], env=qgis_env(profile), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.splitlines()[-1])
    progress = report["progress"]
    assert progress == sorted(progress) and len(progress) >= 6  # a step per tile (9 per pass)
    if cancel:
        assert not report["ok"]
        assert progress[-1] < 60  # stopped in pass 1 or early in pass 2, not at the end
        assert list(out_dir.iterdir()) == []  # no output, no temporary file, no scratch folder
    else:
        assert report["ok"] and progress[-1] == 100
        assert sorted(p.name for p in out_dir.iterdir()) == ["segments.qml", "segments.tif"]


def mosaic_raster(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 1536 x 1536 RGB raster of sample tiles (9 tiles of 512 in each pass), made once per session."""
    path = tmp_path_factory.getbasetemp() / "mosaic_1536.tif"
    if path.exists():
        return path
    tiles = [read_rgb(SAMPLE_ROOT / name) for name in PARITY_TILES[:3]]
    tiles = [np.pad(t, ((0, 0), (0, 512 - t.shape[1]), (0, 512 - t.shape[2])), mode="reflect") for t in tiles]
    mosaic = np.concatenate([np.concatenate([tiles[(r + c) % 3] for c in range(3)], axis=2) for r in range(3)], axis=1)
    profile = {"driver": "GTiff", "height": 1536, "width": 1536, "count": 3, "dtype": "uint8", "crs": "EPSG:3857"}
    with rasterio.open(path, "w", **profile, transform=rasterio.Affine(0.3, 0, 0, 0, -0.3, 0)) as dst:
        dst.write(mosaic)
    return path


def test_openblas_matmul_is_numpys_product(qgis_installed: None, profile: Path) -> None:
    """Outside QGIS, numpy calls OpenBLAS itself: the plugin's direct call must give the same bits for every
    layout the runtime uses (plain, transposed first or second operand, written into a slice)."""
    script = """
import sys, numpy as np
sys.path.insert(0, sys.argv[1])
from segpipe.openblas import openblas_sgemm, sgemm_matmul
matmul = sgemm_matmul(openblas_sgemm())
rng = np.random.default_rng(0)
a, b = rng.standard_normal((5000, 99), np.float32), rng.standard_normal((99, 8), np.float32)
out = np.empty((6000, 8), np.float32)
c = rng.standard_normal((64, 8), np.float32)
f_order = lambda x: np.ascontiguousarray(x.T).T  # the same matrix stored transposed
cases = [(a, b), (a[:, :3], f_order(b[:3])), (f_order(a), b), (a[:64].T, c), (c.T, a[:64])]
assert all(np.array_equal(matmul(x, y), x @ y) for x, y in cases)
assert np.array_equal(matmul(a, b, out=out[1000:]), a @ b) and np.array_equal(out[1000:], a @ b)
print("ok")
"""
    plugins = profile / "profiles" / "default" / "python" / "plugins"
    done = subprocess.run([str(QGIS_PYTHON), "-c", script, str(plugins)], capture_output=True, text=True)
    assert done.stdout.strip() == "ok", done.stderr
