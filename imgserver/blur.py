"""A Gaussian blur that costs the same for any kernel size and matches ``cv2.GaussianBlur``.

``cv2.GaussianBlur`` costs time in proportion to the kernel size K, so ``blur=1001`` on a
photo takes seconds. A wide Gaussian is smooth, so it can be computed on a smaller copy of
the image and interpolated back without visible loss. The subtle part is the border:
OpenCV reflects the image about its first and last pixel centres (``BORDER_REFLECT_101``),
and a kernel wider than the image sees many reflections. Both are kept exact here:

    image --(2x2 mean: samples between pixel centres)--> the area between the two
          mirror lines, [centre 0, centre n-1]
          --(area resize to s cells)--> small image whose edges are the mirror lines
          --(Gaussian, sigma / cell, BORDER_REFLECT, kernel folded onto one period)-->
          --(bilinear, cell edges back on the pixel centres)--> blurred image

A kernel longer than the reflected period is folded onto it (the reflected image is
periodic), so its cost is bounded by the image size, not by K. Three regimes:

- small kernels go straight to ``cv2.GaussianBlur``: the reference itself;
- small images are blurred exactly at full size with folded kernels. For 8-bit images this
  reproduces OpenCV's fixed-point path bit for bit (its kernel quantised to 1/256 with error
  diffusion, integer sums, one rounding), which matters on a few pixels: there OpenCV's
  8-bit result strays from the true Gaussian by more than a grey level;
- everything else runs on the reduced image, a few hundredths of a grey level from the
  reference on average (tests/test_blur.py measures it), far inside the one level allowed.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

#: Below this sigma (or kernel radius) cv2.GaussianBlur is cheap enough to use as it is.
DIRECT_SIGMA = 8.0
DIRECT_RADIUS = 24
#: Sigma, in cells of the reduced image: large enough that the blur is smooth on the cells.
CELL_SIGMA = 4.0
#: A reduced axis keeps at least this many cells.
MIN_CELLS = 16
#: Gaussian weights beyond this many sigmas are below 1e-13 of the peak: drop them.
TAIL_SIGMAS = 8
#: Kernels wider than this many taps are uniform over any period they fold onto.
MAX_TAPS = 2_000_000
#: Blurring at full size is exact; it is used while it costs at most this many
#: multiply-adds per channel (a 128 x 128 image with a kernel wider than itself).
EXACT_BUDGET = 10_000_000
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


def gaussian_blur(image: np.ndarray, ksize: int, sigma: float = 0.0) -> np.ndarray:
    """``cv2.GaussianBlur(image, (ksize, ksize), sigma)``, at a cost independent of ksize."""
    requested = (ksize, sigma)
    ksize, sigma = kernel_parameters(ksize, sigma, image.dtype)
    # Taps beyond TAIL_SIGMAS weigh nothing; dropping them keeps a huge K with a small S cheap.
    radius = min(ksize // 2, math.ceil(TAIL_SIGMAS * sigma))
    if sigma < DIRECT_SIGMA or radius <= DIRECT_RADIUS:
        if radius == ksize // 2:  # the very call the user would make (small kernels use a table)
            return cv2.GaussianBlur(image, (requested[0],) * 2, requested[1])
        return cv2.GaussianBlur(image, (2 * radius + 1, 2 * radius + 1), sigma)
    height, width = image.shape[:2]
    full_cost = height * width * (min(2 * radius + 1, 2 * width - 1)
                                  + min(2 * radius + 1, 2 * height - 1))
    if full_cost <= EXACT_BUDGET:
        if image.dtype == np.uint8 and ksize <= MAX_EMULATED_TAPS:
            return _opencv_fixed_point(image, ksize, sigma)
        return _full_size(image, radius, sigma)
    # The kernel's finest feature sets how far the image may be reduced: its width, or,
    # when K cuts the Gaussian short (before 3 sigma), the cut itself: a near box has hard
    # edges, which need ten cells to come out right.
    scale = sigma if radius >= 3 * sigma else radius / 10
    x_axis = _Axis.plan(width, sigma, radius, scale)
    y_axis = _Axis.plan(height, sigma, radius, scale)
    work = image
    if x_axis.reduced or y_axis.reduced:
        # Means of 2x2 neighbours: samples on the area between the mirror lines.
        box = (2 if x_axis.reduced else 1, 2 if y_axis.reduced else 1)
        work = cv2.boxFilter(image, cv2.CV_32F, box, anchor=(0, 0),
                             borderType=cv2.BORDER_REPLICATE)
        work = work[:height - (box[1] - 1), :width - (box[0] - 1)]
        work = cv2.resize(work, (x_axis.cells, y_axis.cells), interpolation=cv2.INTER_AREA)
    else:
        work = image.astype(np.float32)
    one = np.ones(1, np.float32)
    work = cv2.sepFilter2D(work, -1, x_axis.kernel, one, borderType=x_axis.border)
    work = cv2.sepFilter2D(work, -1, one, y_axis.kernel, borderType=y_axis.border)
    if x_axis.reduced or y_axis.reduced:
        # Output pixel i lies at cell coordinate i / cell - 0.5 (cell edges on pixel centres).
        matrix = np.array([[x_axis.scale, 0, x_axis.offset],
                           [0, y_axis.scale, y_axis.offset]], np.float32)
        work = cv2.warpAffine(work, matrix, (width, height),
                              flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                              borderMode=cv2.BORDER_REFLECT)
    return _to_dtype(work, image.dtype).reshape(image.shape)


class _Axis:
    """How one axis is blurred: reduced to ``cells`` cells, or exactly at full size."""

    def __init__(self, cells: int, cell: float, kernel: np.ndarray, border: int) -> None:
        self.cells, self.cell, self.kernel, self.border = cells, cell, kernel, border

    @property
    def reduced(self) -> bool:
        return self.cell != 1.0

    @property
    def scale(self) -> float:
        return 1.0 / self.cell if self.reduced else 1.0

    @property
    def offset(self) -> float:
        return -0.5 if self.reduced else 0.0

    @classmethod
    def plan(cls, length: int, sigma: float, radius: int, scale: float) -> _Axis:
        factor = min(scale / CELL_SIGMA, (length - 1) / MIN_CELLS)
        if factor < 2:
            kernel = _folded_kernel(radius, sigma, 2 * (length - 1), length - 1)
            return cls(length, 1.0, kernel, cv2.BORDER_REFLECT_101)
        cells = round((length - 1) / factor)
        cell = (length - 1) / cells
        # The 2x2 mean, the area cells and the bilinear return each widen the blur a little;
        # take their variance off (measured best: a quarter of a cell squared in all).
        cell_sigma = math.sqrt(max(sigma * sigma - 0.25 - 0.25 * cell * cell, 1e-6)) / cell
        kernel = _folded_kernel(int(radius / cell), cell_sigma, 2 * cells, cells)
        return cls(cells, cell, kernel, cv2.BORDER_REFLECT)


def _full_size(image: np.ndarray, radius: int, sigma: float) -> np.ndarray:
    """The exact blur, at full size, with kernels folded onto the reflected period."""
    height, width = image.shape[:2]
    kernel_x = _folded_kernel(radius, sigma, 2 * (width - 1), width - 1)
    kernel_y = _folded_kernel(radius, sigma, 2 * (height - 1), height - 1)
    work = cv2.sepFilter2D(image.astype(np.float64), cv2.CV_64F, kernel_x.astype(np.float64),
                           kernel_y.astype(np.float64), borderType=cv2.BORDER_REFLECT_101)
    return _to_dtype(work, image.dtype).reshape(image.shape)


def _opencv_fixed_point(image: np.ndarray, ksize: int, sigma: float) -> np.ndarray:
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
    kernel_x = _fold_integer_taps(kernel, width)
    kernel_y = _fold_integer_taps(kernel, height)
    rows = cv2.sepFilter2D(image.astype(np.float64), cv2.CV_64F, kernel_x, np.ones(1),
                           borderType=cv2.BORDER_REFLECT_101)
    sums = cv2.sepFilter2D(rows, cv2.CV_64F, np.ones(1), kernel_y,
                           borderType=cv2.BORDER_REFLECT_101)
    return np.floor((sums + 32768) / 65536).astype(np.uint8).reshape(image.shape)


def _fold_integer_taps(kernel: np.ndarray, length: int) -> np.ndarray:
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


def _folded_kernel(radius: int, sigma: float, period: int, half: int) -> np.ndarray:
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


def _to_dtype(values: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype == np.uint8:
        return cv2.convertScaleAbs(values)  # rounds and saturates; values are never negative
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is None:
        return values.astype(dtype)
    return np.clip(np.rint(values), info.min, info.max).astype(dtype)
