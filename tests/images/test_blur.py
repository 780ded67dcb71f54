"""The blur matches cv2.GaussianBlur for every kernel size, at a cost independent of it."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from imgserver.images import blur
from imgserver.images.blur import blocks_suffice, blur_blocks, gaussian_blur
from imgserver.images.kernels import kernel_parameters
from imgserver.images.operations import Context, parse_operation

from conftest import mean_abs_diff, photo

# What the contract allows against cv2.GaussianBlur with the same kernel and sigma, in 8-bit
# grey levels: one on average, and no pixel off by more than eight.
MEAN_LIMIT = 1.0
MAX_LIMIT = 8.0

# Kernel sizes from 3 up: OpenCV's own (up to 51, sigma < 8), the first reduced ones (53,
# cells of 2 pixels), medium, both sides of the switch to 8x8 blocks (263 / 265), the
# benchmark's 301 and 1001 (wider than the image).
KSIZES = [3, 7, 15, 31, 51, 53, 55, 61, 75, 101, 151, 263, 265, 301, 501, 1001]


def assert_within_contract(result: np.ndarray, reference: np.ndarray) -> None:
    """Mean absolute difference <= 1 and largest <= 8 grey levels (16-bit: in 8-bit levels)."""
    assert result.dtype == reference.dtype and result.shape == reference.shape
    scale = 257.0 if result.dtype == np.uint16 else 1.0
    difference = np.abs(result.astype(np.float64) - reference.astype(np.float64)) / scale
    assert difference.mean() <= MEAN_LIMIT, difference.mean()
    assert difference.max() <= MAX_LIMIT, difference.max()


@pytest.mark.parametrize("ksize", [1, 3, 5, 31, 51])
def test_blur_small_kernel_is_opencv_exactly(ksize: int) -> None:
    image = photo(60, 80)
    assert np.array_equal(gaussian_blur(image, ksize), cv2.GaussianBlur(image, (ksize, ksize), 0))


@pytest.mark.parametrize("ksize", KSIZES)
def test_blur_every_kernel_size_is_within_contract(ksize: int) -> None:
    for noise in (0.05, 0.01):  # heavy noise, and a cleaner photo
        image = photo(240, 320, noise=noise, seed=ksize)
        assert_within_contract(gaussian_blur(image, ksize),
                               cv2.GaussianBlur(image, (ksize, ksize), 0))


def test_blur_kernel_wider_than_the_image_is_within_contract() -> None:
    image = photo(150, 200, seed=2)  # 15x its width (a 10x wider one: small images below)
    assert_within_contract(gaussian_blur(image, 3001), cv2.GaussianBlur(image, (3001, 3001), 0))


@pytest.mark.parametrize("ksize", [3, 53, 101, 265, 301, 1001])
@pytest.mark.parametrize("channels, dtype", [(1, np.uint8), (4, np.uint8), (3, np.uint16),
                                             (4, np.uint16), (1, np.uint16)])
def test_blur_depths_and_alpha_are_within_contract(ksize: int, channels: int,
                                                   dtype: type) -> None:
    image = photo(180, 260, channels, dtype, seed=channels)
    result = gaussian_blur(image, ksize)
    assert result.dtype == image.dtype and result.shape == image.shape
    assert_within_contract(result, cv2.GaussianBlur(image, (ksize, ksize), 0))


@pytest.mark.parametrize("ksize, sigma", [
    (0, 10), (0, 40), (0, 150), (61, 9), (51, 1000), (101, 50), (201, 30), (301, 60),
    (301, 500), (1001, 45), (1001, 60), (3, 100),
])
def test_blur_sigma_variants_are_within_contract(ksize: int, sigma: float) -> None:
    image = photo(240, 320, noise=0.02)
    reference_ksize = kernel_parameters(ksize, sigma, image.dtype)[0]
    reference = cv2.GaussianBlur(image, (reference_ksize,) * 2, sigma)
    assert_within_contract(gaussian_blur(image, ksize, sigma), reference)


@pytest.mark.parametrize("height, width, ksize", [
    (300, 40, 301), (33, 500, 151), (17, 200, 1001), (130, 130, 101), (150, 200, 301),
    (97, 131, 3001), (129, 300, 53), (600, 450, 301),
])
def test_blur_sizes_around_the_regimes_are_within_contract(height: int, width: int,
                                                           ksize: int) -> None:
    image = photo(height, width, seed=height)
    assert_within_contract(gaussian_blur(image, ksize), cv2.GaussianBlur(image, (ksize, ksize), 0))


def test_blur_1080p_is_within_contract() -> None:
    image = photo(1080, 1920, noise=0.02)
    assert_within_contract(gaussian_blur(image, 301), cv2.GaussianBlur(image, (301, 301), 0))


@pytest.mark.parametrize("height, width, ksize", [
    (240, 320, 101), (240, 320, 301), (240, 320, 1001), (97, 131, 301), (300, 40, 301),
    (17, 200, 1001), (7, 5, 101), (2, 2, 51), (1, 1, 99),
])
def test_blur_method_error_is_far_inside_contract(height: int, width: int, ksize: int) -> None:
    # On float pixels nothing is rounded: what is left is the method's own error, which
    # must stay a small part of the grey level the contract allows.
    image = photo(height, width).astype(np.float32)
    exact = cv2.GaussianBlur(image, (ksize, ksize), 0)
    assert mean_abs_diff(gaussian_blur(image, ksize), exact) < 0.1


@pytest.mark.parametrize("height, width", [(1, 9), (3, 3), (7, 5), (1, 50), (32, 32), (48, 64)])
@pytest.mark.parametrize("ksize", [101, 301, 5001])
def test_blur_small_image_matches_opencv_bit_for_bit(height: int, width: int, ksize: int) -> None:
    # On a few pixels OpenCV's 8-bit path strays from the true Gaussian by more than a grey
    # level (its kernel is quantised to 1/256); imgserver reproduces it exactly.
    image = photo(height, width)
    assert np.array_equal(gaussian_blur(image, ksize), cv2.GaussianBlur(image, (ksize, ksize), 0))


def test_blur_small_16bit_image_is_the_true_gaussian() -> None:
    image = photo(7, 5, 3, np.uint16)
    for ksize in (301, 10001):
        exact = cv2.GaussianBlur(image.astype(np.float64), (ksize, ksize), 0)
        assert np.abs(gaussian_blur(image, ksize) - exact).max() <= 0.5


def test_blur_kernel_larger_than_image_matches_opencv() -> None:
    image = photo(48, 64)
    for ksize in (129, 1001, 10001):  # 2x, 15x and 150x the image's width
        assert_within_contract(gaussian_blur(image, ksize),
                               cv2.GaussianBlur(image, (ksize, ksize), 0))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_blur_huge_kernel_tends_to_reflected_mean(dtype: type) -> None:
    image = photo(1080, 1920, dtype=dtype)
    result = gaussian_blur(image, 1_000_001)  # would take hours with cv2.GaussianBlur
    assert result.shape == image.shape and result.dtype == image.dtype
    # A kernel far wider than the image averages the reflected image: every pixel is the
    # mean of one period of it, in which the first and last rows and columns count once.
    weights_y = np.full(1080, 2.0)
    weights_y[[0, -1]] = 1
    weights_x = np.full(1920, 2.0)
    weights_x[[0, -1]] = 1
    mean = np.einsum("y,yxc,x->c", weights_y, image.astype(np.float64), weights_x)
    mean /= weights_y.sum() * weights_x.sum()
    scale = 257.0 if dtype == np.uint16 else 1.0
    assert np.abs(result.astype(np.float64) - mean).max() / scale <= 1.0


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
def test_blur_integral_in_bands_is_the_same(monkeypatch: pytest.MonkeyPatch,
                                            dtype: type) -> None:
    # Large images are summed in bands of rows (32-bit sums stay exact); a band size that
    # does not divide the height must give the very same pixels.
    image = photo(301, 257, 3, dtype)
    whole = gaussian_blur(image, 301)
    monkeypatch.setattr(blur, "BAND_PIXELS", 257 * 37)
    assert np.array_equal(gaussian_blur(image, 301), whole)


@pytest.mark.parametrize("text", ["blur=100", "blur=0,20", "blur=51,3", "blur=1000001,2"])
def test_blur_even_zero_and_sigma_forms_match_opencv(text: str) -> None:
    op = parse_operation(text, Context(Path("/nonexistent-root")))
    image = photo(120, 160)
    ksize, sigma = kernel_parameters(op.ksize, op.sigma, image.dtype)
    reference_ksize = ksize if ksize < 1000 else 401  # 2*8*sigma+1 covers every weight
    reference = cv2.GaussianBlur(image, (reference_ksize, reference_ksize),
                                 op.sigma if op.sigma else 0)
    assert_within_contract(gaussian_blur(image, op.ksize, op.sigma), reference)


def test_blur_zero_kernel_uses_opencv_size_from_sigma() -> None:
    image = photo(50, 50)
    assert kernel_parameters(0, 1.0, np.dtype(np.uint8)) == (7, 1.0)
    assert kernel_parameters(0, 1.0, np.dtype(np.uint16)) == (9, 1.0)
    assert np.array_equal(gaussian_blur(image, 0, 2.5), cv2.GaussianBlur(image, (0, 0), 2.5))


# -- from the means of 8x8 blocks (what a JPEG decoded at 1/8 gives) -----------------------

def block_means(image: np.ndarray) -> np.ndarray:
    """The means of the image's 8x8 blocks, rounded to 8 bits (cv2.INTER_AREA by 8)."""
    height, width = image.shape[:2]
    return cv2.resize(image, (width // 8, height // 8), interpolation=cv2.INTER_AREA)


@pytest.mark.parametrize("ksize, sigma", [(265, 0), (301, 0), (501, 0), (1001, 0), (2001, 0),
                                          (0, 45), (0, 150), (1001, 45)])
@pytest.mark.parametrize("channels", [1, 3])
def test_blur_from_blocks_is_within_contract(ksize: int, sigma: float, channels: int) -> None:
    # blur_blocks itself works on any size: small images keep the reference cheap.
    image = photo(128, 192, channels, noise=0.02, seed=ksize)
    result = blur_blocks(block_means(image), 192, 128, ksize, sigma)
    reference_ksize = kernel_parameters(ksize, sigma, image.dtype)[0]
    assert_within_contract(result, cv2.GaussianBlur(image, (reference_ksize,) * 2, sigma))


def test_blur_from_blocks_1080p_is_within_contract() -> None:
    image = photo(1080, 1920, noise=0.02, seed=7)
    assert blocks_suffice(1920, 1080, 301)
    result = blur_blocks(block_means(image), 1920, 1080, 301)
    assert_within_contract(result, cv2.GaussianBlur(image, (301, 301), 0))


@pytest.mark.parametrize("ksize", [265, 501])
def test_blur_from_blocks_keeps_a_framed_image_within_contract(ksize: int) -> None:
    # The worst case of the block edges as mirror lines: a frame of lines 255 levels off
    # the rest, on the smallest image allowed.
    side = blur.LOAD_SIDE
    image = np.zeros((side, side), np.uint8)
    image[[0, -1]] = 255
    image[:, [0, -1]] = 255
    assert blocks_suffice(side, side, ksize)
    result = blur_blocks(block_means(image), side, side, ksize)
    assert_within_contract(result, cv2.GaussianBlur(image, (ksize, ksize), 0))


@pytest.mark.parametrize("width, height, ksize, sigma", [
    (1920, 1080, 263, 0),   # sigma 39.8: below LOAD_SIGMA
    (1920, 1080, 301, 60),  # cut short at 2.5 sigma: its finest feature is the cut
    (1924, 1080, 301, 0),   # not whole blocks
    (1920, 1084, 301, 0),
    (1920, 1016, 301, 0),   # below LOAD_SIDE
    (1920, 1080, 51, 0),    # OpenCV's own
])
def test_blur_from_blocks_declines(width: int, height: int, ksize: int, sigma: float) -> None:
    assert not blocks_suffice(width, height, ksize, sigma)
    assert blocks_suffice(1920, 1080, 265) and blocks_suffice(1024, 1024, 1_000_001)
