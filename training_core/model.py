"""The segmentation model: stride-4 CNN encoder + soft k-means over its embeddings.

The forward pass is the contract the numpy runtime (``runtime_export.numpy_runtime.runtime``) reproduces:

1. normalise RGB in [0, 1] with the model's mean/std;
2. encode at stride 4 (two stride-2 conv+BN+ReLU, two residual blocks) and L2-normalise;
3. optionally append the input colour, average-pooled to stride 4, in the opponent basis
   (``OPPONENT_BASIS``: luminance, red-green, yellow-blue) with the luminance scaled by
   ``luminance_weight`` and both chroma channels by ``chroma_weight`` (the cue k-means on RGB uses,
   its chroma weighted above its brightness; see docs/MODEL_NOTES.md); in training mode only when
   ``colour_in_training``, so by default the losses cluster the encoder features alone;
4. seed K prototypes from a 1x1 projection (softmax over its first K channels);
5. soft k-means: ``iters`` rounds of assignment ``softmax(-||e - p||^2 / temperature)`` and
   prototype update (weighted means);
6. smooth the stride-4 assignment with a normalised 3x3 kernel (fixed box or learned);
7. upsample the probabilities bilinearly to the input size.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from runtime_export.numpy_runtime.runtime import check_k_range
from training_core.config import STRIDE, ModelConfig

NORM_EPS = 1e-12  # F.normalize's default eps
MIN_MASS = 1e-6  # floor of a cluster's total assignment in the prototype means
# Orthonormal rows: luminance, red-green, yellow-blue. A rotation of RGB, so equal weights on the three
# channels give the same distances as RGB at that weight; the runtime holds the same matrix.
OPPONENT_BASIS = (
    (3**-0.5, 3**-0.5, 3**-0.5),
    (2**-0.5, -(2**-0.5), 0.0),
    (6**-0.5, 6**-0.5, -2 * 6**-0.5),
)


@dataclass
class ModelOutput:
    """Everything a loss, an evaluation or an export may need from one forward pass."""

    probs: torch.Tensor | None  # [B, K, H, W] cluster probabilities at input resolution (None: upsample=False)
    low_res_probs: torch.Tensor  # [B, K, h, w] the same at stride 4, after smoothing
    embeddings: torch.Tensor  # [B, D', h, w] what was clustered (D' = D, or D + 3 with colour)
    prototypes: torch.Tensor  # [B, K, D'] final cluster centres
    seed_logits: torch.Tensor  # [B, K, h, w] the seed head's first K channels (a global clustering of the cells)


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # In-place ReLUs: batch norm's backward needs its input, not its output, so nothing saved is
        # overwritten, and training keeps one activation less per layer in memory.
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(x + self.bn2(self.conv2(y)), inplace=True)


class Encoder(nn.Module):
    """Stride-4 encoder: [B, 3, H, W] -> [B, embed_dim, H/4, W/4]."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        hidden = max(embed_dim // 2, 1)
        self.conv1 = nn.Conv2d(3, hidden, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(hidden)
        self.conv2 = nn.Conv2d(hidden, embed_dim, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(embed_dim)
        self.res1 = ResidualBlock(embed_dim)
        self.res2 = ResidualBlock(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)), inplace=True)
        x = F.relu(self.bn2(self.conv2(x)), inplace=True)
        return self.res2(self.res1(x))


class _L2Normalize(torch.autograd.Function):
    """``F.normalize(x, dim=1)`` with the same forward ops and a fused backward.

    Autograd through ``x / norm.clamp_min(eps)`` runs about six full-size passes; the closed form
    ``(g - y * <g, y>) / norm`` needs three. Where the norm is clamped the gradient is ``g / eps``, as
    autograd's would be.
    """

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: torch.Tensor) -> torch.Tensor:
        denom = x.norm(2, dim=1, keepdim=True).clamp_min(NORM_EPS)
        y = x / denom.expand_as(x)
        ctx.save_for_backward(y, denom)
        return y

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor) -> torch.Tensor:
        y, denom = ctx.saved_tensors
        radial = (grad * y).sum(dim=1, keepdim=True) * (denom > NORM_EPS)
        return (grad - y * radial) / denom


def flatten_pixels(x: torch.Tensor) -> torch.Tensor:
    """[B, C, h, w] -> [B, C, h * w]; a view, not a copy, also for channels_last memory (pixel-major)."""
    b, c, h, w = x.shape
    if not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c).transpose(1, 2)
    return x.flatten(2)


def smoothing_kernel(weights: torch.Tensor) -> torch.Tensor:
    """A 3x3 kernel with non-negative weights summing to 1 (softmax of 9 logits)."""
    return torch.softmax(weights.flatten(), dim=0).view(1, 1, 3, 3)


def smooth_probs(probs: torch.Tensor, kernel: torch.Tensor, iters: int) -> torch.Tensor:
    """Blur each cluster channel with ``kernel`` (edge-replicated); rows stay normalised."""
    k = probs.shape[1]
    weight = kernel.to(probs.dtype).expand(k, 1, 3, 3)
    for _ in range(iters):
        probs = F.conv2d(F.pad(probs, (1, 1, 1, 1), mode="replicate"), weight, groups=k)
    return probs


def soft_kmeans(
    embeddings: torch.Tensor,
    seed_logits: torch.Tensor,
    iters: int,
    temperature: float,
    kernels: KMeansKernels | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft k-means over ``embeddings`` [B, D, N] seeded by ``seed_logits`` [B, K, N].

    Returns (assignment [B, K, N], prototypes [B, K, D]). Squared distances are expanded as
    ``|e|^2 - 2 p.e + |p|^2`` so no [B, K, D, N] tensor is ever built. The gradient is hand-written
    (``_SoftKMeans``): the values are those of the plain loop below, the backward touches the
    full-size embeddings far fewer times than autograd would. ``kernels``: the round's pieces (default
    ``EAGER_KMEANS``; ``compiled_kmeans_kernels()`` fuses them, to float32 round-off of the same values).
    """
    return _SoftKMeans.apply(embeddings, seed_logits, iters, temperature, kernels or EAGER_KMEANS)


def assign_to_prototypes(embeddings: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """One k-means assignment [B, K, N] of ``embeddings`` [B, D, N] to fixed ``prototypes`` [K, D]."""
    scores = torch.einsum("kd,bdn->bkn", prototypes, embeddings)
    dist = (
        (embeddings * embeddings).sum(dim=1, keepdim=True)
        - 2.0 * scores
        + (prototypes * prototypes).sum(dim=1)[:, None]
    )
    return torch.softmax(dist / -temperature, dim=1)


def _weighted_means(assign: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prototypes [B, K, D], mass [B, K, 1]): assignment-weighted means of the embeddings."""
    mass = assign.sum(dim=2, keepdim=True).clamp_min(MIN_MASS)
    return torch.bmm(assign, embeddings.transpose(1, 2)) / mass, mass


def _kmeans_round(
    prototypes: torch.Tensor, embeddings: torch.Tensor, sq_norm: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round: assignment to ``prototypes``, then the new (prototypes, mass) from it."""
    dist = sq_norm - 2.0 * torch.bmm(prototypes, embeddings) + (prototypes * prototypes).sum(dim=2, keepdim=True)
    assign = torch.softmax(dist / -temperature, dim=1)  # bitwise -dist / temperature, one kernel less
    prototypes, mass = _weighted_means(assign, embeddings)
    return assign, prototypes, mass


def _means_backward(
    g_assign: torch.Tensor, g_protos: torch.Tensor, protos: torch.Tensor, mass: torch.Tensor, embeddings: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``P = (A E^T) / m`` with m = clamp(sum_n A): (gradient of the numerator, of A so far)."""
    g_num = g_protos / mass
    g_mass = -(g_protos * protos).sum(dim=2, keepdim=True) / mass
    g_mass = g_mass * (mass > MIN_MASS)
    return g_num, g_assign + torch.bmm(g_num, embeddings) + g_mass


def _assign_backward(
    assign: torch.Tensor, g_assign: torch.Tensor, prev: torch.Tensor, embeddings_t: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward of ``A = softmax(-(|e|^2 - 2 P E + |P|^2) / T)`` w.r.t. S = P E and P: (dS, dP)."""
    g_logits = _softmax_backward(assign, g_assign)
    g_scores = (2.0 / temperature) * g_logits  # w.r.t. S = P_{t-1} E
    g_sq_proto = -g_logits.sum(dim=2, keepdim=True) / temperature  # w.r.t. |P_{t-1}|^2
    return g_scores, torch.bmm(g_scores, embeddings_t) + 2.0 * g_sq_proto * prev


@dataclass(frozen=True)
class KMeansKernels:
    """The pieces of one soft k-means round, forward and backward: eager (``EAGER_KMEANS``, the reference) or
    each one ``torch.compile``d (``compiled_kmeans_kernels``: its elementwise ops fused around the matmuls).
    Rounds are compiled one at a time, not the loop, so the drawn number of rounds never recompiles."""

    round: Callable[..., tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    means_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    assign_backward: Callable[..., tuple[torch.Tensor, torch.Tensor]]


EAGER_KMEANS = KMeansKernels(_kmeans_round, _means_backward, _assign_backward)


@functools.cache
def compiled_kmeans_kernels() -> KMeansKernels:
    """``EAGER_KMEANS`` with every piece ``torch.compile``d (built once per process, compiled on first call)."""
    return KMeansKernels(
        *(torch.compile(kernel, dynamic=True) for kernel in (_kmeans_round, _means_backward, _assign_backward))
    )


def _soft_kmeans_loop(
    embeddings: torch.Tensor,
    seed_logits: torch.Tensor,
    iters: int,
    temperature: float,
    kernels: KMeansKernels = EAGER_KMEANS,
) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """The k-means rounds; returns every round's assignments, prototypes and masses (for the backward)."""
    assign = torch.softmax(seed_logits, dim=1)
    sq_norm = (embeddings * embeddings).sum(dim=1, keepdim=True)  # [B, 1, N]
    prototypes, mass = _weighted_means(assign, embeddings)
    assigns, protos, masses = [assign], [prototypes], [mass]
    for _ in range(iters):
        assign, prototypes, mass = kernels.round(prototypes, embeddings, sq_norm, temperature)
        assigns.append(assign)
        protos.append(prototypes)
        masses.append(mass)
    return assigns, protos, masses


def _softmax_backward(probs: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Gradient w.r.t. the logits of ``probs = softmax(logits, dim=1)``."""
    return probs * (grad - (grad * probs).sum(dim=1, keepdim=True))


class _SoftKMeans(torch.autograd.Function):
    """Soft k-means with a hand-written backward.

    The embeddings E enter every round linearly (``P_t E`` in the distances, ``A_t E^T`` in the
    means), so autograd would write and accumulate one full-size [B, D, N] gradient per use. Here the
    small factors of each use are collected and the embedding gradient is one batched matmul:
    ``dE = sum_t P_t^T dS_t + dNum_t^T A_t = [P | dNum]^T [dS ; A]``.
    ``|e|^2`` is the same for every cluster, so it cancels in the softmax and has no gradient.
    """

    @staticmethod
    def forward(
        ctx: torch.autograd.function.FunctionCtx,
        embeddings: torch.Tensor,
        seed_logits: torch.Tensor,
        iters: int,
        temperature: float,
        kernels: KMeansKernels,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assigns, protos, masses = _soft_kmeans_loop(embeddings, seed_logits, iters, temperature, kernels)
        ctx.temperature = temperature
        ctx.kernels = kernels
        ctx.save_for_backward(embeddings, *assigns, *protos, *masses)
        ctx.rounds = len(assigns)
        return assigns[-1], protos[-1]

    @staticmethod
    def backward(
        ctx: torch.autograd.function.FunctionCtx, grad_assign: torch.Tensor, grad_protos: torch.Tensor
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None, None]:
        # Detached: the saved outputs (last round) come back requiring grad, the others not; the same flags
        # every round keep the compiled kernels to one variant.
        embeddings, *saved = (tensor.detach() for tensor in ctx.saved_tensors)
        n = ctx.rounds
        kernels = ctx.kernels
        assigns, protos, masses = saved[:n], saved[n : 2 * n], saved[2 * n :]
        embeddings_t = embeddings.transpose(1, 2)
        g_assign = grad_assign if grad_assign is not None else torch.zeros_like(assigns[-1])
        g_protos = grad_protos if grad_protos is not None else torch.zeros_like(protos[-1])
        left, right = [], []  # dE = sum of left_i^T @ right_i, i.e. cat(left)^T @ cat(right)
        for t in range(n - 1, -1, -1):
            # P_t = (A_t E^T) / m_t with m_t = clamp(sum_n A_t): gradients of numerator and mass.
            g_num, g_assign = kernels.means_backward(g_assign, g_protos, protos[t], masses[t], embeddings)
            left.append(g_num)
            right.append(assigns[t])
            if t == 0:
                break
            # A_t = softmax(-(|e|^2 - 2 P_{t-1} E + |P_{t-1}|^2) / T).
            prev = protos[t - 1]
            g_scores, g_protos = kernels.assign_backward(assigns[t], g_assign, prev, embeddings_t, ctx.temperature)
            left.append(prev)
            right.append(g_scores)
            g_assign = torch.zeros_like(assigns[t - 1])  # A_{t-1} feeds P_{t-1} only
        factors, uses = torch.cat(left, dim=1), torch.cat(right, dim=1)  # [B, S, D], [B, S, N]
        if embeddings.stride(1) == 1:  # pixel-major memory (channels_last): give the gradient that layout
            grad_embeddings = torch.bmm(uses.transpose(1, 2), factors).transpose(1, 2)
        else:
            grad_embeddings = torch.bmm(factors.transpose(1, 2), uses)
        grad_seed = _softmax_backward(assigns[0], g_assign)
        return grad_embeddings, grad_seed, None, None, None


def colour_projection(luminance_weight: float, chroma_weight: float) -> torch.Tensor | None:
    """[3, 3]: normalised RGB -> the weighted opponent colour the embedding appends (None: both weights 0)."""
    if luminance_weight == 0 and chroma_weight == 0:
        return None
    weights = torch.tensor([luminance_weight, chroma_weight, chroma_weight], dtype=torch.float64)
    return (weights[:, None] * torch.tensor(OPPONENT_BASIS, dtype=torch.float64)).float()


class SegmentationModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("input_mean", torch.tensor(config.input_mean).view(1, 3, 1, 1))
        self.register_buffer("input_std", torch.tensor(config.input_std).view(1, 3, 1, 1))
        self.encoder = Encoder(config.embed_dim)
        self.seed_proj = nn.Conv2d(config.embed_dim, config.max_k, 1)
        # Learned smoothing starts as the box filter the fast lane uses (all logits equal).
        self.smooth_logits = nn.Parameter(torch.zeros(3, 3), requires_grad=config.smoothing == "learned")
        # Set by compile_training(): what a training-mode forward runs instead of encode() and EAGER_KMEANS.
        self._compiled_encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
        self._compiled_kmeans: KMeansKernels | None = None

    def compile_training(self) -> None:
        """``torch.compile`` the training-mode forward: ``encode`` (input normalisation, encoder, L2 normalisation,
        seed projection: one graph forward, one backward) and the soft k-means rounds (``compiled_kmeans_kernels``).

        Eval mode keeps the eager path, the reference the numpy runtime reproduces; the weights, their
        state_dict keys and checkpoints are the same as without. Values match eager to float round-off, not
        bitwise. Sizes are dynamic from the first call: the downsample drawn per step, K and a short last
        batch reuse one graph instead of compiling a static one first and a dynamic one on the next shape.
        """
        self._compiled_encode = torch.compile(self.encode, dynamic=True)
        self._compiled_kmeans = compiled_kmeans_kernels()

    def clustered_embedding(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Normalised input ``x`` + encoder ``features`` -> the embedding k-means clusters (colour appended
        in eval mode, and in training mode only with ``colour_in_training``)."""
        embeddings = _L2Normalize.apply(features)
        if self.training and not self.config.colour_in_training:
            return embeddings  # the default training step: no projection built on the hot path
        projection = colour_projection(self.config.luminance_weight, self.config.chroma_weight)
        if projection is not None:
            colour = F.avg_pool2d(x, STRIDE, ceil_mode=True)
            embeddings = torch.cat([embeddings, torch.einsum("ij,bjhw->bihw", projection.to(colour), colour)], dim=1)
        return embeddings

    def encode(self, rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(clustered embedding [B, D', h, w], seed logits of all max_k channels [B, max_k, h, w]).

        What a caller pools over many tiles to fit one set of prototypes for a dataset or a raster."""
        x = (rgb - self.input_mean) / self.input_std
        features = self.encoder(x)
        return self.clustered_embedding(x, features), self.seed_proj(features)

    def forward(
        self,
        rgb: torch.Tensor,
        k: int,
        cluster_iters: int | None = None,
        smooth_iters: int | None = None,
        upsample: bool = True,
        prototypes: torch.Tensor | None = None,
    ) -> ModelOutput:
        """Cluster probabilities of ``rgb`` for ``k`` clusters. ``upsample=False`` skips the full-size
        ``probs`` (training uses the stride-4 ones) and leaves it None. ``prototypes`` [K, D'] (fitted
        once for a dataset or raster) replace the per-tile seeded soft k-means by one assignment to them,
        so cluster ids mean the same in every tile."""
        cfg = self.config
        check_k_range(k, cfg.max_k)
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected RGB of shape [B, 3, H, W], got {tuple(rgb.shape)}")
        iters = cfg.eval_cluster_iters if cluster_iters is None else cluster_iters
        smooth = cfg.smooth_iters if smooth_iters is None else smooth_iters

        compiled = self.training and self._compiled_encode is not None
        embeddings, seed_logits = (self._compiled_encode if compiled else self.encode)(rgb)
        b, d, h, w = embeddings.shape
        seed_logits = seed_logits[:, :k]
        if prototypes is None:
            assign, prototypes = soft_kmeans(
                flatten_pixels(embeddings).float(),
                flatten_pixels(seed_logits).float(),
                iters,
                cfg.temperature,
                self._compiled_kmeans if compiled else None,
            )
        else:
            if prototypes.shape != (k, d):
                raise ValueError(f"prototypes of shape {tuple(prototypes.shape)}, expected ({k}, {d})")
            assign = assign_to_prototypes(flatten_pixels(embeddings).float(), prototypes.float(), cfg.temperature)
            prototypes = prototypes.expand(b, k, d)
        low_res = assign.view(b, k, h, w)
        if cfg.smoothing != "none" and smooth > 0:
            low_res = smooth_probs(low_res, smoothing_kernel(self.smooth_logits), smooth)
        probs = F.interpolate(low_res, size=rgb.shape[-2:], mode="bilinear", align_corners=False) if upsample else None
        return ModelOutput(
            probs=probs, low_res_probs=low_res, embeddings=embeddings, prototypes=prototypes, seed_logits=seed_logits
        )
