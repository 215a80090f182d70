"""Training loop: library ``train()`` and the CLI ``python -m training_core.train``.

One optimizer step = ``grad_accum`` micro-batches. Per step, K, the soft k-means rounds and the input
downsample factor are drawn from a generator seeded by (seed, step), identical on every DDP rank (the
marginal entropy is reduced over ranks, so they must agree on K); the two views of each micro-batch
are drawn from a generator seeded by (seed, step, rank, micro-batch). Seeding per step is what makes
a resumed run continue exactly: nothing but the data position has to be replayed.

Outputs in ``checkpoint_dir``: ``step-000050.pt`` ... and ``last.pt`` (see ``training_core.checkpoint``)
and ``train_log.jsonl`` with one JSON object per optimizer step. Under ``torchrun`` only rank 0 writes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, IterableDataset
from tqdm import tqdm

from training_core.checkpoint import (
    LAST_NAME,
    latest_checkpoint,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
    step_checkpoint_name,
)
from training_core.config import TrainConfig, load_config
from training_core.data import build_loader, set_loader_epoch, unit_float
from training_core.data.views import make_views
from training_core.device import DevicePolicy, device_policy
from training_core.distributed import (
    DistributedContext,
    context_from_env,
    start_process_group,
    stop_process_group,
)
from training_core.losses import AllReduce, two_view_losses
from training_core.model import SegmentationModel

LOG_NAME = "train_log.jsonl"
LOSS_PARTS = ("total", "consistency", "pixel_entropy", "marginal_entropy", "smoothness", "cross_view_mi")


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
    return two_view_losses(probs1, probs2, views, config.loss, all_reduce, seeds1, seeds2)


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
            raise RuntimeError("the data loader yielded no batches: check data.source, dataset_ids and max_samples")
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


def _write_checkpoint(checkpoint_dir: Path, step: int, **state: object) -> Path:
    """``step-XXXXXX.pt``, then an atomic copy of it to ``last.pt``; returns the step file."""
    step_path = save_checkpoint(checkpoint_dir / step_checkpoint_name(step), step=step, **state)
    tmp_last = checkpoint_dir / f".{LAST_NAME}.tmp"
    with step_path.open("rb") as source, tmp_last.open("wb") as target:
        shutil.copyfileobj(source, target)
        target.flush()
        os.fsync(target.fileno())
    tmp_last.replace(checkpoint_dir / LAST_NAME)
    return step_path


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
    tmp = log_path.with_name(f".{log_path.name}.tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(log_path)


def train(
    config: TrainConfig,
    checkpoint_dir: Path,
    resume: bool = True,
    progress: Callable[[dict], None] | None = None,
    stop_after_steps: int | None = None,
) -> TrainResult:
    """Train until ``config.steps`` optimizer steps are done in total, checkpointing into ``checkpoint_dir``.

    ``resume``: continue from the newest checkpoint there (without it, the directory must hold none).
    ``progress``: called on rank 0 every ``log_every`` steps and at the last step with the step's log
    record (step, loss parts, k, images_per_s, eta_s, ...). ``stop_after_steps``: do at most this many
    steps in this call, then checkpoint and return (time-boxed runs, resume tests).
    """
    checkpoint_dir = Path(checkpoint_dir)
    dist_ctx = context_from_env()
    policy = device_policy(config.device, config.amp, local_rank=dist_ctx.local_rank)
    start_process_group(dist_ctx, policy.device)
    try:
        return _train(config, checkpoint_dir, resume, progress, stop_after_steps, dist_ctx, policy)
    finally:
        stop_process_group()


def _train(
    config: TrainConfig,
    checkpoint_dir: Path,
    resume: bool,
    progress: Callable[[dict], None] | None,
    stop_after_steps: int | None,
    dist_ctx: DistributedContext,
    policy: DevicePolicy,
) -> TrainResult:
    torch.manual_seed(config.seed)  # the same initial weights on every rank
    model = SegmentationModel(config.model).to(policy.device, memory_format=policy.memory_format)
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=config.weight_decay
    )
    scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.grad_scaler)

    # Resume: weights, optimizer moments, loss scale, global RNG states and the step count.
    start_step, last_losses, checkpoint_path = 0, {}, None
    existing = latest_checkpoint(checkpoint_dir)
    if existing is not None and not resume:
        raise FileExistsError(f"{checkpoint_dir} already holds {existing.name}: resume, or train into an empty dir")
    if existing is not None:
        checkpoint = load_checkpoint(existing)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        if checkpoint.get("scaler") is not None:  # absent in checkpoints written without AMP scaling
            scaler.load_state_dict(checkpoint["scaler"])
        restore_rng_state(checkpoint["rng"])
        start_step, last_losses, checkpoint_path = checkpoint["step"], checkpoint["losses"], existing

    ddp_model = nn.parallel.DistributedDataParallel(model) if dist_ctx.enabled else model
    all_reduce = dist_ctx.all_reduce_sum if dist_ctx.enabled else None
    loader = build_loader(config.data, config.batch_size, config.seed, dist_ctx.rank, dist_ctx.world_size)
    batches = endless_batches(loader, skip=start_step * config.grad_accum)

    log_path = checkpoint_dir / LOG_NAME
    if dist_ctx.is_main:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, start_step)
    end_step = config.steps if stop_after_steps is None else min(config.steps, start_step + stop_after_steps)
    images_per_step = config.batch_size * config.grad_accum * dist_ctx.world_size
    stop = _StopRequest()
    interrupted = False
    bar = tqdm(total=config.steps, initial=start_step, disable=not dist_ctx.is_main, desc="train", unit="step")
    started = time.perf_counter()
    step = start_step
    model.train()
    with stop.on_sigterm(), log_path.open("a") if dist_ctx.is_main else contextlib.nullcontext() as log:
        while step < end_step:
            step_started = time.perf_counter()
            plan = plan_step(config, step)
            sums = torch.zeros(len(LOSS_PARTS), device=policy.device)
            for micro in range(config.grad_accum):
                batch = next(batches)
                # uint8 over the wire (a quarter of the bytes), float on the device.
                images = unit_float(batch["image"].to(policy.device, non_blocking=True))
                valid = batch["valid"].to(policy.device, non_blocking=True) if "valid" in batch else None
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
                raise FloatingPointError(
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
                "images_per_s": images_per_step / step_s,
                "step_s": step_s,
                "eta_s": (time.perf_counter() - started) / (step - start_step) * (config.steps - step),
            }
            if dist_ctx.is_main:
                log.write(json.dumps(record) + "\n")
                log.flush()
                bar.update(1)
                bar.set_postfix(loss=f"{losses['total']:.4f}", k=plan.k)
                if progress is not None and (step % config.log_every == 0 or step == end_step):
                    progress(record)
            if step % config.checkpoint_every == 0 or step == end_step or interrupted:
                checkpoint_path = checkpoint_dir / step_checkpoint_name(step)
                if dist_ctx.is_main:
                    state = {"model": model, "optimizer": optimizer, "config": config, "scaler": scaler}
                    _write_checkpoint(checkpoint_dir, step, losses=last_losses, **state)
            if interrupted:
                break
    bar.close()
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
        prog="python -m training_core.train",
        description="Train the segmentation model (flags override the --config file; torchrun for DDP).",
    )
    parser.add_argument("--config", help="Python module with get_config()/CONFIG, or a YAML file")
    parser.add_argument("--checkpoint_dir", "--checkpoint-dir", dest="checkpoint_dir", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in the dir")
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
    "data_source": ("data", "source"),
    "processed_root": ("data", "processed_root"),
    "dataset_id": ("data", "dataset_ids"),
    "geo_path": ("data", "geo_paths"),
    "patch_size": ("data", "patch_size"),
    "num_workers": ("data", "num_workers"),
    "max_samples": ("data", "max_samples"),
}


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The --config file (or the defaults) with every flag that was given written over it."""
    raw = load_config(args.config).model_dump()
    for flag, (section, field) in _OVERRIDES.items():
        value = getattr(args, flag)
        if value is not None:
            (raw[section] if section else raw)[field] = value
    return TrainConfig.model_validate(raw)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    config = config_from_args(args)
    result = train(config, Path(args.checkpoint_dir), resume=args.resume)
    if context_from_env().is_main:
        print(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in asdict(result).items()}))
    if result.interrupted:
        print(f"stopped by SIGTERM at step {result.steps}; rerun with --resume to continue", file=sys.stderr)
        return 128 + signal.SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
