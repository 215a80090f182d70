"""Imports flow one way: pipeline -> assets -> training_core -> runtime_export.

Read from the source (``ast``), never by importing: every tracked ``.py`` file of the project packages.

- ``runtime_export`` imports none of training_core, assets, pipeline, and no torch or dagster;
- ``training_core`` imports neither assets nor pipeline nor dagster;
- ``runtime_export/numpy_runtime/`` (copied whole into the QGIS plugin) imports numpy, the standard library and
  its own modules (relatively) only;
- dagster's private modules (``dagster._...``) are imported only by the adapter that wraps them
  (``DAGSTER_PRIVATE``: ``assets/dagster_internals.py``).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("runtime_export", "training_core", "assets", "pipeline")
# The files allowed to import dagster's private modules; a new one fails the test.
DAGSTER_PRIVATE = frozenset({"assets/dagster_internals.py"})


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--", *(f"{package}/*.py" for package in PACKAGES)],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.decode()
    return sorted(name for name in listed.split("\0") if name)


def imports_of(source: str, filename: str) -> Iterator[tuple[int, str, int]]:
    """(line, imported module, relative level) for each import: ``import a.b`` gives ``a.b``, ``from a import b``
    gives ``a`` and ``a.b`` (``b`` may be a module), ``from . import x`` gives level 1 and ``x``."""
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, 0
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if base:
                yield node.lineno, base, node.level
            for alias in node.names:
                if alias.name != "*":
                    yield node.lineno, f"{base}.{alias.name}" if base else alias.name, node.level


def _is_under(module: str, names: tuple[str, ...]) -> bool:
    return any(module == name or module.startswith(f"{name}.") for name in names)


def violations(path: str, source: str) -> list[str]:
    """What ``path`` (relative to the repository, posix) imports against the rules, as ``path:line: message``;
    one message per import statement and rule."""
    found: dict[tuple[int, str], str] = {}
    for line, module, level in imports_of(source, path):
        where = f"{path}:{line}: imports {'.' * level}{module}"
        for rule in _broken_rules(path, module, level):
            found.setdefault((line, rule), f"{where}: {rule}")
    return list(found.values())


def _broken_rules(path: str, module: str, level: int) -> Iterator[str]:
    if level == 0 and module.startswith("dagster._") and path not in DAGSTER_PRIVATE:
        yield f"a private dagster module (only {sorted(DAGSTER_PRIVATE)} may)"
    if path.startswith("runtime_export/numpy_runtime/"):
        top = module.split(".")[0]
        if level == 0 and top != "numpy" and top not in sys.stdlib_module_names:
            yield "the numpy runtime imports only numpy, the standard library and itself"
        elif level > 1:
            yield "the numpy runtime imports only its own folder (one dot): the plugin copies it alone"
    elif path.startswith("runtime_export/"):
        if level == 0 and _is_under(module, ("training_core", "assets", "pipeline", "torch", "dagster")):
            yield "runtime_export is the bottom package (no training_core, assets, pipeline, torch or dagster)"
    elif path.startswith("training_core/"):
        if level == 0 and _is_under(module, ("assets", "pipeline", "dagster")):
            yield "training_core imports neither assets, pipeline nor dagster"


def test_imports_flow_one_way() -> None:
    files = _tracked_files()
    assert any(name.startswith("runtime_export/numpy_runtime/") for name in files), files
    found = [problem for name in files for problem in violations(name, (REPO / name).read_text(encoding="utf-8"))]
    assert not found, "imports against the direction:\n" + "\n".join(found)


def test_the_private_dagster_allow_list_is_current() -> None:
    """Each allowed file still imports a private dagster module: an entry no longer needed is removed."""
    for name in sorted(DAGSTER_PRIVATE):
        modules = [module for _, module, level in imports_of((REPO / name).read_text(), name) if level == 0]
        assert any(module.startswith("dagster._") for module in modules), f"{name}: no dagster._ import any more"


def test_each_rule_catches_a_planted_import() -> None:
    planted = {
        "runtime_export/segment.py": "from training_core.model import SegmentationModel\n",
        "runtime_export/artifact.py": "import torch\n",
        "runtime_export/cli.py": "import dagster as dg\n",
        "training_core/export.py": "from assets.export import runtime_artifact\n",
        "training_core/eval/scoring.py": "import dagster\n",
        "runtime_export/numpy_runtime/runtime.py": "import rasterio\n",
        "runtime_export/numpy_runtime/pixels.py": "from ..rasters import open_raster\n",
        "assets/export.py": "from dagster._core.events import DagsterEventType\n",
        "assets/lineage.py": "from dagster._core.events import DagsterEventType\n",
    }
    for path, source in planted.items():
        (problem,) = violations(path, f'"""doc"""\n\n{source}')
        assert problem.startswith(f"{path}:3: imports "), problem
    ok = {
        "runtime_export/numpy_runtime/runtime.py": "import json\nimport numpy as np\nfrom .pixels import PixelRule\n",
        "runtime_export/segment.py": "import rasterio\nfrom runtime_export.numpy_runtime.runtime import STRIDE\n",
        "training_core/export.py": "import torch\nfrom runtime_export.artifact import write_artifact\n",
        "assets/dagster_internals.py": "from dagster._core.events import DagsterEventType\n",
    }
    for path, source in ok.items():
        assert violations(path, source) == [], path
