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

import functools
import math
from collections.abc import Callable

import torch

from training_core.config import LossConfig
from training_core.data.views import TwoViews, warp

EPS = 1e-8
AllReduce = Callable[[torch.Tensor], torch.Tensor]
# The entropies' unit: None = log K taken from the tensor's K (a Python float, the eager reference); a 0-dim
# tensor holding log K is what the compiled parts get, so that K is not a constant of the compiled graph.
LogK = torch.Tensor | None


def _unit(k: int, log_k: LogK) -> float | torch.Tensor:
    """log K, the entropies' unit: ``log_k`` when given (compiled), else from K."""
    return math.log(k) if log_k is None else log_k


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
    z1: torch.Tensor,
    z2: torch.Tensor,
    all_reduce: AllReduce | None = None,
    weight: torch.Tensor | None = None,
    log_k: LogK = None,
) -> torch.Tensor:
    """Mutual information (units of log K) between the cluster of a cell in view 1 and in view 2 (IIC).

    ``z1``/``z2`` [B, K, h, w]: probabilities of the same ground (view 2 already warped into view 1's
    frame). The joint distribution is pooled over every cell of the global batch (summed over DDP ranks
    by ``all_reduce``) and symmetrised, so the term rewards a clustering that agrees across the views,
    is confident, and uses every cluster over the whole batch, not per image. ``weight`` [B, 1, h, w]
    scales each cell's count. ``log_k``: see ``LogK``.
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
    return mi / _unit(z1.shape[1], log_k)


def pixel_entropy(p: torch.Tensor, weight: torch.Tensor | None = None, log_k: LogK = None) -> torch.Tensor:
    """Per-pixel mean entropy of [B, K, h, w] probabilities, in units of log K (0..1)."""
    entropy = -(p * torch.log(p.clamp_min(EPS))).sum(dim=1)
    return _mean(entropy, weight) / _unit(p.shape[1], log_k)


def marginal_entropy(
    p: torch.Tensor, all_reduce: AllReduce | None = None, weight: torch.Tensor | None = None, log_k: LogK = None
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
    return -(marginal * torch.log(marginal.clamp_min(EPS))).sum() / _unit(p.shape[1], log_k)


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


def loss_parts(
    probs1: torch.Tensor,
    probs2: torch.Tensor,
    image1: torch.Tensor,
    image2: torch.Tensor,
    valid1: torch.Tensor | None,
    valid2: torch.Tensor | None,
    grid: torch.Tensor,
    seeds1: torch.Tensor | None,
    seeds2: torch.Tensor | None,
    edge_sharpness: float,
    all_reduce: AllReduce | None = None,
    log_k: LogK = None,
) -> dict[str, torch.Tensor]:
    """The loss parts of ``two_view_losses`` (without ``total``) from tensors alone: the views' low-resolution
    inputs and valid masks and the warp grid already built (no Python per sample), which is what makes this
    function compilable as one graph. ``seeds1`` None: the mutual information is 0 and not computed."""
    probs1, probs2 = probs1.float(), probs2.float()
    both = torch.cat([probs1, probs2])
    valid_both = None if valid1 is None else torch.cat([valid1, valid2])
    z1 = z2 = None
    if seeds1 is not None:
        z1, z2 = torch.softmax(seeds1.float(), dim=1), torch.softmax(seeds2.float(), dim=1)
    # View 2's probabilities, seed-head probabilities and valid mask go into view 1's frame in one gather, whose
    # backward is one scatter: fewer kernels, and inductor (torch 2.13, CPU) gets the gradient wrong when
    # separate warps share the grid beside the smoothness term (tests/training_core/test_compile.py).
    moving = [tensor for tensor in (probs2, z2, valid2) if tensor is not None]
    if len(moving) == 1:
        warped = [warp(probs2, grid)]
    else:
        warped = list(warp(torch.cat(moving, dim=1), grid).split([tensor.shape[1] for tensor in moving], dim=1))
    probs2_warped = warped.pop(0)
    z2_warped = None if z2 is None else warped.pop(0)
    consistency_weight = None if valid1 is None else valid1 * warped.pop(0)
    if z1 is None:
        mutual_information = probs1.new_zeros(())
    else:
        mutual_information = cross_view_mutual_information(z1, z2_warped, all_reduce, consistency_weight, log_k)
    return {
        "consistency": symmetric_kl(probs1, probs2_warped, consistency_weight),
        "pixel_entropy": pixel_entropy(both, valid_both, log_k),
        "marginal_entropy": marginal_entropy(both, all_reduce, valid_both, log_k),
        "smoothness": 0.5
        * (
            edge_aware_smoothness(probs1, image1.float(), edge_sharpness, valid1)
            + edge_aware_smoothness(probs2, image2.float(), edge_sharpness, valid2)
        ),
        "cross_view_mi": mutual_information,
    }


@functools.cache
def compiled_loss_parts() -> Callable[..., dict[str, torch.Tensor]]:
    """``loss_parts`` through ``torch.compile`` (built once per process). Sizes are dynamic from the first call,
    since K and the resolution change from step to step; each variant of the optional inputs (valid mask,
    seed logits) compiles once."""
    return torch.compile(loss_parts, dynamic=True)


def two_view_losses(
    probs1: torch.Tensor,
    probs2: torch.Tensor,
    views: TwoViews,
    weights: LossConfig,
    all_reduce: AllReduce | None = None,
    seeds1: torch.Tensor | None = None,
    seeds2: torch.Tensor | None = None,
    compiled: bool = False,
) -> dict[str, torch.Tensor]:
    """All loss parts and their weighted ``total`` for one batch of two views.

    ``probs1``/``probs2``: stride-4 probabilities [B, K, h, w] of ``views.view1`` / ``views.view2``.
    View 2 is warped into view 1's frame by the grid at (h, w). The edge weights come from the clean
    input pooled to (h, w); pixels are weighted by their valid fraction (padding and nodata count 0).
    ``seeds1``/``seeds2``: the seed head's logits [B, K, h, w] of the same views, for the cross-view
    mutual information (None, or weight 0: that part is 0 and not computed).
    ``compiled``: run the parts through ``torch.compile`` (``compiled_loss_parts``: the elementwise terms
    fused into a few kernels; float round-off of the same values). Ignored with ``all_reduce`` (DDP), whose
    collectives stay eager.
    """
    size = probs1.shape[-1]
    image1, image2, valid1, valid2 = views.low_res(size)
    grid = views.grid(size)
    if seeds1 is None or weights.cross_view_mi == 0:
        seeds1 = seeds2 = None
    inputs = (probs1, probs2, image1, image2, valid1, valid2, grid, seeds1, seeds2, weights.edge_sharpness)
    if compiled and all_reduce is None:
        # log K as a tensor: a Python float would be a constant of the graph, recompiled for every K.
        log_k = torch.full((), math.log(probs1.shape[1]), device=probs1.device)
        parts = compiled_loss_parts()(*inputs, log_k=log_k)
    else:
        parts = loss_parts(*inputs, all_reduce)
    parts["total"] = (
        weights.consistency * parts["consistency"]
        - weights.cross_view_mi * parts["cross_view_mi"]
        + weights.pixel_entropy * parts["pixel_entropy"]
        - weights.marginal_entropy * parts["marginal_entropy"]
        + weights.smoothness * parts["smoothness"]
    )
    return parts
