"""Checkpoint files: atomic, safe to load, complete RNG state, model rebuilt from them."""

from __future__ import annotations

import errno
import hashlib
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from training_core.checkpoint import (
    LAST_NAME,
    CheckpointWriteError,
    DamagedCheckpointError,
    checkpoint_bytes,
    latest_checkpoint,
    load_checkpoint,
    load_latest_checkpoint,
    model_from_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
    write_checkpoint,
)
from training_core.config import ModelConfig, TrainConfig
from training_core.model import SegmentationModel


def _tiny_config() -> TrainConfig:
    return TrainConfig(model=ModelConfig(embed_dim=8, max_k=4))


def _save(path: Path, config: TrainConfig, generators: dict[str, torch.Generator] | None = None) -> SegmentationModel:
    model = SegmentationModel(config.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.rand(1, 3, 16, 16), k=3).probs.mean().backward()
    optimizer.step()
    save_checkpoint(
        path, model=model, optimizer=optimizer, step=7, config=config, losses={"total": 1.5}, generators=generators
    )
    return model


def test_round_trip_with_safe_loader(tmp_path: Path) -> None:
    config = _tiny_config()
    path = tmp_path / step_checkpoint_name(7)
    model = _save(path, config)
    checkpoint = torch.load(path, weights_only=True)  # the safe unpickler reads every value
    assert checkpoint["step"] == 7
    assert checkpoint["losses"] == {"total": 1.5}
    assert checkpoint["config"] == config.model_dump(mode="json")
    assert checkpoint["optimizer"]["state"], "optimizer moments are saved"
    rebuilt, rebuilt_config = model_from_checkpoint(path)
    assert rebuilt_config == config
    assert not rebuilt.training
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(rebuilt.state_dict()[name], tensor, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == [path.name], "no temp file is left behind"


def test_config_this_code_cannot_load_names_the_checkpoint_and_the_key(tmp_path: Path) -> None:
    path = tmp_path / step_checkpoint_name(7)
    _save(path, _tiny_config())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["config"]["model"]["colour_weight"] = 2.0  # a field this code no longer has
    torch.save(checkpoint, path)
    with pytest.raises(ValueError, match=rf"(?s)checkpoint {path}: .*model\.colour_weight.*Extra inputs"):
        model_from_checkpoint(path)


def test_rng_states_restore_exactly(tmp_path: Path) -> None:
    generator = torch.Generator().manual_seed(3)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(4)
    path = tmp_path / "ckpt.pt"
    _save(path, _tiny_config(), {"augment": generator})
    # The save happened after the model's init draws; record what comes next, scramble, restore.
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    generator.manual_seed(99)
    restore_rng_state(load_checkpoint(path)["rng"], {"augment": generator})
    got = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=generator).item())
    assert got == expected


def test_latest_prefers_last_then_highest_step(tmp_path: Path) -> None:
    assert latest_checkpoint(tmp_path) is None
    config = _tiny_config()
    _save(tmp_path / step_checkpoint_name(5), config)
    _save(tmp_path / step_checkpoint_name(12), config)
    (tmp_path / "step-notanumber.pt").write_bytes(b"")
    assert latest_checkpoint(tmp_path) == tmp_path / step_checkpoint_name(12)
    _save(tmp_path / LAST_NAME, config)
    assert latest_checkpoint(tmp_path) == tmp_path / LAST_NAME


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_checkpoint(tmp_path / "missing.pt")
    partial = tmp_path / "partial.pt"
    torch.save({"model": {}, "step": 1}, partial)
    with pytest.raises(ValueError, match=r"partial\.pt lacks the keys \['config', 'losses', 'optimizer', 'rng'\]"):
        load_checkpoint(partial)


def test_unreadable_checkpoint_is_one_clear_error(tmp_path: Path) -> None:
    path = tmp_path / LAST_NAME
    _save(path, _tiny_config())
    path.write_bytes(path.read_bytes()[:1000])  # a copy cut short by a crash or a full disk
    with pytest.raises(DamagedCheckpointError, match=r"last\.pt is unreadable \(truncated") as raised:
        load_checkpoint(path)
    assert "\n" not in str(raised.value)
    torch.save(torch.zeros(2), path)
    with pytest.raises(DamagedCheckpointError, match="holds a Tensor, not a checkpoint dict"):
        load_checkpoint(path)


def test_damaged_last_falls_back_to_the_newest_intact_step(tmp_path: Path) -> None:
    assert load_latest_checkpoint(tmp_path) is None
    config = _tiny_config()
    for name in (step_checkpoint_name(5), step_checkpoint_name(12), LAST_NAME):
        _save(tmp_path / name, config)
    path, checkpoint = load_latest_checkpoint(tmp_path)
    assert path == tmp_path / LAST_NAME and checkpoint["step"] == 7
    (tmp_path / LAST_NAME).write_bytes(b"")
    (tmp_path / step_checkpoint_name(12)).write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning) as warned:
        path, checkpoint = load_latest_checkpoint(tmp_path)
    assert path == tmp_path / step_checkpoint_name(5)
    messages = [str(w.message) for w in warned]
    assert len(messages) == 2 and all(message.endswith(f"resuming from {path} instead") for message in messages)
    assert str(tmp_path / LAST_NAME) in messages[0] and str(tmp_path / step_checkpoint_name(12)) in messages[1]
    (tmp_path / step_checkpoint_name(5)).write_bytes(b"")
    with pytest.raises(DamagedCheckpointError, match=f"no intact checkpoint in {tmp_path}"):
        load_latest_checkpoint(tmp_path)


def _state(step: int) -> bytes:
    config = _tiny_config()
    model = SegmentationModel(config.model)
    return checkpoint_bytes(model=model, optimizer=torch.optim.AdamW(model.parameters()), step=step, config=config)


def _digests(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_write_checkpoint_gives_the_step_file_and_last_the_same_bytes(tmp_path: Path) -> None:
    data = _state(4)
    assert write_checkpoint(tmp_path, 4, data) == tmp_path / step_checkpoint_name(4)
    assert (tmp_path / LAST_NAME).read_bytes() == data == (tmp_path / step_checkpoint_name(4)).read_bytes()
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == [LAST_NAME, step_checkpoint_name(4)]


@pytest.mark.parametrize("failing_write", [1, 2], ids=["step file", "last.pt"])
def test_a_full_disk_mid_checkpoint_advances_neither_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_write: int
) -> None:
    """The disk fills part-way through the step file's temp (1st write) or last.pt's (2nd): one error naming the
    file, the previous step file and last.pt as they were (last.pt never older than a step file), no temp left."""
    write_checkpoint(tmp_path, 3, _state(3))
    before = _digests(tmp_path)
    real_write = Path.write_bytes
    writes = []

    def fills_the_disk(path: Path, data: bytes) -> int:
        writes.append(path)
        if len(writes) == failing_write:
            real_write(path, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, data)

    monkeypatch.setattr(Path, "write_bytes", fills_the_disk)
    target = [step_checkpoint_name(6), LAST_NAME][failing_write - 1]
    with pytest.raises(CheckpointWriteError, match=rf"{tmp_path / target}: cannot write the checkpoint: No space left"):
        write_checkpoint(tmp_path, 6, _state(6))
    assert writes[0].name.startswith(f".{step_checkpoint_name(6)}.")  # temps are hidden siblings
    assert _digests(tmp_path) == before, "no file advanced and no temp file is left"
    assert load_checkpoint(tmp_path / LAST_NAME)["step"] == 3
