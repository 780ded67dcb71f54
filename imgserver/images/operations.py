"""The operations a request can ask for, found by name, and applied in order.

    resize=F            scale both sides to F percent            (imgserver.images.geometry)
    fit=WxH             shrink to fit inside a box
    fill=WxH[,G]        cover a box and cut it, at a gravity or smart
    crop=X,Y,W,H        keep a rectangle
    rotate=A, flip=D    turn or mirror, exactly
    split[=V]           four tiles
    blur=K[,S]          Gaussian blur                           (imgserver.images.filters)
    sharpen=S[,A]       unsharp mask
    grayscale[=V]       luminance only
    watermark=PATH,...  another image drawn on                  (imgserver.images.watermark)
    quality=Q           the encoder's quality: a setting, not a step (below)

Each is one class (``imgserver.images.operation.Operation``) holding its name, its parser
and what it does; importing its module registers it. Adding an operation is adding a class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Importing these modules registers their operations.
from imgserver.images import filters, geometry, watermark  # noqa: F401
from imgserver.images.filters import Blur, Grayscale, Sharpen
from imgserver.images.geometry import TILE_SUFFIXES, Crop, Fill, Fit, Flip, Resize, Rotate, Split
from imgserver.images.operation import Context, Operation, Scaling, integer, needs
from imgserver.images.watermark import Watermark

__all__ = ["TILE_SUFFIXES", "Blur", "Context", "Crop", "Fill", "Fit", "Flip", "Grayscale",
           "Operation", "Quality", "Resize", "Rotate", "Scaling", "Sharpen", "Split",
           "Watermark", "apply", "output_suffixes", "parse_operation", "parse_operations",
           "quality"]


@dataclass(frozen=True)
class Quality(Operation, name="quality", example="quality=80", setting=True,
              summary="the encoder quality of JPEG, WebP and AVIF outputs, 1 to 100 (a "
                      "setting: where it stands does not matter; once per request)"):
    """The quality JPEG, WebP and AVIF outputs are encoded at."""

    value: int

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Quality:
        """``quality=Q``."""
        return cls(integer(needs(value, "quality=Q, from 1 to 100"), "quality", 1, 100))


def parse_operation(text: str, context: Context) -> Operation | None:
    """The operation ``text`` names; None for one that asks for nothing (``split=False``).

    Raises ValueError with a message for the user when the text is not valid.
    """
    name, sep, value = text.partition("=")
    name = name.strip()
    kind = Operation.registry.get(name)
    if kind is None:
        known = ", ".join(Operation.registry)
        raise ValueError(f"unknown operation {name[:40]!r} (expected one of {known})")
    return kind.parse(value if sep else None, context)


def parse_operations(texts: list[str], context: Context) -> tuple[Operation, ...]:
    """Parse a list of operations, dropping those that ask for nothing (``split=False``)."""
    parsed = (parse_operation(text, context) for text in texts)
    return tuple(op for op in parsed if op is not None)


def output_suffixes(operations: tuple[Operation, ...]) -> list[str]:
    """The suffixes of every file one image produces: ``[""]``, or tile suffixes after splits."""
    suffixes = [""]
    for op in operations:
        suffixes = [s + t for s in suffixes for t in op.suffixes()]
    return suffixes


def quality(operations: tuple[Operation, ...]) -> int | None:
    """The quality the request sets, or None (each format's default)."""
    return next((op.value for op in operations if isinstance(op, Quality)), None)


def apply(images: list[tuple[str, np.ndarray]],
          operations: tuple[Operation, ...]) -> list[tuple[str, np.ndarray]]:
    """Apply ``operations`` in order to each (suffix, image); a split multiplies the list by 4."""
    for op in operations:
        if op.setting:
            continue
        images = [(suffix + tile_suffix, tile)
                  for suffix, image in images for tile_suffix, tile in op.tiles(image)]
    return images
