"""The watermark: another image drawn onto each image, at a gravity, with an opacity.

    watermark=PATH[,G[,O]]   the mark at PATH (under the root), flush at gravity G
                             (default southeast), blended by its alpha times O (0 < O <= 1)

The mark is drawn at its own size, or shrunk to fit inside the image (keeping its aspect
ratio) where it is larger. Its path is confined to the root when the request is validated,
and again when a worker reads it (a symlink swapped in meanwhile cannot lead out). A worker
decodes a mark once and keeps it while the file is unchanged: a job of a thousand images
costs one decode per worker, not a thousand.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from imgserver.errors import ImageError
from imgserver.images.codec import Limits, decode
from imgserver.images.operation import (
    GRAVITIES,
    Context,
    Operation,
    alpha_split,
    gravity,
    needs,
    number,
    offset,
)
from imgserver.images.paths import OutsideRoot, confine, open_file

#: A mark is a logo, not a photo: it may have at most this many pixels and bytes.
MAX_MARK_PIXELS = 25_000_000
MAX_MARK_BYTES = 64 << 20


@dataclass(frozen=True)
class Watermark(Operation, name="watermark", example="watermark=logos/mark.png,southeast,0.5",
                summary="draw the image at PATH (under the root) at its own size, flush at a "
                        "gravity (default southeast), blended by its alpha times an opacity "
                        "0 < O <= 1"):
    """Draw the mark at ``path`` flush at ``gravity``, at ``opacity``."""

    root: str
    path: str       # resolved inside the root when the request was validated
    written: str    # as the request wrote it, for messages
    gravity: str = "southeast"
    opacity: float = 1.0

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Watermark:
        """``watermark=PATH``, ``watermark=PATH,G`` or ``watermark=PATH,G,O``: the gravity and
        opacity are read from the right, so a path may hold commas. After its last comma, a
        number is an opacity, which needs a gravity before it; a word without a dot or a
        slash is a gravity, which must be one of the nine."""
        form = "watermark=PATH, watermark=PATH,G or watermark=PATH,G,O"
        written = needs(value, form)
        where, opacity = "southeast", 1.0
        rest, comma, last = written.rpartition(",")
        last = last.strip()
        if comma and last and last[0] in "+-.0123456789":
            opacity = number(last, "opacity", above=0, at_most=1)
            rest, comma, last = rest.rpartition(",")
            if not comma:
                raise ValueError(f"an opacity follows a gravity: expected {form}")
            where, written = gravity(last), rest.strip()
        elif comma and "." not in last and "/" not in last:
            where, written = gravity(last), rest.strip()
        if not written:
            raise ValueError(f"needs the path of the mark: expected {form}")
        try:
            path = confine(context.root, written)
        except OutsideRoot as exc:
            raise ValueError(f"mark {exc}") from None
        return cls(str(context.root), str(path), written,
                   "centre" if where == "center" else where, opacity)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image with the mark blended in."""
        mark = _fitted(self._mark(), image.shape[1], image.shape[0])
        rows, columns = mark.shape[:2]
        across, down = GRAVITIES[self.gravity]
        left = offset(image.shape[1] - columns, across)
        top = offset(image.shape[0] - rows, down)
        result = image.copy()
        region = result[top:top + rows, left:left + columns]
        region[...] = blend(region, mark, self.opacity)
        return result

    def _mark(self) -> np.ndarray:
        root = Path(self.root)
        try:
            fd = open_file(root, Path(self.path))
        except (OSError, OutsideRoot) as exc:
            raise ImageError(f"cannot read watermark {self.written!r}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
        try:
            info = os.fstat(fd)
            # A folder fails the read with an OSError, a FIFO reads as empty: say what it is.
            if not stat.S_ISREG(info.st_mode):
                raise ImageError(f"cannot read watermark {self.written!r}: not a regular file")
            if info.st_size > MAX_MARK_BYTES:
                raise ImageError(f"watermark {self.written!r} is {info.st_size} bytes, more "
                                 f"than a mark may have ({MAX_MARK_BYTES})")
            key = (self.path, info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns)
            return _decoded(key, fd)
        finally:
            os.close(fd)


#: Marks decoded in this worker, by file identity (path, device, inode, size, time): a few,
#: the oldest dropped first.
_MARKS: dict[tuple, np.ndarray] = {}
_MARKS_KEPT = 8


def _decoded(key: tuple, fd: int) -> np.ndarray:
    """The mark ``key`` names, read from ``fd`` and decoded once while its file is unchanged."""
    mark = _MARKS.get(key)
    if mark is not None:
        return mark
    with open(fd, "rb", closefd=False) as file:
        data = file.read(MAX_MARK_BYTES + 1)
    try:
        mark = decode(data, Limits(MAX_MARK_PIXELS, MAX_MARK_BYTES))
    except ImageError as exc:
        raise ImageError(f"watermark: {exc}") from None
    mark.flags.writeable = False
    while len(_MARKS) >= _MARKS_KEPT:
        _MARKS.pop(next(iter(_MARKS)))
    _MARKS[key] = mark
    return mark


def _fitted(mark: np.ndarray, width: int, height: int) -> np.ndarray:
    """The mark, shrunk to fit inside ``width`` x ``height`` where it is larger."""
    rows, columns = mark.shape[:2]
    factor = min(width / columns, height / rows)
    if factor >= 1:
        return mark
    size = (max(1, round(columns * factor)), max(1, round(rows * factor)))
    return cv2.resize(mark, size, interpolation=cv2.INTER_AREA)


def blend(region: np.ndarray, mark: np.ndarray, opacity: float) -> np.ndarray:
    """``mark`` over ``region`` (same size), by the mark's alpha times ``opacity``; in the
    region's channels and depth. A region with alpha becomes more opaque where the mark is
    (alpha over alpha)."""
    top = float(np.iinfo(region.dtype).max)
    mark_colour, mark_alpha = alpha_split(mark)
    weight = np.full(mark.shape[:2], opacity, np.float32) if mark_alpha is None else \
        mark_alpha.astype(np.float32) * (opacity / np.iinfo(mark.dtype).max)
    colour, alpha = alpha_split(region)
    channels = 1 if colour.ndim == 2 else colour.shape[2]
    paint = _channels(mark_colour, channels).astype(np.float32) \
        * (top / np.iinfo(mark.dtype).max)
    if channels > 1:
        weight_c = weight[..., None]
    else:
        weight_c = weight
        paint = paint.reshape(colour.shape)
    mixed = paint * weight_c + colour.astype(np.float32) * (1 - weight_c)
    out = np.clip(np.rint(mixed), 0, top).astype(region.dtype)
    if alpha is None:
        return out
    covered = weight * top + alpha.astype(np.float32) * (1 - weight)
    return np.dstack([out, np.clip(np.rint(covered), 0, top).astype(region.dtype)])


def _channels(colour: np.ndarray, channels: int) -> np.ndarray:
    """``colour`` (gray or BGR) as ``channels`` channels (1: gray, 3: BGR)."""
    gray = colour.ndim == 2 or colour.shape[2] == 1
    if channels == 1:
        return colour.reshape(colour.shape[:2]) if gray else cv2.cvtColor(
            np.ascontiguousarray(colour), cv2.COLOR_BGR2GRAY)
    return cv2.cvtColor(colour.reshape(colour.shape[:2]), cv2.COLOR_GRAY2BGR) if gray \
        else colour
