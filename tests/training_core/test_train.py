"""Training loop: learning on real tiles, exact resume, checkpoints, SIGTERM, NaN stop, safe resume, CLI."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch

import training_core.train as train_module
from training_core.checkpoint import LAST_NAME, load_checkpoint, step_checkpoint_name
from training_core.config import DataConfig, ModelConfig, TrainConfig
from training_core.device import device_policy
from training_core.model import SegmentationModel
from training_core.train import (
    ConfigMismatchError,
    StepPlan,
    TrainingStoppedError,
    step_losses,
    train,
    view_generator,
)

REPO = Path(__file__).resolve().parents[2]
KAMPALA = REPO / "sample_data" / "extracted" / "kampala_buildings" / "images"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _tiny_config(**overrides: object) -> TrainConfig:
    fields = {
        "model": ModelConfig(embed_dim=8, max_k=4),
        "data": DataConfig(source="synthetic", patch_size=32, synthetic_items=6, num_workers=0),
        "steps": 10,
        "batch_size": 2,
        "device": "cpu",
        "checkpoint_every": 3,
        "log_every": 2,
        "lr": 1e-3,
    }
    return TrainConfig(**(fields | overrides))


def _log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_loss_is_finite_and_falls_on_real_tiles() -> None:
    """30 steps on a fixed batch of two kampala tiles (64 px crops), K and rounds fixed."""
    tiles = []
    for name in sorted(os.listdir(KAMPALA))[:2]:
        with rasterio.open(KAMPALA / name) as src:
            tiles.append(src.read(window=((96, 160), (96, 160))))
    images = torch.from_numpy(np.stack(tiles)).float() / 255
    config = TrainConfig(model=ModelConfig(embed_dim=16, max_k=4), data=DataConfig(patch_size=64))
    torch.manual_seed(0)
    model = SegmentationModel(config.model).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    policy = device_policy("cpu", False)
    totals = []
    for step in range(30):
        parts = step_losses(
            model,
            images,
            StepPlan(k=4, cluster_iters=3, downsample=1),
            config,
            view_generator(0, step, 0, 0, policy.device),
            policy,
        )
        assert all(torch.isfinite(value) for value in parts.values()), parts
        parts["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals.append(parts["total"].item())
    assert np.mean(totals[-5:]) < np.mean(totals[:5]) - 0.02, totals


def test_resume_continues_exactly(tmp_path: Path) -> None:
    config = _tiny_config()
    straight = train(config, tmp_path / "straight", resume=False)
    first = train(config, tmp_path / "resumed", resume=False, stop_after_steps=5)
    assert first.steps == 5 and first.checkpoint_path == tmp_path / "resumed" / step_checkpoint_name(5)
    with (tmp_path / "resumed" / "train_log.jsonl").open("a") as log:
        log.write('{"step": 6, "total": 0.1}\n{"step": 7, "tot')  # steps after the checkpoint, torn by a crash
    second = train(config, tmp_path / "resumed", resume=True)
    assert (straight.steps, second.steps) == (10, 10)
    a = load_checkpoint(straight.checkpoint_path)
    b = load_checkpoint(second.checkpoint_path)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=0, atol=1e-6, msg=name)
    assert _log(straight.log_path) == [
        {**row, "images_per_s": ANY, "step_s": ANY, "eta_s": ANY} for row in _log(second.log_path)
    ]


class _Any:
    def __eq__(self, other: object) -> bool:
        return True


ANY = _Any()


def test_checkpoints_log_and_progress(tmp_path: Path) -> None:
    seen: list[dict] = []
    result = train(_tiny_config(steps=7), tmp_path, resume=False, progress=seen.append)
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("events.out.tfevents."))
    assert names == [LAST_NAME, "step-000003.pt", "step-000006.pt", "step-000007.pt", "train_log.jsonl"]
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1  # TensorBoard (test_tensorboard.py)
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 7
    rows = _log(result.log_path)
    assert [row["step"] for row in rows] == list(range(1, 8))
    assert all(2 <= row["k"] <= 4 and row["downsample"] in (1, 2) for row in rows)
    assert [record["step"] for record in seen] == [2, 4, 6, 7]
    assert {"total", "consistency", "lr", "images_per_s", "eta_s"} <= set(seen[0])
    assert result.final_losses == {key: rows[-1][key] for key in result.final_losses}
    assert (result.device, result.amp, result.interrupted) == ("cpu", False, False)
    with pytest.raises(FileExistsError, match="already holds last.pt"):
        train(_tiny_config(steps=7), tmp_path, resume=False)


def test_cpu_amp_trains_in_bfloat16(tmp_path: Path) -> None:
    result = train(_tiny_config(amp=True, steps=2), tmp_path, resume=False)
    assert result.amp and result.steps == 2
    assert all(math.isfinite(value) for value in result.final_losses.values())
    assert 0.0 <= result.final_losses["marginal_entropy"] <= 1.0


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_losses = train_module.two_view_losses
    calls = {"n": 0}

    def poisoned(*args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        calls["n"] += 1
        parts = real_losses(*args, **kwargs)
        if calls["n"] == 5:
            parts["total"] = parts["total"] * float("nan")
        return parts

    monkeypatch.setattr(train_module, "two_view_losses", poisoned)
    expected = r"non-finite loss at step 5 .* Last good checkpoint: .*step-000003\.pt"
    with pytest.raises(FloatingPointError, match=expected):
        train(_tiny_config(), tmp_path, resume=False)
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 3
    assert not (tmp_path / step_checkpoint_name(5)).exists()


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "training_core.train", "--device", "cpu", *args]


ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def test_cli_runs_the_users_command(tmp_path: Path) -> None:
    ckpt = tmp_path / "seg_ckpt"
    done = subprocess.run(
        _cli("--steps", "2", "--checkpoint_dir", str(ckpt), "--patch-size", "64", "--seed", "3"),
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env=ONE_THREAD_ENV,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 2 and summary["checkpoint_path"].endswith("step-000002.pt")
    assert load_checkpoint(ckpt / LAST_NAME)["config"]["seed"] == 3
    # Progress is one line per log interval on stderr (no terminal bar).
    assert [line.split()[:2] for line in done.stderr.splitlines()] == [["step", "2/2"]]


def test_sigterm_saves_and_exits_then_resume_finishes(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    args = ("--steps", "1000", "--checkpoint_dir", str(ckpt), "--patch-size", "32", "--checkpoint-every", "1000")
    proc = subprocess.Popen(
        _cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=ONE_THREAD_ENV
    )
    log = ckpt / "train_log.jsonl"
    deadline = time.monotonic() + 90
    while not (log.exists() and log.read_text().count("\n") >= 2):
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else "timeout"
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "stopped by SIGTERM" in stderr and "Traceback" not in stderr
    stopped_at = load_checkpoint(ckpt / LAST_NAME)["step"]
    assert 2 <= stopped_at < 1000
    assert len(_log(log)) == stopped_at
    checkpoint = load_checkpoint(ckpt / LAST_NAME)
    config = TrainConfig.model_validate(checkpoint["config"] | {"steps": stopped_at + 2})
    assert train(config, ckpt, resume=True).steps == stopped_at + 2
    assert [row["step"] for row in _log(log)] == list(range(1, stopped_at + 3))


def test_shards_of_several_datasets_train_and_resume_exactly(tmp_path: Path) -> None:
    """source=shards over two datasets' train splits (an iterable dataset: a resume replays its batches)."""
    from training_core.shards.write import build_shards

    extracted = REPO / "sample_data" / "extracted"
    processed = tmp_path / "processed"
    datasets = ["kampala_buildings", "unlabeled_scenes"]
    for dataset_id in datasets:
        build_shards(extracted, processed, dataset_id)
    data = DataConfig(source="shards", processed_root=str(processed), dataset_ids=datasets, patch_size=64)
    config = _tiny_config(data=data, steps=4, checkpoint_every=10)
    straight = train(config, tmp_path / "straight", resume=False)
    train(config, tmp_path / "resumed", resume=False, stop_after_steps=2)
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert straight.steps == resumed.steps == 4
    assert all(math.isfinite(value) for value in straight.final_losses.values())
    a, b = (load_checkpoint(result.checkpoint_path)["model"] for result in (straight, resumed))
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_resume_refuses_another_config_unless_overridden(tmp_path: Path) -> None:
    train(_tiny_config(steps=4), tmp_path, resume=False, stop_after_steps=2)
    changed = _tiny_config(
        steps=6,  # run length, logging, checkpointing and loader knobs may change on resume
        log_every=1,
        checkpoint_every=5,
        seed=1,
        lr=2e-3,
        data=DataConfig(source="synthetic", patch_size=32, synthetic_items=8, num_workers=0, cache_mode="lru"),
    )
    expected = (
        rf"{tmp_path / LAST_NAME} was trained under another config: data\.synthetic_items \(6 in the checkpoint, "
        r"8 now\), lr \(0\.001 in the checkpoint, 0\.002 now\), seed \(42 in the checkpoint, 1 now\)\. Resume"
    )
    with pytest.raises(ConfigMismatchError, match=expected):
        train(changed, tmp_path, resume=True)
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 2, "a refused resume writes nothing"

    with pytest.warns(UserWarning, match=r"resuming .*last\.pt under a changed config: data\.synthetic_items"):
        result = train(changed, tmp_path, resume=True, override_config=True)
    assert result.steps == 6
    assert load_checkpoint(tmp_path / LAST_NAME)["config"] == changed.model_dump(mode="json")
    rows = _log(result.log_path)
    assert [row["step"] for row in rows] == [1, 2, 2, 3, 4, 5, 6]
    assert rows[2] == {
        "step": 2,
        "event": "config_override",
        "checkpoint": str(tmp_path / LAST_NAME),
        "changed": {
            "data.synthetic_items": {"checkpoint": 6, "now": 8},
            "lr": {"checkpoint": 1e-3, "now": 2e-3},
            "seed": {"checkpoint": 42, "now": 1},
        },
    }
    # The override is now the checkpoint's config: resuming under it again needs no override.
    assert train(changed.model_copy(update={"steps": 7}), tmp_path, resume=True).steps == 7


def test_damaged_last_checkpoint_resumes_from_the_newest_intact_step(tmp_path: Path) -> None:
    config = _tiny_config(steps=7)
    straight = train(config, tmp_path / "straight", resume=False)
    ckpt = tmp_path / "damaged"
    train(config, ckpt, resume=False, stop_after_steps=4)  # step-3, step-4 and last (= step 4)
    for name in (LAST_NAME, step_checkpoint_name(4)):
        (ckpt / name).write_bytes((ckpt / name).read_bytes()[:2000])  # cut short by a crash
    with pytest.warns(RuntimeWarning) as warned:
        resumed = train(config, ckpt, resume=True)
    messages = [str(w.message) for w in warned if issubclass(w.category, RuntimeWarning)]
    fallback = ckpt / step_checkpoint_name(3)
    assert len(messages) == 2
    for message, name in zip(messages, (LAST_NAME, step_checkpoint_name(4)), strict=True):
        assert message.startswith(f"checkpoint {ckpt / name} is unreadable (truncated or not a checkpoint): ")
        assert message.endswith(f"; resuming from {fallback} instead")
    assert resumed.steps == 7 and [row["step"] for row in _log(resumed.log_path)] == list(range(1, 8))
    a, b = (load_checkpoint(result.checkpoint_path)["model"] for result in (straight, resumed))
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_cli_resume_names_the_changed_fields_then_overrides(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    ckpt = tmp_path / "ckpt"
    config = tmp_path / "tiny.yaml"
    config.write_text("model: {embed_dim: 8, max_k: 4}\nbatch_size: 2\ndata: {patch_size: 32, synthetic_items: 4}\n")
    args = ["--device", "cpu", "--config", str(config), "--checkpoint_dir", str(ckpt), "--log-every", "1"]
    assert train_module.main([*args, "--steps", "1"]) == 0
    capsys.readouterr()
    assert train_module.main([*args, "--steps", "2", "--resume", "--seed", "5", "--data-source", "geo"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m training_core.train: error: ") and err.count("\n") == 1
    assert "data.source ('synthetic' in the checkpoint, 'geo' now), seed (42 in the checkpoint, 5 now)" in err
    assert "--override-config" in err
    with pytest.warns(UserWarning, match=r"under a changed config: seed \(42 in the checkpoint, 5 now\)"):
        assert train_module.main([*args, "--steps", "2", "--resume", "--seed", "5", "--override-config"]) == 0
    assert load_checkpoint(ckpt / LAST_NAME)["config"]["seed"] == 5
    assert _log(ckpt / "train_log.jsonl")[1]["changed"] == {"seed": {"checkpoint": 42, "now": 5}}


def test_resume_override_trains_with_the_recorded_learning_rate(tmp_path: Path) -> None:
    """An overridden lr and weight decay reach the optimizer, not only the log: the resumed step's update is the
    same direction scaled by the new lr (AdamW's update is lr times the moment ratio)."""
    train(_tiny_config(steps=2), tmp_path / "base", resume=False)
    # The optimizer's parameters (buffers such as batch-norm statistics move whatever the lr).
    trained = [name for name, p in SegmentationModel(_tiny_config().model).named_parameters() if p.requires_grad]
    updates = {}
    for lr in (1e-3, 0.5):
        ckpt = tmp_path / f"lr{lr}"
        ckpt.mkdir()
        for name in (LAST_NAME, step_checkpoint_name(2)):
            (ckpt / name).write_bytes((tmp_path / "base" / name).read_bytes())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the override's own warning (tested above)
            train(_tiny_config(steps=3, lr=lr, weight_decay=0.0), ckpt, resume=True, override_config=True)
        resumed = load_checkpoint(ckpt / LAST_NAME)
        assert resumed["step"] == 3 and resumed["config"]["lr"] == lr
        assert {group["lr"] for group in resumed["optimizer"]["param_groups"]} == {lr}
        assert [(row["step"], row["lr"]) for row in _log(ckpt / "train_log.jsonl") if "lr" in row] == [(3, lr)]
        before = load_checkpoint(ckpt / step_checkpoint_name(2))["model"]
        updates[lr] = torch.cat([(resumed["model"][n] - before[n]).flatten().double() for n in trained])
    # The same direction, 500 times as long (float32 weights round the small update in its last bits).
    small, large = updates[1e-3], updates[0.5]
    assert float(large.norm() / small.norm()) == pytest.approx(500, rel=1e-3)
    assert float(torch.nn.functional.cosine_similarity(small, large, dim=0)) > 0.9999


def test_resume_override_of_the_architecture_is_refused(tmp_path: Path) -> None:
    train(_tiny_config(steps=2), tmp_path, resume=False)
    wider = _tiny_config(steps=3, model=ModelConfig(embed_dim=12, max_k=4))
    with pytest.raises(ConfigMismatchError, match=r"weights do not fit the model config now \(model\.embed_dim \(8"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            train(wider, tmp_path, resume=True, override_config=True)
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 2


@pytest.fixture(scope="module")
def kampala_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training_core.shards.write import build_shards

    processed = tmp_path_factory.mktemp("processed")
    build_shards(REPO / "sample_data" / "extracted", processed, "kampala_buildings")
    return processed


def _damage_one(folder: Path) -> tuple[Path, bytes]:
    """Truncate the first tile of a split's shard (as a copy cut short would); returns it and its bytes."""
    tile = sorted(folder.rglob("inputs/*.tif"))[0]
    good = tile.read_bytes()
    tile.write_bytes(good[:3000])
    return tile, good


def _shards_config(processed: Path, **overrides: object) -> TrainConfig:
    data = DataConfig(source="shards", processed_root=str(processed), dataset_ids=["kampala_buildings"], patch_size=32)
    return _tiny_config(data=data, **overrides)


def _same_weights(a: Path, b: Path) -> None:
    wa, wb = load_checkpoint(a)["model"], load_checkpoint(b)["model"]
    for name, tensor in wa.items():
        torch.testing.assert_close(wb[name], tensor, rtol=0, atol=1e-6, msg=name)


def test_a_damaged_val_tile_stops_training_after_checkpointing_then_resume_loses_nothing(
    kampala_shards: Path, tmp_path: Path
) -> None:
    """Periodic evaluation at step 3 (checkpoints every 10) meets a truncated val tile: steps 1-3 are saved first,
    the error names the tile, and resuming without evaluation ends where a run that never evaluated ends."""
    processed = tmp_path / "processed"
    shutil.copytree(kampala_shards, processed)
    tile, _ = _damage_one(processed / "kampala_buildings" / "val")
    config = _shards_config(processed, steps=5, checkpoint_every=10, eval_every=3)
    with pytest.raises(TrainingStoppedError, match=rf"periodic evaluation at step 3: {tile}: .*steps 1-3 are saved"):
        train(config, tmp_path / "ckpt", resume=False)
    assert load_checkpoint(tmp_path / "ckpt" / LAST_NAME)["step"] == 3
    resumed = train(config.model_copy(update={"eval_every": 0}), tmp_path / "ckpt", resume=True)
    straight = train(config.model_copy(update={"eval_every": 0}), tmp_path / "straight", resume=False)
    assert resumed.steps == straight.steps == 5
    _same_weights(straight.checkpoint_path, resumed.checkpoint_path)


def test_a_damaged_training_tile_stops_training_after_checkpointing(kampala_shards: Path, tmp_path: Path) -> None:
    """A truncated train tile met at step N saves steps 1..N-1 first; once the tile is fixed, the resume ends
    with the weights of a run that never stopped."""
    processed = tmp_path / "processed"
    shutil.copytree(kampala_shards, processed)
    config = _shards_config(processed, steps=20, checkpoint_every=50, batch_size=4)
    straight = train(config, tmp_path / "straight", resume=False)
    tile, good = _damage_one(processed / "kampala_buildings" / "train")
    with pytest.raises(TrainingStoppedError, match=rf"reading the training data for step \d+: {tile}") as stopped:
        train(config, tmp_path / "ckpt", resume=False)
    saved = load_checkpoint(tmp_path / "ckpt" / LAST_NAME)["step"]
    assert 0 < saved < 20 and f"steps 1-{saved} are saved" in str(stopped.value)
    tile.write_bytes(good)
    resumed = train(config, tmp_path / "ckpt", resume=True)
    assert resumed.steps == 20
    _same_weights(straight.checkpoint_path, resumed.checkpoint_path)
