"""Benchmark one training step on the CPU against the encoder alone; prints one JSON line.

Setup (issue 3): 512x512 patches, batch 2, both views (4 images through the model), embed 96, 4 soft
k-means rounds, fast smoothing with 2 rounds. ``step_s[K]`` is forward + backward + optimizer step
with every loss at K = 4, 8, 16; ``encoder_s`` is forward + backward of the encoder alone on the same
4 images, both in the memory format training uses (``DevicePolicy.memory_format``). Each figure is the
minimum over ``--repeats`` runs, interleaved (encoder, K=4, K=8, K=16, encoder, ...) so that load from
other processes hits all figures alike.
Targets: ``ratio[K] = step_s[K] / encoder_s <= 1.5`` and ``peak_rss_mb <= 1536``.

    python bench/train_step.py [--repeats 5] [--threads N] [--device cpu]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time

import torch

from training_core.config import ModelConfig, TrainConfig
from training_core.data.synthetic import synthetic_tile
from training_core.device import device_policy
from training_core.model import SegmentationModel
from training_core.train import StepPlan, step_losses, view_generator

KS = (4, 8, 16)
PATCH = 512
BATCH = 2
CLUSTER_ITERS = 4


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = TrainConfig(model=ModelConfig(embed_dim=96, smoothing="fast", smooth_iters=2))
    policy = device_policy(args.device, False)
    device = policy.device
    torch.manual_seed(0)
    model = SegmentationModel(config.model).to(device, memory_format=policy.memory_format).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    tiles = [torch.from_numpy(synthetic_tile(0, i, PATCH)[0]) for i in range(BATCH)]
    images = torch.stack(tiles).float().div(255).to(device)
    both_views = torch.cat([images, images.flip(-1)]).contiguous(memory_format=policy.memory_format)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def encoder_step() -> None:
        model.encoder(both_views).sum().backward()
        model.zero_grad(set_to_none=True)

    def train_step(k: int) -> None:
        plan = StepPlan(k=k, cluster_iters=CLUSTER_ITERS, downsample=1)
        parts = step_losses(model, images, plan, config, view_generator(0, k, 0, 0, device), policy)
        parts["total"].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runs = {"encoder": encoder_step, **{k: (lambda k=k: train_step(k)) for k in KS}}
    wall: dict[object, list[float]] = {name: [] for name in runs}
    cpu: dict[object, list[float]] = {name: [] for name in runs}
    for run in runs.values():  # warm-up: allocator, oneDNN primitive caches
        run()
    for _ in range(args.repeats):
        for name, run in runs.items():
            sync()
            started_wall, started_cpu = time.perf_counter(), time.process_time()
            run()
            sync()
            wall[name].append(time.perf_counter() - started_wall)
            cpu[name].append(time.process_time() - started_cpu)

    encoder_s = min(wall["encoder"])
    step_s = {str(k): round(min(wall[k]), 4) for k in KS}
    # CPU seconds of this process: a second opinion when other processes load the machine.
    encoder_cpu_s = min(cpu["encoder"])
    step_cpu_s = {str(k): round(min(cpu[k]), 4) for k in KS}
    print(
        json.dumps(
            {
                "bench": "train_step",
                "device": str(device),
                "cpu": platform.processor() or platform.machine(),
                "threads": torch.get_num_threads(),
                "patch": PATCH,
                "batch": BATCH,
                "views": 2,
                "embed_dim": 96,
                "cluster_iters": CLUSTER_ITERS,
                "smoothing": "fast",
                "smooth_iters": 2,
                "repeats": args.repeats,
                "step_s": step_s,
                "encoder_s": round(encoder_s, 4),
                "ratio": {k: round(v / encoder_s, 3) for k, v in step_s.items()},
                "step_cpu_s": step_cpu_s,
                "encoder_cpu_s": round(encoder_cpu_s, 4),
                "cpu_ratio": {k: round(v / encoder_cpu_s, 3) for k, v in step_cpu_s.items()},
                "load_avg_1m": round(os.getloadavg()[0], 2),
                "peak_rss_mb": round(_peak_rss_mb(), 1),
                "targets": {"ratio_max": 1.5, "peak_rss_mb_max": 1536},
            }
        )
    )


if __name__ == "__main__":
    main()
