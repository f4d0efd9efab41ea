"""Dynamic tiling against the pinned reference vectors in tests/golden/colembed-3b."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from embed_serving.tiling import choose_grid, image_to_pixel_values, tile_image

GOLDEN = Path(__file__).resolve().parent / "golden" / "colembed-3b" / "tiling.json"
TOL = 1e-3


# The fixture is part of the repository: a missing file fails collection, it never skips.
REFERENCE: dict[str, Any] = json.loads(GOLDEN.read_text())


def _case_id(case: dict[str, Any]) -> str:
    return (
        f"{case['width']}x{case['height']}-S{case['image_size']}"
        f"-{case['min_tiles']}..{case['max_tiles']}"
    )


def _pattern_image(width: int, height: int, seed: int) -> Image.Image:
    # tiling.json `pattern`: RGB = (x*255//(w-1), y*255//(h-1), (x+y)*7 % 256)
    #   + numpy default_rng(pattern_seed).integers(0, 32, (h, w, 3)), mod 256, uint8
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    base = np.stack([x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 7 % 256], axis=-1)
    noise = np.random.default_rng(seed).integers(0, 32, (height, width, 3))
    return Image.fromarray(((base + noise) % 256).astype(np.uint8), mode="RGB")


@pytest.mark.parametrize("case", REFERENCE["grids"], ids=_case_id)
def test_grid_matches_reference(case: dict[str, Any]) -> None:
    grid = choose_grid(
        case["width"], case["height"], case["image_size"], case["min_tiles"], case["max_tiles"]
    )
    assert grid == (case["cols"], case["rows"])

    # Tile count (thumbnail included) from real tiling; a flat image keeps it cheap.
    image = Image.new("RGB", (case["width"], case["height"]), (10, 20, 30))
    tiles = tile_image(
        image, case["image_size"], case["min_tiles"], case["max_tiles"], case["use_thumbnail"]
    )
    assert len(tiles) == case["n_tiles"]
    assert all(t.size == (case["image_size"], case["image_size"]) for t in tiles)


@pytest.mark.parametrize("case", REFERENCE["pixels"], ids=_case_id)
def test_pixels_match_reference(case: dict[str, Any]) -> None:
    image = _pattern_image(case["width"], case["height"], case["pattern_seed"])
    size = case["image_size"]
    pixels = image_to_pixel_values(
        image, size, case["min_tiles"], case["max_tiles"], case["use_thumbnail"]
    )

    assert pixels.dtype == torch.float32
    assert pixels.shape == (case["n_tiles"], 3, size, size)
    assert choose_grid(
        case["width"], case["height"], size, case["min_tiles"], case["max_tiles"]
    ) == (case["cols"], case["rows"])
    want_means = torch.tensor(case["tile_means"])
    want_channel_means = torch.tensor(case["tile_channel_means"])
    want_corner = torch.tensor(case["first_tile_top_left_4x4_channel0"])
    torch.testing.assert_close(pixels.mean(dim=(1, 2, 3)), want_means, atol=TOL, rtol=0)
    torch.testing.assert_close(pixels.mean(dim=(2, 3)), want_channel_means, atol=TOL, rtol=0)
    torch.testing.assert_close(pixels[0, 0, :4, :4], want_corner, atol=TOL, rtol=0)


def test_reference_file_has_cases() -> None:
    # Guards against the parametrised tests silently collecting nothing in CI.
    assert len(REFERENCE["grids"]) >= 50
    assert len(REFERENCE["pixels"]) >= 3


def test_tiles_are_row_major_crops() -> None:
    # 2x1 grid on a half-black/half-white image: tile 0 is the left (black) half.
    image = Image.new("RGB", (200, 100), (0, 0, 0))
    image.paste((255, 255, 255), (100, 0, 200, 100))
    cols, rows = choose_grid(200, 100, 50, 1, 2)
    assert (cols, rows) == (2, 1)
    pixels = image_to_pixel_values(image, 50, 1, 2, use_thumbnail=True)
    assert pixels.shape == (3, 3, 50, 50)
    assert pixels[0].mean() < -0.9  # left tile, black -> -1
    assert pixels[1].mean() > 0.9  # right tile, white -> +1
    assert abs(float(pixels[2].mean())) < 0.1  # thumbnail: half and half


def test_single_tile_has_no_thumbnail_and_thumbnail_is_optional() -> None:
    image = Image.new("RGB", (64, 64), (255, 0, 0))
    assert len(tile_image(image, 64, 1, 6, use_thumbnail=True)) == 1
    wide = Image.new("RGB", (256, 64))
    assert len(tile_image(wide, 64, 1, 6, use_thumbnail=False)) == 4
    assert len(tile_image(wide, 64, 1, 6, use_thumbnail=True)) == 5


def test_non_rgb_input_is_converted() -> None:
    gray = Image.new("L", (64, 64), 255)
    rgba = Image.new("RGBA", (64, 64), (255, 255, 255, 0))
    for image in (gray, rgba):
        pixels = image_to_pixel_values(image, 64, 1, 6, use_thumbnail=True)
        assert pixels.shape == (1, 3, 64, 64)
        torch.testing.assert_close(pixels, torch.ones_like(pixels))


@pytest.mark.parametrize(
    ("min_tiles", "max_tiles", "expected"),
    [(2, 2, (1, 2)), (3, 3, (3, 1)), (6, 6, (2, 3))],
)
def test_transposed_grid_ties_follow_set_order(
    min_tiles: int, max_tiles: int, expected: tuple[int, int]
) -> None:
    # On a square image a grid and its transpose score the same; the reference keeps whichever
    # its Python set yields first. A lexicographic order would pick (1, 3) for 3 tiles.
    assert choose_grid(300, 300, 64, min_tiles, max_tiles) == expected


def test_min_tiles_is_respected() -> None:
    # A small square image would take one tile; min_tiles=2 forbids that grid.
    cols, rows = choose_grid(64, 64, 64, 2, 6)
    assert cols * rows >= 2


@pytest.mark.parametrize(
    "args", [(0, 10, 64, 1, 6), (10, 10, 0, 1, 6), (10, 10, 64, 0, 6), (10, 10, 64, 5, 4)]
)
def test_invalid_arguments_raise(args: tuple[int, int, int, int, int]) -> None:
    with pytest.raises(ValueError):
        choose_grid(*args)
