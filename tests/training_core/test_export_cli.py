"""``python -m training_core.export``: any training checkpoint becomes a parity-checked artifact."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime_export.artifact import config_hash
from runtime_export.numpy_runtime.runtime import load_runtime_model
from training_core import export as export_module
from training_core.checkpoint import LAST_NAME, load_checkpoint
from training_core.config import DataConfig, ModelConfig, TrainConfig
from training_core.shards.index import read_manifest
from training_core.shards.write import build_shards
from training_core.train import train

REPO = Path(__file__).resolve().parents[2]


def _tiny(data: DataConfig) -> TrainConfig:
    return TrainConfig(model=ModelConfig(embed_dim=8, max_k=4), data=data, steps=2, batch_size=2, device="cpu")


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("processed")
    for dataset_id in ("kampala_buildings", "quebec_buildings"):
        build_shards(REPO / "sample_data" / "extracted", root, dataset_id)
    return root


@pytest.fixture(scope="module")
def shards_checkpoint(processed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A checkpoint trained on kampala's shards, as ``torchrun -m training_core.train`` leaves one."""
    data = DataConfig(source="shards", processed_root=str(processed), dataset_ids=["kampala_buildings"], patch_size=32)
    ckpt = tmp_path_factory.mktemp("ckpt")
    train(_tiny(data), ckpt, resume=False)
    return ckpt / LAST_NAME


@pytest.fixture(scope="module")
def synthetic_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    ckpt = tmp_path_factory.mktemp("synthetic")
    train(_tiny(DataConfig(source="synthetic", patch_size=32, synthetic_items=4)), ckpt, resume=False)
    return ckpt / LAST_NAME


def test_cli_exports_a_loadable_artifact_with_the_checkpoints_lineage(
    shards_checkpoint: Path, processed: Path, tmp_path: Path
) -> None:
    out = tmp_path / "artifact"
    done = subprocess.run(
        [sys.executable, "-m", "training_core.export", "--checkpoint", str(shards_checkpoint), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["artifact"] == str(out) and summary["parity"]["passed"] and summary["parity"]["n_tiles"] == 2
    runtime = load_runtime_model(out)
    assert runtime.max_k == 4
    meta = json.loads((out / "meta.json").read_text())
    checkpoint = load_checkpoint(shards_checkpoint)
    version = read_manifest(processed, "kampala_buildings")["data_version"]
    assert meta["lineage"] | {"code_version": None} == {
        "checkpoint": str(shards_checkpoint),
        "checkpoint_step": 2,
        "config_hash": config_hash(TrainConfig.model_validate(checkpoint["config"])),
        "code_version": None,
        "dataset_ids": ["kampala_buildings"],
        "data_versions": {"kampala_buildings": version},
    }
    assert list(meta["input_rules"]) == ["kampala_buildings"]  # from the checkpoint's processed root
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"], "no staging folder is left behind"


def test_rules_of_the_datasets_named(
    shards_checkpoint: Path, processed: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "artifact"
    argv = ["--checkpoint", str(shards_checkpoint), "--out", str(out), "--processed-root", str(processed)]
    assert export_module.main([*argv, "--dataset-id", "quebec_buildings"]) == 0
    assert json.loads(capsys.readouterr().out)["input_rules"] == ["quebec_buildings"]
    assert list(json.loads((out / "meta.json").read_text())["input_rules"]) == ["quebec_buildings"]


def test_synthetic_checkpoint_exports_without_rules(
    synthetic_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert export_module.main(["--checkpoint", str(synthetic_checkpoint), "--out", str(tmp_path / "a")]) == 0
    meta = json.loads((tmp_path / "a" / "meta.json").read_text())
    assert meta["input_rules"] == {} and meta["lineage"]["data_versions"] == {}
    assert json.loads(capsys.readouterr().out)["parity"]["passed"]  # on synthetic tiles


@pytest.mark.parametrize(
    ("make_args", "message"),
    [
        (lambda ckpt, tmp: ["--checkpoint", str(tmp / "missing.pt")], "checkpoint .*missing.pt does not exist"),
        (lambda ckpt, tmp: ["--checkpoint", str(_truncated(ckpt, tmp))], r"cut\.pt is unreadable \(truncated"),
        (lambda ckpt, tmp: ["--checkpoint", str(ckpt), "--dataset-id", "x"], "--dataset-id needs --processed-root"),
        (
            lambda ckpt, tmp: ["--checkpoint", str(ckpt), "--processed-root", str(tmp / "nowhere")],
            "processed root .*nowhere does not exist here",
        ),
    ],
)
def test_bad_input_is_one_error_line(
    synthetic_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, make_args, message: str
) -> None:
    out = tmp_path / "artifact"
    assert export_module.main([*make_args(synthetic_checkpoint, tmp_path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m training_core.export: error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not out.exists()


def _truncated(checkpoint: Path, tmp_path: Path) -> Path:
    cut = tmp_path / "cut.pt"
    cut.write_bytes(checkpoint.read_bytes()[:1000])
    return cut


def test_failed_parity_keeps_the_previous_artifact(
    synthetic_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "artifact"
    assert export_module.main(["--checkpoint", str(synthetic_checkpoint), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    failing = {"passed": False, "min_label_agreement": 0.9, "max_prob_diff": 0.5, "thresholds": {}, "n_tiles": 2}
    monkeypatch.setattr(export_module, "runtime_parity", lambda *args: failing)
    assert export_module.main(["--checkpoint", str(synthetic_checkpoint), "--out", str(out)]) == 2
    assert "error: parity check failed (label agreement 0.90000" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["artifact"]
