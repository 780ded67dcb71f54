"""A Gaussian blur that costs the same for any kernel size and matches ``cv2.GaussianBlur``.

``cv2.GaussianBlur`` costs time in proportion to the kernel size K, so ``blur=1001`` on a
photo takes seconds. A wide Gaussian is smooth, so it can be computed on a smaller copy of
the image and interpolated back without visible loss. The subtle part is the border:
OpenCV reflects the image about its first and last pixel centres (``BORDER_REFLECT_101``),
and a kernel wider than the image sees many reflections. Both are kept exact here:

    image --(integral image, read at the cell corners)--> the mean of each cell, where the
          cells exactly tile the area between the two mirror lines [centre 0, centre n-1]
          --(Gaussian, sigma / cell, BORDER_REFLECT, kernel folded onto one period)-->
          --(bilinear, cell edges on the outer pixel centres; via a coarse grid and an
             exact integer resize)--> blurred image

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
    one = np.ones(1, np.float32)
    if x_axis.reduced or y_axis.reduced:
        work = _cell_means(image, x_axis, y_axis)
    else:
        work = image.astype(np.float32)
    work = cv2.sepFilter2D(work, -1, x_axis.kernel, one, borderType=x_axis.border)
    work = cv2.sepFilter2D(work, -1, one, y_axis.kernel, borderType=y_axis.border)
    if x_axis.reduced or y_axis.reduced:
        work = _upsample(work, x_axis, y_axis, width, height)
    return _to_dtype(work, image.dtype).reshape(image.shape)


def _cell_means(image: np.ndarray, x_axis: _Axis, y_axis: _Axis) -> np.ndarray:
    """The mean of the image over each cell (float32), exactly, from its integral image.

    The integral of pixels that are constant over their squares is bilinear inside each
    pixel, so interpolating the integral image at a cell's corners gives the exact sum
    over the cell, wherever its edges fall. Cells of a reduced axis start at the first pixel
    centre and end at the last (the mirror lines); cells of a full axis are the pixels.
    """
    height, width = image.shape[:2]
    exact_in_int32 = image.dtype == np.uint8 and height * width < (2**31 - 1) // 255
    sums = cv2.integral(image, sdepth=cv2.CV_32S if exact_in_int32 else cv2.CV_64F)
    if sums.ndim == 2:
        sums = sums[..., None]
    corners = _interpolate(_interpolate(sums, x_axis.edges(width), 1), y_axis.edges(height), 0)
    means = np.diff(np.diff(corners, axis=0), axis=1) / (x_axis.cell * y_axis.cell)
    means = means.astype(np.float32)
    return means[..., 0] if image.ndim == 2 else means


def _interpolate(values: np.ndarray, positions: np.ndarray, axis: int) -> np.ndarray:
    """``values`` linearly interpolated at fractional ``positions`` along ``axis``."""
    low = np.clip(np.floor(positions).astype(np.int64), 0, values.shape[axis] - 2)
    weight = positions - low
    shape = [1] * values.ndim
    shape[axis] = len(positions)
    weight = weight.reshape(shape)
    below = np.take(values, low, axis=axis).astype(np.float64)
    above = np.take(values, low + 1, axis=axis).astype(np.float64)
    return below + (above - below) * weight


def _upsample(small: np.ndarray, x_axis: _Axis, y_axis: _Axis, width: int,
              height: int) -> np.ndarray:
    """Cells back to pixels, bilinearly, cell edges on the outer pixel centres.

    In two steps, since cv2.warpAffine is slow on a whole image: an exact affine warp to
    an intermediate grid ``step`` times coarser than the pixels, then cv2.resize by exactly
    ``step`` (edge-aligned, which puts that grid's samples right on the pixels'), cropped.
    """
    steps = (x_axis.step, y_axis.step)
    size = (-(-width // steps[0]), -(-height // steps[1]))
    matrix = np.array([[x_axis.warp_scale, 0, x_axis.warp_offset],
                       [0, y_axis.warp_scale, y_axis.warp_offset]], np.float32)
    middle = cv2.warpAffine(small, matrix, size, flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                            borderMode=cv2.BORDER_REFLECT)
    if steps == (1, 1):
        return middle
    full = cv2.resize(middle, None, fx=steps[0], fy=steps[1], interpolation=cv2.INTER_LINEAR)
    return full[:height, :width]


class _Axis:
    """How one axis is blurred: reduced to ``cells`` cells, or exactly at full size."""

    def __init__(self, cells: int, cell: float, kernel: np.ndarray, border: int) -> None:
        self.cells, self.cell, self.kernel, self.border = cells, cell, kernel, border

    @property
    def reduced(self) -> bool:
        return self.cell != 1.0

    @property
    def step(self) -> int:
        """Pixels per sample of the intermediate grid of the upsampling (1: none)."""
        return max(1, int(self.cell // 2)) if self.reduced else 1

    @property
    def warp_scale(self) -> float:
        return self.step / self.cell if self.reduced else 1.0

    @property
    def warp_offset(self) -> float:
        # Intermediate sample m sits on pixel (m + 0.5) * step - 0.5; pixel x on cell
        # coordinate x / cell - 0.5 (cell edges on the outer pixel centres).
        if not self.reduced:
            return 0.0
        return (0.5 * self.step - 0.5) / self.cell - 0.5

    def edges(self, length: int) -> np.ndarray:
        """Where the cells begin and end, in pixel edge coordinates (pixel i spans [i, i+1))."""
        if not self.reduced:
            return np.arange(length + 1, dtype=np.float64)
        return 0.5 + np.arange(self.cells + 1, dtype=np.float64) * self.cell

    @classmethod
    def plan(cls, length: int, sigma: float, radius: int, scale: float) -> _Axis:
        factor = min(scale / CELL_SIGMA, (length - 1) / MIN_CELLS)
        if factor < 2:
            kernel = _folded_kernel(radius, sigma, 2 * (length - 1), length - 1)
            return cls(length, 1.0, kernel, cv2.BORDER_REFLECT_101)
        cells = round((length - 1) / factor)
        cell = (length - 1) / cells
        # Averaging over cells and interpolating back (cells to the grid, grid to pixels)
        # each widen the blur a little: take their variance off.
        step = max(1, int(cell // 2))
        widening = cell * cell / 12 + cell * cell / 6 + step * step / 6
        cell_sigma = math.sqrt(max(sigma * sigma - widening, 1e-6)) / cell
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
