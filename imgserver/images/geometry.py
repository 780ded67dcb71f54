"""Operations that change an image's geometry: scale, fit, fill, crop, rotate, flip, split.

    resize=F            both sides to F percent, 0.05 < F <= 100 (area interpolation)
    fit=WxH|Wx|xH       shrink to fit inside the box, keeping the aspect ratio
    fill=WxH[,G]        cover the box, then cut it to exactly W x H at gravity G (or smart)
    crop=X,Y,W,H        keep [X, X+W) x [Y, Y+H), clipped to the image
    rotate=A            clockwise by 0, 90, 180 or 270 degrees (or -90, -180, -270), exactly
    flip=h|v|hv         mirror left-right, top-bottom, or both
    split[=V]           four tiles (V = None, false or False: no split)

Sizes round with Python's ``round()``, as SPEC §2 and §12 give them; shrinking uses area
interpolation, enlarging (fill only) bicubic. Rotations and flips move pixels without
resampling, so they are exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from imgserver.images.operation import (
    GRAVITIES,
    MAX_SIZE,
    NO,
    Context,
    Operation,
    Scaling,
    box,
    gravity,
    integer,
    needs,
    number,
    offset,
    parts,
)

#: Tile suffixes in the order tiles are produced: left-top, right-top, left-bottom, right-bottom.
TILE_SUFFIXES = ("_lt", "_rt", "_lb", "_rb")


def scale(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` scaled to ``size`` (width, height): area interpolation when shrinking,
    bicubic when enlarging, untouched at its own size."""
    height, width = image.shape[:2]
    if size == (width, height):
        return image
    shrinking = size[0] <= width and size[1] <= height
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if shrinking
                      else cv2.INTER_CUBIC)


@dataclass(frozen=True)
class Resize(Scaling, Operation, name="resize", example="resize=50",
             summary="scale both sides to F percent, 0.05 < F <= 100"):
    """Scale both sides to ``percent`` percent of their size."""

    percent: float

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Resize:
        """``resize=F``."""
        text = needs(value, "resize=F, a percentage in (0.05, 100]")
        return cls(number(text, "scaling factor", above=0.05, at_most=100))

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """``max(1, round(side * F / 100))`` for each side."""
        return (max(1, round(width * self.percent / 100)),
                max(1, round(height * self.percent / 100)))

    def size(self, width: int, height: int) -> tuple[int, int]:
        """The output size for an input of ``width`` x ``height``."""
        return self.scaled_size(width, height)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image scaled (F <= 100 never enlarges)."""
        height, width = image.shape[:2]
        return scale(image, self.scaled_size(width, height))


@dataclass(frozen=True)
class Fit(Scaling, Operation, name="fit", example="fit=400x400",
          summary="shrink to fit inside WxH (or Wx, xH), keeping the aspect ratio; never "
                  "enlarge"):
    """Shrink to fit inside ``width`` x ``height`` (None: that side is open)."""

    width: int | None
    height: int | None

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Fit:
        """``fit=WxH``, ``fit=Wx`` or ``fit=xH``."""
        return cls(*box(needs(value, "fit=WxH, fit=Wx or fit=xH"), open_sides=True))

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """s = min(W/w, H/h) over the sides given; the image's own size when s >= 1."""
        factors = [side / length for side, length in ((self.width, width),
                                                      (self.height, height)) if side]
        factor = min(factors)
        if factor >= 1:
            return width, height
        return max(1, round(width * factor)), max(1, round(height * factor))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image shrunk to fit the box (area interpolation), or as it is."""
        height, width = image.shape[:2]
        return scale(image, self.scaled_size(width, height))


@dataclass(frozen=True)
class Fill(Scaling, Operation, name="fill", example="fill=200x200,smart",
           summary="cover WxH, then cut it to exactly WxH at a gravity (centre by default; "
                   "north, ..., southwest; smart: where the detail is)"):
    """Cover ``width`` x ``height`` and cut the window placed by ``gravity``."""

    width: int
    height: int
    gravity: str = "centre"

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Fill:
        """``fill=WxH`` or ``fill=WxH,G``."""
        form = "fill=WxH or fill=WxH,G"
        pieces = parts(needs(value, form), 2, form)
        width, height = box(pieces[0], open_sides=False)
        assert width is not None and height is not None
        where = gravity(pieces[1], also=("smart",)) if len(pieces) == 2 else "centre"
        return cls(width, height, "centre" if where == "center" else where)

    def scaled_size(self, width: int, height: int) -> tuple[int, int]:
        """s = max(W/w, H/h); ``max(W, round(w*s))`` x ``max(H, round(h*s))``."""
        factor = max(self.width / width, self.height / height)
        return max(self.width, round(width * factor)), max(self.height, round(height * factor))

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image scaled to cover the box, then cut to it."""
        height, width = image.shape[:2]
        return self.after_scaling(scale(image, self.scaled_size(width, height)))

    def scales_on_decode(self) -> bool:
        """Not for ``smart``: a reduced decode moves the window with the most detail by a
        pixel now and then, several grey levels on average on a detailed photo."""
        return self.gravity != "smart"

    def after_scaling(self, image: np.ndarray) -> np.ndarray:
        """The W x H window of the scaled image that the gravity places."""
        height, width = image.shape[:2]
        excess_x, excess_y = width - self.width, height - self.height
        if self.gravity == "smart":
            left, top = smart_window(image, self.width, self.height)
        else:
            across, down = GRAVITIES[self.gravity]
            left, top = offset(excess_x, across), offset(excess_y, down)
        return image[top:top + self.height, left:left + self.width]


def smart_window(image: np.ndarray, width: int, height: int) -> tuple[int, int]:
    """Where the ``width`` x ``height`` window with the most detail starts: sliding along the
    side with excess, the one whose sum of ``|Sobel x| + |Sobel y|`` (of the image in grey)
    is largest, the most central one on a tie."""
    rows, columns = image.shape[:2]
    excess_x, excess_y = columns - width, rows - height
    if excess_x == 0 and excess_y == 0:
        return 0, 0
    grey = image
    if grey.ndim == 3:
        code = cv2.COLOR_BGRA2GRAY if grey.shape[2] == 4 else cv2.COLOR_BGR2GRAY
        grey = cv2.cvtColor(grey, code)
    grey = grey.astype(np.float32)
    detail = (np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0))
              + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1)))
    # The scaled image covers the box: only one side has excess.
    lines = detail.sum(axis=0 if excess_x else 1, dtype=np.float64)
    span = width if excess_x else height
    sums = np.concatenate([[0.0], np.cumsum(lines)])
    windows = sums[span:] - sums[:-span]
    # Sobel of integer samples gives integers, summed exactly in float64: ties are exact.
    candidates = np.flatnonzero(windows == windows.max())
    excess = excess_x or excess_y
    start = int(candidates[np.argmin(np.abs(2 * candidates - excess))])
    return (start, 0) if excess_x else (0, start)


@dataclass(frozen=True)
class Crop(Operation, name="crop", example="crop=10,10,300,200",
           summary="keep the pixels [X, X+W) x [Y, Y+H), clipped to the image"):
    """Keep the rectangle at ``x``, ``y`` of ``width`` x ``height``."""

    x: int
    y: int
    width: int
    height: int

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Crop:
        """``crop=X,Y,W,H``."""
        form = "crop=X,Y,W,H"
        pieces = parts(needs(value, form), 4, form)
        if len(pieces) != 4:
            raise ValueError(f"has {len(pieces)} parts, expected 4: {form}")
        x, y = (integer(piece, name, 0) for piece, name in zip(pieces[:2], "XY", strict=True))
        width, height = (integer(piece, name, 1, MAX_SIZE)
                         for piece, name in zip(pieces[2:], ("width", "height"), strict=True))
        return cls(x, y, width, height)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The rectangle, clipped to the image; ValueError when nothing of it is left."""
        rows, columns = image.shape[:2]
        kept = image[self.y:self.y + self.height, self.x:self.x + self.width]
        if kept.size == 0:
            raise ValueError(f"crop={self.x},{self.y},{self.width},{self.height} leaves "
                             f"nothing of a {columns}x{rows} image")
        return kept


@dataclass(frozen=True)
class Rotate(Operation, name="rotate", example="rotate=90",
             summary="rotate clockwise by 0, 90, 180 or 270 degrees (or -90, -180, -270)"):
    """Rotate clockwise by ``degrees`` (0, 90, 180 or 270)."""

    degrees: int

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Rotate:
        """``rotate=A``."""
        text = needs(value, "rotate=A, with A one of 0, 90, 180, 270, -90, -180, -270")
        angle = integer(text, "angle", -270, 270)
        if angle % 90:
            raise ValueError(f"angle must be a multiple of 90 (0, 90, 180, 270, -90, -180, "
                             f"-270), got {angle}")
        return cls(angle % 360)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image turned, pixel for pixel."""
        if self.degrees == 0:
            return image
        return cv2.rotate(image, {90: cv2.ROTATE_90_CLOCKWISE, 180: cv2.ROTATE_180,
                                  270: cv2.ROTATE_90_COUNTERCLOCKWISE}[self.degrees])


@dataclass(frozen=True)
class Flip(Operation, name="flip", example="flip=h",
           summary="mirror left-right (h), top-bottom (v) or both (hv)"):
    """Mirror along ``directions``: ``h``, ``v`` or ``hv``."""

    directions: str

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Flip:
        """``flip=h``, ``flip=v`` or ``flip=hv``."""
        text = needs(value, "flip=h, flip=v or flip=hv")
        if text not in ("h", "v", "hv"):
            raise ValueError(f"direction {text[:20]!r} is not h, v or hv")
        return cls(text)

    def apply(self, image: np.ndarray) -> np.ndarray:
        """The image mirrored, pixel for pixel."""
        return cv2.flip(image, {"h": 1, "v": 0, "hv": -1}[self.directions])


@dataclass(frozen=True)
class Split(Operation, name="split", example="split=True",
            summary="four tiles: left-top, right-top, left-bottom, right-bottom (None, false "
                    "or False: no split)"):
    """Split into four tiles (left column ``w - w//2`` wide, top row ``h - h//2`` high)."""

    @classmethod
    def parse(cls, value: str | None, context: Context) -> Split | None:
        """``split`` or ``split=V``; None for V in None, false, False."""
        return None if value is not None and value.strip() in NO else cls()

    def tiles(self, image: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """The four tiles, as views, in ``TILE_SUFFIXES`` order."""
        height, width = image.shape[:2]
        if width < 2 or height < 2:
            raise ValueError(f"cannot split a {width}x{height} image: a tile would be empty")
        left, top = width - width // 2, height - height // 2
        return list(zip(TILE_SUFFIXES, [image[:top, :left], image[:top, left:],
                                        image[top:, :left], image[top:, left:]], strict=True))

    def suffixes(self) -> tuple[str, ...]:
        """The tiles' suffixes."""
        return TILE_SUFFIXES

    def apply(self, image: np.ndarray) -> np.ndarray:
        """Not a one-image operation: see ``tiles``."""
        raise TypeError("split makes four images: use tiles()")
