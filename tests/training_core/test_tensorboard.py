"""TensorBoard: loss and learning-rate scalars every step, evaluation of the labeled shards every ``eval_every``
steps, and evaluation that leaves training exactly as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from training_core.checkpoint import LAST_NAME, load_checkpoint
from training_core.config import DataConfig, ModelConfig, TrainConfig
from training_core.shards.write import build_shards
from training_core.train import LOSS_PARTS, train

REPO = Path(__file__).resolve().parents[2]
LABELED = ("kampala_buildings", "quebec_buildings")  # quebec has no `train` items: evaluated, never trained on
EVAL_SCALARS = ("val_miou", "majority_k8_miou", "min_cluster_share")


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("processed")
    for dataset_id in LABELED:
        build_shards(REPO / "sample_data" / "extracted", root, dataset_id)
    return root


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_cli_training_on_shards_logs_losses_and_evaluation(processed: Path, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {embed_dim: 8, max_k: 4}\nbatch_size: 2\nlog_every: 2\n")
    command = [sys.executable, "-m", "training_core.train", "--device", "cpu", "--steps", "4"]
    command += ["--checkpoint_dir", str(ckpt), "--config", str(config), "--patch-size", "32", "--eval-every", "2"]
    command += ["--data-source", "shards", "--processed-root", str(processed), "--dataset-id", "kampala_buildings"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=REPO, env=env, check=False)
    assert done.returncode == 0, done.stderr
    scalars = _scalars(ckpt)
    for name in LOSS_PARTS:
        assert [step for step, _ in scalars[f"loss/{name}"]] == [1, 2, 3, 4], name
    assert scalars["train/lr"] == [(step, pytest.approx(3e-4)) for step in (1, 2, 3, 4)]
    assert all(value > 0 for _, value in scalars["train/images_per_s"])
    for dataset_id in LABELED:
        for name in EVAL_SCALARS:
            points = scalars[f"eval/{dataset_id}/{name}"]
            assert [step for step, _ in points] == [2, 4] and all(0 <= value <= 1 for _, value in points), points
    assert {tag.split("/")[1] for tag in scalars if tag.startswith("eval/")} == set(LABELED)
    assert "eval/quebec_buildings/val_miou" in scalars  # every labeled dataset of the root, not only the trained
    assert load_checkpoint(ckpt / LAST_NAME)["data_versions"].keys() == {"kampala_buildings"}


def test_evaluation_does_not_disturb_training(processed: Path, tmp_path: Path) -> None:
    """Evaluation seeds torch (the untrained control) and switches the model to eval mode; a run with it ends
    with the weights, batch-norm statistics and RNG states of a run without."""
    data = DataConfig(source="shards", processed_root=str(processed), dataset_ids=["kampala_buildings"], patch_size=32)
    config = TrainConfig(
        model=ModelConfig(embed_dim=8, max_k=4), data=data, steps=3, batch_size=2, device="cpu", checkpoint_every=3
    )
    plain = train(config, tmp_path / "plain", resume=False)
    evaluated = train(config.model_copy(update={"eval_every": 2}), tmp_path / "evaluated", resume=False)
    assert [step for step, _ in _scalars(tmp_path / "evaluated")["eval/kampala_buildings/val_miou"]] == [2]
    assert not any(tag.startswith("eval/") for tag in _scalars(tmp_path / "plain"))
    a, b = (load_checkpoint(result.checkpoint_path) for result in (plain, evaluated))
    for name, tensor in a["model"].items():
        assert torch.equal(b["model"][name], tensor), name
    assert torch.equal(a["rng"]["torch"], b["rng"]["torch"])
    assert np.array_equal(a["rng"]["numpy"]["keys"], b["rng"]["numpy"]["keys"])
    assert a["rng"]["python"] == b["rng"]["python"]
