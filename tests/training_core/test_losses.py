"""Loss parts: bounds, per-pixel scale, view alignment, DDP reduction hook, edge awareness."""

from __future__ import annotations

import math

import pytest
import torch

from training_core.config import LossConfig
from training_core.data.views import TwoViews, dihedral
from training_core.losses import (
    cross_view_mutual_information,
    edge_aware_smoothness,
    marginal_entropy,
    pixel_entropy,
    symmetric_kl,
    two_view_losses,
)


def _random_probs(b: int, k: int, size: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.softmax(3 * torch.randn(b, k, size, size, generator=generator), dim=1)


def test_symmetric_kl_is_zero_on_equal_and_symmetric() -> None:
    p, q = _random_probs(2, 5, 8, 0), _random_probs(2, 5, 8, 1)
    assert symmetric_kl(p, p).item() == pytest.approx(0.0, abs=1e-7)
    assert symmetric_kl(p, q).item() > 0
    assert symmetric_kl(p, q).item() == pytest.approx(symmetric_kl(q, p).item(), rel=1e-6)


def test_entropies_are_in_units_of_log_k() -> None:
    k = 6
    uniform = torch.full((2, k, 4, 4), 1.0 / k)
    one_hot = torch.nn.functional.one_hot(torch.arange(16).view(1, 4, 4) % k, k).permute(0, 3, 1, 2).float()
    assert pixel_entropy(uniform).item() == pytest.approx(1.0, rel=1e-5)
    assert pixel_entropy(one_hot).item() == pytest.approx(0.0, abs=1e-6)
    assert marginal_entropy(one_hot[:, :, :3, :2]).item() == pytest.approx(1.0, rel=1e-5)
    collapsed = torch.zeros(1, k, 4, 4)
    collapsed[:, 2] = 1
    assert marginal_entropy(collapsed).item() == pytest.approx(0.0, abs=1e-6)


def test_losses_do_not_scale_with_patch_size() -> None:
    p, q = _random_probs(2, 4, 8, 0), _random_probs(2, 4, 8, 1)
    big_p, big_q = (t.repeat_interleave(3, dim=2).repeat_interleave(3, dim=3) for t in (p, q))
    assert symmetric_kl(big_p, big_q).item() == pytest.approx(symmetric_kl(p, q).item(), rel=1e-5)
    assert pixel_entropy(big_p).item() == pytest.approx(pixel_entropy(p).item(), rel=1e-5)
    assert marginal_entropy(big_p).item() == pytest.approx(marginal_entropy(p).item(), rel=1e-5)


def test_marginal_sums_batch_statistics_through_all_reduce() -> None:
    """Two 'ranks' holding halves of a batch see the entropy of the whole batch."""
    full = _random_probs(4, 3, 6)
    halves = full[:2], full[2:]

    def add_other_rank(mass: torch.Tensor) -> torch.Tensor:
        return mass + halves[1].sum(dim=(0, 2, 3))

    reduced = marginal_entropy(halves[0], all_reduce=add_other_rank)
    assert reduced.item() == pytest.approx(marginal_entropy(full).item(), rel=1e-6)
    assert reduced.item() != pytest.approx(marginal_entropy(halves[0]).item(), rel=1e-6)


def test_smoothness_is_cheaper_across_colour_edges() -> None:
    split = torch.zeros(1, 2, 8, 8)
    split[:, 0, :, :4] = 1
    split[:, 1, :, 4:] = 1
    flat = torch.full((1, 3, 8, 8), 0.5)
    edged = flat.clone()
    edged[:, :, :, 4:] = 0.9
    assert edge_aware_smoothness(split, edged, 10.0) < edge_aware_smoothness(split, flat, 10.0)
    assert edge_aware_smoothness(torch.full((1, 2, 8, 8), 0.5), flat, 10.0).item() == 0.0


def _aligned_views(probs: torch.Tensor, images: torch.Tensor, valid: torch.Tensor | None) -> tuple:
    """Probabilities and views of one scene under 8 different transform pairs (perfectly consistent)."""
    codes1, codes2 = list(range(8)), [(c + 3) % 8 for c in range(8)]
    probs1 = torch.stack([dihedral(p, c) for p, c in zip(probs, codes1, strict=True)])
    probs2 = torch.stack([dihedral(p, c) for p, c in zip(probs, codes2, strict=True)])
    views = TwoViews(
        view1=torch.stack([dihedral(x, c) for x, c in zip(images, codes1, strict=True)]),
        view2=torch.stack([dihedral(x, c) for x, c in zip(images, codes2, strict=True)]),
        codes1=codes1,
        codes2=codes2,
        clean=images,
        valid=valid,
    )
    return probs1, probs2, views


def test_aligned_views_have_zero_consistency_and_the_total_combines_parts() -> None:
    probs = _random_probs(8, 4, 8)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    probs1, probs2, views = _aligned_views(probs, images, None)
    weights = LossConfig()
    parts = two_view_losses(probs1, probs2, views, weights)
    assert parts["consistency"].item() == pytest.approx(0.0, abs=1e-7)
    expected = (
        weights.consistency * parts["consistency"]
        + weights.pixel_entropy * parts["pixel_entropy"]
        - weights.marginal_entropy * parts["marginal_entropy"]
        + weights.smoothness * parts["smoothness"]
        - weights.cross_view_mi * parts["cross_view_mi"]
    )
    assert parts["total"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert all(math.isfinite(v.item()) for v in parts.values())


def test_cross_view_mutual_information_is_one_for_agreeing_balanced_clusters_and_zero_for_independent() -> None:
    k = 4
    cells = torch.arange(64).view(1, 8, 8)
    one_hot = torch.nn.functional.one_hot(cells % k, k).permute(0, 3, 1, 2).float()
    assert cross_view_mutual_information(one_hot, one_hot).item() == pytest.approx(1.0, rel=1e-4)
    # View 2's cluster says nothing about view 1's: each view-1 cluster meets every view-2 cluster equally.
    independent = torch.nn.functional.one_hot(cells // k % k, k).permute(0, 3, 1, 2).float()
    assert cross_view_mutual_information(one_hot, independent).item() == pytest.approx(0.0, abs=1e-4)
    uniform = torch.full_like(one_hot, 1.0 / k)
    assert cross_view_mutual_information(uniform, uniform).item() == pytest.approx(0.0, abs=1e-6)
    # Agreeing but collapsed into one cluster: no information either.
    collapsed = torch.zeros_like(one_hot)
    collapsed[:, 0] = 1
    assert cross_view_mutual_information(collapsed, collapsed).item() == pytest.approx(0.0, abs=1e-4)


def test_cross_view_mutual_information_pools_the_joint_over_ranks() -> None:
    z1 = _random_probs(4, 3, 6, 0)
    z2 = 0.7 * z1 + 0.3 * _random_probs(4, 3, 6, 1)  # views that mostly agree

    def add_other_rank(joint: torch.Tensor) -> torch.Tensor:
        return joint + torch.einsum("bihw,bjhw->ij", z1[2:], z2[2:])

    reduced = cross_view_mutual_information(z1[:2], z2[:2], all_reduce=add_other_rank)
    assert reduced.item() == pytest.approx(cross_view_mutual_information(z1, z2).item(), rel=1e-5)


def test_cross_view_mutual_information_enters_the_total_when_weighted() -> None:
    """Seed logits that agree across the views raise the information; the total falls by weight x MI."""
    probs = _random_probs(8, 4, 8)
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    probs1, probs2, views = _aligned_views(probs, images, None)
    seeds1, seeds2 = 10 * probs1, 10 * probs2  # logits of the same (aligned) clustering
    off = two_view_losses(probs1, probs2, views, LossConfig(cross_view_mi=0.0), None, seeds1, seeds2)
    weights = LossConfig(cross_view_mi=2.0)
    on = two_view_losses(probs1, probs2, views, weights, None, seeds1, seeds2)
    assert off["cross_view_mi"].item() == 0.0  # weight 0: not computed
    assert on["cross_view_mi"].item() > 0.1
    assert on["total"].item() == pytest.approx(off["total"].item() - 2.0 * on["cross_view_mi"].item(), rel=1e-5)


def test_invalid_pixels_do_not_count() -> None:
    """Whatever the model predicts on padding / nodata (right half invalid) leaves every loss unchanged."""
    images = torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    valid = torch.ones(8, 1, 32, 32)
    valid[..., 16:] = 0
    probs = _random_probs(8, 4, 8, seed=4)
    other = probs.clone()
    other[..., 4:] = _random_probs(8, 4, 8, seed=5)[..., 4:]
    base = two_view_losses(*_aligned_views(probs, images, valid), LossConfig())
    changed = two_view_losses(*_aligned_views(other, images, valid), LossConfig())
    for name, value in base.items():
        assert changed[name].item() == pytest.approx(value.item(), rel=1e-6, abs=1e-7), name
    unmasked = two_view_losses(*_aligned_views(other, images, None), LossConfig())
    assert unmasked["total"].item() != pytest.approx(base["total"].item(), rel=1e-4)
