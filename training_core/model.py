"""The segmentation model: stride-4 CNN encoder + soft k-means over its embeddings.

The forward pass is the contract the numpy runtime (``runtime_export.runtime``) reproduces:

1. normalise RGB in [0, 1] with the model's mean/std;
2. encode at stride 4 (two stride-2 conv+BN+ReLU, two residual blocks) and L2-normalise;
3. optionally append the input colour, average-pooled to stride 4 and scaled by
   ``colour_weight`` (the cue k-means on RGB uses; see docs/MODEL_NOTES.md);
4. seed K prototypes from a 1x1 projection (softmax over its first K channels);
5. soft k-means: ``iters`` rounds of assignment ``softmax(-||e - p||^2 / temperature)`` and
   prototype update (weighted means);
6. smooth the stride-4 assignment with a normalised 3x3 kernel (fixed box or learned);
7. upsample the probabilities bilinearly to the input size.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from training_core.config import STRIDE, ModelConfig


@dataclass
class ModelOutput:
    """Everything a loss, an evaluation or an export may need from one forward pass."""

    probs: torch.Tensor  # [B, K, H, W] cluster probabilities at input resolution
    low_res_probs: torch.Tensor  # [B, K, h, w] the same at stride 4, after smoothing
    embeddings: torch.Tensor  # [B, D', h, w] what was clustered (D' = D, or D + 3 with colour)
    prototypes: torch.Tensor  # [B, K, D'] final cluster centres


class ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


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
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.res2(self.res1(x))


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
    embeddings: torch.Tensor, seed_logits: torch.Tensor, iters: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Soft k-means over ``embeddings`` [B, D, N] seeded by ``seed_logits`` [B, K, N].

    Returns (assignment [B, K, N], prototypes [B, K, D]). Squared distances are expanded as
    ``|e|^2 - 2 p.e + |p|^2`` so no [B, K, D, N] tensor is ever built.
    """
    assign = torch.softmax(seed_logits, dim=1)
    sq_norm = (embeddings * embeddings).sum(dim=1, keepdim=True)  # [B, 1, N]
    prototypes = _weighted_means(assign, embeddings)
    for _ in range(iters):
        dist = (
            sq_norm
            - 2.0 * torch.bmm(prototypes, embeddings)
            + (prototypes * prototypes).sum(dim=2, keepdim=True)
        )
        assign = torch.softmax(-dist / temperature, dim=1)
        prototypes = _weighted_means(assign, embeddings)
    return assign, prototypes


def _weighted_means(assign: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    mass = assign.sum(dim=2, keepdim=True).clamp_min(1e-6)  # [B, K, 1]
    return torch.bmm(assign, embeddings.transpose(1, 2)) / mass


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

    def clustered_embedding(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """Normalised input ``x`` + encoder ``features`` -> the embedding k-means clusters."""
        embeddings = F.normalize(features, dim=1)
        if self.config.colour_weight > 0:
            colour = F.avg_pool2d(x, STRIDE, ceil_mode=True)
            embeddings = torch.cat([embeddings, self.config.colour_weight * colour], dim=1)
        return embeddings

    def forward(
        self,
        rgb: torch.Tensor,
        k: int,
        cluster_iters: int | None = None,
        smooth_iters: int | None = None,
    ) -> ModelOutput:
        cfg = self.config
        if not 2 <= k <= cfg.max_k:
            raise ValueError(f"k={k} is outside [2, max_k={cfg.max_k}]")
        if rgb.ndim != 4 or rgb.shape[1] != 3:
            raise ValueError(f"expected RGB of shape [B, 3, H, W], got {tuple(rgb.shape)}")
        iters = cfg.eval_cluster_iters if cluster_iters is None else cluster_iters
        smooth = cfg.smooth_iters if smooth_iters is None else smooth_iters

        x = (rgb - self.input_mean) / self.input_std
        features = self.encoder(x)
        seed_logits = self.seed_proj(features)[:, :k]
        embeddings = self.clustered_embedding(x, features)
        b, d, h, w = embeddings.shape
        assign, prototypes = soft_kmeans(
            embeddings.flatten(2).float(), seed_logits.flatten(2).float(), iters, cfg.temperature
        )
        low_res = assign.view(b, k, h, w)
        if cfg.smoothing != "none" and smooth > 0:
            low_res = smooth_probs(low_res, smoothing_kernel(self.smooth_logits), smooth)
        probs = F.interpolate(low_res, size=rgb.shape[-2:], mode="bilinear", align_corners=False)
        return ModelOutput(probs=probs, low_res_probs=low_res, embeddings=embeddings, prototypes=prototypes)
