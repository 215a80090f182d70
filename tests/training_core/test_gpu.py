"""On a CUDA GPU (skipped elsewhere; docs/GPU.md runs them with bench/gpu_check.sh): the step's device paths,
and that a resumed CUDA training continues the same run. CUDA is not bitwise reproducible (atomics in the
warp's backward, cuDNN's algorithm choice, a compiled step's fresh graphs after a resume), so "the same run"
means the same draws and data exactly, and weights that agree far more closely than training moves them."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from training_core.checkpoint import load_checkpoint
from training_core.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from training_core.data import views
from training_core.data.views import dihedral, make_views, warp, warp_grid
from training_core.model import SegmentationModel
from training_core.train import train, view_generator

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (docs/GPU.md)")
CUDA = torch.device("cuda")
PAIRS = list(itertools.product(range(8), range(8)))


def test_batched_transforms_and_grids_on_cuda_are_exact() -> None:
    x = (torch.randint(0, 256, (len(PAIRS), 3, 20, 20)) / 256).to(CUDA)
    codes1, codes2 = [c1 for c1, _ in PAIRS], [c2 for _, c2 in PAIRS]
    view1 = views._transform(x, codes1)
    assert torch.equal(view1.cpu(), views._transform(x.cpu(), codes1))
    for size in (20, 5):  # full resolution and stride 4
        pooled = torch.nn.functional.avg_pool2d(x, 20 // size)
        grid = warp_grid(codes1, codes2, size, CUDA)
        assert torch.equal(warp(views._transform(pooled, codes2), grid), views._transform(pooled, codes1))


def test_views_are_drawn_on_cuda_without_a_device_sync() -> None:
    """The transforms are drawn on the host and the batch moved by gathers: the step never waits here."""
    images = torch.rand(8, 3, 64, 64, device=CUDA)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        noisy = make_views(images, AugmentConfig(), view_generator(0, 0, 0, 0, CUDA))
        noisy.low_res(16)
        noisy.grid(16)
        clean = make_views(images, AugmentConfig(noise_std=0.0), view_generator(0, 0, 0, 0, CUDA))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert clean.codes1 == noisy.codes1 and clean.codes2 == noisy.codes2  # drawn from the generator's seed
    for i, code in enumerate(clean.codes1):
        assert torch.equal(clean.view1[i], dihedral(images[i], code))


@pytest.mark.parametrize("compile_step", [False, True])
def test_a_resumed_cuda_training_continues_the_same_run(tmp_path: Path, compile_step: bool) -> None:
    config = TrainConfig(
        model=ModelConfig(embed_dim=16, max_k=6),
        data=DataConfig(source="synthetic", patch_size=64, synthetic_items=16),
        steps=8,
        batch_size=4,
        lr=3e-3,
        device="cuda",
        compile=compile_step,
        checkpoint_every=4,
    )
    straight = train(config, tmp_path / "straight", resume=False)
    train(config, tmp_path / "resumed", resume=False, stop_after_steps=4)
    resumed = train(config, tmp_path / "resumed", resume=True)
    assert (straight.steps, resumed.steps, resumed.amp) == (8, 8, True)

    def rows(result: object) -> list[dict]:
        return [json.loads(line) for line in Path(result.log_path).read_text().splitlines()]

    def draws(result: object) -> list[tuple]:
        return [(row["step"], row["k"], row["cluster_iters"], row["downsample"]) for row in rows(result)]

    assert draws(resumed) == draws(straight)  # K, rounds and downsample come from (seed, step) alone
    for a, b in zip(rows(straight), rows(resumed), strict=True):
        assert b["total"] == pytest.approx(a["total"], rel=0.05, abs=0.02), a["step"]

    torch.manual_seed(config.seed)
    initial = SegmentationModel(config.model).state_dict()
    a, b = load_checkpoint(straight.checkpoint_path)["model"], load_checkpoint(resumed.checkpoint_path)["model"]
    for name, start in initial.items():
        if not start.is_floating_point():
            continue
        moved = (a[name].cpu() - start).norm()
        if moved > 0:  # the resumed weights differ from the straight ones far less than training moved them
            assert (b[name].cpu() - a[name].cpu()).norm() < 0.1 * moved, name
