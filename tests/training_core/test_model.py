"""Model contract: shapes, K range, and the fast paths (fused normalise backward, hand-written soft
k-means gradient, k-channel seed projection) against the plain formulas the numpy runtime mirrors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from training_core.config import ModelConfig
from training_core.model import (
    SegmentationModel,
    _L2Normalize,
    assign_to_prototypes,
    smooth_probs,
    smoothing_kernel,
    soft_kmeans,
)


def _plain_soft_kmeans(
    embeddings: torch.Tensor, seed_logits: torch.Tensor, iters: int, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook loop, differentiated by autograd."""

    def means(assign: torch.Tensor) -> torch.Tensor:
        return torch.bmm(assign, embeddings.transpose(1, 2)) / assign.sum(dim=2, keepdim=True).clamp_min(1e-6)

    assign = torch.softmax(seed_logits, dim=1)
    prototypes = means(assign)
    for _ in range(iters):
        dist = (
            (embeddings * embeddings).sum(dim=1, keepdim=True)
            - 2.0 * torch.bmm(prototypes, embeddings)
            + (prototypes * prototypes).sum(dim=2, keepdim=True)
        )
        assign = torch.softmax(-dist / temperature, dim=1)
        prototypes = means(assign)
    return assign, prototypes


def _plain_forward(model: SegmentationModel, rgb: torch.Tensor, k: int, iters: int) -> torch.Tensor:
    """The model's documented math with stock torch ops only."""
    x = (rgb - model.input_mean) / model.input_std
    features = model.encoder(x)
    seed_logits = model.seed_proj(features)[:, :k]
    embeddings = F.normalize(features, dim=1)
    b, _, h, w = embeddings.shape
    assign, _ = _plain_soft_kmeans(
        embeddings.flatten(2).float(), seed_logits.flatten(2).float(), iters, model.config.temperature
    )
    low_res = smooth_probs(assign.view(b, k, h, w), smoothing_kernel(model.smooth_logits), model.config.smooth_iters)
    return F.interpolate(low_res, size=rgb.shape[-2:], mode="bilinear", align_corners=False)


@pytest.mark.parametrize("k", [2, 5, 8])
def test_output_shapes(k: int) -> None:
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=8)).eval()
    out = model(torch.rand(2, 3, 32, 24), k)
    assert out.probs.shape == (2, k, 32, 24)
    assert out.low_res_probs.shape == (2, k, 8, 6)
    assert out.embeddings.shape == (2, 8 + 3, 8, 6)  # the features, then the colour (on by default)
    assert out.prototypes.shape == (2, k, 8 + 3)
    torch.testing.assert_close(out.probs.sum(dim=1), torch.ones(2, 32, 24))


def test_colour_is_appended_in_the_weighted_opponent_basis() -> None:
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=4, luminance_weight=0.5, chroma_weight=2.0)).eval()
    rgb = torch.rand(1, 3, 16, 16)
    out = model(rgb, 3)
    assert out.embeddings.shape == (1, 11, 4, 4)
    r, g, b = F.avg_pool2d((rgb - model.input_mean) / model.input_std, 4)[0]
    expected = torch.stack([0.5 * (r + g + b) / 3**0.5, 2.0 * (r - g) / 2**0.5, 2.0 * (r + g - 2 * b) / 6**0.5])
    torch.testing.assert_close(out.embeddings[0, 8:], expected)


def test_equal_colour_weights_give_the_distances_of_weighted_rgb() -> None:
    # The opponent basis is a rotation of RGB: at equal weights k-means sees RGB scaled by that weight.
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=4, luminance_weight=2.0, chroma_weight=2.0)).eval()
    rgb = torch.rand(1, 3, 16, 16)
    colour = model(rgb, 3).embeddings[0, 8:].flatten(1).T
    weighted_rgb = 2.0 * F.avg_pool2d((rgb - model.input_mean) / model.input_std, 4)[0].flatten(1).T
    torch.testing.assert_close(torch.cdist(colour, colour), torch.cdist(weighted_rgb, weighted_rgb), atol=1e-5, rtol=0)


def test_zero_colour_weights_append_nothing() -> None:
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=4, luminance_weight=0.0, chroma_weight=0.0)).eval()
    assert model(torch.rand(1, 3, 16, 16), 3).embeddings.shape == (1, 8, 4, 4)


@pytest.mark.parametrize(("colour_in_training", "channels"), [(False, 8), (True, 11)])
def test_training_mode_clusters_colour_only_when_asked(colour_in_training: bool, channels: int) -> None:
    config = ModelConfig(embed_dim=8, max_k=4, colour_in_training=colour_in_training)
    model = SegmentationModel(config).train()
    assert model(torch.rand(2, 3, 16, 16), 3).embeddings.shape[1] == channels
    assert model.eval()(torch.rand(2, 3, 16, 16), 3).embeddings.shape[1] == 11  # inference always has it


@pytest.mark.parametrize("k", [0, 1, 9])
def test_k_outside_range_is_a_clear_error(k: int) -> None:
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=8))
    with pytest.raises(ValueError, match=rf"k={k} is outside the model's k_range \[2, 8\]"):
        model(torch.rand(1, 3, 16, 16), k)


def test_non_rgb_input_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"expected RGB of shape \[B, 3, H, W\]"):
        SegmentationModel(ModelConfig(embed_dim=8, max_k=4))(torch.rand(1, 4, 16, 16), 2)


def test_upsample_false_skips_only_the_full_size_probs() -> None:
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=4)).eval()
    rgb = torch.rand(1, 3, 16, 16)
    full, low = model(rgb, 3), model(rgb, 3, upsample=False)
    assert low.probs is None
    assert torch.equal(full.low_res_probs, low.low_res_probs)


def test_forward_and_gradients_match_the_plain_formulas() -> None:
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=6)).double().train()
    rgb = torch.rand(2, 3, 24, 24, dtype=torch.double)
    weights = torch.randn(2, 4, 24, 24, dtype=torch.double)
    fast = model(rgb, 4, cluster_iters=3).probs
    fast_grads = torch.autograd.grad((fast * weights).sum(), list(model.encoder.parameters()))
    plain = _plain_forward(model, rgb, 4, 3)
    plain_grads = torch.autograd.grad((plain * weights).sum(), list(model.encoder.parameters()))
    torch.testing.assert_close(fast, plain, rtol=0, atol=1e-6)
    # The k-means runs in float32; autograd's gradient there is the less accurate of the two
    # (it differentiates |e|^2, which cancels), so agreement is to float32 round-off, not bitwise.
    for got, want in zip(fast_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=2e-3 * want.abs().max().item())


def test_float32_forward_is_bitwise_the_plain_loop() -> None:
    generator = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(2, 16, 50, generator=generator), dim=1)
    seed_logits = torch.randn(2, 5, 50, generator=generator)
    fast = soft_kmeans(embeddings, seed_logits, 4, 0.1)
    plain = _plain_soft_kmeans(embeddings, seed_logits, 4, 0.1)
    assert torch.equal(fast[0], plain[0]) and torch.equal(fast[1], plain[1])


@pytest.mark.parametrize("iters", [0, 1, 3])
def test_soft_kmeans_gradient(iters: int) -> None:
    generator = torch.Generator().manual_seed(iters)
    embeddings = torch.randn(2, 5, 7, dtype=torch.double, generator=generator, requires_grad=True)
    seed_logits = torch.randn(2, 3, 7, dtype=torch.double, generator=generator, requires_grad=True)
    assert torch.autograd.gradcheck(lambda e, s: soft_kmeans(e, s, iters, 0.7), (embeddings, seed_logits))


def test_l2_normalize_matches_f_normalize_and_its_gradient() -> None:
    x = torch.randn(2, 6, 3, 3, dtype=torch.double)
    x[0, :, 0, 0] = 0.0  # a zero vector: clamped norm, gradient g / eps as autograd gives
    assert torch.equal(_L2Normalize.apply(x), F.normalize(x, dim=1))
    grad = torch.randn_like(x)
    xs = [x.clone().requires_grad_(), x.clone().requires_grad_()]
    (_L2Normalize.apply(xs[0]) * grad).sum().backward()
    (F.normalize(xs[1], dim=1) * grad).sum().backward()
    torch.testing.assert_close(xs[0].grad, xs[1].grad, rtol=1e-10, atol=0)


def test_channels_last_training_layout_gives_the_same_outputs_and_gradients() -> None:
    """Training runs the model channels_last (DevicePolicy.memory_format); values must not depend on it."""
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=6)).train()
    rgb = torch.rand(2, 3, 32, 32)
    weights = torch.randn(2, 5, 8, 8)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.zero_grad()
        model.to(memory_format=memory_format)
        out = model(rgb.contiguous(memory_format=memory_format), 5, cluster_iters=3, upsample=False)
        (out.low_res_probs * weights).sum().backward()
        results.append((out.low_res_probs, [p.grad.clone() for p in model.encoder.parameters()]))
    (probs_a, grads_a), (probs_b, grads_b) = results
    torch.testing.assert_close(probs_b, probs_a, rtol=0, atol=1e-5)
    for got, want in zip(grads_b, grads_a, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-3 * want.abs().max().item())


def test_fixed_prototypes_give_one_assignment_round_and_the_same_ids_in_every_tile() -> None:
    torch.manual_seed(0)
    model = SegmentationModel(ModelConfig(embed_dim=8, max_k=4, luminance_weight=1.0, chroma_weight=1.0)).eval()
    tile = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        embeddings, seed_logits = model.encode(tile)
        assert embeddings.shape == (1, 11, 8, 8) and seed_logits.shape == (1, 4, 8, 8)
        prototypes = embeddings[0, :, :3, 0].T.contiguous()  # three cells as fixed centres
        out = model(tile, 3, prototypes=prototypes)
        expected = assign_to_prototypes(embeddings.flatten(2), prototypes, model.config.temperature)
        torch.testing.assert_close(
            out.low_res_probs, smooth_probs(expected.view(1, 3, 8, 8), smoothing_kernel(model.smooth_logits), 2)
        )
        # The same pixels in another batch (another tile) get the same ids against the same prototypes.
        pair = model(torch.cat([torch.rand(1, 3, 32, 32), tile]), 3, prototypes=prototypes)
        torch.testing.assert_close(pair.probs[1], out.probs[0])
        with pytest.raises(ValueError, match="prototypes of shape"):
            model(tile, 2, prototypes=prototypes)
