"""The blur matches cv2.GaussianBlur for every kernel size, at a cost independent of it."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from imgserver.blur import gaussian_blur, kernel_parameters
from imgserver.operations import parse_operation

from conftest import mean_abs_diff, photo

# What the SPEC allows: one grey level on average. The float reference shows the method's
# own error; the uint8 reference adds OpenCV's fixed-point rounding.
TOLERANCE = 1.0


@pytest.mark.parametrize("ksize", [1, 3, 5, 31])
def test_blur_small_kernel_is_opencv_exactly(ksize: int) -> None:
    image = photo(60, 80)
    assert np.array_equal(gaussian_blur(image, ksize), cv2.GaussianBlur(image, (ksize, ksize), 0))


@pytest.mark.parametrize("height, width, ksize", [
    (240, 320, 51), (240, 320, 101), (240, 320, 301), (240, 320, 1001),
    (97, 131, 101), (97, 131, 301), (97, 131, 3001),
    (300, 40, 301), (33, 500, 151), (17, 200, 1001),
    (7, 5, 101), (2, 2, 51), (1, 1, 99),
])
def test_blur_large_kernel_matches_opencv(height: int, width: int, ksize: int) -> None:
    image = photo(height, width)
    exact = cv2.GaussianBlur(image.astype(np.float32), (ksize, ksize), 0)
    assert mean_abs_diff(gaussian_blur(image.astype(np.float32), ksize), exact) < 0.1
    reference = cv2.GaussianBlur(image, (ksize, ksize), 0)
    result = gaussian_blur(image, ksize)
    assert result.dtype == np.uint8 and result.shape == image.shape
    assert mean_abs_diff(result, reference) <= TOLERANCE


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


@pytest.mark.parametrize("ksize, sigma", [(51, 1000), (101, 50), (301, 500), (201, 30)])
def test_blur_wide_sigma_cut_short_by_kernel_matches_opencv(ksize: int, sigma: float) -> None:
    image = photo(240, 320)
    reference = cv2.GaussianBlur(image, (ksize, ksize), sigma)
    assert mean_abs_diff(gaussian_blur(image, ksize, sigma), reference) <= 0.3


def test_blur_kernel_larger_than_image_matches_opencv() -> None:
    image = photo(48, 64)
    for ksize in (129, 1001, 10001):  # 2x, 15x and 150x the image's width
        reference = cv2.GaussianBlur(image, (ksize, ksize), 0)
        assert mean_abs_diff(gaussian_blur(image, ksize), reference) <= TOLERANCE


def test_blur_huge_kernel_tends_to_reflected_mean() -> None:
    image = photo(1080, 1920)
    result = gaussian_blur(image, 1_000_001)  # would take hours with cv2.GaussianBlur
    assert result.shape == image.shape
    # A kernel far wider than the image averages the reflected image: every pixel is the
    # mean of one period of it, in which the first and last rows and columns count once.
    weights_y = np.full(1080, 2.0)
    weights_y[[0, -1]] = 1
    weights_x = np.full(1920, 2.0)
    weights_x[[0, -1]] = 1
    mean = np.einsum("y,yxc,x->c", weights_y, image.astype(np.float64), weights_x)
    mean /= weights_y.sum() * weights_x.sum()
    assert np.abs(result.astype(np.float64) - mean).max() <= 1.0


@pytest.mark.parametrize("text", ["blur=100", "blur=0,20", "blur=51,3", "blur=1000001,2"])
def test_blur_even_zero_and_sigma_forms_match_opencv(text: str) -> None:
    op = parse_operation(text)
    image = photo(120, 160)
    ksize, sigma = kernel_parameters(op.ksize, op.sigma, image.dtype)
    reference_ksize = ksize if ksize < 1000 else 401  # 2*8*sigma+1 covers every weight
    reference = cv2.GaussianBlur(image, (reference_ksize, reference_ksize),
                                 op.sigma if op.sigma else 0)
    assert mean_abs_diff(gaussian_blur(image, op.ksize, op.sigma), reference) <= TOLERANCE


def test_blur_zero_kernel_uses_opencv_size_from_sigma() -> None:
    image = photo(50, 50)
    assert kernel_parameters(0, 1.0, np.dtype(np.uint8)) == (7, 1.0)
    assert kernel_parameters(0, 1.0, np.dtype(np.uint16)) == (9, 1.0)
    assert np.array_equal(gaussian_blur(image, 0, 2.5), cv2.GaussianBlur(image, (0, 0), 2.5))


@pytest.mark.parametrize("channels, dtype", [(1, np.uint8), (4, np.uint8), (3, np.uint16),
                                             (4, np.uint16)])
def test_blur_keeps_channels_and_depth(channels: int, dtype: type) -> None:
    image = photo(90, 120, channels, dtype)
    result = gaussian_blur(image, 301)
    assert result.dtype == image.dtype and result.shape == image.shape
    reference = cv2.GaussianBlur(image, (301, 301), 0)
    scale = 257.0 if dtype == np.uint16 else 1.0  # compare in 8-bit grey levels
    assert mean_abs_diff(result, reference) / scale <= TOLERANCE
