"""What an operation is: a name, a parser, and what it does to pixels, in one class.

Every operation is a frozen dataclass that subclasses ``Operation`` with its name::

    @dataclass(frozen=True)
    class Flip(Operation, name="flip", example="flip=h", summary="mirror ..."):
        ...
        @classmethod
        def parse(cls, value, context): ...      # the text after '=' -> an instance
        def apply(self, image): ...              # pixels in, pixels out

Subclassing registers it: ``imgserver.images.operations`` finds it by its name, lists it in
the documentation, and applies it. Instances are plain data, so a parsed list of them goes
to a worker process as it is. Parsers raise ``ValueError`` with a message for the user that
says what was expected; the request parser adds which operation it was.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

_FLOAT = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_INT = re.compile(r"[+-]?[0-9]+")
#: The values that mean "no" to an on/off operation (split, grayscale).
NO = ("None", "false", "False")
#: The largest width or height an operation may ask for.
MAX_SIZE = 100_000


@dataclass(frozen=True)
class Context:
    """What a parser may need to know beyond the text: the root that paths lie in."""

    root: Path


class Operation:
    """One step of a request's ``operations``; subclasses register themselves by name."""

    registry: ClassVar[dict[str, type[Operation]]] = {}
    name: ClassVar[str]
    example: ClassVar[str]   # a valid use, for the documentation
    summary: ClassVar[str]   # what it does, in one line
    #: A setting (quality) changes how outputs are written, not the pixels: where it stands
    #: in the list does not matter, and it may be given once.
    setting: ClassVar[bool] = False

    def __init_subclass__(cls, *, name: str, example: str, summary: str,
                          setting: bool = False, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.name, cls.example, cls.summary, cls.setting = name, example, summary, setting
        Operation.registry[name] = cls

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Operation | None:
        """The operation ``value`` describes (None: the bare name, without ``=``); None when
        it asks for nothing (``split=False``). ValueError saying what was expected."""
        raise NotImplementedError

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image after this operation."""
        raise NotImplementedError

    def tiles(self, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The images this operation makes of ``image``, each with the suffix its file name
        gets (one image, no suffix, unless the operation splits)."""
        return [("", self.apply(image))]

    def suffixes(self) -> tuple[str, ...]:
        """The file-name suffixes ``tiles`` gives, in order."""
        return ("",)


class Scaling:
    """An operation that starts by scaling the image, which a decoder may do for it while
    decoding (a JPEG shrinks for almost nothing inside libjpeg)."""

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """The size a ``width`` x ``height`` image is scaled to first."""
        raise NotImplementedError

    def after_scaling(self, image: np.ndarray) -> np.ndarray:
        """The rest of the operation, on the image scaled to ``scaled_size``."""
        return image

    def scales_on_decode(self) -> bool:
        """Whether a decoder may do the scaling: not where the rest of the operation hangs
        on the scaled image's finest detail, which a reduced decode changes."""
        return True


# -- the pieces of the grammar, shared by the parsers ----------------------------------


def needs(value: str | None, form: str) -> str:
    """``value``, stripped; ValueError naming the ``form`` expected when it is missing."""
    if value is None or not value.strip():
        raise ValueError(f"needs a value: {form}")
    return value.strip()


def integer(text: str, what: str, low: int, high: int | None = None) -> int:
    """``text`` as an integer in [low, high]; ValueError naming ``what`` otherwise."""
    text = text.strip()
    if not _INT.fullmatch(text):
        raise ValueError(f"{what} {text[:20]!r} is not an integer")
    if len(text.lstrip("+-0")) > 15:  # beyond any bound here, and slow to convert
        raise ValueError(f"{what} {text[:20]}... is too large")
    number = int(text)
    if number < low or (high is not None and number > high):
        bound = f"from {low} to {high}" if high is not None else f">= {low}"
        raise ValueError(f"{what} must be {bound}, got {number}")
    return number


def number(text: str, what: str, *, above: float, at_most: float | None = None) -> float:
    """``text`` as a finite number in (above, at_most]; ValueError naming ``what`` otherwise."""
    text = text.strip()
    if not _FLOAT.fullmatch(text):
        raise ValueError(f"{what} {text[:20]!r} is not a number")
    value = float(text)
    if not (math.isfinite(value) and value > above
            and (at_most is None or value <= at_most)):
        bound = f"in ({above:g}, {at_most:g}]" if at_most is not None else f"> {above:g}"
        raise ValueError(f"{what} must be {bound}, got {text[:20]}")
    return value


def parts(value: str, count: int, form: str) -> list[str]:
    """``value`` cut at commas into at most ``count`` parts, each stripped."""
    pieces = [piece.strip() for piece in value.split(",")]
    if len(pieces) > count:
        raise ValueError(f"has {len(pieces)} parts, expected at most {count}: {form}")
    return pieces


def box(text: str, *, open_sides: bool) -> tuple[int | None, int | None]:
    """``WxH`` (with ``open_sides``, also ``Wx`` and ``xH``) as (width, height)."""
    form = "WxH, Wx or xH" if open_sides else "WxH"
    width_text, sep, height_text = text.strip().lower().partition("x")
    if not sep:
        raise ValueError(f"{text.strip()[:40]!r} is not a box: expected {form}")
    sides: list[int | None] = []
    for side, what in ((width_text, "width"), (height_text, "height")):
        if side.strip():
            sides.append(integer(side, what, 1, MAX_SIZE))
        elif open_sides:
            sides.append(None)
        else:
            raise ValueError(f"the {what} is missing: expected {form}")
    if sides == [None, None]:
        raise ValueError(f"gives neither a width nor a height: expected {form}")
    return sides[0], sides[1]


#: Where a window (fill) or a mark (watermark) goes: (horizontal, vertical), each 0 (left,
#: top), 0.5 (centre) or 1 (right, bottom).
GRAVITIES: dict[str, tuple[float, float]] = {
    "centre": (0.5, 0.5), "center": (0.5, 0.5),
    "north": (0.5, 0.0), "south": (0.5, 1.0), "east": (1.0, 0.5), "west": (0.0, 0.5),
    "northeast": (1.0, 0.0), "northwest": (0.0, 0.0),
    "southeast": (1.0, 1.0), "southwest": (0.0, 1.0),
}


def gravity(text: str, *, also: tuple[str, ...] = ()) -> str:
    """``text`` as one of the nine gravities (or of ``also``)."""
    name = text.strip().lower()
    if name not in GRAVITIES and name not in also:
        known = ", ".join([*dict.fromkeys(GRAVITIES), *also])
        raise ValueError(f"unknown gravity {text.strip()[:20]!r} (expected one of {known})")
    return name


def offset(excess: int, where: float) -> int:
    """Where a window ``excess`` pixels smaller than its frame starts, at ``where`` (0, 0.5
    or 1): flush with the start, centred (``excess // 2``), or flush with the end."""
    return excess // 2 if where == 0.5 else int(excess * where)


def alpha_split(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """The colour (or gray) channels of ``image``, and its alpha channel or None."""
    if image.ndim == 3 and image.shape[2] in (2, 4):
        return image[..., :-1], image[..., -1]
    return image, None
