"""bench/gpu_throughput.py: the CPU smoke run of the GPU bench prints its JSON lines; the largest-batch search."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).parents[2] / "bench" / "gpu_throughput.py"
_SPEC = importlib.util.spec_from_file_location("bench_gpu_throughput", BENCH)
gpu_throughput = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(gpu_throughput)


def test_cpu_smoke_run_prints_one_json_line_per_measurement_with_ratios() -> None:
    command = [sys.executable, str(BENCH), "--device", "cpu", "--batches", "2", "--patch", "64", "--steps", "2"]
    command += ["--workers", "0", "4", "--loader-items", "6", "--loader-seconds", "0.2", "--compile", "off"]
    result = subprocess.run(command + ["--threads", "1"], capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(line["bench"] == "gpu_throughput" for line in lines)
    by_part: dict[str, list[dict]] = {}
    for line in lines:
        by_part.setdefault(line["part"], []).append(line)
    assert list(by_part) == ["setup", "encoder", "step", "loader", "summary"]  # no CUDA: no max_batch, no check
    (encoder,), (step,), (summary,) = by_part["encoder"], by_part["step"], by_part["summary"]
    assert {"batch", "patch", "images_per_s", "step_s"} <= set(encoder)
    assert {"batch", "compile", "amp", "images_per_s", "ks", "floor_images_per_s", "ratio"} <= set(step)
    assert step["batch"] == 2 and step["compile"] is False and len(step["ks"]) == 2
    assert step["ratio"] == pytest.approx(step["images_per_s"] / encoder["images_per_s"], rel=1e-2)
    assert [loader["workers"] for loader in by_part["loader"]] == [0, 4]
    assert all(loader["images_per_s"] > 0 and "ratio_to_step" in loader for loader in by_part["loader"])
    # The recipe (configs/gpu.yaml) loads with 4 workers: the summary compares that loader with the step.
    assert summary["recipe_workers"] == 4 and summary["loader_to_step"] is not None
    assert {"step_to_floor", "limit", "targets", "met"} <= set(summary)


def test_largest_batch_doubles_then_halves_the_gap(monkeypatch: pytest.MonkeyPatch) -> None:
    tried: list[int] = []

    def fits(trainer: object, batch: int, patch: int) -> bool:
        tried.append(batch)
        return batch <= 300

    monkeypatch.setattr(gpu_throughput, "fits", fits)
    largest, probes = gpu_throughput.largest_batch(None, 32, 512, cap=1024)
    assert tried[:4] == [64, 128, 256, 512]
    assert 292 < largest <= 300 and dict(probes)[largest] is True
    assert gpu_throughput.largest_batch(None, 32, 512, cap=100)[0] == 64  # the cap stops the doubling
