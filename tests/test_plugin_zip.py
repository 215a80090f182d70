"""The QGIS plugin zip (``qgis_plugin/build.py``), checked without QGIS.

The zip holds exactly the plugin's own files (``qgis_plugin/segpipe/``) and every file of
``runtime_export/numpy_runtime/`` under ``segpipe/numpy_runtime/``, byte for byte: nothing missing, nothing
extra. What it should hold is listed here from the two folders themselves, not through build.py's own list,
so a build that drops, adds or stales a file fails; the planted cases below show the check catches each. The
same sources give the same zip. (Installing and running the zip in QGIS: tests/qgis/, a ``system`` test.)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BUILD = Path("qgis_plugin") / "build.py"
PLUGIN = Path("qgis_plugin") / "segpipe"
RUNTIME = Path("runtime_export") / "numpy_runtime"


def files_in(folder: Path) -> dict[str, bytes]:
    """Relative POSIX path -> content of every file under ``folder``, bytecode caches left out."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and "__pycache__" not in path.parts
    }


def expected_entries(root: Path) -> dict[str, bytes]:
    """What a zip built from the sources under ``root`` must hold: archive name -> content."""
    plugin = {f"segpipe/{name}": content for name, content in files_in(root / PLUGIN).items()}
    runtime = {f"segpipe/numpy_runtime/{name}": content for name, content in files_in(root / RUNTIME).items()}
    return plugin | runtime


def differences(zip_path: Path, expected: dict[str, bytes]) -> list[str]:
    """One line per entry the zip is missing, holds twice, holds in excess, or holds with other bytes."""
    with zipfile.ZipFile(zip_path) as archive:
        names = archive.namelist()
        built = {name: archive.read(name) for name in names}
    return (
        [f"{name}: in the zip twice" for name in sorted(set(names)) if names.count(name) > 1]
        + [f"{name}: missing from the zip" for name in sorted(expected.keys() - built.keys())]
        + [f"{name}: in the zip, not in the source" for name in sorted(built.keys() - expected.keys())]
        + [
            f"{name}: differs from the source"
            for name in sorted(expected.keys() & built.keys())
            if built[name] != expected[name]
        ]
    )


def build(root: Path, out: Path) -> Path:
    """Run ``root``'s qgis_plugin/build.py, which packs the sources under ``root``."""
    subprocess.run([sys.executable, str(root / BUILD), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def plugin_zip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The zip as users build it: bin/build-qgis-plugin."""
    out = tmp_path_factory.mktemp("dist") / "segpipe-qgis.zip"
    subprocess.run([str(REPO / "bin" / "build-qgis-plugin"), str(out)], check=True, capture_output=True)
    return out


@pytest.fixture
def source_copy(tmp_path: Path) -> Path:
    """A writable copy of what the build reads (build.py, the plugin, the runtime), laid out as in the repo."""
    root = tmp_path / "repo"
    ignore = shutil.ignore_patterns("__pycache__")
    for folder in (PLUGIN, RUNTIME):
        shutil.copytree(REPO / folder, root / folder, ignore=ignore)
    shutil.copy2(REPO / BUILD, root / BUILD)
    return root


def test_zip_holds_the_plugin_and_every_runtime_file_byte_for_byte(plugin_zip: Path) -> None:
    expected = expected_entries(REPO)
    assert "segpipe/metadata.txt" in expected and "segpipe/numpy_runtime/runtime.py" in expected
    assert differences(plugin_zip, expected) == []


def test_build_is_reproducible(plugin_zip: Path, tmp_path: Path) -> None:
    assert build(REPO, tmp_path / "again.zip").read_bytes() == plugin_zip.read_bytes()


def _append(path: Path) -> None:
    path.write_bytes(path.read_bytes() + b"\n# changed after the build\n")


# Each case changes the copy's sources, builds the copy, and compares that zip with the repo's sources.
PLANTED: dict[str, tuple[Callable[[Path], None], str]] = {
    "extra runtime module": (
        lambda root: (root / RUNTIME / "planted.py").write_text("X = 1\n"),
        "segpipe/numpy_runtime/planted.py: in the zip, not in the source",
    ),
    "missing runtime module": (
        lambda root: (root / RUNTIME / "pixels.py").unlink(),
        "segpipe/numpy_runtime/pixels.py: missing from the zip",
    ),
    "stale runtime module": (
        lambda root: _append(root / RUNTIME / "runtime.py"),
        "segpipe/numpy_runtime/runtime.py: differs from the source",
    ),
    "stale plugin file": (
        lambda root: _append(root / PLUGIN / "metadata.txt"),
        "segpipe/metadata.txt: differs from the source",
    ),
}


@pytest.mark.parametrize("case", PLANTED)
def test_the_check_finds_a_zip_that_is_not_the_source(case: str, source_copy: Path, tmp_path: Path) -> None:
    plant, problem = PLANTED[case]
    plant(source_copy)
    assert differences(build(source_copy, tmp_path / "planted.zip"), expected_entries(REPO)) == [problem]


def test_the_check_finds_a_runtime_file_the_build_leaves_out(source_copy: Path, tmp_path: Path) -> None:
    """build.py packs the runtime's ``*.py``; a data file the runtime would read must not go missing quietly."""
    (source_copy / RUNTIME / "palette.json").write_text("[]\n")
    built = build(source_copy, tmp_path / "plugin.zip")
    assert differences(built, expected_entries(source_copy)) == [
        "segpipe/numpy_runtime/palette.json: missing from the zip"
    ]
