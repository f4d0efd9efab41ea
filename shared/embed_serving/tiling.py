"""Eagle2/InternVL dynamic tiling for the ColEmbed-3B image encoder.

A page image is cut into a grid of `image_size` x `image_size` tiles whose grid shape best
matches the image's aspect ratio and area (Eagle2's `find_closest_aspect_ratio_v2`), plus a
downscaled thumbnail of the whole page. The grid rule has ties that are resolved by candidate
order, so the candidate list is built exactly as the reference builds it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

# SigLIP-style normalisation used by Eagle2: maps [0, 1] to [-1, 1].
IMAGE_MEAN: tuple[float, float, float] = (0.5, 0.5, 0.5)
IMAGE_STD: tuple[float, float, float] = (0.5, 0.5, 0.5)

# The area term saturates here: beyond 60% of the source pixels, more tiles earn nothing.
_AREA_CAP = 0.6


def _candidate_grids(min_tiles: int, max_tiles: int) -> list[tuple[int, int]]:
    # Built as a set and then sorted by area, exactly like the reference: the stable sort keeps
    # the set's iteration order within one area, and that order decides ties between grids.
    # Small-int tuple hashes are deterministic in CPython, so this order is reproducible.
    grids = {
        (i, j)
        for n in range(min_tiles, max_tiles + 1)
        for i in range(1, n + 1)
        for j in range(1, n + 1)
        if min_tiles <= i * j <= max_tiles
    }
    return sorted(grids, key=lambda g: g[0] * g[1])


def choose_grid(
    width: int, height: int, image_size: int, min_tiles: int, max_tiles: int
) -> tuple[int, int]:
    """Return the (cols, rows) tile grid for a `width` x `height` image."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    if image_size <= 0:
        raise ValueError(f"image_size must be positive, got {image_size}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")

    aspect = width / height
    area = width * height
    best_score = float("-inf")
    best: tuple[int, int] = (1, 1)
    for cols, rows in _candidate_grids(min_tiles, max_tiles):
        ratio = cols / rows
        score = min(cols * rows * image_size * image_size / area, _AREA_CAP) * min(
            ratio / aspect, aspect / ratio
        )
        if score > best_score:  # strict: the first maximum in candidate order wins
            best_score = score
            best = (cols, rows)
    return best


def tile_image(
    image: Image.Image, image_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> list[Image.Image]:
    """Cut `image` into row-major tiles, plus a whole-image thumbnail when there are several."""
    cols, rows = choose_grid(image.width, image.height, image_size, min_tiles, max_tiles)
    resized = image.resize((image_size * cols, image_size * rows), Image.Resampling.BICUBIC)
    tiles = [
        resized.crop((c * image_size, r * image_size, (c + 1) * image_size, (r + 1) * image_size))
        for r in range(rows)
        for c in range(cols)
    ]
    if use_thumbnail and len(tiles) > 1:
        tiles.append(image.resize((image_size, image_size), Image.Resampling.BICUBIC))
    return tiles


def image_to_tiles(
    image: Image.Image, image_size: int, min_tiles: int, max_tiles: int, use_thumbnail: bool
) -> torch.Tensor:
    """Tile `image`: uint8 (n_tiles, 3, S, S), the pixels before normalisation.

    The server keeps tiles in this form until they reach the device (`normalize_tiles`): a
    quarter of the float32 memory, and the same values, since normalising is elementwise.
    """
    # Convert before tiling, as the reference loader does: resampling RGBA/P/L differs from RGB.
    if image.mode != "RGB":
        image = image.convert("RGB")
    tiles = tile_image(image, image_size, min_tiles, max_tiles, use_thumbnail)
    stacked = torch.from_numpy(np.stack([np.asarray(t, dtype=np.uint8) for t in tiles]))
    return stacked.permute(0, 3, 1, 2).contiguous()


def normalize_tiles(
    tiles: torch.Tensor, mean: Sequence[float] = IMAGE_MEAN, std: Sequence[float] = IMAGE_STD
) -> torch.Tensor:
    """uint8 tiles -> float32 model input, on the tiles' device.

    Same arithmetic as torchvision's ToTensor + Normalize: uint8 / 255, then (x - mean) / std,
    each step a correctly rounded float32 op, so CPU and GPU give identical bits.
    """
    pixels = tiles.to(torch.float32).div(255)
    mean_t = torch.tensor(mean, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32, device=tiles.device).view(1, 3, 1, 1)
    return pixels.sub(mean_t).div(std_t).contiguous()


def image_to_pixel_values(
    image: Image.Image,
    image_size: int,
    min_tiles: int,
    max_tiles: int,
    use_thumbnail: bool,
    mean: Sequence[float] = IMAGE_MEAN,
    std: Sequence[float] = IMAGE_STD,
) -> torch.Tensor:
    """Tile `image` and normalise it: a float32 tensor of shape (n_tiles, 3, S, S)."""
    tiles = image_to_tiles(image, image_size, min_tiles, max_tiles, use_thumbnail)
    return normalize_tiles(tiles, mean, std)
