"""GPU training throughput (issue 20): the full training step against the encoder-only floor, and the loader.

One JSON line per measurement, as each finishes (``"part"`` says which):

- ``check``: on the device, the compiled step (``compile: true``) against the eager one from the same weights
  and inputs, in float32: loss parts and encoder gradients (relative to the largest gradient). Timing a
  compiled step that computes something else would be worthless, so this comes before the compiled steps.
- ``encoder``: forward + backward of the encoder alone on both views of ``batch`` patches, at the resolution
  each timed step draws (the floor: what a step cannot go below).
- ``step``: the full training step as ``train()`` runs it: a pinned uint8 batch to the device, the two views,
  the forward of both views, every loss, backward, AdamW, and the per-step read-back of the loss parts. K,
  the soft k-means rounds and the downsample are drawn per step by ``plan_step`` of the recipe, as in
  training; AMP as the device policy sets it (bf16 autocast on CUDA). ``ratio``: step images/s over the floor
  images/s at the same batch. Eager and compiled (``--compile both``).
- ``max_batch``: CUDA only: the largest batch whose worst step (K = max_k, the most rounds, full resolution)
  fits, by doubling from the largest of ``--batches`` and then halving the gap (``torch.cuda.OutOfMemoryError``);
  that batch is then measured like the others.
- ``loader``: the shard loader alone (``build_loader`` of the recipe's data settings on shards built from the
  sample tiles, in a temp folder) with each of ``--workers``: images/s delivered, pinned when CUDA is used.
  ``ratio_to_step``: over the best step images/s measured in this run.
- ``summary``: the best step (batch, compile), its ratio to the encoder floor at that batch, the loader at the
  recipe's ``num_workers`` (and the best worker count) over that step, and which stage limits.

Images are patches: the two views of a patch count once, as ``train()``'s ``images_per_s`` does. Timings
wait for the device (``torch.cuda.synchronize``) before the clock starts and before it stops.
Targets (one GPU): step / encoder floor >= 0.6 at the best batch; loader at the recipe's workers >= 1.2x the
step, or the summary names the limiting stage.

    python bench/gpu_throughput.py                   # everything (bench/gpu_check.sh, docs/GPU.md); minutes on an H200
    python bench/gpu_throughput.py --device cpu --batches 2 --patch 128 --steps 3 --workers 0 2 \\
        --loader-items 8 --compile off               # a CPU smoke run of the same code
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import rasterio
import torch

from training_core.config import TrainConfig, load_config
from training_core.data import build_loader, set_loader_epoch
from training_core.data.synthetic import synthetic_tile
from training_core.device import DevicePolicy, device_policy
from training_core.model import SegmentationModel
from training_core.shards.write import build_shards
from training_core.train import LOSS_PARTS, StepPlan, device_inputs, plan_step, step_losses, view_generator

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "gpu.yaml"
KAMPALA = REPO / "sample_data" / "extracted" / "kampala_buildings" / "images"
TARGET_STEP_TO_FLOOR = 0.6
TARGET_LOADER_TO_STEP = 1.2
WARMUP_STEP_INDEX = 10**6  # view seeds of the warm-up steps: apart from the timed steps' 0, 1, ...
DISTINCT_TILES = 8  # synthetic tiles per batch, repeated: generating hundreds would cost more than the bench


def emit(record: dict) -> dict:
    print(json.dumps({"bench": "gpu_throughput", **record}), flush=True)
    return record


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def compiled_graphs() -> int:
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def host_batch(batch: int, patch: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A loader-like batch on the host: uint8 images (pinned for CUDA) and an all-true valid mask."""
    tiles = [torch.from_numpy(synthetic_tile(0, i, patch)[0]) for i in range(min(batch, DISTINCT_TILES))]
    images = torch.stack([tiles[i % len(tiles)] for i in range(batch)])
    valid = torch.ones(batch, patch, patch, dtype=torch.bool)
    if device.type == "cuda":
        images, valid = images.pin_memory(), valid.pin_memory()
    return {"image": images, "valid": valid}


def warmup_plans(config: TrainConfig) -> list[StepPlan]:
    """Every downsample with the smallest and the largest K and rounds: the shapes a compiled step meets, so
    its (re)compilations happen here and not while timing."""
    low, high = config.cluster_iters
    return [
        StepPlan(k=k, cluster_iters=iters, downsample=factor)
        for factor in config.data.downsample
        for k, iters in ((config.k_min, low), (config.model.max_k, high))
    ]


class Trainer:
    """The model, optimizer and loss scaler of one measured configuration, stepping like ``train()``."""

    def __init__(self, config: TrainConfig, policy: DevicePolicy) -> None:
        self.config, self.policy = config, policy
        torch.manual_seed(config.seed)
        self.model = SegmentationModel(config.model).to(policy.device, memory_format=policy.memory_format).train()
        if config.compile:
            self.model.compile_training()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.scaler = torch.amp.GradScaler(policy.device.type, enabled=policy.grad_scaler)

    def step(self, batch: dict[str, torch.Tensor], plan: StepPlan, index: int) -> list[float]:
        images, valid = device_inputs(batch, self.policy.device)
        generator = view_generator(self.config.seed, index, 0, 0, self.policy.device)
        parts = step_losses(self.model, images, plan, self.config, generator, self.policy, valid=valid)
        self.scaler.scale(parts["total"]).backward()
        losses = torch.stack([parts[name].detach().float() for name in LOSS_PARTS]).tolist()  # as train() reads
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        return losses

    def encoder_pass(self, views: torch.Tensor) -> None:
        """The floor: forward + backward of the encoder alone (eager, autocast as the step's)."""
        with self.policy.autocast():
            features = self.model.encoder(views)
        features.float().sum().backward()
        self.model.zero_grad(set_to_none=True)

    def release(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        del self.model, self.optimizer
        gc.collect()
        if self.policy.device.type == "cuda":
            torch.cuda.empty_cache()


def timed(device: torch.device, runs: list[Callable[[], object]]) -> float:
    """Wall seconds of ``runs`` back to back, the device drained before and after."""
    sync(device)
    started = time.perf_counter()
    for run in runs:
        run()
    sync(device)
    return time.perf_counter() - started


def measure_batch(
    trainer: Trainer, batch: int, patch: int, steps: int, floor: bool, floors: dict[int, float]
) -> list[dict]:
    """The encoder floor (once per batch, eager) and the step at ``batch``; their JSON lines."""
    config, policy = trainer.config, trainer.policy
    device = policy.device
    plans = [plan_step(config, index) for index in range(steps)]
    records = []
    if floor and batch not in floors:
        views = {
            factor: torch.rand(2 * batch, 3, patch // factor, patch // factor, device=device).contiguous(
                memory_format=policy.memory_format
            )
            for factor in config.data.downsample
        }
        for factor in config.data.downsample:
            trainer.encoder_pass(views[factor])  # warm-up: cuDNN algorithm choice, allocator
        reset_peak_memory(device)
        wall = timed(device, [lambda f=plan.downsample: trainer.encoder_pass(views[f]) for plan in plans])
        floors[batch] = batch * steps / wall
        del views
        records.append(
            emit(
                {
                    "part": "encoder",
                    "batch": batch,
                    "patch": patch,
                    "images_per_s": round(floors[batch], 2),
                    "step_s": round(wall / steps, 5),
                    "peak_memory_mb": peak_memory_mb(device),
                }
            )
        )
    host = host_batch(batch, patch, device)
    for index, plan in enumerate(warmup_plans(config)):
        trainer.step(host, plan, WARMUP_STEP_INDEX + index)
    graphs_before = compiled_graphs()
    reset_peak_memory(device)
    wall = timed(device, [lambda p=plan, i=index: trainer.step(host, p, i) for index, plan in enumerate(plans)])
    images_per_s = batch * steps / wall
    record = {
        "part": "step",
        "batch": batch,
        "patch": patch,
        "compile": config.compile,
        "amp": str(policy.amp_dtype).removeprefix("torch.") if policy.amp else None,
        "images_per_s": round(images_per_s, 2),
        "step_s": round(wall / steps, 5),
        "steps": steps,
        "ks": [plan.k for plan in plans],
        "downsamples": [plan.downsample for plan in plans],
        "graphs_compiled_while_timing": compiled_graphs() - graphs_before,
        "peak_memory_mb": peak_memory_mb(device),
    }
    if batch in floors:
        record |= {"floor_images_per_s": round(floors[batch], 2), "ratio": round(images_per_s / floors[batch], 3)}
    records.append(emit(record))
    return records


def measure_or_report(trainer: Trainer, batch: int, args: argparse.Namespace, floors: dict[int, float]) -> list[dict]:
    """``measure_batch``'s step lines; a batch that runs out of device memory (a compiled step's graphs, or the
    allocator's fragmentation at the largest batch) is reported as such and the run goes on."""
    try:
        records = measure_batch(trainer, batch, args.patch, args.steps, True, floors)
    except torch.cuda.OutOfMemoryError:
        records = None
    if records is None:
        trainer.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
        emit({"part": "step", "batch": batch, "compile": trainer.config.compile, "error": "out of memory"})
        return []
    return [record for record in records if record["part"] == "step"]


def fits(trainer: Trainer, batch: int, patch: int) -> bool:
    """Whether the worst step (K = max_k, the most rounds, full resolution) runs at ``batch``."""
    config = trainer.config
    plan = StepPlan(k=config.model.max_k, cluster_iters=config.cluster_iters[1], downsample=min(config.data.downsample))
    try:
        trainer.step(host_batch(batch, patch, trainer.policy.device), plan, 0)
        sync(trainer.policy.device)
        fitted = True
    except torch.cuda.OutOfMemoryError:
        fitted = False
    # Out of the handler, so that its traceback no longer holds the failed step's tensors.
    trainer.optimizer.zero_grad(set_to_none=True)
    gc.collect()
    torch.cuda.empty_cache()
    return fitted


def largest_batch(trainer: Trainer, start: int, patch: int, cap: int) -> tuple[int, list[tuple[int, bool]]]:
    """Double from ``start`` until a step does not fit (or ``cap``), then halve the gap down to 8 patches."""
    probes: list[tuple[int, bool]] = []
    good, bad = start, None
    while bad is None and good * 2 <= cap:
        probes.append((good * 2, fits(trainer, good * 2, patch)))
        good, bad = (good * 2, None) if probes[-1][1] else (good, good * 2)
    while bad is not None and bad - good > 8:
        middle = (good + bad) // 2
        probes.append((middle, fits(trainer, middle, patch)))
        good, bad = (middle, bad) if probes[-1][1] else (good, middle)
    return good, probes


def check_compiled(config: TrainConfig, policy: DevicePolicy, patch: int) -> dict:
    """The compiled step against the eager one in float32 on the device: loss parts and encoder gradients."""
    float32 = DevicePolicy(policy.device, False, None, grad_scaler=False)
    plan = StepPlan(k=config.model.max_k, cluster_iters=config.cluster_iters[1], downsample=1)
    host = host_batch(2, patch, policy.device)
    host["valid"][:, : patch // 8] = False  # a padded band: the masked losses too
    results = []
    for compiled in (False, True):
        step_config = config.model_copy(update={"compile": compiled})
        torch.manual_seed(config.seed)
        model = SegmentationModel(config.model).to(policy.device, memory_format=policy.memory_format).train()
        if compiled:
            model.compile_training()
        images, valid = device_inputs(host, policy.device)
        generator = view_generator(config.seed, 0, 0, 0, policy.device)
        parts = step_losses(model, images, plan, step_config, generator, float32, valid=valid)
        parts["total"].backward()
        grads = torch.cat([p.grad.flatten() for p in model.encoder.parameters()])
        results.append((torch.stack([parts[name].detach() for name in LOSS_PARTS]), grads))
    (eager_parts, eager_grads), (compiled_parts, compiled_grads) = results
    loss_diff = (compiled_parts - eager_parts).abs().max().item()
    grad_rel = ((compiled_grads - eager_grads).abs().max() / eager_grads.abs().max()).item()
    # TF32 convolutions on CUDA and the fused kernels' summation order: agreement to ~1e-3, not bitwise.
    return emit(
        {
            "part": "check",
            "what": "compiled vs eager step, float32",
            "patch": patch,
            "loss_parts_max_abs_diff": loss_diff,
            "encoder_grad_max_rel_diff": grad_rel,
            "ok": loss_diff < 1e-3 and grad_rel < 1e-2,
        }
    )


def write_loader_tiles(extracted: Path, items: int, size: int) -> str:
    """``items`` unlabeled RGB GeoTIFFs of size x size, each a mosaic of the kampala tiles; returns the dataset id."""
    dataset_id = "bench_tiles"
    folder = extracted / dataset_id / "images"
    folder.mkdir(parents=True)
    paths = sorted(KAMPALA.glob("*.tif"))
    sources = [rasterio.open(path).read() for path in paths]
    with rasterio.open(paths[0]) as src:
        crs, transform = src.crs, src.transform
    per_side = math.ceil(size / sources[0].shape[1])
    for item in range(items):
        rows = [
            np.concatenate([sources[(item + r * per_side + c) % len(sources)] for c in range(per_side)], axis=2)
            for r in range(per_side)
        ]
        pixels = np.concatenate(rows, axis=1)[:, :size, :size]
        profile = {"driver": "GTiff", "width": size, "height": size, "count": 3, "dtype": "uint8"}
        with rasterio.open(folder / f"tile-{item:05d}.tif", "w", crs=crs, transform=transform, **profile) as dst:
            dst.write(pixels)
    return dataset_id


def loader_rate(config: TrainConfig, batch: int, seconds: float) -> tuple[float, int]:
    """(images/s, images) the loader delivers over at least ``seconds`` after its first batch, epochs repeated."""
    loader = build_loader(config.data, batch, config.seed)
    images, epoch, started = 0, 0, None

    def batches() -> Iterator[dict]:
        nonlocal epoch
        while True:
            set_loader_epoch(loader, epoch)
            yield from loader
            epoch += 1

    with contextlib.closing(batches()) as stream:
        for delivered in stream:
            if started is None:  # workers started and the first batch made: the steady state begins
                started = time.perf_counter()
                continue
            images += len(delivered["image"])
            if time.perf_counter() - started >= seconds:
                break
    return images / (time.perf_counter() - started), images


def measure_loader(
    args: argparse.Namespace, recipe: TrainConfig, device: torch.device, best_step: float | None
) -> list:
    records = []
    with tempfile.TemporaryDirectory(prefix="bench-gpu-loader-") as tmp:
        extracted, processed = Path(tmp) / "extracted", Path(tmp) / "processed"
        tile = args.loader_tile or args.patch + args.patch // 2  # larger than the patch: a random crop per epoch
        dataset_id = write_loader_tiles(extracted, args.loader_items, tile)
        build_shards(extracted, processed, dataset_id)
        for workers in args.workers:
            data = recipe.data.model_copy(
                update={
                    "source": "shards",
                    "processed_root": str(processed),
                    "dataset_ids": [dataset_id],
                    "patch_size": args.patch,
                    "num_workers": workers,
                    "persistent_workers": workers > 0,
                    "pin_memory": device.type == "cuda",
                    "prefetch_factor": recipe.data.prefetch_factor if workers > 0 else None,
                }
            )
            config = recipe.model_copy(update={"data": data})
            rate, images = loader_rate(config, args.loader_batch, args.loader_seconds)
            record = {
                "part": "loader",
                "workers": workers,
                "batch": args.loader_batch,
                "patch": args.patch,
                "tile": tile,
                "items": args.loader_items,
                "pinned": device.type == "cuda",
                "images": images,
                "images_per_s": round(rate, 2),
            }
            if best_step:
                record["ratio_to_step"] = round(rate / best_step, 3)
            records.append(emit(record))
    return records


def summarize(steps: list[dict], floors: dict[int, float], loaders: list[dict], recipe: TrainConfig) -> dict:
    best = max(steps, key=lambda record: record["images_per_s"])
    floor = floors.get(best["batch"])
    ratio = best["images_per_s"] / floor if floor else None
    at_recipe = next((r for r in loaders if r["workers"] == recipe.data.num_workers), None)
    best_loader = max(loaders, key=lambda record: record["images_per_s"]) if loaders else None
    loader_ratio = at_recipe["images_per_s"] / best["images_per_s"] if at_recipe else None
    if loader_ratio is not None and loader_ratio < TARGET_LOADER_TO_STEP:
        limit = f"loader ({recipe.data.num_workers} workers deliver {loader_ratio:.2f}x what the step consumes)"
    elif ratio is not None and ratio < TARGET_STEP_TO_FLOOR:
        limit = f"step (losses, k-means, views and optimizer: {ratio:.2f}x the encoder floor)"
    else:
        limit = "encoder (the step is within the target of its floor and the loader keeps up)"
    return emit(
        {
            "part": "summary",
            "best_batch": best["batch"],
            "best_compile": best["compile"],
            "step_images_per_s": best["images_per_s"],
            "floor_images_per_s": round(floor, 2) if floor else None,
            "step_to_floor": round(ratio, 3) if ratio is not None else None,
            "recipe_workers": recipe.data.num_workers,
            "loader_images_per_s_at_recipe_workers": at_recipe["images_per_s"] if at_recipe else None,
            "loader_to_step": round(loader_ratio, 3) if loader_ratio is not None else None,
            "best_loader_workers": best_loader["workers"] if best_loader else None,
            "limit": limit,
            "targets": {"step_to_floor": TARGET_STEP_TO_FLOOR, "loader_to_step": TARGET_LOADER_TO_STEP},
            "met": {
                "step_to_floor": ratio is not None and ratio >= TARGET_STEP_TO_FLOOR,
                "loader_to_step": loader_ratio is not None and loader_ratio >= TARGET_LOADER_TO_STEP,
            },
        }
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--config", default=str(RECIPE), help="the recipe whose model, losses and draws are timed")
    parser.add_argument("--patch", type=int, default=512)
    parser.add_argument("--batches", type=int, nargs="+", default=[2, 8, 32])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    parser.add_argument("--compile", default="both", choices=["off", "on", "both"])
    parser.add_argument("--cudagraphs", action="store_true", help="compiled steps with inductor's CUDA graphs")
    parser.add_argument(
        "--max-batch",
        dest="max_batch",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="search the largest batch that fits (default: on for CUDA)",
    )
    parser.add_argument("--max-batch-cap", type=int, default=1024)
    parser.add_argument("--workers", type=int, nargs="*", default=[0, 4, 8, 16], help="loader workers to time")
    parser.add_argument("--loader-items", type=int, default=192, help="tiles of the loader's temp dataset")
    parser.add_argument("--loader-tile", type=int, default=None, help="their side (default: 1.5x the patch)")
    parser.add_argument("--loader-batch", type=int, default=32)
    parser.add_argument("--loader-seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_config(args.config)
    recipe = recipe.model_copy(update={"data": recipe.data.model_copy(update={"patch_size": args.patch})})
    TrainConfig.model_validate(recipe.model_dump())  # the patch must suit the recipe's downsample factors
    policy = device_policy(args.device, recipe.amp)
    device = policy.device
    if args.cudagraphs:
        import torch._inductor.config as inductor_config

        inductor_config.triton.cudagraphs = True
    emit(
        {
            "part": "setup",
            "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
            "torch": torch.__version__,
            "cpus": os.cpu_count(),
            "config": str(args.config),
            "amp": str(policy.amp_dtype).removeprefix("torch.") if policy.amp else None,
            "cudagraphs": args.cudagraphs,
        }
    )
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    search = device.type == "cuda" if args.max_batch is None else args.max_batch
    if search and device.type != "cuda":
        raise SystemExit("--max-batch needs CUDA (it searches for torch.cuda.OutOfMemoryError)")

    floors: dict[int, float] = {}
    steps: list[dict] = []
    batches = sorted(set(args.batches))
    for compiled in modes:
        if compiled:  # after the eager figures: compiling keeps the host's cores busy for a while
            check_compiled(recipe, policy, min(args.patch, 256))
        trainer = Trainer(recipe.model_copy(update={"compile": compiled}), policy)
        for batch in batches:
            steps += measure_or_report(trainer, batch, args, floors)
        if search and not compiled:
            largest, probes = largest_batch(trainer, batches[-1], args.patch, args.max_batch_cap)
            emit({"part": "max_batch", "batch": largest, "patch": args.patch, "probes": probes})
            if largest not in batches:
                batches.append(largest)
                steps += measure_or_report(trainer, largest, args, floors)
        trainer.release()

    best_step = max(record["images_per_s"] for record in steps)
    loaders = measure_loader(args, recipe, device, best_step) if args.workers else []
    summarize(steps, floors, loaders, recipe)
    return 0


if __name__ == "__main__":
    sys.exit(main())
