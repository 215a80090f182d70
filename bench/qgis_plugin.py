"""The QGIS plugin against ``runtime_export.segment`` on a 4096 x 4096 raster: one JSON line per run, then ratios.

The same raster (``bench/runtime.py``'s: sample scenes mirrored to 4096 x 4096, ``--raster-size``), the
same model (default size, batch norm calibrated on a real tile) and K = 8, segmented
1. by ``python -m runtime_export.segment`` in the project's environment;
2. by ``qgis_process run segpipe:segment`` (QGIS 3.22 headless, the plugin zip built by
   ``bin/build-qgis-plugin`` and installed into a throwaway profile): the wall time includes QGIS's start-up.
Each child's peak RSS comes from ``wait4`` (its own, not this process's). The last line gives the
QGIS-to-CLI time ratio (target <= 1.2), QGIS's peak RSS (target <= 1.5 GB) and the share of equal labels.

    python bench/qgis_plugin.py [--raster-size 4096]     # needs bin/install-system-deps (QGIS)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import rasterio

from training_core.export import export_model

ROOT = Path(__file__).resolve().parent.parent
QGIS_PROCESS = "/usr/bin/qgis_process.bin"
K = 8
TARGETS = {"time_ratio_max": 1.2, "qgis_peak_rss_mb_max": 1536}

# ru_maxrss survives fork and exec, so a child of this torch-sized process would report at least this process's
# size: each run goes through a small launcher, which prints its child's peak RSS (kB) as its last line.
LAUNCH = (
    "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
)

_SPEC = importlib.util.spec_from_file_location("bench_runtime", ROOT / "bench" / "runtime.py")
bench_runtime = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(bench_runtime)


def run_measured(argv: list[str], env: dict[str, str] | None = None) -> dict[str, float]:
    """Wall seconds and peak RSS (MB) of one child process, which must succeed."""
    with tempfile.TemporaryFile("w+") as log:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-S", "-c", LAUNCH, *argv], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        wall = time.perf_counter() - started
        log.seek(0)
        output = log.read()
    if done.returncode != 0:
        raise SystemExit(f"{argv[0]} failed: {output[-3000:]}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(int(output.split()[-1]) / 1024, 1)}


def qgis_profile(root: Path) -> dict[str, str]:
    """A throwaway QGIS profile with the freshly built plugin enabled; the environment that selects it."""
    zip_path = root / "segpipe-qgis.zip"
    subprocess.run([str(ROOT / "bin" / "build-qgis-plugin"), str(zip_path)], check=True, capture_output=True)
    plugins = root / "profile" / "profiles" / "default" / "python" / "plugins"
    plugins.mkdir(parents=True)
    with zipfile.ZipFile(zip_path) as archive:
        archive.extractall(plugins)
    runtime_dir = root / "xdg"
    runtime_dir.mkdir(mode=0o700)
    env = {
        **os.environ,
        "QT_QPA_PLATFORM": "offscreen",
        "QGIS_CUSTOM_CONFIG_PATH": str(root / "profile"),
        "XDG_RUNTIME_DIR": str(runtime_dir),
    }
    subprocess.run([QGIS_PROCESS, "plugins", "enable", "segpipe"], env=env, check=True, capture_output=True)
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--raster-size", type=int, default=bench_runtime.RASTER_SIDE, help="side of the raster, px")
    side = parser.parse_args().raster_size
    if not Path(QGIS_PROCESS).exists():
        raise SystemExit(f"{QGIS_PROCESS} is missing: run bin/install-system-deps")
    with rasterio.open(bench_runtime.TILE) as src:
        model, config = bench_runtime.calibrated_model(src.read([1, 2, 3]))
    with tempfile.TemporaryDirectory(prefix="bench-qgis-") as scratch:
        scratch = Path(scratch)
        artifact = export_model(model, config, scratch / "model", {}, {})
        raster = scratch / "input.tif"
        bench_runtime.write_big_raster(raster, side)
        env = qgis_profile(scratch)
        cli_out, qgis_out = scratch / "cli.tif", scratch / "qgis.tif"
        cli_argv = ["--model", str(artifact), "--input", str(raster), "--output", str(cli_out), "--k", str(K)]
        runs = {
            "cli": run_measured([sys.executable, "-m", "runtime_export.segment", *cli_argv, "--quiet"]),
            "qgis_process": run_measured(
                [QGIS_PROCESS, "run", "segpipe:segment", "--", f"INPUT={raster}", f"MODEL={artifact}", f"K={K}"]
                + [f"OUTPUT={qgis_out}"],
                env,
            ),
        }
        megapixels = side * side / 1e6
        for name, run in runs.items():
            rate = round(megapixels / run["wall_s"], 3)
            print(json.dumps({"run": name, "raster": side, "k": K, **run, "mp_per_s": rate}))
        with rasterio.open(cli_out) as cli, rasterio.open(qgis_out) as qgis:
            agreement = float(np.mean(cli.read(1) == qgis.read(1)))
    ratio = runs["qgis_process"]["wall_s"] / runs["cli"]["wall_s"]
    summary = {
        "qgis_to_cli_time_ratio": round(ratio, 3),
        "qgis_peak_rss_mb": runs["qgis_process"]["peak_rss_mb"],
        "label_agreement": agreement,
        "targets": TARGETS,
        "met": ratio <= TARGETS["time_ratio_max"]
        and runs["qgis_process"]["peak_rss_mb"] <= TARGETS["qgis_peak_rss_mb_max"],
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
