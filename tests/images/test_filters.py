"""grayscale and sharpen against references written from SPEC §12, through real PNG files
(decoded exactly); blur has its own tests (test_blur.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from conftest import mean_abs_diff, photo, processed, processed_tiles

KINDS = [(1, np.uint8), (3, np.uint8), (4, np.uint8), (1, np.uint16), (3, np.uint16),
         (4, np.uint16)]
KIND_IDS = [f"{channels}x{np.dtype(dtype).itemsize * 8}bit" for channels, dtype in KINDS]


def grayscale_reference(image: np.ndarray) -> np.ndarray:
    """Luminance as COLOR_BGR2GRAY gives it; with alpha, B = G = R = luminance, alpha kept."""
    if image.ndim == 2:
        return image
    grey = cv2.cvtColor(np.ascontiguousarray(image[..., :3]), cv2.COLOR_BGR2GRAY)
    if image.shape[2] == 3:
        return grey
    return np.dstack([grey, grey, grey, image[..., 3]])


def sharpen_reference(image: np.ndarray, sigma: float, amount: float = 1.0) -> np.ndarray:
    """img + A * (img - GaussianBlur(img, (0, 0), S)), rounded, clipped; alpha untouched."""
    has_alpha = image.ndim == 3 and image.shape[2] == 4
    colour = np.ascontiguousarray(image[..., :3]) if has_alpha else image
    blurred = cv2.GaussianBlur(colour, (0, 0), sigma)
    values = colour.astype(np.float64)
    sharp = values + amount * (values - blurred.astype(np.float64))
    result = np.clip(np.round(sharp), 0, np.iinfo(image.dtype).max).astype(image.dtype)
    return np.dstack([result, image[..., 3]]) if has_alpha else result


def levels(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference in 8-bit grey levels."""
    return mean_abs_diff(a, b) / (257 if a.dtype == np.uint16 else 1)


# -- grayscale --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_filters_grayscale_is_exact(root: Path, kind: tuple[int, Any]) -> None:
    image = photo(23, 31, *kind)
    result = processed(root, image, ["grayscale"])
    assert result.dtype == image.dtype
    assert np.array_equal(result, grayscale_reference(image))


def test_filters_grayscale_shapes_one_channel_or_four_with_alpha(root: Path) -> None:
    colour = photo(5, 7, 3)
    assert processed(root, colour, ["grayscale"]).shape == (5, 7)
    with_alpha = photo(5, 7, 4)
    result = processed(root, with_alpha, ["grayscale"])
    assert result.shape == (5, 7, 4)
    assert np.array_equal(result[..., 0], result[..., 1])
    assert np.array_equal(result[..., 1], result[..., 2])
    assert np.array_equal(result[..., 3], with_alpha[..., 3])


def test_filters_grayscale_is_luminance(root: Path) -> None:
    # Pure blue, green and red, and white: 0.114, 0.587 and 0.299 of full scale.
    image = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], np.uint8)
    assert processed(root, image, ["grayscale"]).tolist() == [[29, 150, 76, 255]]


@pytest.mark.parametrize("operation", ["grayscale=None", "grayscale=false", "grayscale=False",
                                       " grayscale = False "])
def test_filters_grayscale_no_leaves_colour(root: Path, operation: str) -> None:
    image = photo(9, 11, 4)
    assert np.array_equal(processed(root, image, [operation]), image)


@pytest.mark.parametrize("operation", ["grayscale", "grayscale=True", "grayscale=1",
                                       "grayscale=no", "grayscale=none"])
def test_filters_grayscale_any_other_value_applies(root: Path, operation: str) -> None:
    assert processed(root, photo(9, 11), [operation]).shape == (9, 11)


# -- sharpen ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("sigma, amount", [(1.0, 1.0), (0.5, 2.0), (2.5, 0.3), (30.0, 10.0)])
def test_filters_sharpen_matches_reference(root: Path, kind: tuple[int, Any], sigma: float,
                                           amount: float) -> None:
    image = photo(31, 43, *kind)
    operation = f"sharpen={sigma}" if amount == 1 else f"sharpen={sigma},{amount}"
    result = processed(root, image, [operation])
    reference = sharpen_reference(image, sigma, amount)
    assert result.shape == reference.shape and result.dtype == reference.dtype
    assert levels(result, reference) <= 1
    if kind[0] == 4:
        assert np.array_equal(result[..., 3], image[..., 3])  # alpha untouched


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_filters_sharpen_clips_to_the_depth(root: Path, dtype: Any) -> None:
    # A step from dark to light: a strong unsharp mask overshoots both ways, and must clip
    # to 0 and to the top of the depth, never wrap round.
    top = np.iinfo(dtype).max
    image = np.zeros((16, 16, 3), dtype)
    image[:, :8] = top // 10
    image[:, 8:] = top - top // 10
    result = processed(root, image, ["sharpen=2,10"])
    assert result.min() == 0 and result.max() == top
    assert levels(result, sharpen_reference(image, 2, 10)) <= 1


def test_filters_sharpen_of_a_flat_image_changes_nothing(root: Path) -> None:
    flat = np.full((12, 12, 4), 99, np.uint8)
    assert np.array_equal(processed(root, flat, ["sharpen=3,10"]), flat)


@pytest.mark.parametrize("kind", [(3, np.uint16), (4, np.uint8), (1, np.uint8)],
                         ids=["3x16bit", "4x8bit", "1x8bit"])
def test_filters_after_a_split_apply_to_each_tile(root: Path, kind: tuple[int, Any]) -> None:
    image = photo(20, 25, *kind)
    tiles = processed_tiles(root, image, ["split", "sharpen=1,2", "grayscale"])
    parts = [image[:10, :13], image[:10, 13:], image[10:, :13], image[10:, 13:]]
    for (suffix, tile), part in zip(tiles.items(), parts, strict=True):
        expected = grayscale_reference(sharpen_reference(part, 1, 2))
        assert tile.shape == expected.shape, suffix
        assert levels(tile, expected) <= 1, suffix
