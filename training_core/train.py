"""Training loop: library ``train()`` and the CLI ``python -m training_core.train``.

One optimizer step = ``grad_accum`` micro-batches. Per step, K, the soft k-means rounds and the input
downsample factor are drawn from a generator seeded by (seed, step), identical on every DDP rank (the
marginal entropy is reduced over ranks, so they must agree on K); the two views of each micro-batch
are drawn from a generator seeded by (seed, step, rank, micro-batch). Seeding per step is what makes
a resumed run continue exactly: nothing but the data position has to be replayed.

Outputs in ``checkpoint_dir``: ``step-000050.pt`` ... and ``last.pt`` (see ``training_core.checkpoint``),
``train_log.jsonl`` with one JSON object per optimizer step, and TensorBoard event files (``loss/<part>``,
``train/lr``, ``train/images_per_s`` every step; ``eval/<dataset>/...`` every ``eval_every`` steps). Under
``torchrun`` only rank 0 writes.

Resuming checks the checkpoint's config against the new one: only ``RESUMABLE_FIELDS`` may differ, unless
the caller overrides (the override is logged, and the optimizer trains with the new lr and weight decay). A
damaged ``last.pt`` falls back to the newest intact step file.

Bad data met mid-training (a damaged training tile, or a val tile that periodic evaluation cannot read)
stops training with ``TrainingStoppedError``, after checkpointing the steps done since the last checkpoint:
nothing is lost, and a resume continues once the data is fixed (or ``eval_every`` is 0). The CLI reports
every user error (``runtime_export.cli``) as one line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import signal
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from torch.utils.tensorboard import SummaryWriter

from runtime_export.atomic import atomic_write_text
from runtime_export.cli import USER_ERRORS, error_line, run_cli
from training_core.checkpoint import (
    CheckpointWriteError,
    capture_rng_state,
    checkpoint_bytes,
    latest_checkpoint,
    load_latest_checkpoint,
    restore_rng_state,
    step_checkpoint_name,
    write_checkpoint,
)
from training_core.config import DataConfig, TrainConfig, load_config, validation_message
from training_core.data import build_loader, set_loader_epoch, unit_float
from training_core.data.sharded import processed_dataset_ids
from training_core.data.views import make_views
from training_core.device import DevicePolicy, device_policy
from training_core.distributed import (
    DistributedContext,
    context_from_env,
    start_process_group,
    stop_process_group,
)
from training_core.eval.report import MODEL
from training_core.eval.scoring import EVAL_SPLIT, dataset_label_space, evaluate_model
from training_core.losses import AllReduce, two_view_losses
from training_core.model import SegmentationModel
from training_core.shards.index import read_manifest

PROG = "python -m training_core.train"
LOG_NAME = "train_log.jsonl"
LOSS_PARTS = ("total", "consistency", "pixel_entropy", "marginal_entropy", "smoothness", "cross_view_mi")
# Config fields (dotted paths) that do not change the weights a training produces: where and how often to
# log, checkpoint and evaluate, and how the loader feeds the same data. The one list: a resume may change
# them (config_differences), and the Dagster asset's training key, its checkpoint folder, ignores them
# (weight_shaping_config), so the CLI and Dagster agree on what continues a training.
NOT_WEIGHT_SHAPING = frozenset(
    {
        "device",
        "amp",  # the Dagster asset resumes a training moved between CPU and GPU (AMP always on for CUDA)
        "compile",  # the same step, fused: values to float round-off, like amp
        "log_every",
        "checkpoint_every",
        "eval_every",
        "data.num_workers",
        "data.prefetch_factor",
        "data.persistent_workers",
        "data.pin_memory",
        "data.cache_mode",
        "data.cache_max_items",
    }
)
# A resume may also raise ``steps``: seeding per step makes a longer run continue the shorter one exactly. It
# still shapes the weights (the last step's are the result), so it stays in the training key.
RESUMABLE_FIELDS = NOT_WEIGHT_SHAPING | {"steps"}
_ABSENT = "<absent>"  # a field only one of two configs has (renamed or added since the checkpoint)


@dataclass
class TrainResult:
    steps: int  # optimizer steps done in total (including those before a resume)
    wall_s: float  # seconds spent in this call
    images_per_s: float  # images (both views count once) per second in this call, all ranks
    final_losses: dict[str, float]
    checkpoint_path: Path | None
    log_path: Path
    device: str
    amp: bool
    interrupted: bool = False  # stopped early by SIGTERM (a checkpoint was saved)


class ConfigMismatchError(ValueError):
    """``resume`` found a checkpoint trained under another config."""


class TrainingStoppedError(ValueError):
    """Bad data met mid-training; the steps done were checkpointed first (the message says where)."""


class NonFiniteLossError(FloatingPointError, ValueError):
    """A NaN or infinite loss (e.g. a learning rate too high): a ValueError, so the CLI reports one line."""


@dataclass(frozen=True)
class StepPlan:
    """What one optimizer step trains on, drawn from (seed, step) alone."""

    k: int
    cluster_iters: int
    downsample: int


def plan_step(config: TrainConfig, step: int) -> StepPlan:
    rng = np.random.default_rng([config.seed, step])
    low, high = config.cluster_iters
    return StepPlan(
        k=int(rng.integers(config.k_min, config.model.max_k + 1)),
        cluster_iters=int(rng.integers(low, high + 1)),
        downsample=int(rng.choice(config.data.downsample)),
    )


def view_generator(seed: int, step: int, rank: int, micro: int, device: torch.device) -> torch.Generator:
    """The generator the two views of one micro-batch are drawn from (on ``device``)."""
    entropy = np.random.SeedSequence([seed, step, rank, micro]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator(device=device).manual_seed(int(entropy))


def step_losses(
    model: nn.Module,
    images: torch.Tensor,
    plan: StepPlan,
    config: TrainConfig,
    generator: torch.Generator,
    policy: DevicePolicy,
    all_reduce: AllReduce | None = None,
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Forward both views of ``images`` [B, 3, P, P] (on the device) in one batch and return the loss parts.

    ``valid`` [B, P, P] marks real pixels (None: all). The losses use the stride-4 probabilities; the
    warp grid is built at that resolution, which is exact because the (downsampled) patch side is a
    multiple of 4 (checked by TrainConfig).
    """
    if plan.downsample > 1:
        images = F.avg_pool2d(images, plan.downsample)
        valid = None if valid is None else F.avg_pool2d(valid[:, None].float(), plan.downsample)[:, 0]
    views = make_views(images, config.augment, generator, valid)
    with policy.autocast():
        both = torch.cat([views.view1, views.view2]).contiguous(memory_format=policy.memory_format)
        output = model(both, plan.k, cluster_iters=plan.cluster_iters, upsample=False)
    probs1, probs2 = output.low_res_probs.chunk(2)
    seeds1, seeds2 = output.seed_logits.chunk(2)
    return two_view_losses(probs1, probs2, views, config.loss, all_reduce, seeds1, seeds2, compiled=config.compile)


def device_inputs(batch: Mapping[str, Any], device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(images float32 in [0, 1], valid mask or None) of a loader batch, on ``device``.

    uint8 over the wire (a quarter of the bytes), float on the device. A mask with every pixel valid (the
    common case) is dropped here, on the host, as ``make_views`` would drop it on the device: the same
    losses, without the mask's copy or a device sync to look at it.
    """
    images = unit_float(batch["image"].to(device, non_blocking=True))
    valid = batch.get("valid")
    if valid is None or bool(valid.all()):
        return images, None
    return images, valid.to(device, non_blocking=True)


def endless_batches(loader: DataLoader, skip: int = 0) -> Iterator[dict]:
    """Batches of epoch 0, 1, ... (each epoch's order set by ``set_loader_epoch``), after dropping ``skip``.

    A resume skips the batches already trained on. Epochs of a map-style dataset have a known length,
    so whole epochs are skipped without reading them; an iterable dataset's batches are replayed.
    """
    epoch = 0
    if not isinstance(loader.dataset, IterableDataset) and len(loader) > 0:
        epoch, skip = divmod(skip, len(loader))
    while True:
        set_loader_epoch(loader, epoch)
        yielded = False
        for batch in loader:
            yielded = True
            if skip > 0:
                skip -= 1
                continue
            yield batch
        if not yielded:
            raise ValueError("the data loader yielded no batches: check data.source, dataset_ids and max_samples")
        epoch += 1


class _StopRequest:
    """Set by SIGTERM; the loop finishes the current step, saves, and returns."""

    def __init__(self) -> None:
        self.requested = False

    @contextlib.contextmanager
    def on_sigterm(self) -> Iterator[None]:
        # Signal handlers can only be installed from the main thread (Dagster may run us elsewhere).
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: setattr(self, "requested", True))
        try:
            yield
        finally:
            signal.signal(signal.SIGTERM, previous)


def _original_message(error: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback.

    torch re-raises it in the main process as the same type with the worker's whole traceback as the
    message, whose last line is ``module.Type: message``."""
    text = str(error)
    if "Original Traceback" not in text:
        return error_line(error)
    last = text.rstrip().splitlines()[-1]
    return " ".join(last.split(": ", 1)[-1].split())


def _trim_log(log_path: Path, keep_through_step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they will be redone), and a line
    torn by a crash mid-write."""
    if not log_path.exists():
        return
    kept = []
    for line in log_path.read_text().splitlines():
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            continue
        if step <= keep_through_step:
            kept.append(line)
    atomic_write_text(log_path, "".join(line + "\n" for line in kept))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"data": {"source": ...}}`` -> ``{"data.source": ...}`` (lists stay values)."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(saved: Mapping[str, Any], config: TrainConfig) -> dict[str, tuple[Any, Any]]:
    """``{dotted path: (checkpoint's value, config's value)}`` for every field outside ``RESUMABLE_FIELDS``
    where a checkpoint's config (``model_dump(mode="json")``) and ``config`` differ."""
    old, new = _flatten(saved), _flatten(config.model_dump(mode="json"))
    return {
        path: (old.get(path, _ABSENT), new.get(path, _ABSENT))
        for path in sorted(old.keys() | new.keys())
        if path not in RESUMABLE_FIELDS and old.get(path, _ABSENT) != new.get(path, _ABSENT)
    }


def weight_shaping_config(config: TrainConfig) -> dict[str, Any]:
    """``config.model_dump(mode="json")`` without the ``NOT_WEIGHT_SHAPING`` fields, at any depth: what a
    key of the weights a training produces may hash."""

    def without(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
        return {
            key: without(value, f"{prefix}{key}.") if isinstance(value, Mapping) else value
            for key, value in tree.items()
            if f"{prefix}{key}" not in NOT_WEIGHT_SHAPING
        }

    return without(config.model_dump(mode="json"), "")


def _describe(changed: Mapping[str, tuple[Any, Any]]) -> str:
    return ", ".join(f"{path} ({old!r} in the checkpoint, {new!r} now)" for path, (old, new) in changed.items())


def data_versions(data: DataConfig) -> dict[str, str]:
    """``{dataset_id: data version}`` of the shards trained on (empty for synthetic and geo sources)."""
    if data.source != "shards" or data.processed_root is None:
        return {}
    ids = data.dataset_ids or processed_dataset_ids(data.processed_root)
    return {dataset_id: read_manifest(data.processed_root, dataset_id)["data_version"] for dataset_id in ids}


def eval_datasets(config: TrainConfig) -> list[str]:
    """The datasets periodic evaluation scores: every one under ``data.processed_root`` with labeled val tiles."""
    if not config.eval_every:
        return []
    root = config.data.processed_root
    if config.data.source != "shards" or root is None:
        warnings.warn(f"eval_every={config.eval_every} ignored: evaluation needs data.source=shards", stacklevel=4)
        return []
    return [
        dataset_id
        for dataset_id in processed_dataset_ids(root)
        if read_manifest(root, dataset_id)["counts"].get(EVAL_SPLIT, 0) > 0
        and dataset_label_space(root, dataset_id)[0] is not None
    ]


def evaluate_into(
    writer: SummaryWriter, model: SegmentationModel, config: TrainConfig, dataset_ids: list[str], step: int
) -> None:
    """``eval/<dataset>/{val_miou,majority_k8_miou,min_cluster_share}`` of the current weights.

    Evaluation seeds torch (the untrained control) and runs the model in eval mode: every RNG state is put
    back and train mode restored, so a run with evaluation trains exactly as one without.
    """
    rng = capture_rng_state()
    try:
        for dataset_id in dataset_ids:
            report = evaluate_model(model, config, config.data.processed_root, dataset_id, n_samples=0)
            scalars = {
                "val_miou": report.miou(MODEL),
                "majority_k8_miou": report.majority_k8_miou(MODEL),
                "min_cluster_share": min(report.methods[MODEL].cluster_shares),
            }
            for name, value in scalars.items():
                if value is not None:
                    writer.add_scalar(f"eval/{dataset_id}/{name}", value, step)
    finally:
        restore_rng_state(rng)
        model.train()


def progress_line(row: Mapping[str, Any], total_steps: int) -> str:
    """One line per log interval (the CLI's stderr, Dagster's run log): step, loss parts, K, throughput, ETA."""
    losses = " ".join(f"{name}={float(row[name]):.4f}" for name in LOSS_PARTS if name in row)
    return (
        f"step {row['step']}/{total_steps} {losses} k={row.get('k')} "
        f"{float(row['images_per_s']):.2f} img/s ETA {float(row['eta_s']):.0f}s"
    )


def train(
    config: TrainConfig,
    checkpoint_dir: Path,
    resume: bool = True,
    progress: Callable[[dict], None] | None = None,
    stop_after_steps: int | None = None,
    override_config: bool = False,
) -> TrainResult:
    """Train until ``config.steps`` optimizer steps are done in total, checkpointing into ``checkpoint_dir``.

    ``resume``: continue from the newest intact checkpoint there (without it, the directory must hold
    none); a checkpoint trained under a config that differs outside ``RESUMABLE_FIELDS`` is refused
    (ConfigMismatchError naming the fields) unless ``override_config``, which resumes and logs the change.
    ``progress``: called on rank 0 every ``log_every`` steps and at the last step with the step's log
    record (step, loss parts, k, lr, images_per_s, eta_s, ...). ``stop_after_steps``: do at most this many
    steps in this call, then checkpoint and return (time-boxed runs, resume tests).
    """
    checkpoint_dir = Path(checkpoint_dir)
    dist_ctx = context_from_env()
    policy = device_policy(config.device, config.amp, local_rank=dist_ctx.local_rank)
    start_process_group(dist_ctx, policy.device)
    try:
        return _train(config, checkpoint_dir, resume, progress, stop_after_steps, override_config, dist_ctx, policy)
    finally:
        stop_process_group()


def _train(
    config: TrainConfig,
    checkpoint_dir: Path,
    resume: bool,
    progress: Callable[[dict], None] | None,
    stop_after_steps: int | None,
    override_config: bool,
    dist_ctx: DistributedContext,
    policy: DevicePolicy,
) -> TrainResult:
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = SegmentationModel(config.model).to(policy.device, memory_format=policy.memory_format)
    if config.compile:
        model.compile_training()
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.grad_scaler)

    # Resume: weights, optimizer moments, loss scale, global RNG states and the step count.
    start_step, last_losses, checkpoint_path, overridden = 0, {}, None, {}
    existing = latest_checkpoint(checkpoint_dir)
    if existing is not None and not resume:
        raise FileExistsError(
            f"{checkpoint_dir} already holds {existing.name}: resume (--resume), or train into an empty dir"
        )
    loaded = load_latest_checkpoint(checkpoint_dir) if resume else None
    if loaded is not None:
        existing, checkpoint = loaded
        overridden = config_differences(checkpoint["config"], config)
        if overridden and not override_config:
            raise ConfigMismatchError(
                f"{existing} was trained under another config: {_describe(overridden)}. Resume with the same "
                "config, train into a new checkpoint dir, or override (--override-config) to continue these "
                "weights under the new one"
            )
        if overridden:
            warnings.warn(f"resuming {existing} under a changed config: {_describe(overridden)}", stacklevel=3)
        try:
            model.load_state_dict(checkpoint["model"])
        except RuntimeError:  # an override of a model field that shapes the weights
            changed = {path: values for path, values in overridden.items() if path.startswith("model.")}
            raise ConfigMismatchError(
                f"{existing}: its weights do not fit the model config now ({_describe(changed)}): an override cannot "
                "change the architecture; train into a new checkpoint dir"
            ) from None
        optimizer.load_state_dict(checkpoint["optimizer"])
        # The optimizer's state carries the checkpoint's lr and weight decay: train with the ones recorded now.
        for group in optimizer.param_groups:
            group.update(lr=config.lr, weight_decay=config.weight_decay)
        if checkpoint.get("scaler") is not None:  # absent in checkpoints written without AMP scaling
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        start_step, last_losses, checkpoint_path = checkpoint["step"], checkpoint["losses"], existing

    ddp_model = nn.parallel.DistributedDataParallel(model) if dist_ctx.enabled else model
    all_reduce = dist_ctx.all_reduce_sum if dist_ctx.enabled else None
    loader = build_loader(config.data, config.batch_size, config.seed, dist_ctx.rank, dist_ctx.world_size)
    batches = endless_batches(loader, skip=start_step * config.grad_accum)
    versions = data_versions(config.data)
    to_evaluate = eval_datasets(config) if dist_ctx.is_main else []

    log_path = checkpoint_dir / LOG_NAME
    if dist_ctx.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, start_step)
    end_step = config.steps if stop_after_steps is None else min(config.steps, start_step + stop_after_steps)
    images_per_step = config.batch_size * config.grad_accum * dist_ctx.world_size
    stop = _StopRequest()
    interrupted = False
    started = time.perf_counter()
    step = saved_step = start_step

    def save() -> Path:
        """Checkpoint the ``step`` steps done (rank 0 writes; every rank gets the path)."""
        nonlocal saved_step
        if dist_ctx.is_main:
            state = checkpoint_bytes(
                model=model,
                optimizer=optimizer,
                step=step,
                config=config,
                losses=last_losses,
                scaler=scaler,
                data_versions=versions,
            )
            try:
                write_checkpoint(checkpoint_dir, step, state)
            except CheckpointWriteError as error:
                kept = f"resume from {checkpoint_path}" if checkpoint_path else "no earlier checkpoint to resume from"
                raise CheckpointWriteError(
                    error.errno, f"{error.strerror}; training stopped at step {step}: {kept} once there is space"
                ) from error
        saved_step = step
        return checkpoint_dir / step_checkpoint_name(step)

    def stopped(what: str, error: BaseException, remedy: str) -> TrainingStoppedError:
        """The error that ends training on bad data, once the steps done since the last checkpoint are saved
        (by rank 0, the one that writes: another rank's error names the last checkpoint)."""
        nonlocal checkpoint_path
        if step > saved_step and dist_ctx.is_main:
            checkpoint_path = save()
        if checkpoint_path is None:
            done = "no step was saved"
        else:
            done = f"steps 1-{saved_step} are saved in {checkpoint_path}"
        return TrainingStoppedError(f"{what}: {_original_message(error)}. Training stopped; {done}. {remedy}")

    model.train()
    with contextlib.ExitStack() as stack:
        stack.enter_context(stop.on_sigterm())
        log = writer = None
        if dist_ctx.is_main:
            log = stack.enter_context(log_path.open("a"))
            # purge_step hides the events of steps after the checkpoint (they are redone), as _trim_log does.
            writer = SummaryWriter(str(checkpoint_dir), purge_step=start_step + 1 if start_step else None)
            stack.callback(writer.close)
            if overridden:
                changed = {path: {"checkpoint": old, "now": new} for path, (old, new) in overridden.items()}
                override = {"step": start_step, "event": "config_override", "checkpoint": str(existing)}
                log.write(json.dumps({**override, "changed": changed}) + "\n")
        while step < end_step:
            step_started = time.perf_counter()
            plan = plan_step(config, step)
            sums = torch.zeros(len(LOSS_PARTS), device=policy.device)
            for micro in range(config.grad_accum):
                try:
                    batch = next(batches)
                except USER_ERRORS as error:  # a damaged tile or shard
                    what = f"reading the training data for step {step + 1}"
                    raise stopped(what, error, "Fix the data, then resume (--resume)") from error
                images, valid = device_inputs(batch, policy.device)
                generator = view_generator(config.seed, step, dist_ctx.rank, micro, policy.device)
                # DDP all-reduces gradients once per step: skip the sync on all but the last micro-batch.
                last_micro = micro == config.grad_accum - 1
                with ddp_model.no_sync() if dist_ctx.enabled and not last_micro else contextlib.nullcontext():
                    parts = step_losses(ddp_model, images, plan, config, generator, policy, all_reduce, valid)
                    scaler.scale(parts["total"] / config.grad_accum).backward()
                sums += torch.stack([parts[name].detach().float() for name in LOSS_PARTS])

            # One reduction averages the loss parts over ranks and tells every rank about a SIGTERM.
            stop_flag = torch.tensor([float(stop.requested)], device=policy.device)
            reduced = dist_ctx.mean_over_ranks(torch.cat([sums / config.grad_accum, stop_flag])).tolist()
            losses = dict(zip(LOSS_PARTS, reduced[:-1], strict=True))
            interrupted = reduced[-1] > 0
            if not all(math.isfinite(value) for value in losses.values()):
                raise NonFiniteLossError(
                    f"non-finite loss at step {step + 1} ({losses}); stopped without updating the weights. "
                    f"Last good checkpoint: {checkpoint_path or 'none yet'}"
                )
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            last_losses = losses

            step_s = time.perf_counter() - step_started
            record = {
                "step": step,
                **losses,
                **asdict(plan),
                "lr": optimizer.param_groups[0]["lr"],
                "images_per_s": images_per_step / step_s,
                "step_s": step_s,
                "eta_s": (time.perf_counter() - started) / (step - start_step) * (config.steps - step),
            }
            if dist_ctx.is_main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                for name in LOSS_PARTS:
                    writer.add_scalar(f"loss/{name}", losses[name], step)
                writer.add_scalar("train/lr", record["lr"], step)
                writer.add_scalar("train/images_per_s", record["images_per_s"], step)
                if progress is not None and (step % config.log_every == 0 or step == end_step):
                    progress(record)
            if step % config.checkpoint_every == 0 or step == end_step or interrupted:
                checkpoint_path = save()
            if interrupted:
                break
            # Rank 0 only (the others wait at the next step's reduction); after the checkpoint, so a long
            # evaluation never delays it. A val tile it cannot read stops training (steps checkpointed first)
            # rather than leaving the eval curves silently incomplete.
            if to_evaluate and step % config.eval_every == 0:
                try:
                    evaluate_into(writer, model, config, to_evaluate, step)
                except USER_ERRORS as error:
                    remedy = "Fix the val data, or resume without periodic evaluation (--resume --eval-every 0)"
                    raise stopped(f"periodic evaluation at step {step}", error, remedy) from error
    dist_ctx.barrier()  # no rank leaves before rank 0 has written the last checkpoint
    wall_s = time.perf_counter() - started
    return TrainResult(
        steps=step,
        wall_s=wall_s,
        images_per_s=(step - start_step) * images_per_step / wall_s,
        final_losses=last_losses,
        checkpoint_path=checkpoint_path,
        log_path=log_path,
        device=str(policy.device),
        amp=policy.amp,
        interrupted=interrupted,
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Train the segmentation model (flags override the --config file; torchrun for DDP).",
    )
    parser.add_argument("--config", help="Python module with get_config()/CONFIG, or a YAML file")
    parser.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the dir")
    parser.add_argument(
        "--override-config",
        action="store_true",
        help="with --resume: continue even if the checkpoint was trained under another config (logged)",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"])
    parser.add_argument("--amp", action="store_true", default=None, help="bf16 autocast on the CPU")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--grad-accum", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--data-source", choices=["synthetic", "shards", "geo"])
    parser.add_argument("--processed-root")
    parser.add_argument("--dataset-id", action="append", help="repeatable; default: every dataset")
    parser.add_argument("--geo-path", action="append", help="GeoTIFF or folder (source=geo); repeatable")
    parser.add_argument("--patch-size", type=int)
    parser.add_argument("--num-workers", type=int)
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--checkpoint-every", type=int)
    parser.add_argument("--log-every", type=int)
    parser.add_argument("--eval-every", type=int, help="score the labeled shards every N steps (TensorBoard)")
    return parser.parse_args(argv)


# CLI flag -> (section of TrainConfig or None for the top level, field)
_OVERRIDES = {
    "device": (None, "device"),
    "amp": (None, "amp"),
    "steps": (None, "steps"),
    "batch_size": (None, "batch_size"),
    "grad_accum": (None, "grad_accum"),
    "lr": (None, "lr"),
    "seed": (None, "seed"),
    "checkpoint_every": (None, "checkpoint_every"),
    "log_every": (None, "log_every"),
    "eval_every": (None, "eval_every"),
    "data_source": ("data", "source"),
    "processed_root": ("data", "processed_root"),
    "dataset_id": ("data", "dataset_ids"),
    "geo_path": ("data", "geo_paths"),
    "patch_size": ("data", "patch_size"),
    "num_workers": ("data", "num_workers"),
    "max_samples": ("data", "max_samples"),
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The --config file (or the defaults) with every flag that was given written over it.

    A bad value is a ValueError naming the flag that gave it (or the field, when the file did)."""
    raw = load_config(args.config).model_dump()
    given = {}
    for flag, (section, field) in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            (raw[section] if section else raw)[field] = value
            given[f"{section}.{field}" if section else field] = "--" + flag.replace("_", "-")
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as error:
        raise ValueError(validation_message(error, given)) from None


def main(argv: list[str] | None = None) -> int:
    """The CLI; a user error (bad flag, config, data, checkpoint, full disk) is one line on stderr, exit 2."""
    return run_cli(PROG, _main, argv)


def _main(argv: list[str] | None) -> int:
    args = _parse_args(argv)
    config = config_from_args(args)
    # Inside an Env, GDAL's errors (a truncated tile's) reach rasterio, which raises them, instead of being
    # printed on stderr beside the one line naming the file.
    with rasterio.Env():
        result = train(
            config,
            Path(args.checkpoint_dir),
            resume=args.resume,
            progress=lambda row: print(progress_line(row, config.steps), file=sys.stderr, flush=True),
            override_config=args.override_config,
        )
    if context_from_env().is_main:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}))
    if result.interrupted:
        print(f"stopped by SIGTERM at step {result.steps}; rerun with --resume to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
