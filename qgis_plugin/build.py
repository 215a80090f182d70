"""Build the installable QGIS plugin zip: ``qgis_plugin/segpipe/`` with the numpy runtime vendored in.

``python qgis_plugin/build.py [ZIP]`` (``bin/build-qgis-plugin``; default ``dist/segpipe-qgis.zip``)

The zip holds one folder, ``segpipe/`` (what QGIS's "Install from ZIP" expects): the plugin's own files
and ``segpipe/numpy_runtime/``, a byte-for-byte copy of every module of ``runtime_export/numpy_runtime/``
(numpy and the standard library only, importing each other relatively, so the copy runs unchanged). Never
edit the copy: it is rebuilt from the source each time, and tests/test_plugin_zip.py fails when a built zip
misses, adds or changes any file of the plugin or the runtime. Standard library only; entries have a fixed
timestamp, so the same sources give the same zip.
"""

from __future__ import annotations

import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PLUGIN = REPO / "qgis_plugin" / "segpipe"
# The numpy runtime, copied whole: every module in the folder (no torch, no rasterio, no training_core).
RUNTIME = REPO / "runtime_export" / "numpy_runtime"
ZIP_TIME = (2020, 1, 1, 0, 0, 0)
DEFAULT_ZIP = REPO / "dist" / "segpipe-qgis.zip"


def plugin_files() -> dict[str, Path]:
    """Archive name -> source file, in a stable order."""
    own = sorted(path for path in PLUGIN.rglob("*") if path.is_file() and "__pycache__" not in path.parts)
    files = {f"segpipe/{path.relative_to(PLUGIN).as_posix()}": path for path in own}
    for path in sorted(RUNTIME.glob("*.py")):
        files[f"segpipe/numpy_runtime/{path.name}"] = path
    return files


def build_plugin_zip(destination: Path = DEFAULT_ZIP) -> Path:
    """Write the zip atomically (a temp sibling renamed into place) and return its path."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = destination.with_name(f".{destination.name}.tmp")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for name, source in plugin_files().items():
                entry = zipfile.ZipInfo(name, ZIP_TIME)
                entry.compress_type = zipfile.ZIP_DEFLATED
                entry.external_attr = 0o644 << 16
                archive.writestr(entry, source.read_bytes())
        tmp.replace(destination)
    finally:
        tmp.unlink(missing_ok=True)
    return destination


if __name__ == "__main__":
    print(build_plugin_zip(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_ZIP))
