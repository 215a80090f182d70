"""Two augmented views of a batch, and the warp grid that maps view 2 onto view 1's frame.

Each view gets its own dihedral transform (flip, then ``rot90``), its own colour jitter and noise.
A dihedral transform is coded 0..7: ``rot = code % 4`` quarter turns after a horizontal flip when
``code >= 4``. The warp grid is built by pushing an identity coordinate image through the same
index permutations as the pixels, so its values are exact pixel centres: ``warp(view2, grid)``
reproduces view 1 bit for bit when noise is off. The grid works at any resolution the transform
commutes with, e.g. the stride-4 probabilities of a patch whose side is divisible by 4.

Everything here runs on the images' device. On the CPU each sample is transformed by itself (the
reference); on an accelerator a batch is transformed by one gather through a cached table of the eight
permutations (``_dihedral_tables``), and the codes are drawn on the host, so the step launches a few
kernels however large the batch and never waits for the device to read them. Both give the same values:
a dihedral transform only moves values.
"""

from __future__ import annotations

import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training_core.config import AugmentConfig

DIHEDRAL_CODES = tuple(range(8))


def dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Apply dihedral transform ``code`` to the last two (square) dims of ``x``."""
    if code >= 4:
        x = torch.flip(x, dims=(-1,))
    return torch.rot90(x, code % 4, dims=(-2, -1))


def inverse_dihedral(x: torch.Tensor, code: int) -> torch.Tensor:
    """Undo ``dihedral(x, code)``."""
    x = torch.rot90(x, -(code % 4), dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if code >= 4 else x


def warp_grid(codes1: list[int], codes2: list[int], size: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Grid [B, size, size, 2] for ``F.grid_sample(..., align_corners=True)`` taking view 2 into view 1's frame.

    View 1 pixel q shows the ground at ``T1^-1(q)``, which view 2 shows at ``T2(T1^-1(q))``; an image of
    view-2 coordinates transformed by ``T1 o T2^-1`` holds exactly that location at q.
    """
    coords = _pixel_centres(size, device)
    if coords.device.type != "cpu":
        return _gathered_grid(coords, codes1, codes2)
    grids = [dihedral(inverse_dihedral(coords, c2), c1) for c1, c2 in zip(codes1, codes2, strict=True)]
    return torch.stack(grids).permute(0, 2, 3, 1).contiguous()


def _pixel_centres(size: int, device: torch.device | str) -> torch.Tensor:
    """[2, size, size] grid_sample coordinates of every pixel centre: channel 0 = x (column), 1 = y (row)."""
    axis = torch.linspace(-1.0, 1.0, size, device=device)
    ys, xs = torch.meshgrid(axis, axis, indexing="ij")
    return torch.stack([xs, ys])


@functools.lru_cache(maxsize=16)
def _dihedral_tables(size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """([8, size * size], same): for each code, the flat source index of every pixel of ``dihedral(x, code)``
    and of ``inverse_dihedral(x, code)`` (the transforms applied to an image of indices)."""
    base = torch.arange(size * size, device=device).view(size, size)
    forward = torch.stack([dihedral(base, code).reshape(-1) for code in DIHEDRAL_CODES])
    inverse = torch.stack([inverse_dihedral(base, code).reshape(-1) for code in DIHEDRAL_CODES])
    return forward, inverse


def _codes_tensor(codes: list[int], device: torch.device) -> torch.Tensor:
    """``codes`` as an int64 tensor on ``device``; to a CUDA device through pinned memory, without a sync."""
    codes_tensor = torch.tensor(codes, dtype=torch.int64)
    if device.type == "cuda":
        return codes_tensor.pin_memory().to(device, non_blocking=True)
    return codes_tensor.to(device)


def _gathered_transform(batch: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """``_transform`` as one gather: sample i through the permutation of ``codes[i]``."""
    b, c, h, w = batch.shape
    forward, _ = _dihedral_tables(h, batch.device)
    index = forward[_codes_tensor(codes, batch.device)]  # [B, h * w]
    return batch.reshape(b, c, h * w).gather(2, index[:, None].expand(b, c, h * w)).view(b, c, h, w)


def _gathered_grid(coords: torch.Tensor, codes1: list[int], codes2: list[int]) -> torch.Tensor:
    """``warp_grid``'s grids as one gather: ``dihedral(inverse_dihedral(coords, c2), c1)`` takes the pixel at
    ``inverse[c2][forward[c1][i]]`` to position i."""
    size = coords.shape[-1]
    forward, inverse = _dihedral_tables(size, coords.device)
    index = inverse[_codes_tensor(codes2, coords.device)].gather(1, forward[_codes_tensor(codes1, coords.device)])
    return coords.reshape(2, size * size).T[index].view(len(codes1), size, size, 2)


def warp(x: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Nearest-pixel resample of ``x`` [B, C, h, w] at ``grid`` [B, h, w, 2] (``align_corners=True``, border).

    The same values as ``F.grid_sample(x, grid, mode="nearest", padding_mode="border", align_corners=True)``,
    computed as an index gather: its backward is a scatter-add, several times cheaper than grid_sample's.
    """
    b, c, h, w = x.shape
    cols = ((grid[..., 0] + 1) * (0.5 * (w - 1))).round().long().clamp_(0, w - 1)
    rows = ((grid[..., 1] + 1) * (0.5 * (h - 1))).round().long().clamp_(0, h - 1)
    index = (rows * w + cols).view(b, 1, -1).expand(b, c, -1)
    return x.reshape(b, c, h * w).gather(2, index).view(b, c, *grid.shape[1:3])


@dataclass
class TwoViews:
    view1: torch.Tensor  # [B, 3, P, P] in [0, 1]
    view2: torch.Tensor
    codes1: list[int]  # dihedral code per sample
    codes2: list[int]
    clean: torch.Tensor  # [B, 3, P, P] the input before augmentation
    valid: torch.Tensor | None  # [B, 1, P, P] float, 1 = real pixel, 0 = padding / nodata; None = all real

    def grid(self, size: int) -> torch.Tensor:
        """Warp grid at resolution ``size`` (P, or P / 4 for the model's stride-4 outputs)."""
        return warp_grid(self.codes1, self.codes2, size, self.view1.device)

    def low_res(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """(image1, image2, valid1, valid2) at ``size`` x ``size``, each in its view's frame.

        The clean input and the valid mask are average-pooled once, then transformed like each view
        (exact: dihedral transforms commute with pooling when P is a multiple of ``size``).
        """
        image = F.adaptive_avg_pool2d(self.clean, size)
        image1, image2 = _transform(image, self.codes1), _transform(image, self.codes2)
        if self.valid is None:
            return image1, image2, None, None
        valid = F.adaptive_avg_pool2d(self.valid, size)
        return image1, image2, _transform(valid, self.codes1), _transform(valid, self.codes2)


def _transform(batch: torch.Tensor, codes: list[int]) -> torch.Tensor:
    """Dihedral transform ``codes[i]`` applied to sample i of ``batch`` [B, C, S, S]."""
    if batch.device.type != "cpu":
        return _gathered_transform(batch, codes)
    return torch.stack([dihedral(sample, code) for sample, code in zip(batch, codes, strict=True)])


NOISE_CHUNKS = 8  # fixed, so the noise does not depend on the machine's thread count


def gaussian_noise(shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of ``shape`` on ``generator``'s device, reproducible from ``generator``.

    torch draws CPU normals on one thread (about 15 ms for a batch of 512 px views, as long as the
    whole encoder step on 16 cores), so on the CPU the tensor is filled in ``NOISE_CHUNKS`` chunks, each
    from its own generator seeded by ``generator``, on a thread pool (the fill releases the GIL).
    """
    if generator.device.type != "cpu":
        return torch.randn(shape, generator=generator, device=generator.device)
    seeds = torch.randint(2**62, (NOISE_CHUNKS,), generator=generator).tolist()
    noise = torch.empty(shape)
    chunks = noise.view(-1).chunk(NOISE_CHUNKS)

    def fill(chunk: torch.Tensor, seed: int) -> None:
        chunk.normal_(generator=torch.Generator().manual_seed(seed))

    with ThreadPoolExecutor(max_workers=min(NOISE_CHUNKS, torch.get_num_threads())) as pool:
        list(pool.map(fill, chunks, seeds))
    return noise


def _draw_codes(n: int, augment: AugmentConfig, generator: torch.Generator) -> list[int]:
    allowed = [c for c in DIHEDRAL_CODES if (augment.flip or c < 4) and (augment.rot90 or c % 4 == 0)]
    picks = torch.randint(len(allowed), (n,), generator=generator, device=generator.device)
    return [allowed[i] for i in picks.tolist()]


def _jitter_colour(x: torch.Tensor, strength: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample brightness, contrast and saturation factors drawn from [1 - strength, 1 + strength]."""
    factors = 1.0 + strength * (2.0 * torch.rand(3, x.shape[0], 1, 1, 1, generator=generator, device=x.device) - 1.0)
    brightness, contrast, saturation = factors
    x = x * brightness
    mean_grey = x.mean(dim=(1, 2, 3), keepdim=True)
    x = (x - mean_grey) * contrast + mean_grey
    grey = x.mean(dim=1, keepdim=True)
    return grey + (x - grey) * saturation


def _augment(
    images: torch.Tensor, codes: list[int], augment: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    view = _transform(images, codes)
    if augment.colour_jitter > 0:
        view = _jitter_colour(view, augment.colour_jitter, generator)
    if augment.noise_std > 0:
        view = view + augment.noise_std * gaussian_noise(view.shape, generator)
    return view.clamp(0.0, 1.0) if augment.colour_jitter > 0 or augment.noise_std > 0 else view


def make_views(
    images: torch.Tensor, augment: AugmentConfig, generator: torch.Generator, valid: torch.Tensor | None = None
) -> TwoViews:
    """Two independently augmented views of ``images`` [B, 3, P, P] (P square), drawn from ``generator``.

    ``valid`` [B, P, P] (bool or float; None or all true = every pixel real) lets the losses leave
    padding and nodata out. ``generator`` must live on ``images.device`` (noise is drawn there; on an
    accelerator the transforms are drawn on the host from its seed).
    """
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"two views need square images [B, 3, P, P], got {tuple(images.shape)}")
    # On an accelerator the codes come from a host generator seeded like ``generator``: reading them back
    # would wait for the device. On the CPU it is ``generator`` itself.
    host = generator if generator.device.type == "cpu" else torch.Generator().manual_seed(generator.initial_seed())
    codes1 = _draw_codes(images.shape[0], augment, host)
    codes2 = _draw_codes(images.shape[0], augment, host)
    view1 = _augment(images, codes1, augment, generator)
    view2 = _augment(images, codes2, augment, generator)
    mask = None if valid is None else valid.to(images.dtype).unsqueeze(1)
    if mask is not None and bool((mask == 1).all()):
        mask = None  # every pixel real (the common case): the losses then take plain means
    return TwoViews(view1=view1, view2=view2, codes1=codes1, codes2=codes2, clean=images, valid=mask)
