"""Issue 24 for ``python -m training_core.export`` and ``python -m runtime_export.segment``: every bad input found on
a user's machine is refused as a user runs it (a child process): non-zero exit, one line naming the file, field and
problem, no traceback, every file byte-identical, no hidden leftovers. And a killed run's leftovers go with the next.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.reliability.harness import REPO, Untouched, assert_refused, hidden_entries, run_module
from training_core.checkpoint import load_checkpoint
from training_core.export import export_artifact
from training_core.smoke_export import smoke_config
from training_core.train import train

# A 256 x 256 uint8 RGB tile: segmenting it takes a fraction of a second.
TILE = REPO / "sample_data" / "extracted" / "kampala_buildings" / "images" / "OAM-1238448-1046532-21.tif"
NOT_UTF8 = os.fsdecode(b"\xff")  # a file name byte that is not UTF-8, as Python hands it over from argv
UINT16_RULE = {"dtype": "uint16", "bands": [1, 2, 3], "alpha_band": None, "nodata": 0, "value_range": [0, 4095]}


@dataclass(frozen=True)
class Shared:
    """Built once per module: a checkpoint of a tiny model (max_k 4) and its artifact."""

    root: Path
    checkpoint: Path
    artifact: Path


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Shared:
    root = tmp_path_factory.mktemp("shared")
    result = train(smoke_config(seed=7, steps=1, embed_dim=8, max_k=4, patch_size=32), root / "ckpt", resume=False)
    assert result.checkpoint_path is not None
    artifact = export_artifact(result.checkpoint_path, root / "model", {}, {"val_miou": None})
    return Shared(root, result.checkpoint_path, artifact)


# -- how each case builds its inputs in its own folder -------------------------------------------------------------


def artifact_copy(shared: Shared, case: Path, meta: dict | None = None, arrays: dict | None = None) -> Path:
    """A copy of the shared artifact with some meta.json values and model.npz arrays replaced."""
    copy = Path(shutil.copytree(shared.artifact, case / "model"))
    if meta:
        payload = json.loads((copy / "meta.json").read_text())
        (copy / "meta.json").write_text(json.dumps({**payload, **meta}))  # json.dumps writes NaN / Infinity as such
    if arrays:
        with np.load(copy / "model.npz") as npz:
            payload = {key: npz[key] for key in npz.files}
        for key, change in arrays.items():
            payload[key] = change(payload[key].copy())
        np.savez(copy / "model.npz", **payload)
    return copy


def with_nan(array: np.ndarray) -> np.ndarray:
    array.flat[0] = np.nan
    return array


def tile(case: Path, name: str = "scene.tif") -> Path:
    return Path(shutil.copyfile(TILE, case / name))


def segment(model: Path, input_path: Path, output: Path, *flags: str) -> tuple[str, ...]:
    return ("--model", str(model), "--input", str(input_path), "--output", str(output), "--k", "3", *flags)


def truncated_npz(shared: Shared, case: Path) -> Path:
    copy = artifact_copy(shared, case)
    data = (copy / "model.npz").read_bytes()
    (copy / "model.npz").write_bytes(data[: len(data) // 2])
    return copy


def nan_checkpoint(shared: Shared, case: Path) -> Path:
    state = load_checkpoint(shared.checkpoint)
    state["model"]["encoder.conv2.weight"][0, 0, 0, 0] = float("nan")
    torch.save(state, case / "diverged.pt")
    return case / "diverged.pt"


def cut_checkpoint(shared: Shared, case: Path) -> Path:
    (case / "cut.pt").write_bytes(shared.checkpoint.read_bytes()[:1000])
    return case / "cut.pt"


def run_folder(shared: Shared, case: Path) -> Path:
    """What a user's training run folder holds: checkpoints, shards, their notes (75 files)."""
    run = case / "run"
    run.mkdir()
    for i in range(40):
        shutil.copyfile(shared.checkpoint, run / f"step-{i:06}.pt")
    for i in range(34):
        (run / f"shard-{i:03}.tar").write_bytes(b"shard" * i)
    (run / "notes.md").write_text("what I tried\n")
    return run


def hard_link(case: Path) -> Path:
    os.link(tile(case), case / "labels.tif")
    return case / "labels.tif"


def symbolic_link(case: Path) -> Path:
    (case / "labels.tif").symlink_to(tile(case))
    return case / "labels.tif"


# -- the cases: (module, arguments built in the case folder, cwd or None, fragments of the one error line) ----------


@dataclass(frozen=True)
class Case:
    module: str
    arguments: Callable[[Shared, Path], tuple[str, ...]]
    fragments: tuple[str, ...]
    cwd: Callable[[Shared, Path], Path] | None = None


EXPORT, SEGMENT = "training_core.export", "runtime_export.segment"

CASES = {
    # 1. --out is replaced only when it is an artifact: a run folder, the current folder, the checkpoint's are not.
    "1-export-out-is-a-run-folder": Case(
        EXPORT,
        lambda s, c: ("--checkpoint", str(s.checkpoint), "--out", str(run_folder(s, c))),
        ("output folder", "run: not an artifact folder (it holds notes.md, shard-000.tar, shard-001.tar and 72 more)"),
    ),
    "1-export-out-is-the-current-folder": Case(
        EXPORT,
        lambda s, c: ("--checkpoint", str(s.checkpoint), "--out", "."),
        ("output folder .: holds the current folder",),
        cwd=lambda s, c: artifact_copy(s, c),
    ),
    "1-export-out-holds-the-checkpoint": Case(
        EXPORT,
        lambda s, c: ("--checkpoint", str(run_folder(s, c) / "step-000001.pt"), "--out", str(c / "run")),
        ("run: holds the checkpoint", "step-000001.pt"),
    ),
    # 2 and 6. The output is never the input nor its own style sidecar, whatever the links.
    "2-segment-output-is-the-input": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / "scene.tif"),
        ("scene.tif: is the input",),
    ),
    "2-segment-output-is-a-symlink-to-the-input": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, c / "scene.tif", symbolic_link(c)),
        ("labels.tif: is the input", "scene.tif"),
    ),
    "2-segment-output-is-a-hard-link-to-the-input": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, c / "scene.tif", hard_link(c)),
        ("labels.tif: is the input", "scene.tif"),
    ),
    "2-segment-output-style-is-the-input": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c, "scene.qml"), c / "scene.tif"),
        ("scene.tif: its QGIS style", "scene.qml would replace the input"),
    ),
    "6-segment-output-is-a-style-file": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / "labels.qml"),
        ("labels.qml: a .qml output would be overwritten by its own QGIS style",),
    ),
    # 4. Weights holding NaN are not exported.
    "4-export-nan-weights": Case(
        EXPORT,
        lambda s, c: ("--checkpoint", str(nan_checkpoint(s, c)), "--out", str(c / "artifact")),
        ("diverged.pt", "weight 'encoder.conv2.weight' holds NaN or infinity"),
    ),
    # 5. The artifact reader refuses non-finite and non-numeric values, naming the file and field.
    "5-meta-nan": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, meta={"temperature": float("nan")}), tile(c), c / "out.tif"),
        ("meta.json: temperature is NaN, not a finite number",),
    ),
    "5-meta-infinity": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, meta={"input_scale": float("inf")}), tile(c), c / "out.tif"),
        ("meta.json: input_scale is Infinity, not a finite number",),
    ),
    "5-meta-true-for-a-number": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, meta={"chroma_weight": True}), tile(c), c / "out.tif"),
        ("meta.json: chroma_weight must be a non-negative number, got True",),
    ),
    "5-npz-nan-weights": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, arrays={"encoder.conv1.weight": with_nan}), tile(c), c / "out.tif"),
        ("model.npz: array 'encoder.conv1.weight' holds NaN or infinity",),
    ),
    "5-npz-zero-std": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, arrays={"input_std": np.zeros_like}), tile(c), c / "out.tif"),
        ("model.npz: array 'input_std' must be positive",),
    ),
    # 7. A preset rule of another dtype than the file's.
    "7-segment-dataset-of-another-dtype": Case(
        SEGMENT,
        lambda s, c: segment(
            artifact_copy(s, c, meta={"input_rules": {"naip": UINT16_RULE}}),
            tile(c),
            c / "out.tif",
            "--dataset",
            "naip",
        ),
        ("dataset 'naip': its input rule is for uint16 data", "scene.tif is uint8"),
    ),
    # 8. Value ranges: finite, lo below hi.
    "8-segment-value-range-infinite": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / "out.tif", "--value-range", "0,inf"),
        ("--value-range", "'0,inf'", "two finite numbers"),
    ),
    "8-segment-value-range-reversed": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / "out.tif", "--value-range", "255,0"),
        ("--value-range", "'255,0'", "LO below HI"),
    ),
    "8-meta-value-range-infinite": Case(
        SEGMENT,
        lambda s, c: segment(
            artifact_copy(s, c, meta={"input_rules": {"naip": {**UINT16_RULE, "value_range": [0, float("inf")]}}}),
            tile(c),
            c / "out.tif",
        ),
        ("meta.json: input_rules.naip.value_range[1] is Infinity",),
    ),
    "8-meta-value-range-reversed": Case(
        SEGMENT,
        lambda s, c: segment(
            artifact_copy(s, c, meta={"input_rules": {"naip": {**UINT16_RULE, "value_range": [4095, 0]}}}),
            tile(c),
            c / "out.tif",
        ),
        ("meta.json: input_rules.naip: not a pixel rule", "value_range [4095, 0]", "lo below hi"),
    ),
    # 9. K beyond the model's range.
    "9-segment-k-beyond-max-k": Case(
        SEGMENT,
        lambda s, c: (*segment(s.artifact, tile(c), c / "out.tif")[:-2], "--k", "9"),
        ("k=9 is outside the model's k_range [2, 4]",),
    ),
    # 10. What used to be a traceback.
    "10-segment-truncated-npz": Case(
        SEGMENT,
        lambda s, c: segment(truncated_npz(s, c), tile(c), c / "out.tif"),
        ("model.npz: not a readable npz archive",),
    ),
    "10-meta-string-for-a-number": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, meta={"max_k": "4"}), tile(c), c / "out.tif"),
        ("meta.json: max_k must be an integer >= 2, got '4'",),
    ),
    "10-meta-list-for-an-object": Case(
        SEGMENT,
        lambda s, c: segment(artifact_copy(s, c, meta={"input_rules": ["naip"]}), tile(c), c / "out.tif"),
        ("meta.json: input_rules must be an object", "got list"),
    ),
    "10-segment-max-fit-cells-zero": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / "out.tif", "--max-fit-cells", "0"),
        ("--max-fit-cells", "'0': expected a positive integer"),
    ),
    "10-segment-max-fit-cells-negative": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / "out.tif", "--max-fit-cells", "-5"),
        ("--max-fit-cells", "'-5': expected a positive integer"),
    ),
    "10-segment-input-not-utf8": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c, f"scene{NOT_UTF8}.tif"), c / "out.tif"),
        (
            "--input",
            "scene\\xff.tif: the path is not valid UTF-8",
        ),
    ),
    "10-segment-output-not-utf8": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, tile(c), c / f"out{NOT_UTF8}.tif"),
        (
            "--output",
            "out\\xff.tif: the path is not valid UTF-8",
        ),
    ),
    "10-segment-model-missing-not-utf8": Case(
        SEGMENT,
        lambda s, c: segment(c / f"model{NOT_UTF8}", tile(c), c / "out.tif"),
        ("model\\udcff: no such folder",),  # Python writes the undecodable byte this way
    ),
    "10-segment-model-missing": Case(
        SEGMENT,
        lambda s, c: segment(c / "nowhere", tile(c), c / "out.tif"),
        ("nowhere: no such folder",),
    ),
    "10-segment-input-missing": Case(
        SEGMENT,
        lambda s, c: segment(s.artifact, c / "missing.tif", c / "out.tif"),
        ("missing.tif: no such file (--input is the raster to segment)",),
    ),
    "10-export-checkpoint-missing": Case(
        EXPORT,
        lambda s, c: ("--checkpoint", str(c / "missing.pt"), "--out", str(c / "artifact")),
        ("checkpoint", "missing.pt does not exist"),
    ),
    "10-export-checkpoint-damaged": Case(
        EXPORT,
        lambda s, c: ("--checkpoint", str(cut_checkpoint(s, c)), "--out", str(c / "artifact")),
        ("cut.pt is unreadable (truncated or not a checkpoint)",),
    ),
}


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_refused_in_one_line_and_loses_nothing(shared: Shared, tmp_path: Path, name: str) -> None:
    case = CASES[name]
    arguments = case.arguments(shared, tmp_path)
    cwd = case.cwd(shared, tmp_path) if case.cwd else None
    untouched = Untouched(tmp_path, shared.root)
    outcome = run_module(case.module, *arguments, cwd=cwd, timeout=120)
    line = assert_refused(outcome, *case.fragments)
    assert line.startswith(f"python -m {case.module}: error: "), line
    untouched.assert_unchanged()


# -- 3. what a SIGKILLed run leaves is removed by the next run -----------------------------------------------------

# Runs a CLI with one of its functions replaced by a SIGKILL of the process: killed mid-run, deterministically.
KILLED_AT = """
import os, signal, sys, importlib
module, function = sys.argv[1], sys.argv[2]
setattr(importlib.import_module(module), function, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
cli = importlib.import_module(sys.argv[3])
sys.exit(cli.main(sys.argv[4:]))
"""


def killed_run(patch_module: str, function: str, cli: str, *arguments: str | Path) -> int:
    """Run ``cli`` in a child killed (SIGKILL) when it calls ``patch_module.function``; returns the child's pid."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore"}
    child = subprocess.Popen(
        [sys.executable, "-c", KILLED_AT, patch_module, function, cli, *map(str, arguments)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == -signal.SIGKILL, stderr.decode()
    return child.pid


def test_killed_segment_leaves_no_scratch_and_the_next_run_removes_its_output_folder(
    shared: Shared, tmp_path: Path
) -> None:
    (tmp_path / "in").mkdir()
    source = tile(tmp_path / "in")
    out, scratch = tmp_path / "labels" / "out.tif", tmp_path / "scratch"
    arguments = (*segment(shared.artifact, source, out, "--quiet"), "--scratch-dir", str(scratch))
    untouched = Untouched(source, shared.root)
    # Killed in pass 2 (assigning labels):
    pid = killed_run("runtime_export.numpy_runtime.whole_raster", "assign_tile", "runtime_export.segment", *arguments)
    # The scratch file had no name: nothing of it stays. The labels being written stay, named after the dead run.
    assert list(scratch.iterdir()) == []
    (leftover,) = out.parent.iterdir()
    assert leftover.name.startswith(f".segment-output-{pid}-") and (leftover / "labels.tif").is_file()
    outcome = run_module(SEGMENT, *arguments, timeout=120)
    assert outcome.returncode == 0, outcome.stderr
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.qml", "out.tif"]
    assert hidden_entries(tmp_path) == set()
    untouched.assert_unchanged()


def test_killed_export_candidate_is_removed_by_the_next_export(shared: Shared, tmp_path: Path) -> None:
    out = Path(shutil.copytree(shared.artifact, tmp_path / "artifact"))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    arguments = ("--checkpoint", shared.checkpoint, "--out", out)
    untouched = Untouched(shared.root)
    # Killed at the parity check: a complete candidate, unverified, was staged beside the artifact.
    pid = killed_run("training_core.export", "runtime_parity", "training_core.export", *arguments)
    (leftover,) = hidden_entries(tmp_path)
    assert Path(leftover).name.startswith(f".artifact.export-staging-{pid}-")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the artifact itself untouched
    outcome = run_module(EXPORT, *arguments, timeout=120)
    assert outcome.returncode == 0, outcome.stderr
    assert json.loads(outcome.stdout)["parity"]["passed"]
    assert [p.name for p in tmp_path.iterdir()] == ["artifact"]
    assert hidden_entries(tmp_path) == set()
    untouched.assert_unchanged()
