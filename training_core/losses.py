"""Unsupervised losses on the model's stride-4 cluster probabilities.

Every term is a mean over pixels (and entropies are divided by log K), so its scale depends neither
on the patch size nor on the K drawn for the step. Targets never reach this module.

- consistency: symmetric KL between view 1 and view 2 warped into view 1's frame (same ground);
- pixel entropy (minimised): each pixel should commit to one cluster;
- marginal entropy (maximised, so it enters negated): the batch should use all K clusters; the
  cluster masses are summed over every DDP rank before the entropy is taken;
- edge-aware smoothness: neighbouring pixels agree unless the input colour changes between them;
- cross-view mutual information (maximised, so it enters negated; IIC): the seed head's clustering of
  a cell should be predictable from the other view's, over the whole batch. Unlike the per-image soft
  k-means terms it ties cluster ids across images, and uniform assignments are its minimum (0), which
  training moves away from, not a resting point it is drawn into.

Pixels outside the data (padding of small rasters, nodata) carry weight 0 in every term.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from training_core.config import LossConfig
from training_core.data.views import TwoViews, warp

EPS = 1e-8
AllReduce = Callable[[torch.Tensor], torch.Tensor]


def _mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of per-pixel ``values`` [B, h, w], weighted by ``weight`` [B, 1, h, w] (None = plain mean)."""
    if weight is None:
        return values.mean()
    weight = weight.squeeze(1)
    return (values * weight).sum() / weight.sum().clamp_min(EPS)


def symmetric_kl(p: torch.Tensor, q: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel mean of ``(KL(p||q) + KL(q||p)) / 2`` for probabilities [B, K, h, w] over dim 1."""
    log_ratio = torch.log(p.clamp_min(EPS)) - torch.log(q.clamp_min(EPS))
    return _mean(0.5 * ((p - q) * log_ratio).sum(dim=1), weight)


def cross_view_mutual_information(
    z1: torch.Tensor, z2: torch.Tensor, all_reduce: AllReduce | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mutual information (units of log K) between the cluster of a cell in view 1 and in view 2 (IIC).

    ``z1``/``z2`` [B, K, h, w]: probabilities of the same ground (view 2 already warped into view 1's
    frame). The joint distribution is pooled over every cell of the global batch (summed over DDP ranks
    by ``all_reduce``) and symmetrised, so the term rewards a clustering that agrees across the views,
    is confident, and uses every cluster over the whole batch, not per image. ``weight`` [B, 1, h, w]
    scales each cell's count.
    """
    if weight is not None:
        z1 = z1 * weight
    joint = torch.einsum("bihw,bjhw->ij", z1, z2)
    if all_reduce is not None:
        joint = all_reduce(joint)
    joint = 0.5 * (joint + joint.T)
    joint = (joint / joint.sum().clamp_min(EPS)).clamp_min(EPS)
    marginal = joint.sum(dim=1)
    mi = (joint * (torch.log(joint) - torch.log(marginal[:, None]) - torch.log(marginal[None, :]))).sum()
    return mi / math.log(z1.shape[1])


def pixel_entropy(p: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Per-pixel mean entropy of [B, K, h, w] probabilities, in units of log K (0..1)."""
    entropy = -(p * torch.log(p.clamp_min(EPS))).sum(dim=1)
    return _mean(entropy, weight) / math.log(p.shape[1])


def marginal_entropy(
    p: torch.Tensor, all_reduce: AllReduce | None = None, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy (units of log K) of the mean cluster distribution over every pixel of the global batch.

    ``all_reduce`` sums a tensor over DDP ranks (differentiably) so all ranks see the same marginal.
    """
    mass = p.sum(dim=(0, 2, 3)) if weight is None else (p * weight).sum(dim=(0, 2, 3))
    if all_reduce is not None:
        mass = all_reduce(mass)
    # Normalising by the total mass (= the pixel count when rows sum to 1) keeps the marginal a
    # distribution even when low-precision smoothing leaves rows a hair off 1.
    marginal = mass / mass.sum().clamp_min(EPS)
    return -(marginal * torch.log(marginal.clamp_min(EPS))).sum() / math.log(p.shape[1])


def edge_aware_smoothness(
    p: torch.Tensor, image: torch.Tensor, sharpness: float, weight: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over neighbour pairs of ``exp(-sharpness * colour step) * total-variation distance``.

    ``image`` [B, 3, h, w] is the input at the resolution of ``p`` (average-pooled to stride 4); a pair
    counts with the product of its two pixels' ``weight``.
    """
    terms = []
    for dim in (2, 3):
        n = p.shape[dim] - 1
        prob_step = 0.5 * (p.narrow(dim, 1, n) - p.narrow(dim, 0, n)).abs().sum(dim=1)
        colour_step = (image.narrow(dim, 1, n) - image.narrow(dim, 0, n)).abs().mean(dim=1)
        pair_weight = None if weight is None else weight.narrow(dim, 1, n) * weight.narrow(dim, 0, n)
        terms.append(_mean(torch.exp(-sharpness * colour_step) * prob_step, pair_weight))
    return 0.5 * (terms[0] + terms[1])


def two_view_losses(
    probs1: torch.Tensor,
    probs2: torch.Tensor,
    views: TwoViews,
    weights: LossConfig,
    all_reduce: AllReduce | None = None,
    seeds1: torch.Tensor | None = None,
    seeds2: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """All loss parts and their weighted ``total`` for one batch of two views.

    ``probs1``/``probs2``: stride-4 probabilities [B, K, h, w] of ``views.view1`` / ``views.view2``.
    View 2 is warped into view 1's frame by the grid at (h, w). The edge weights come from the clean
    input pooled to (h, w); pixels are weighted by their valid fraction (padding and nodata count 0).
    ``seeds1``/``seeds2``: the seed head's logits [B, K, h, w] of the same views, for the cross-view
    mutual information (None, or weight 0: that part is 0 and not computed).
    """
    probs1, probs2 = probs1.float(), probs2.float()
    size = probs1.shape[-1]
    image1, image2, valid1, valid2 = views.low_res(size)
    grid = views.grid(size)
    both = torch.cat([probs1, probs2])
    valid_both = None if valid1 is None else torch.cat([valid1, valid2])
    consistency_weight = None if valid1 is None else valid1 * warp(valid2, grid)
    if seeds1 is None or weights.cross_view_mi == 0:
        mutual_information = probs1.new_zeros(())
    else:
        z1, z2 = torch.softmax(seeds1.float(), dim=1), torch.softmax(seeds2.float(), dim=1)
        mutual_information = cross_view_mutual_information(z1, warp(z2, grid), all_reduce, consistency_weight)
    parts = {
        "consistency": symmetric_kl(probs1, warp(probs2, grid), consistency_weight),
        "pixel_entropy": pixel_entropy(both, valid_both),
        "marginal_entropy": marginal_entropy(both, all_reduce, valid_both),
        "smoothness": 0.5
        * (
            edge_aware_smoothness(probs1, image1.float(), weights.edge_sharpness, valid1)
            + edge_aware_smoothness(probs2, image2.float(), weights.edge_sharpness, valid2)
        ),
        "cross_view_mi": mutual_information,
    }
    parts["total"] = (
        weights.consistency * parts["consistency"]
        - weights.cross_view_mi * parts["cross_view_mi"]
        + weights.pixel_entropy * parts["pixel_entropy"]
        - weights.marginal_entropy * parts["marginal_entropy"]
        + weights.smoothness * parts["smoothness"]
    )
    return parts
