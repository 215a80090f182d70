"""``compile: true``: the training step through torch.compile (inductor) trains, checkpoints the same weights
layout, and computes the eager step's values to float round-off. On the CPU this needs inductor's C++
toolchain; without one the test skips, saying so. Compiling takes about a minute on 2 cores."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from training_core.checkpoint import load_checkpoint
from training_core.config import AugmentConfig, DataConfig, ModelConfig, TrainConfig
from training_core.data.views import make_views
from training_core.losses import compiled_loss_parts, loss_parts
from training_core.train import RESUMABLE_FIELDS, config_differences, train


def _inductor_unavailable() -> str | None:
    """Why torch.compile's default backend cannot run here (None: it can)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError as error:  # pragma: no cover - a torch build without inductor
        return f"torch._inductor does not import: {error}"
    try:
        compiler = get_cpp_compiler()
    except Exception as error:  # noqa: BLE001 - whatever inductor's own lookup raises, it cannot compile
        return f"inductor finds no C++ compiler ({error}); its CPU backend needs one (apt-get install g++)"
    if shutil.which(compiler) is None:
        return f"inductor's C++ compiler {compiler!r} is not on PATH (apt-get install g++)"
    return None


pytestmark = [
    pytest.mark.skipif(_inductor_unavailable() is not None, reason=_inductor_unavailable() or ""),
    pytest.mark.usefixtures("one_torch_thread"),
]


def _config(**overrides: object) -> TrainConfig:
    fields = {
        # One K, one resolution: the fewest graphs to compile, so the test stays near a minute.
        "model": ModelConfig(embed_dim=8, max_k=3),
        "data": DataConfig(source="synthetic", patch_size=32, synthetic_items=4, downsample=[1]),
        "k_min": 3,
        "steps": 2,
        "batch_size": 2,
        "device": "cpu",
        "checkpoint_every": 2,
        "lr": 1e-3,
    }
    return TrainConfig(**(fields | overrides))


def test_compiled_step_trains_like_the_eager_one(tmp_path: Path) -> None:
    eager = train(_config(), tmp_path / "eager", resume=False)
    compiled = train(_config(compile=True), tmp_path / "compiled", resume=False)
    assert compiled.steps == 2 and not compiled.interrupted
    for name, value in eager.final_losses.items():
        assert compiled.final_losses[name] == pytest.approx(value, rel=1e-3, abs=1e-5), name
    a, b = load_checkpoint(eager.checkpoint_path), load_checkpoint(compiled.checkpoint_path)
    assert a["model"].keys() == b["model"].keys()  # no `_orig_mod.` prefixes: eval, export and resume load it as is
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-3, atol=1e-5, msg=name)
    assert b["config"]["compile"] is True


@pytest.mark.parametrize("masked", [False, True])
def test_compiled_losses_give_the_eager_values_and_gradients(masked: bool) -> None:
    """Every term at once, the seed head's mutual information included, with and without a valid mask.
    Unmasked is where separate warps of one grid got inductor (torch 2.13, CPU) a wrong consistency gradient."""
    generator = torch.Generator().manual_seed(0)
    b, k, h = 2, 3, 8
    images = torch.rand(b, 3, 4 * h, 4 * h, generator=generator)
    valid = torch.rand(b, 4 * h, 4 * h, generator=generator) > 0.3 if masked else None
    views = make_views(images, AugmentConfig(), torch.Generator().manual_seed(1), valid)
    image1, image2, valid1, valid2 = views.low_res(h)
    grid = views.grid(h)
    probs = [torch.softmax(torch.randn(b, k, h, h, generator=generator), dim=1) for _ in range(2)]
    seeds = [torch.randn(b, k, h, h, generator=generator) for _ in range(2)]

    def values_and_gradients(parts_of: object, **log_k: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        leaves = [tensor.clone().requires_grad_() for tensor in (*probs, *seeds)]
        p1, p2, s1, s2 = leaves
        parts = parts_of(p1, p2, image1, image2, valid1, valid2, grid, s1, s2, 10.0, **log_k)
        values = torch.stack(list(parts.values()))
        # Distinct weights, so a gradient swapped between two terms shows.
        return values, list(torch.autograd.grad((values * torch.arange(1.0, 6.0)).sum(), leaves))

    want_values, want_grads = values_and_gradients(loss_parts)
    got_values, got_grads = values_and_gradients(compiled_loss_parts(), log_k=torch.full((), math.log(k)))
    torch.testing.assert_close(got_values, want_values, rtol=1e-5, atol=1e-6)
    for got, want in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-4 * want.abs().max().item())


def test_compile_is_a_resumable_knob() -> None:
    """A training may move between the eager and the compiled step (e.g. CPU to GPU): same run, same folder."""
    assert "compile" in RESUMABLE_FIELDS
    saved = _config().model_dump(mode="json")
    del saved["compile"]  # a checkpoint written before the field existed
    assert config_differences(saved, _config(compile=True)) == {}
