"""Fixtures shared by every test package: the bundled sample data and small synthetic GeoTIFF datasets."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from affine import Affine
from rasterio.errors import NotGeoreferencedWarning

SAMPLE_EXTRACTED = Path(__file__).resolve().parents[1] / "sample_data" / "extracted"
TESTS = Path(__file__).resolve().parent
# Where float results pass through BLAS kernels (the numpy runtime, the model, losses, evaluation, parity):
# marked `numerical`, so bin/test runs them again under another OpenBLAS kernel (tests/numerics.py).
NUMERICAL_TESTS = (
    "runtime_export",
    "training_core/test_model.py",
    "training_core/test_losses.py",
    "training_core/test_eval.py",
    "training_core/test_export.py",
    "training_core/test_export_cli.py",
    "training_core/test_metrics.py",
    "assets/test_export.py",
)

# Long tests are marked `slow` (skip them with -m "not slow"): every test allowed SLOW_TIMEOUT_S or more
# (`pytest.mark.timeout`: the whole-pipeline runs), the modules below, and the `system` tests, which mark
# themselves (tests/ops/test_ui_browser.py, tests/ops/test_postgres.py, tests/qgis/).
SLOW_TIMEOUT_S = 180
SLOW_TESTS = (
    "pipeline/test_concurrent_runs.py",  # sample_pipeline runs, several jobs each
    "training_core/test_compile.py",  # torch.compile: about a minute on 2 cores
)


def _under(where: str, paths: tuple[str, ...]) -> bool:
    return any(where == path or where.startswith(f"{path}/") for path in paths)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        where = item.path.relative_to(TESTS).as_posix()
        if _under(where, NUMERICAL_TESTS):
            item.add_marker(pytest.mark.numerical)
        timeout = item.get_closest_marker("timeout")
        allowed = (timeout.args[0] if timeout.args else timeout.kwargs.get("timeout", 0)) if timeout else 0
        if _under(where, SLOW_TESTS) or allowed >= SLOW_TIMEOUT_S:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def sample_extracted() -> Path:
    """The bundled extracted root. Read-only: copy before writing (see `extracted_copy`)."""
    return SAMPLE_EXTRACTED


@pytest.fixture
def extracted_copy(tmp_path: Path) -> Path:
    """A writable copy of the whole sample extracted root."""
    return Path(shutil.copytree(SAMPLE_EXTRACTED, tmp_path / "extracted"))


@pytest.fixture
def kampala_copy(tmp_path: Path) -> Path:
    """A writable extracted root holding only kampala_buildings (48 items, 16 labeled); returns the root."""
    root = tmp_path / "extracted"
    shutil.copytree(SAMPLE_EXTRACTED / "kampala_buildings", root / "kampala_buildings")
    return root


def write_geotiff(
    path: Path,
    pixels: np.ndarray,
    *,
    crs: str | None = "EPSG:3857",
    nodata: float | None = None,
    compress: str | None = None,
) -> Path:
    """Write a [bands, H, W] array as a GeoTIFF (10 m pixels) with the given CRS; crs=None: no georef."""
    path.parent.mkdir(parents=True, exist_ok=True)
    profile = {
        "driver": "GTiff",
        "count": pixels.shape[0],
        "height": pixels.shape[1],
        "width": pixels.shape[2],
        "dtype": pixels.dtype.name,
        "nodata": nodata,
    }
    if crs is not None:
        profile |= {"crs": crs, "transform": Affine(10, 0, 500_000, 0, -10, 4_000_000)}
    if compress is not None:
        profile["compress"] = compress
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)  # crs=None is asked for
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(pixels)
    return path


@pytest.fixture
def write_tif() -> Callable[..., Path]:
    """`write_geotiff` as a fixture, so tests need not import conftest."""
    return write_geotiff


@pytest.fixture
def make_dataset(tmp_path: Path) -> Callable[..., Path]:
    """Factory for a small synthetic dataset `<tmp>/extracted/<dataset_id>/{images,masks}/`.

    `make_dataset("toy", n_unlabeled=3, n_labeled=2)` writes 16x16 uint8 RGB inputs `u0..`, `l0..` and
    single-band masks (values 0..2) for the labeled ones; returns the dataset folder.
    """

    def make(dataset_id: str = "toy", n_unlabeled: int = 3, n_labeled: int = 2, size: int = 16) -> Path:
        rng = np.random.default_rng(0)
        dataset = tmp_path / "extracted" / dataset_id
        for name in [f"u{i}" for i in range(n_unlabeled)] + [f"l{i}" for i in range(n_labeled)]:
            write_geotiff(dataset / "images" / f"{name}.tif", rng.integers(0, 256, (3, size, size), dtype=np.uint8))
            if name.startswith("l"):
                write_geotiff(dataset / "masks" / f"{name}.tif", rng.integers(0, 3, (1, size, size), dtype=np.uint8))
        return dataset

    return make


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one intra-op thread is faster, and immune to other processes' load."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
