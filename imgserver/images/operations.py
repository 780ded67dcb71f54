"""The operations a request can ask for: their grammar and what they do to pixels.

An operation is written ``name=value``; whitespace around the name, the value and each part
of ``K,S`` is ignored. ``parse_operation`` turns the text into one of the frozen dataclasses
below, or raises ``ValueError`` with a message that says what was expected. The dataclasses
are plain data, so a parsed list of them can be sent to a worker process as it is.

    resize=F     scale both sides to F percent, 0.05 < F <= 100 (area interpolation)
    split[=V]    split into 4 tiles; V = None, false or False means "do not split"
    blur=K[,S]   Gaussian blur, K x K kernel (even K -> K+1), optional sigma S > 0
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import cv2
import numpy as np

from imgserver.images.blur import gaussian_blur

_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT = re.compile(r"[+-]?[0-9]+")
_NO_SPLIT = ("None", "false", "False")

#: Tile suffixes in the order tiles are produced: left-top, right-top, left-bottom, right-bottom.
TILE_SUFFIXES = ("_lt", "_rt", "_lb", "_rb")


@dataclass(frozen=True)
class Resize:
    """Scale both sides to ``percent`` percent of their size."""

    percent: float

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The output size for an input of ``width`` x ``height``."""
        return (max(1, round(width * self.percent / 100)),
                max(1, round(height * self.percent / 100)))


@dataclass(frozen=True)
class Split:
    """Split into four tiles (left column ``w - w//2`` wide, top row ``h - h//2`` high)."""


@dataclass(frozen=True)
class Blur:
    """Gaussian blur, ``ksize`` x ``ksize`` (odd, or 0: from sigma), ``sigma`` (0: from ksize)."""

    ksize: int
    sigma: float = 0.0


Operation = Resize | Split | Blur


def parse_operation(text: str) -> Operation | None:
    """Parse one operation; ``None`` for a split that does not split.

    Raises ValueError with a message for the user when the text is not valid.
    """
    name, sep, value = text.partition("=")
    name, value = name.strip(), value.strip()
    if name == "resize":
        return _parse_resize(value, bool(sep))
    if name == "split":
        return None if sep and value in _NO_SPLIT else Split()
    if name == "blur":
        return _parse_blur(value, bool(sep))
    raise ValueError(f"unknown operation {name!r} (expected resize, split or blur)")


def _parse_resize(value: str, has_value: bool) -> Resize:
    if not has_value or not value:
        raise ValueError("resize needs a value: resize=F, a percentage in (0.05, 100]")
    if not _FLOAT.fullmatch(value):
        raise ValueError(f"scaling factor {value!r} is not a number")
    percent = float(value)
    if not (math.isfinite(percent) and 0.05 < percent <= 100):
        raise ValueError("scaling factor must be in (0.05, 100]")
    return Resize(percent)


def _parse_blur(value: str, has_value: bool) -> Blur:
    if not has_value or not value:
        raise ValueError("blur needs a value: blur=K or blur=K,S")
    k_text, comma, s_text = (part.strip() for part in value.partition(","))
    if not _INT.fullmatch(k_text):
        raise ValueError(f"kernel size {k_text!r} is not an integer")
    try:
        ksize = int(k_text)
    except ValueError:  # more digits than Python converts
        raise ValueError(f"kernel size {k_text[:20]}... is too long") from None
    if ksize < 0:
        raise ValueError(f"kernel size must be >= 0, got {ksize}")
    sigma = 1.0 if ksize == 0 else 0.0  # K = 0 without S: OpenCV's kernel for sigma 1
    if comma:
        if not _FLOAT.fullmatch(s_text):
            raise ValueError(f"sigma {s_text!r} is not a number")
        sigma = float(s_text)
        if not (math.isfinite(sigma) and sigma > 0):
            raise ValueError(f"sigma must be > 0, got {s_text}")
    if ksize % 2 == 0 and ksize > 0:
        ksize += 1  # OpenCV needs an odd kernel; the SPEC raises an even K to K+1
    return Blur(ksize, sigma)


def parse_operations(texts: list[str]) -> tuple[Operation, ...]:
    """Parse a list of operations, dropping splits that do not split."""
    parsed = (parse_operation(text) for text in texts)
    return tuple(op for op in parsed if op is not None)


def output_suffixes(operations: tuple[Operation, ...]) -> list[str]:
    """The suffixes of every file one image produces: ``[""]``, or tile suffixes after splits."""
    suffixes = [""]
    for op in operations:
        if isinstance(op, Split):
            suffixes = [s + t for s in suffixes for t in TILE_SUFFIXES]
    return suffixes


def split_tiles(image: np.ndarray) -> list[np.ndarray]:
    """The four tiles of ``image``, as views, in ``TILE_SUFFIXES`` order."""
    height, width = image.shape[:2]
    if width < 2 or height < 2:
        raise ValueError(f"cannot split a {width}x{height} image: a tile would be empty")
    left, top = width - width // 2, height - height // 2
    return [image[:top, :left], image[:top, left:], image[top:, :left], image[top:, left:]]


def resize(image: np.ndarray, op: Resize) -> np.ndarray:
    """Scale ``image`` as ``op`` says, with area interpolation (F <= 100 never enlarges)."""
    height, width = image.shape[:2]
    size = op.size(width, height)
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def apply(images: list[tuple[str, np.ndarray]],
          operations: tuple[Operation, ...]) -> list[tuple[str, np.ndarray]]:
    """Apply ``operations`` in order to each (suffix, image); a split multiplies the list by 4."""
    for op in operations:
        if isinstance(op, Split):
            images = [(suffix + tile_suffix, tile)
                      for suffix, image in images
                      for tile_suffix, tile in zip(TILE_SUFFIXES, split_tiles(image), strict=False)]
        elif isinstance(op, Resize):
            images = [(suffix, resize(image, op)) for suffix, image in images]
        else:
            images = [(suffix, gaussian_blur(image, op.ksize, op.sigma))
                      for suffix, image in images]
    return images
