"""Wall time of `sample_pipeline` through Dagster against the same stages as plain library calls.

Both sides run as fresh Python processes on the bundled sample data, one after the other in this run,
each with its own temporary work root:
- dagster: `dagster job execute -m pipeline.definitions -j sample_pipeline -c pipeline/sample_run.yaml` (what
  bin/run-sample runs) against a fresh temporary DAGSTER_HOME holding the project's embedded instance
  config; the dataset partitions are registered first with `observe_raw_datasets`, timed apart (`register_s`);
- direct: this file with `--direct`: the same stages and the same checks, called as library functions in
  one process (header extraction + validation, shard build + verification, training with the job's run
  config, IoU evaluation + comparison picture, export + runtime parity + promotion).
The sides alternate for --rounds rounds and the fastest of each counts, so load from other work on the
host hits both alike. Prints one JSON line: both wall times, their ratio (target <= 1.3), every round's
times, the direct stage breakdown and the 1-minute load average at the end.

Usage: python bench/pipeline.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
EXTRACTED_ROOT = REPO_ROOT / "sample_data" / "extracted"
# The job's run config (its training budget); the direct side trains with the same `trained_model` config.
SAMPLE_RUN_CONFIG = REPO_ROOT / "pipeline" / "sample_run.yaml"
PARITY_KS = (2, 8, 16)
PARITY_TILES = 2
PARITY_TILE_SIZE = 256


def timed_subprocess(command: list[str], env: dict[str, str]) -> tuple[float, str]:
    """Run `command` from the repository root; return its wall time and stdout, or raise with its output."""
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(
            f"{' '.join(command)} exited {result.returncode}:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
        )
    return elapsed, result.stdout


def run_through_dagster(tmp: Path) -> dict[str, float]:
    dagster_home = tmp / "dagster_home"
    dagster_home.mkdir()
    shutil.copy(REPO_ROOT / "pipeline" / "local_instance.yaml", dagster_home / "dagster.yaml")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "SEGPIPE_ENV": "local",
        "SEGPIPE_WORK_ROOT": str(tmp / "work"),
    }
    # `dagster job execute` takes no workspace file; the module is the one workspace.yaml loads.
    execute = [sys.executable, "-m", "dagster", "job", "execute", "-m", "pipeline.definitions", "-j"]
    register_s, _ = timed_subprocess([*execute, "observe_raw_datasets"], env)
    print(f"dagster: registered partitions in {register_s:.1f}s", file=sys.stderr)
    pipeline_s, _ = timed_subprocess([*execute, "sample_pipeline", "-c", str(SAMPLE_RUN_CONFIG)], env)
    return {"register_s": register_s, "dagster_s": pipeline_s}


def run_direct(tmp: Path) -> dict[str, Any]:
    # -P keeps bench/ off sys.path: the stages import only the libraries, never this folder's modules.
    command = [sys.executable, "-P", __file__, "--direct", "--work-root", str(tmp / "work")]
    elapsed, stdout = timed_subprocess(command, {**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    stages = json.loads(stdout.strip().splitlines()[-1])
    print(f"direct: {elapsed:.1f}s {stages}", file=sys.stderr)
    return {"direct_s": elapsed, "direct_stages_s": stages}


def direct_stages(work_root: Path) -> dict[str, float]:
    """The sample pipeline's stages as library calls, in order; returns seconds per stage."""
    # Imported here: the parent process only orchestrates and must not pay for torch.
    import numpy as np
    import rasterio
    import yaml
    from rasterio.windows import Window

    from runtime_export.artifact import promote_if_better
    from training_core.config import TrainConfig
    from training_core.datasets.discovery import discover_datasets
    from training_core.datasets.scan import extract_header, validate_dataset
    from training_core.datasets.schema import HEADER_FILENAME, dump_header
    from training_core.eval.picture import render_comparison
    from training_core.eval.report import BASELINE, MODEL
    from training_core.eval.scoring import dataset_label_space, evaluate_checkpoint
    from training_core.export import export_artifact
    from training_core.parity import runtime_parity
    from training_core.shards.index import iter_split_items, read_manifest
    from training_core.shards.verify import verify_shards
    from training_core.shards.write import build_shards
    from training_core.train import train

    headers_root, processed_root = work_root / "headers", work_root / "processed"
    artifacts_root = work_root / "artifacts"
    dataset_ids = discover_datasets(EXTRACTED_ROOT)
    timings: dict[str, float] = {}
    state: dict[str, Any] = {}

    def stage(name: str, body: Callable[[], None]) -> None:
        started = time.perf_counter()
        body()
        timings[name] = round(time.perf_counter() - started, 2)

    def headers() -> None:
        for dataset_id in dataset_ids:
            header = extract_header(EXTRACTED_ROOT / dataset_id, dataset_id)
            dump_header(header, headers_root / dataset_id / HEADER_FILENAME)
            validate_dataset(EXTRACTED_ROOT / dataset_id, header)

    def shards() -> None:
        for dataset_id in dataset_ids:
            build_shards(EXTRACTED_ROOT, processed_root, dataset_id, overwrite=True)
            problems = verify_shards(processed_root, dataset_id)
            if problems:
                raise RuntimeError(f"{dataset_id}: {problems}")

    def training() -> None:
        run_config = yaml.safe_load(SAMPLE_RUN_CONFIG.read_text())
        requested = TrainConfig.model_validate(run_config["ops"]["trained_model"]["config"])
        trained_on = [
            dataset_id
            for dataset_id in dataset_ids
            if next(iter_split_items(processed_root, dataset_id, requested.data.split), None) is not None
        ]
        raw = requested.model_dump(mode="json")
        raw["data"].update(source="shards", processed_root=str(processed_root), dataset_ids=trained_on)
        result = train(TrainConfig.model_validate(raw), work_root / "checkpoints", resume=True)
        state["checkpoint"] = str(result.checkpoint_path)

    def evaluation() -> None:
        labeled = [
            dataset_id
            for dataset_id in dataset_ids
            if dataset_label_space(processed_root, dataset_id)[0] is not None
            and read_manifest(processed_root, dataset_id)["counts"].get("val", 0) > 0
        ]
        reports = {
            dataset_id: evaluate_checkpoint(state["checkpoint"], processed_root, dataset_id) for dataset_id in labeled
        }
        for dataset_id, report in reports.items():
            render_comparison(report, artifacts_root / "evaluation" / f"{dataset_id}.png")
        state["metrics"] = {
            "val_miou": float(np.mean([report.miou(MODEL) for report in reports.values()])),
            "baseline_val_miou": float(np.mean([report.miou(BASELINE) for report in reports.values()])),
        }
        state["data_versions"] = {dataset_id: report.data_version for dataset_id, report in reports.items()}

    def export() -> None:
        lineage = {"datasets": dataset_ids, "data_versions": state["data_versions"]}
        out_dir = export_artifact(state["checkpoint"], artifacts_root / "candidate", lineage, state["metrics"])
        tiles = []
        for dataset_id in sorted(dataset_ids):
            for shard_dir, entry in iter_split_items(processed_root, dataset_id, "val"):
                if len(tiles) < PARITY_TILES:
                    with rasterio.open(shard_dir / entry.input) as source:
                        size = min(PARITY_TILE_SIZE, source.width, source.height)
                        tiles.append(source.read([1, 2, 3], window=Window(0, 0, size, size)).astype(np.uint8))
        report = runtime_parity(out_dir, state["checkpoint"], tiles, PARITY_KS)
        if not report["passed"]:
            raise RuntimeError(f"runtime parity failed: {report}")
        promote_if_better(out_dir, artifacts_root / "best")

    for name, body in (
        ("headers", headers),
        ("shards", shards),
        ("training", training),
        ("evaluation", evaluation),
        ("export", export),
    ):
        stage(name, body)
    return timings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; the fastest of each side counts")
    parser.add_argument(
        "--direct", action="store_true", help="internal: run the stages as library calls, print timings"
    )
    parser.add_argument("--work-root", type=Path, help="internal: work root of --direct")
    args = parser.parse_args()
    if args.direct:
        print(json.dumps(direct_stages(args.work_root)))
        return
    directs, dagsters = [], []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory(prefix=f"bench-pipeline-{round_index}-") as tmp:
            (Path(tmp) / "direct").mkdir()
            (Path(tmp) / "dagster").mkdir()
            directs.append(run_direct(Path(tmp) / "direct"))
            dagsters.append(run_through_dagster(Path(tmp) / "dagster"))
    direct = min(directs, key=lambda timing: timing["direct_s"])
    dagster = min(dagsters, key=lambda timing: timing["dagster_s"])
    print(
        json.dumps(
            {
                "bench": "pipeline",
                "dagster_s": round(dagster["dagster_s"], 2),
                "direct_s": round(direct["direct_s"], 2),
                "ratio": round(dagster["dagster_s"] / direct["direct_s"], 3),
                "target_ratio": 1.3,
                "rounds": args.rounds,
                "all_dagster_s": [round(timing["dagster_s"], 2) for timing in dagsters],
                "all_direct_s": [round(timing["direct_s"], 2) for timing in directs],
                "register_s": round(dagster["register_s"], 2),
                "direct_stages_s": direct["direct_stages_s"],
                "cpus": os.cpu_count(),
                "load_avg_1m": round(os.getloadavg()[0], 2),
            }
        )
    )


if __name__ == "__main__":
    main()
