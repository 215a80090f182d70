"""Training checkpoints: one ``torch.save``d dict, written atomically, loaded with ``weights_only=True``.

Keys: ``model`` (state_dict), ``optimizer`` (state_dict), ``step`` (int, optimizer steps done),
``config`` (``TrainConfig.model_dump(mode="json")``), ``rng`` (python / numpy / torch / cuda states and
any named ``torch.Generator`` the loop draws from), ``losses`` (last logged loss parts),
``scaler`` (the AMP GradScaler state, or None) and ``data_versions`` (``{dataset_id: data version}`` of the
shards trained on; empty for other sources and absent in older checkpoints).

Files in a checkpoint directory: ``step-000123.pt`` for every checkpoint and ``last.pt`` for the newest
(``write_checkpoint``: the same bytes under both names, and ``last.pt`` is never older than the newest step
file). Every value is a tensor or a plain Python container so the safe unpickler can read it back.

A failed write (a full disk) is a ``CheckpointWriteError`` naming the file; it leaves every earlier file as
it was and no temp file behind.
"""

from __future__ import annotations

import io
import pickle
import random
import re
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import ValidationError
from torch import nn

from runtime_export.atomic import atomic_path
from training_core.config import TrainConfig
from training_core.model import SegmentationModel

LAST_NAME = "last.pt"
_STEP_RE = re.compile(r"^step-(\d+)\.pt$")
# What torch.load raises on a truncated or garbled file (the zip reader, the unpickler, the OS).
_UNREADABLE = (RuntimeError, EOFError, OSError, pickle.UnpicklingError)


class DamagedCheckpointError(ValueError):
    """A checkpoint file that cannot be read back (truncated, garbled, or missing keys)."""


class CheckpointWriteError(OSError):
    """A checkpoint file that could not be written (most often a full disk); the message names the file."""


def step_checkpoint_name(step: int) -> str:
    """File name of the checkpoint written after ``step`` optimizer steps."""
    return f"step-{step:06d}.pt"


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside a DistributedDataParallel wrapper (keys without ``module.``)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def capture_rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Every RNG state the training loop depends on, as tensors and plain containers."""
    kind, keys, pos, has_gauss, cached_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gauss),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {name: gen.get_state() for name, gen in (generators or {}).items()},
    }
    return state


def restore_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Put back the states ``capture_rng_state`` recorded (python, numpy, torch, cuda, named generators)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state(
        (npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"], npy["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, gen in (generators or {}).items():
        if name not in state["generators"]:
            raise KeyError(f"checkpoint rng state has no generator {name!r} (has {sorted(state['generators'])})")
        gen.set_state(state["generators"][name])


def checkpoint_bytes(
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int,
    config: TrainConfig,
    losses: dict[str, float] | None = None,
    generators: dict[str, torch.Generator] | None = None,
    scaler: torch.amp.GradScaler | None = None,
    data_versions: Mapping[str, str] | None = None,
) -> bytes:
    """The checkpoint serialised in memory: writing it is then a plain file write, whose failure is an OSError
    with its errno (``torch.save`` into a file reports a full disk as a RuntimeError of its zip writer)."""
    payload = {
        "model": unwrap_model(model).state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": int(step),
        "config": config.model_dump(mode="json"),
        "rng": capture_rng_state(generators),
        "losses": {name: float(value) for name, value in (losses or {}).items()},
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
        "data_versions": dict(data_versions or {}),
    }
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


@contextmanager
def _checkpoint_file(path: Path) -> Iterator[Path]:
    """``atomic_path`` whose OSErrors name the checkpoint (a failed fsync or rename names no file)."""
    try:
        with atomic_path(path) as tmp:
            yield tmp
    except CheckpointWriteError:
        raise
    except OSError as error:
        message = f"{path}: cannot write the checkpoint: {error.strerror or error} (disk full?)"
        raise CheckpointWriteError(error.errno, message) from error


def save_checkpoint(path: str | Path, **state: Any) -> Path:
    """Write one checkpoint file atomically (``runtime_export.atomic``: a failed write keeps the old file);
    ``state``: the keyword arguments of ``checkpoint_bytes``. Training writes its pairs with ``write_checkpoint``."""
    path = Path(path)
    data = checkpoint_bytes(**state)
    with _checkpoint_file(path) as tmp:
        tmp.write_bytes(data)
    return path


def write_checkpoint(checkpoint_dir: str | Path, step: int, data: bytes) -> Path:
    """``step-NNNNNN.pt`` and ``last.pt``, both holding ``data`` (``checkpoint_bytes`` of ``step``); returns
    the step file.

    Both temp files are written before either is renamed into place, ``last.pt`` first: a failed write
    advances neither (and removes both temps), and a crash between the two renames leaves ``last.pt`` newer
    than the newest step file, never older, so a resume never goes back past a step that was saved.
    """
    checkpoint_dir = Path(checkpoint_dir)
    step_path = checkpoint_dir / step_checkpoint_name(step)
    with _checkpoint_file(step_path) as step_tmp:
        step_tmp.write_bytes(data)
        with _checkpoint_file(checkpoint_dir / LAST_NAME) as last_tmp:
            last_tmp.write_bytes(data)
    return step_path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint with the safe unpickler onto the CPU.

    A missing file is FileNotFoundError; an unreadable one or one lacking keys is DamagedCheckpointError.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except _UNREADABLE as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DamagedCheckpointError(
            f"checkpoint {path} is unreadable (truncated or not a checkpoint): {reason}"
        ) from error
    if not isinstance(checkpoint, dict):
        raise DamagedCheckpointError(f"checkpoint {path} holds a {type(checkpoint).__name__}, not a checkpoint dict")
    missing = {"model", "optimizer", "step", "config", "rng", "losses"} - set(checkpoint)
    if missing:
        raise DamagedCheckpointError(f"checkpoint {path} lacks the keys {sorted(missing)}")
    return checkpoint


def _step_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """The ``step-*.pt`` files, highest step first."""
    steps = [
        (int(match.group(1)), entry)
        for entry in checkpoint_dir.glob("step-*.pt")
        if (match := _STEP_RE.match(entry.name))
    ]
    return [entry for _, entry in sorted(steps, reverse=True)]


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """``last.pt`` if present, else the ``step-*.pt`` with the highest step, else None."""
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / LAST_NAME
    if last.is_file():
        return last
    steps = _step_checkpoints(checkpoint_dir)
    return steps[0] if steps else None


def load_latest_checkpoint(checkpoint_dir: str | Path) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint that reads back intact, as (path, contents); None when the directory holds none.

    ``last.pt`` first, then ``step-*.pt`` from the highest step: a damaged file (a crash or a full disk
    mid-copy) is skipped with a warning naming it and the file used instead. All damaged is an error.
    """
    checkpoint_dir = Path(checkpoint_dir)
    last = checkpoint_dir / LAST_NAME
    candidates = [last] if last.is_file() else []
    candidates += _step_checkpoints(checkpoint_dir)
    damaged: list[DamagedCheckpointError] = []
    for path in candidates:
        try:
            checkpoint = load_checkpoint(path)
        except DamagedCheckpointError as error:
            damaged.append(error)
            continue
        for error in damaged:
            warnings.warn(f"{error}; resuming from {path} instead", RuntimeWarning, stacklevel=2)
        return path, checkpoint
    if damaged:
        raise DamagedCheckpointError(f"no intact checkpoint in {checkpoint_dir}: {'; '.join(map(str, damaged))}")
    return None


def model_from_checkpoint(path: str | Path) -> tuple[SegmentationModel, TrainConfig]:
    """Rebuild the trained model (eval mode, CPU) and the config that trained it."""
    checkpoint = load_checkpoint(path)
    try:
        config = TrainConfig.model_validate(checkpoint["config"])
    except ValidationError as error:  # e.g. a checkpoint from before a config field was renamed
        raise ValueError(f"checkpoint {path}: its training config does not load with this code: {error}") from error
    model = SegmentationModel(config.model)
    try:
        model.load_state_dict(checkpoint["model"])
    except RuntimeError as error:  # weights of another architecture than the config describes
        raise DamagedCheckpointError(f"checkpoint {path}: the weights do not fit its model config: {error}") from error
    return model.eval(), config
