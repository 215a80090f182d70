"""Two-view augmentation: dihedral transforms, and warp grids that are exact at full and stride-4 resolution."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from training_core.config import AugmentConfig
from training_core.data import views
from training_core.data.views import (
    DIHEDRAL_CODES,
    dihedral,
    gaussian_noise,
    inverse_dihedral,
    make_views,
    warp,
    warp_grid,
)

PAIRS = list(itertools.product(DIHEDRAL_CODES, DIHEDRAL_CODES))


def _dyadic_image(size: int, seed: int = 0) -> torch.Tensor:
    """Values k/256, so 4x4 average pooling is exact in any summation order."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (1, 3, size, size), generator=generator).float() / 256


def test_the_eight_transforms_are_distinct_and_invertible() -> None:
    x = _dyadic_image(8)
    seen = [dihedral(x, code) for code in DIHEDRAL_CODES]
    for a, b in itertools.combinations(seen, 2):
        assert not torch.equal(a, b)
    for code in DIHEDRAL_CODES:
        assert torch.equal(inverse_dihedral(dihedral(x, code), code), x)


def test_grid_warps_view2_onto_view1_exactly_for_all_64_pairs() -> None:
    x = _dyadic_image(20)
    view1 = torch.cat([dihedral(x, c1) for c1, _ in PAIRS])
    view2 = torch.cat([dihedral(x, c2) for _, c2 in PAIRS])
    grid = warp_grid([c1 for c1, _ in PAIRS], [c2 for _, c2 in PAIRS], 20)
    assert grid.shape == (64, 20, 20, 2)
    assert torch.equal(warp(view2, grid), view1)


def test_grid_is_exact_at_stride_4_for_all_64_pairs() -> None:
    """Dihedral transforms commute with 4x pooling, so the stride-4 grid aligns the pooled views exactly."""
    x = _dyadic_image(32, seed=1)
    pooled1 = torch.cat([F.avg_pool2d(dihedral(x, c1), 4) for c1, _ in PAIRS])
    pooled2 = torch.cat([F.avg_pool2d(dihedral(x, c2), 4) for _, c2 in PAIRS])
    grid = warp_grid([c1 for c1, _ in PAIRS], [c2 for _, c2 in PAIRS], 8)
    assert torch.equal(warp(pooled2, grid), pooled1)


def test_warp_equals_nearest_grid_sample() -> None:
    """``warp`` is grid_sample's nearest mode (the grid is meant for it), on exact and arbitrary grids."""
    generator = torch.Generator().manual_seed(2)
    x = torch.rand(3, 4, 9, 9, generator=generator)
    exact = warp_grid([1, 6, 3], [5, 0, 7], 9)
    arbitrary = torch.rand(3, 5, 7, 2, generator=generator) * 2.2 - 1.1  # includes points outside: border
    for grid in (exact, arbitrary):
        expected = F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=True)
        assert torch.equal(warp(x, grid), expected)


def test_the_accelerator_path_moves_the_same_values_as_the_per_sample_loop() -> None:
    """On CUDA a batch is transformed, and its grids built, by one gather; the CPU loop is the reference."""
    codes1, codes2 = [c1 for c1, _ in PAIRS], [c2 for _, c2 in PAIRS]
    x = torch.cat([_dyadic_image(12, seed=i) for i in range(len(PAIRS))])
    assert torch.equal(views._gathered_transform(x, codes1), views._transform(x, codes1))
    assert torch.equal(views._gathered_transform(x[:, :1], codes2), views._transform(x[:, :1], codes2))
    for size in (12, 3):
        grid = views._gathered_grid(views._pixel_centres(size, "cpu"), codes1, codes2)
        assert grid.is_contiguous() and torch.equal(grid, warp_grid(codes1, codes2, size))


def test_make_views_without_noise_are_aligned_by_their_grid() -> None:
    images = _dyadic_image(16).repeat(6, 1, 1, 1) * torch.linspace(0.5, 1.0, 6).view(6, 1, 1, 1)
    views = make_views(images, AugmentConfig(noise_std=0.0), torch.Generator().manual_seed(0))
    assert len(set(zip(views.codes1, views.codes2, strict=True))) > 1, "views draw their own transforms"
    assert torch.equal(warp(views.view2, views.grid(16)), views.view1)
    for i, code in enumerate(views.codes1):
        assert torch.equal(views.view1[i], dihedral(images[i], code))


def test_low_res_inputs_and_valid_masks_move_with_each_view() -> None:
    images = _dyadic_image(16).repeat(4, 1, 1, 1)
    valid = torch.zeros(4, 16, 16, dtype=torch.bool)
    valid[:, :10, :5] = True  # e.g. a raster smaller than the patch, padded bottom and right
    views = make_views(images, AugmentConfig(noise_std=0.0), torch.Generator().manual_seed(1), valid)
    image1, image2, valid1, valid2 = views.low_res(4)
    assert valid1.shape == (4, 1, 4, 4)
    pooled_valid = F.avg_pool2d(valid[:, None].float(), 4)
    for i in range(4):
        assert torch.equal(valid2[i], dihedral(pooled_valid[i], views.codes2[i]))
        assert torch.equal(image1[i], F.avg_pool2d(views.view1[i : i + 1], 4)[0])  # no noise: views pool alike
    grid = views.grid(4)
    assert torch.equal(warp(valid2, grid), valid1) and torch.equal(warp(image2, grid), image1)
    all_real = make_views(images, AugmentConfig(), torch.Generator().manual_seed(1), torch.ones(4, 16, 16).bool())
    assert all_real.valid is None and all_real.low_res(4)[2] is None


def test_noise_and_jitter_stay_in_range_and_differ_per_view() -> None:
    images = torch.full((2, 3, 16, 16), 0.5)
    augment = AugmentConfig(flip=False, rot90=False, noise_std=0.1, colour_jitter=0.4)
    views = make_views(images, augment, torch.Generator().manual_seed(0))
    assert views.codes1 == views.codes2 == [0, 0]
    for view in (views.view1, views.view2):
        assert 0.0 <= view.min() and view.max() <= 1.0
    assert not torch.equal(views.view1, views.view2)


def test_same_generator_seed_gives_the_same_views() -> None:
    images = _dyadic_image(16).repeat(3, 1, 1, 1)
    a = make_views(images, AugmentConfig(colour_jitter=0.2), torch.Generator().manual_seed(5))
    b = make_views(images, AugmentConfig(colour_jitter=0.2), torch.Generator().manual_seed(5))
    assert torch.equal(a.view1, b.view1) and torch.equal(a.view2, b.view2) and a.codes2 == b.codes2


def test_non_square_images_are_rejected() -> None:
    with pytest.raises(ValueError, match="square images"):
        make_views(torch.zeros(1, 3, 8, 12), AugmentConfig(), torch.Generator())


def test_gaussian_noise_is_standard_reproducible_and_thread_count_free() -> None:
    shape = torch.Size([2, 3, 64, 64])
    first = gaussian_noise(shape, torch.Generator().manual_seed(4))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        again = gaussian_noise(shape, torch.Generator().manual_seed(4))
    finally:
        torch.set_num_threads(threads)
    assert first.shape == shape and torch.equal(first, again)
    assert abs(first.mean().item()) < 0.02 and abs(first.std().item() - 1) < 0.02
    assert not torch.equal(first, gaussian_noise(shape, torch.Generator().manual_seed(5)))
