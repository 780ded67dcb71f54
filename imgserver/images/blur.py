"""A Gaussian blur that costs the same for any kernel size and matches ``cv2.GaussianBlur``.

``cv2.GaussianBlur`` costs time in proportion to the kernel size K, so ``blur=1001`` on a
photo takes seconds. A wide Gaussian is smooth, so it can be computed on a smaller copy of
the image and interpolated back without visible loss. The subtle part is the border:
OpenCV reflects the image about its first and last pixel centres (``BORDER_REFLECT_101``),
and a kernel wider than the image sees many reflections. Both are kept exact here:

    image --(integral image, read at the cell corners)--> the mean of each cell, where the
          cells exactly tile the area between the two mirror lines [centre 0, centre n-1]
          --(Gaussian, sigma / cell, BORDER_REFLECT, kernel folded onto one period)-->
          --(shifted onto cv2.resize's sample grid, rounded to the image's depth)-->
          --(one bilinear cv2.resize by the cell size, cropped)--> blurred image

A kernel longer than the reflected period is folded onto it (the reflected image is
periodic), so its cost is bounded by the image size, not by K. Three regimes:

- small kernels go straight to ``cv2.GaussianBlur``: the reference itself;
- small images are blurred exactly at full size with folded kernels. For 8-bit images this
  reproduces OpenCV's fixed-point path bit for bit (its kernel quantised to 1/256 with error
  diffusion, integer sums, one rounding), which matters on a few pixels: there OpenCV's
  8-bit result strays from the true Gaussian by more than a grey level;
- everything else runs on the reduced image: about 0.2 grey levels from OpenCV's 8-bit
  result on average and at most one or two on photos (tests/images/test_blur.py measures it), most
  of it from rounding the cells to 8 bits before the one pass over the whole image.

A JPEG can skip most of that work for the widest blurs on large images (``blur_blocks``):
libjpeg decodes it at 1/8 from the DC coefficients alone, which are the means of its 8 x 8
blocks; cells made of whole blocks need no integral image. Block edges fall on pixel edges,
so there the mirror lines are half a pixel off OpenCV's. That costs nothing on a photo, but
an image framed by a line 255 levels off the rest is up to 255 / (sigma sqrt(2 pi)) levels
off near the frame and 255 / side on average per side: hence only from LOAD_SIGMA and
LOAD_SIDE on.
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from imgserver.images.kernels import (
    MAX_EMULATED_TAPS,
    folded_kernel,
    full_size_blur,
    kernel_parameters,
    opencv_fixed_point,
    to_dtype,
)

#: Below this sigma (or kernel radius) cv2.GaussianBlur is cheap enough to use as it is.
DIRECT_SIGMA = 8.0
DIRECT_RADIUS = 24
#: Sigma, in cells of the reduced image: large enough that the blur is smooth on the cells.
CELL_SIGMA = 4.0
#: A reduced axis keeps at least this many cells.
MIN_CELLS = 16
#: Gaussian weights beyond this many sigmas are below 1e-13 of the peak: drop them.
TAIL_SIGMAS = 8
#: Blurring at full size is exact; it is used while it costs at most this many
#: multiply-adds per channel (a 128 x 128 image with a kernel wider than itself).
EXACT_BUDGET = 10_000_000
#: The integral image is computed in bands of at most this many pixels: 32-bit sums of
#: 8-bit pixels stay exact (below 2**31 / 255 pixels), and memory stays bounded.
BAND_PIXELS = 1 << 22
#: The side of the blocks whose means a JPEG decoded at 1/8 gives.
BLOCK = 8
#: From this sigma on a blur may start from those means: the mirror lines half a pixel off
#: cost at most 255 / (40 sqrt(2 pi)) = 2.5 grey levels per border there...
LOAD_SIGMA = 40.0
#: ... and only on images at least this many pixels a side: the outermost rows and columns
#: then count twice per reflected period instead of once, which moves the average of an
#: image framed by a line 255 levels off the rest by up to 255 / side per border.
LOAD_SIDE = 1024


def gaussian_blur(image: np.ndarray, ksize: int, sigma: float = 0.0) -> np.ndarray:
    """``cv2.GaussianBlur(image, (ksize, ksize), sigma)``, at a cost independent of ksize."""
    requested = (ksize, sigma)
    ksize, sigma = kernel_parameters(ksize, sigma, image.dtype)
    radius = _radius(ksize, sigma)
    if _direct(sigma, radius):
        if radius == ksize // 2:  # the very call the user would make (small kernels use a table)
            return cv2.GaussianBlur(image, (requested[0],) * 2, requested[1])
        return cv2.GaussianBlur(image, (2 * radius + 1, 2 * radius + 1), sigma)
    height, width = image.shape[:2]
    if _exact_cost(width, height, radius) <= EXACT_BUDGET:
        if image.dtype == np.uint8 and ksize <= MAX_EMULATED_TAPS:
            return opencv_fixed_point(image, ksize, sigma)
        return full_size_blur(image, radius, sigma)
    scale = _finest(sigma, radius)
    x_axis = _Axis.plan(width, sigma, radius, scale)
    y_axis = _Axis.plan(height, sigma, radius, scale)
    one = np.ones(1, np.float32)
    reduced = x_axis.reduced or y_axis.reduced
    work = _cell_means(image, x_axis, y_axis) if reduced else image.astype(np.float32)
    work = cv2.sepFilter2D(work, -1, x_axis.kernel, one, borderType=x_axis.border)
    work = cv2.sepFilter2D(work, -1, one, y_axis.kernel, borderType=y_axis.border)
    if reduced:
        return _upsample(work, x_axis, y_axis, width, height, image.dtype).reshape(image.shape)
    return to_dtype(work, image.dtype).reshape(image.shape)


def blocks_suffice(width: int, height: int, ksize: int, sigma: float = 0.0) -> bool:
    """Whether this blur of an 8-bit ``width`` x ``height`` image may be computed from the
    means of its BLOCK x BLOCK blocks alone (``blur_blocks``)."""
    ksize, sigma = kernel_parameters(ksize, sigma, np.dtype(np.uint8))
    radius = _radius(ksize, sigma)
    return (not _direct(sigma, radius) and _exact_cost(width, height, radius) > EXACT_BUDGET
            and _finest(sigma, radius) >= max(LOAD_SIGMA, BLOCK * CELL_SIGMA)
            and width % BLOCK == 0 and height % BLOCK == 0
            and min(width, height) >= LOAD_SIDE)


def blur_blocks(blocks: np.ndarray, width: int, height: int, ksize: int,
                sigma: float = 0.0) -> np.ndarray:
    """``gaussian_blur`` of an 8-bit ``width`` x ``height`` image, from the means of its
    BLOCK x BLOCK blocks (``blocks``, 8-bit, as libjpeg decodes a JPEG at 1/8).

    The blocks' edges are the mirror lines here (BORDER_REFLECT on the blocks): half a pixel
    from OpenCV's, which ``blocks_suffice`` allows for.
    """
    ksize, sigma = kernel_parameters(ksize, sigma, np.dtype(np.uint8))
    radius = _radius(ksize, sigma)
    scale = _finest(sigma, radius)
    rows, columns = blocks.shape[:2]
    kernels, cells = [], []
    for length, count in ((width, columns), (height, rows)):
        # Coarser cells where the kernel allows, averaged from the blocks (cv2.INTER_AREA
        # weighs each block by how much of it a cell covers).
        cell_count = min(count, max(MIN_CELLS, round(length * CELL_SIGMA / scale)))
        cell = length / cell_count
        widening = cell * cell / 12 + cell * cell / 6  # averaging, and the resize back
        if cell_count != count:
            widening += BLOCK * BLOCK / 12  # the blocks' own averaging, under the cells'
        kernels.append(_cell_kernel(radius, sigma, cell, cell_count, widening))
        cells.append(cell_count)
    work: np.ndarray = blocks.astype(np.float32)
    if (cells[0], cells[1]) != (columns, rows):
        work = cv2.resize(work, (cells[0], cells[1]), interpolation=cv2.INTER_AREA)
    one = np.ones(1, np.float32)
    work = cv2.sepFilter2D(work, -1, kernels[0], one, borderType=cv2.BORDER_REFLECT)
    work = cv2.sepFilter2D(work, -1, one, kernels[1], borderType=cv2.BORDER_REFLECT)
    # Cell k's centre is on pixel (k + 0.5) * cell - 0.5, where cv2.resize puts it; before
    # the first centre it holds the first cell, as the reflection would.
    return cv2.resize(to_dtype(work, np.dtype(np.uint8)), (width, height),
                      interpolation=cv2.INTER_LINEAR)


def _radius(ksize: int, sigma: float) -> int:
    # Taps beyond TAIL_SIGMAS weigh nothing; dropping them keeps a huge K with a small S cheap.
    return min(ksize // 2, math.ceil(TAIL_SIGMAS * sigma))


def _direct(sigma: float, radius: int) -> bool:
    return sigma < DIRECT_SIGMA or radius <= DIRECT_RADIUS


def _exact_cost(width: int, height: int, radius: int) -> int:
    """Multiply-adds per channel of the exact blur at full size."""
    return height * width * (min(2 * radius + 1, 2 * width - 1)
                             + min(2 * radius + 1, 2 * height - 1))


def _finest(sigma: float, radius: int) -> float:
    # The kernel's finest feature sets how far the image may be reduced: its width, or,
    # when K cuts the Gaussian short (before 3 sigma), the cut itself: a near box has hard
    # edges, which need ten cells to come out right.
    return sigma if radius >= 3 * sigma else radius / 10


def _cell_kernel(radius: int, sigma: float, cell: float, cells: int,
                 widening: float) -> np.ndarray:
    """The kernel on cells of ``cell`` pixels, folded onto their reflected period, its sigma
    less the ``widening`` (a variance, in pixels) that reducing and enlarging add."""
    cell_sigma = math.sqrt(max(sigma * sigma - widening, 1e-6)) / cell
    return folded_kernel(int(radius / cell), cell_sigma, 2 * cells, cells)


def _cell_means(image: np.ndarray, x_axis: _Axis, y_axis: _Axis) -> np.ndarray:
    """The mean of the image over each cell (float32), exactly, from its integral image.

    The integral of pixels that are constant over their squares is bilinear inside each
    pixel, so interpolating the integral image at a cell's corners gives the exact sum
    over the cell, wherever its edges fall. Cells of a reduced axis start at the first pixel
    centre and end at the last (the mirror lines); cells of a full axis are the pixels.
    """
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    ys, xs = y_axis.edges(height), x_axis.edges(width)
    y_low = np.clip(np.floor(ys).astype(np.int64), 0, height - 1)
    x_low = np.clip(np.floor(xs).astype(np.int64), 0, width - 1)
    found = _integral_around(image, y_low, x_low).reshape(len(ys), 2, len(xs), 2, channels)
    # The integral at an edge is its value at the pixel edge below plus a fraction of the
    # step to the next one; between two edges, the integer parts are differenced exactly
    # first, so that only small numbers meet the fractions.
    below, step = found[:, 0], found[:, 1] - found[:, 0]
    fraction = (ys - y_low)[:, None, None, None]
    rows = np.diff(below, axis=0) + np.diff(step * fraction, axis=0)
    below, step = rows[:, :, 0], rows[:, :, 1] - rows[:, :, 0]
    fraction = (xs - x_low)[None, :, None]
    sums = np.diff(below, axis=1) + np.diff(step * fraction, axis=1)
    means = (sums * (1 / (x_axis.cell * y_axis.cell))).astype(np.float32)
    return means[..., 0] if image.ndim == 2 else means


def _integral_around(image: np.ndarray, y_low: np.ndarray, x_low: np.ndarray) -> np.ndarray:
    """The integral image at rows y_low and y_low + 1 (interleaved), columns x_low and
    x_low + 1 (interleaved, every channel): 32-bit integers for 8-bit pixels, else float64.

    Only these values are kept, so the integral is computed in bands of rows: 32-bit sums
    of 8-bit pixels stay exact, and memory stays bounded on large images.
    """
    height, width = image.shape[:2]
    channels = 1 if image.ndim == 2 else image.shape[2]
    rows = np.stack([y_low, y_low + 1], axis=1).ravel()  # integral rows, 0..height
    samples = (np.stack([x_low, x_low + 1], axis=1)[..., None] * channels
               + np.arange(channels)).ravel()  # where those columns are in a row
    depth = cv2.CV_32S if image.dtype == np.uint8 else cv2.CV_64F
    band = max(1, BAND_PIXELS // width)
    if band >= height:  # one band: the common case
        sums = cv2.integral(image, sdepth=depth).reshape(height + 1, -1)
        return sums[rows].take(samples, axis=1)  # rows, then columns: far the fastest
    found = np.empty((len(rows), len(samples)), np.int64 if depth == cv2.CV_32S else np.float64)
    above = np.zeros(len(samples), found.dtype)  # the integral's row at the band's top
    for top in range(0, height, band):
        bottom = min(top + band, height)
        sums = cv2.integral(image[top:bottom], sdepth=depth).reshape(bottom - top + 1, -1)
        first = top + 1 if top else 0  # row ``top`` was read in the band above
        inside = np.flatnonzero((rows >= first) & (rows <= bottom))
        found[inside] = sums[rows[inside] - top].take(samples, axis=1) + above
        above = above + sums[-1].take(samples)
    return found


def _upsample(small: np.ndarray, x_axis: _Axis, y_axis: _Axis, width: int, height: int,
              dtype: np.dtype) -> np.ndarray:
    """Cells back to pixels of ``dtype``, bilinearly, cell edges on the outer pixel centres.

    One cv2.resize by the cell size, in ``dtype`` (an 8-bit resize is the cheapest pass over
    the whole image). It reads its source samples at fixed places: the blurred cells are
    first moved there (one cell of the reflection in front, and a shift of under half a
    pixel), and the result is cropped.
    """
    if not (x_axis.reduced or y_axis.reduced):
        return to_dtype(small, dtype)
    x_count, y_count = x_axis.samples(width), y_axis.samples(height)
    # The reflection the cell-level blur saw: two cells in front (the shift reads one more
    # than the sample in front) and enough behind.
    y_front, x_front = 2 * y_axis.reduced, 2 * x_axis.reduced
    padded = cv2.copyMakeBorder(small, y_front, y_count - small.shape[0] + 1,
                                x_front, x_count - small.shape[1] + 1, cv2.BORDER_REFLECT)
    shifted = cv2.sepFilter2D(padded, -1, x_axis.shift_kernel(), y_axis.shift_kernel(),
                              borderType=cv2.BORDER_REPLICATE)
    top, left = y_front // 2, x_front // 2
    samples = to_dtype(shifted[top:top + y_count, left:left + x_count], dtype)
    full = cv2.resize(samples, None, fx=x_axis.cell, fy=y_axis.cell,
                      interpolation=cv2.INTER_LINEAR)
    return full[y_axis.crop:y_axis.crop + height, x_axis.crop:x_axis.crop + width]


class _Axis:
    """How one axis is blurred: reduced to ``cells`` cells, or exactly at full size.

    Coordinates: pixel x (its centre) lies at cell coordinate x / cell - 0.5, the cells
    tiling the span between the first and the last pixel centre. cv2.resize by ``cell``
    maps its output pixel d to source coordinate (d + 0.5) / cell - 0.5; its output is
    cropped from ``crop`` on, so source sample q has to be the blurred image at cell
    coordinate q - (crop + 0.5) / cell, about one cell before q.
    """

    def __init__(self, cells: int, cell: float, kernel: np.ndarray, border: int) -> None:
        self.cells, self.cell, self.kernel, self.border = cells, cell, kernel, border

    @property
    def reduced(self) -> bool:
        return self.cell != 1.0

    @property
    def crop(self) -> int:
        """Where the pixels begin in the resized image (its first cell is the reflection)."""
        return round(self.cell - 0.5) if self.reduced else 0

    @property
    def shift(self) -> float:
        """How far (in cells, under half a pixel) source sample q lies before cell q - 1."""
        return (self.crop + 0.5) / self.cell - 1 if self.reduced else 0.0

    def samples(self, length: int) -> int:
        """How many source samples cv2.resize reads for ``length`` pixels."""
        if not self.reduced:
            return length
        return math.ceil((self.crop + length - 0.5) / self.cell + 0.5)

    def shift_kernel(self) -> np.ndarray:
        """Linear interpolation ``shift`` cells back, as a 3-tap correlation kernel."""
        shift = self.shift
        return np.array([max(shift, 0.0), 1 - abs(shift), max(-shift, 0.0)], np.float32)

    def edges(self, length: int) -> np.ndarray:
        """Where the cells begin and end, in pixel edge coordinates (pixel i spans [i, i+1))."""
        if not self.reduced:
            return np.arange(length + 1, dtype=np.float64)
        return 0.5 + np.arange(self.cells + 1, dtype=np.float64) * self.cell

    @classmethod
    def plan(cls, length: int, sigma: float, radius: int, scale: float) -> _Axis:
        factor = min(scale / CELL_SIGMA, (length - 1) / MIN_CELLS)
        if factor < 2:
            kernel = folded_kernel(radius, sigma, 2 * (length - 1), length - 1)
            return cls(length, 1.0, kernel, cv2.BORDER_REFLECT_101)
        cells = round((length - 1) / factor)
        cell = (length - 1) / cells
        # Averaging over cells, the shift onto cv2.resize's samples and its interpolation
        # each widen the blur a little: take their variance off (a linear interpolation
        # at fraction t adds t (1 - t) cell^2, on average cell^2 / 6).
        shift = -(round(cell - 0.5) + 0.5) / cell % 1
        widening = cell * cell * (1 / 12 + shift * (1 - shift) + 1 / 6)
        return cls(cells, cell, _cell_kernel(radius, sigma, cell, cells, widening),
                   cv2.BORDER_REFLECT)


