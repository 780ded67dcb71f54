"""Gaussian kernels as ``cv2.GaussianBlur`` builds them, folded onto an image's reflected
period, and the exact blurs at full size made with them (``imgserver.images.blur`` uses
them for the images small enough to blur exactly).

OpenCV reflects an image about its first and last pixel centres (``BORDER_REFLECT_101``),
so the reflected image repeats every ``2 (n - 1)`` samples: taps of a kernel that are one
period apart touch the same samples and can be added up. A kernel of any length then costs
at most one period of taps.
"""

from __future__ import annotations

import cv2
import numpy as np

#: Kernels wider than this many taps are uniform over any period they fold onto.
MAX_TAPS = 2_000_000
#: OpenCV's 8-bit kernel is emulated up to this size (it is built tap by tap).
MAX_EMULATED_TAPS = 4_000_001


def kernel_parameters(ksize: int, sigma: float, dtype: np.dtype) -> tuple[int, float]:
    """The odd kernel size and the sigma that ``cv2.GaussianBlur(ksize, sigma)`` would use."""
    if ksize <= 0:
        # OpenCV's rule for a kernel computed from sigma (createGaussianKernels).
        ksize = int(round(sigma * (3 if dtype == np.uint8 else 4) * 2 + 1)) | 1
    elif ksize % 2 == 0:
        ksize += 1
    if sigma <= 0:
        sigma = 0.3 * ((ksize - 1) * 0.5 - 1) + 0.8  # OpenCV's default sigma for ksize
    return ksize, sigma


def full_size_blur(image: np.ndarray, radius: int, sigma: float) -> np.ndarray:
    """The exact blur, at full size, with kernels folded onto the reflected period."""
    height, width = image.shape[:2]
    kernel_x = folded_kernel(radius, sigma, 2 * (width - 1), width - 1)
    kernel_y = folded_kernel(radius, sigma, 2 * (height - 1), height - 1)
    work = cv2.sepFilter2D(image.astype(np.float64), cv2.CV_64F, kernel_x.astype(np.float64),
                           kernel_y.astype(np.float64), borderType=cv2.BORDER_REFLECT_101)
    return to_dtype(work, image.dtype).reshape(image.shape)


def opencv_fixed_point(image: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
    """``cv2.GaussianBlur`` on 8-bit pixels, bit for bit, at a cost bounded by the image size.

    OpenCV quantises the kernel to multiples of 1/256, rounding with error diffusion so the
    taps sum to exactly 1 (getGaussianKernelFixedPoint_ED); it sums each row exactly and
    rounds once at the end, ``(sum + 2^15) >> 16``. Integer taps that are a reflected period
    apart are added up (folding), which keeps every sum exact; float64 holds them exactly.
    """
    half = ksize // 2
    positions = np.arange(half) - (ksize - 1) / 2
    weights = np.exp(-(positions * positions) / (2.0 * sigma * sigma))
    total = 2 * weights.sum() + 1.0  # the centre tap weighs exp(0) = 1
    # Error diffusion: each rounded tap carries its rounding error to the next one, so the
    # running sum of rounded taps is the rounded running sum of exact taps.
    running = np.rint(np.cumsum(weights / total * 256))
    side = np.diff(running, prepend=0.0)
    kernel = np.concatenate([side, [256 - 2 * side.sum()], side[::-1]])
    height, width = image.shape[:2]
    kernel_x = fold_integer_taps(kernel, width)
    kernel_y = fold_integer_taps(kernel, height)
    rows = cv2.sepFilter2D(image.astype(np.float64), cv2.CV_64F, kernel_x, np.ones(1),
                           borderType=cv2.BORDER_REFLECT_101)
    sums = cv2.sepFilter2D(rows, cv2.CV_64F, np.ones(1), kernel_y,
                           borderType=cv2.BORDER_REFLECT_101)
    return np.floor((sums + 32768) / 65536).astype(np.uint8).reshape(image.shape)


def fold_integer_taps(kernel: np.ndarray, length: int) -> np.ndarray:
    """``kernel`` (centred) folded onto the reflect-101 period of an axis of ``length``."""
    if length == 1:
        return np.array([kernel.sum()])
    period = 2 * (length - 1)
    if len(kernel) <= period:
        return kernel
    offsets = np.arange(len(kernel)) - len(kernel) // 2
    weights = np.bincount(offsets % period, weights=kernel, minlength=period)
    folded = weights[np.arange(-(length - 1), length) % period]
    folded[0] /= 2  # offsets -(n-1) and n-1 are one period apart: they share the weight
    folded[-1] /= 2
    return folded


def folded_kernel(radius: int, sigma: float, period: int, half: int) -> np.ndarray:
    """Normalised Gaussian taps -radius..radius; folded onto one period when longer than it.

    The reflected image repeats every ``period`` samples, so taps that are a period apart
    touch the same samples and can be summed: the folded kernel spans -half..half, its two
    end taps (one period apart) sharing the weight of their residue.
    """
    if period == 0:
        return np.ones(1, np.float32)
    if 2 * radius + 1 > MAX_TAPS:
        weights: np.ndarray = np.ones(period)
    else:
        taps = np.arange(-radius, radius + 1)
        gauss = np.exp(-(taps * taps) / (2.0 * sigma * sigma))
        if 2 * radius + 1 <= period:
            return (gauss / gauss.sum()).astype(np.float32)
        weights = np.bincount(taps % period, weights=gauss, minlength=period)
    kernel = weights[np.arange(-half, half + 1) % period]
    kernel[0] /= 2
    kernel[-1] /= 2
    return (kernel / kernel.sum()).astype(np.float32)


def to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``values`` rounded and saturated to ``dtype``."""
    if dtype == np.uint8:
        return cv2.convertScaleAbs(values)  # rounds and saturates; values are never negative
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is None:
        return values.astype(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)
