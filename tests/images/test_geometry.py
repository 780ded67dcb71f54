"""fit, fill (nine gravities and smart), crop, rotate and flip against references written
from SPEC §12's formulas with numpy and OpenCV, through real PNG files (decoded exactly)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from imgserver.errors import ImageError
from imgserver.images.geometry import Fill, Fit

from conftest import mean_abs_diff, photo, processed, processed_tiles

#: The pixel layouts an image can have: (channels, depth).
KINDS = [(1, np.uint8), (3, np.uint8), (4, np.uint8), (1, np.uint16), (3, np.uint16),
         (4, np.uint16)]
KIND_IDS = [f"{channels}x{np.dtype(dtype).itemsize * 8}bit" for channels, dtype in KINDS]
GRAVITIES = ["centre", "center", "north", "south", "east", "west", "northeast", "northwest",
             "southeast", "southwest"]


# -- references, from the SPEC's words ----------------------------------------------------


def fit_size(width: int, height: int, box_width: int | None,
             box_height: int | None) -> tuple[int, int]:
    """s = min(W/w, H/h) over the sides given; s >= 1: as it is; else max(1, round(side*s))."""
    ratios = [box / side for box, side in ((box_width, width), (box_height, height))
              if box is not None]
    s = min(ratios)
    if s >= 1:
        return width, height
    return max(1, round(width * s)), max(1, round(height * s))


def fit_reference(image: np.ndarray, box_width: int | None,
                  box_height: int | None) -> np.ndarray:
    """The image shrunk into the box with area interpolation, or as it is."""
    height, width = image.shape[:2]
    size = fit_size(width, height, box_width, box_height)
    if size == (width, height):
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def fill_scaled(image: np.ndarray, box_width: int, box_height: int) -> np.ndarray:
    """s = max(W/w, H/h); max(W, round(w*s)) x max(H, round(h*s)); area shrinking, bicubic
    enlarging, untouched at s = 1."""
    height, width = image.shape[:2]
    s = max(box_width / width, box_height / height)
    size = (max(box_width, round(width * s)), max(box_height, round(height * s)))
    if s == 1:
        return image
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA if s < 1 else cv2.INTER_CUBIC)


def gravity_offset(gravity: str, excess_x: int, excess_y: int) -> tuple[int, int]:
    """Flush with the edges a gravity names; centred ((excess)//2) along the others."""
    x = 0 if "west" in gravity else excess_x if "east" in gravity else excess_x // 2
    y = 0 if "north" in gravity else excess_y if "south" in gravity else excess_y // 2
    return x, y


def smart_offset(scaled: np.ndarray, box_width: int, box_height: int) -> tuple[int, int]:
    """Every window along the side with excess, one by one: the one whose sum of
    |Sobel x| + |Sobel y| of the grey image is largest, the most central on a tie."""
    grey = scaled if scaled.ndim == 2 else cv2.cvtColor(
        np.ascontiguousarray(scaled[..., :3]), cv2.COLOR_BGR2GRAY)
    detail = (np.abs(cv2.Sobel(grey, cv2.CV_64F, 1, 0))
              + np.abs(cv2.Sobel(grey, cv2.CV_64F, 0, 1)))
    rows, columns = grey.shape
    excess_x, excess_y = columns - box_width, rows - box_height
    if excess_x:
        sums = [detail[:, x:x + box_width].sum() for x in range(excess_x + 1)]
    else:
        sums = [detail[y:y + box_height, :].sum() for y in range(excess_y + 1)]
    excess = excess_x or excess_y
    best = max(sums)
    # Most central: the window's centre nearest the image's; of two as near, the first
    # (the one centre gravity's (excess)//2 picks).
    start = min((abs(2 * i - excess), i) for i, total in enumerate(sums) if total == best)[1]
    return (start, 0) if excess_x else (0, start)


def fill_reference(image: np.ndarray, box_width: int, box_height: int,
                   gravity: str = "centre") -> np.ndarray:
    """The scaled image's box_width x box_height window placed by ``gravity``."""
    scaled = fill_scaled(image, box_width, box_height)
    if gravity == "smart":
        x, y = smart_offset(scaled, box_width, box_height)
    else:
        x, y = gravity_offset(gravity, scaled.shape[1] - box_width,
                              scaled.shape[0] - box_height)
    return scaled[y:y + box_height, x:x + box_width]


def rotate_reference(image: np.ndarray, degrees: int) -> np.ndarray:
    """Clockwise by ``degrees`` (np.rot90 turns counter-clockwise for positive k)."""
    return np.rot90(image, k=-degrees // 90, axes=(0, 1))


def image_of(kind: tuple[int, Any], height: int = 37, width: int = 53, seed: int = 0
             ) -> np.ndarray:
    """A noisy photo-like image of that kind: a pixel's shift changes it by many levels."""
    channels, dtype = kind
    return photo(height, width, channels, dtype, seed)


def close(result: np.ndarray, reference: np.ndarray) -> bool:
    """Same shape and depth, and within one grey level on average (in 8-bit levels)."""
    levels = 257 if reference.dtype == np.uint16 else 1
    return (result.shape == reference.shape and result.dtype == reference.dtype
            and mean_abs_diff(result, reference) / levels <= 1)


# -- fit --------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, operation, expected", [
    (10, 5, "fit=5x", (5, 2)),          # 2.5 -> 2: Python rounds half to even
    (14, 7, "fit=7x", (7, 4)),          # 3.5 -> 4
    (14, 7, "fit=x5", (10, 5)),
    (7, 3, "fit=x2", (5, 2)),           # 4.67 -> 5
    (6, 10, "fit=3x100", (3, 5)),       # the smaller factor of the two sides
    (30, 10, "fit=3x3", (3, 1)),
    (1000, 3, "fit=10x10", (10, 1)),    # never empty: 0.03 -> 1
    (3, 1000, "fit=x10", (1, 10)),
    (20, 10, "fit=40x40", (20, 10)),    # never enlarged
    (20, 10, "fit=20x", (20, 10)),      # s = 1: as it is
    (20, 10, "fit=x11", (20, 10)),
])
def test_geometry_fit_size_follows_the_formula(root: Path, width: int, height: int,
                                               operation: str,
                                               expected: tuple[int, int]) -> None:
    result = processed(root, image_of((3, np.uint8), height, width), [operation])
    assert (result.shape[1], result.shape[0]) == expected


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("operation, box", [("fit=20x20", (20, 20)), ("fit=30x", (30, None)),
                                            ("fit=x9", (None, 9)), ("fit=100x100", (100, 100))])
def test_geometry_fit_matches_reference(root: Path, kind: tuple[int, Any], operation: str,
                                        box: tuple[int | None, int | None]) -> None:
    image = image_of(kind)
    result = processed(root, image, [operation])
    assert close(result, fit_reference(image, *box))


def test_geometry_fit_never_enlarges_the_pixels(root: Path) -> None:
    image = image_of((4, np.uint16), 12, 9)
    assert np.array_equal(processed(root, image, ["fit=90x120"]), image)


@settings(deadline=None)  # fast, but a loaded machine must not fail it
@given(st.integers(1, 300), st.integers(1, 300),
       st.one_of(st.tuples(st.integers(1, 400), st.integers(1, 400)),
                 st.tuples(st.integers(1, 400), st.none()),
                 st.tuples(st.none(), st.integers(1, 400))))
def test_geometry_fit_always_inside_the_box_never_empty_nor_enlarged(
        width: int, height: int, box: tuple[int | None, int | None]) -> None:
    result = Fit(*box).apply(np.zeros((height, width), np.uint8))
    rows, columns = result.shape
    assert 1 <= columns <= width and 1 <= rows <= height
    if (columns, rows) == (width, height):
        return  # left as it is: the image fits already (it is never enlarged)
    assert box[0] is None or columns <= box[0]
    assert box[1] is None or rows <= box[1]
    # The aspect ratio, within the rounding of each side by at most half a pixel (a whole
    # one where a side was raised to 1 pixel).
    slack = 0.5 if min(rows, columns) > 1 else 1.0
    assert abs(columns * height - rows * width) <= slack * (width + height)


# -- fill -------------------------------------------------------------------------------


@pytest.mark.parametrize("width, height, box, expected_scaled", [
    (40, 20, (10, 10), (20, 10)),      # shrink: s = 0.5
    (9, 7, (4, 4), (5, 4)),            # s = 4/7: 5.14 -> 5
    (20, 10, (50, 10), (50, 25)),      # enlarge: s = 2.5
    (3, 2, (7, 7), (10, 7)),           # 10.5 -> 10: Python rounds half to even
    (10, 6, (10, 3), (10, 6)),         # s = 1: untouched
])
def test_geometry_fill_scales_by_the_formula_then_cuts_exactly_the_box(
        root: Path, width: int, height: int, box: tuple[int, int],
        expected_scaled: tuple[int, int]) -> None:
    image = image_of((3, np.uint8), height, width)
    scaled = fill_scaled(image, *box)
    assert (scaled.shape[1], scaled.shape[0]) == expected_scaled
    result = processed(root, image, [f"fill={box[0]}x{box[1]}"])
    assert result.shape[:2] == (box[1], box[0])
    assert close(result, fill_reference(image, *box))


@pytest.mark.parametrize("gravity", GRAVITIES)
@pytest.mark.parametrize("width, height, box", [
    (53, 37, (20, 20)),   # shrink, excess across
    (37, 53, (20, 20)),   # shrink, excess down
    (13, 11, (40, 25)),   # enlarge, excess down
    (11, 13, (25, 40)),   # enlarge, excess across
])
def test_geometry_fill_gravity_matches_reference(root: Path, gravity: str, width: int,
                                                 height: int, box: tuple[int, int]) -> None:
    image = image_of((3, np.uint8), height, width)
    result = processed(root, image, [f"fill={box[0]}x{box[1]},{gravity}"])
    assert close(result, fill_reference(image, *box, gravity))


@pytest.mark.parametrize("gravity, rows, columns", [
    # A 9 x 6 image into 9 x 3 (s = 1, untouched): 3 rows to spare.
    ("north", slice(0, 3), slice(0, 9)), ("centre", slice(1, 4), slice(0, 9)),
    ("south", slice(3, 6), slice(0, 9)), ("east", slice(1, 4), slice(0, 9)),
    ("northwest", slice(0, 3), slice(0, 9)), ("southeast", slice(3, 6), slice(0, 9)),
])
def test_geometry_fill_at_scale_one_cuts_the_window_exactly(root: Path, gravity: str,
                                                             rows: slice, columns: slice) -> None:
    image = image_of((4, np.uint16), 6, 9)
    assert np.array_equal(processed(root, image, [f"fill=9x3,{gravity}"]), image[rows, columns])


@pytest.mark.parametrize("gravity, columns", [("west", slice(0, 4)), ("centre", slice(2, 6)),
                                              ("east", slice(5, 9)), ("north", slice(2, 6)),
                                              ("southwest", slice(0, 4))])
def test_geometry_fill_excess_across_is_cut_by_gravity(root: Path, gravity: str,
                                                        columns: slice) -> None:
    image = image_of((1, np.uint8), 4, 9)  # into 4 x 4 at s = 1: 5 columns to spare
    assert np.array_equal(processed(root, image, [f"fill=4x4,{gravity}"]), image[:, columns])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("width, height, box", [(53, 37, (20, 20)), (37, 53, (30, 12)),
                                                (13, 11, (40, 25)), (40, 20, (40, 10))])
def test_geometry_fill_smart_matches_brute_force(root: Path, kind: tuple[int, Any],
                                                 width: int, height: int,
                                                 box: tuple[int, int]) -> None:
    image = image_of(kind, height, width, seed=3)
    result = processed(root, image, [f"fill={box[0]}x{box[1]},smart"])
    assert close(result, fill_reference(image, *box, "smart"))


@pytest.mark.parametrize("at, expected", [
    (0, slice(0, 20)),
    # Sobel sees the patch's columns and one more each side (27 to 34): every window from
    # 15 to 27 holds all of it, and 20 is the most central of them.
    (28, slice(20, 40)),
    # Columns 49 to 56: windows from 37 to 40 hold it; 37 is the most central.
    (50, slice(37, 57)),
])
def test_geometry_fill_smart_keeps_the_detail(root: Path, at: int, expected: slice) -> None:
    # A flat 60 x 20 image with a checkered 6 x 10 patch at column ``at``; 40 columns spare.
    image = np.full((20, 60, 3), 128, np.uint8)
    image[5:15, at:at + 6] = np.indices((10, 6)).sum(axis=0)[..., None] % 2 * 255
    assert np.array_equal(processed(root, image, ["fill=20x20,smart"]), image[:, expected])


def test_geometry_fill_smart_on_a_flat_image_is_centred(root: Path) -> None:
    flat = np.full((10, 31), 77, np.uint8)
    flat[:, ::2] = 78  # detail everywhere alike: every window ties
    assert np.array_equal(processed(root, flat, ["fill=10x10,smart"]), flat[:, 10:20])
    tall = np.full((30, 10, 3), 200, np.uint8)
    assert np.array_equal(processed(root, tall, ["fill=10x11,smart"]), tall[9:20])


@settings(deadline=None)
@given(st.integers(1, 64), st.integers(1, 64), st.integers(1, 64), st.integers(1, 64),
       st.sampled_from([*GRAVITIES, "smart"]))
def test_geometry_fill_is_always_exactly_the_box(width: int, height: int, box_width: int,
                                                 box_height: int, gravity: str) -> None:
    image = np.zeros((height, width, 3), np.uint8)
    result = Fill(box_width, box_height, "centre" if gravity == "center" else gravity
                  ).apply(image)
    assert result.shape == (box_height, box_width, 3)


# -- crop, rotate, flip: exact ----------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("operation, rows, columns", [
    ("crop=2,1,5,3", slice(1, 4), slice(2, 7)),
    ("crop=0,0,53,37", slice(0, 37), slice(0, 53)),
    ("crop=50,30,100,100", slice(30, 37), slice(50, 53)),  # clipped to the image
    ("crop=52,36,1,1", slice(36, 37), slice(52, 53)),
])
def test_geometry_crop_is_exact_and_clipped(root: Path, kind: tuple[int, Any], operation: str,
                                            rows: slice, columns: slice) -> None:
    image = image_of(kind)
    assert np.array_equal(processed(root, image, [operation]), image[rows, columns])


@pytest.mark.parametrize("operation", ["crop=53,0,5,5", "crop=0,37,5,5", "crop=999,999,1,1"])
def test_geometry_crop_leaving_nothing_fails_naming_the_size(root: Path, operation: str) -> None:
    with pytest.raises(ImageError, match="nothing of a 53x37 image"):
        processed(root, image_of((3, np.uint8)), [operation])
    assert not list(root.glob("out.*"))


def test_geometry_rotate_turns_clockwise() -> None:
    # Written out by hand: the left column becomes the top row, read bottom to top.
    image = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    assert np.array_equal(rotate_reference(image, 90), [[40, 10], [50, 20], [60, 30]])
    assert np.array_equal(rotate_reference(image, -90), [[30, 60], [20, 50], [10, 40]])


@pytest.mark.parametrize("degrees", [0, 90, 180, 270, -90, -180, -270])
def test_geometry_rotate_is_exact(root: Path, degrees: int) -> None:
    image = image_of((3, np.uint8))
    assert np.array_equal(processed(root, image, [f"rotate={degrees}"]),
                          rotate_reference(image, degrees))


def test_geometry_rotate_by_hand(root: Path) -> None:
    image = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    assert np.array_equal(processed(root, image, ["rotate=90"]), [[40, 10], [50, 20], [60, 30]])
    assert np.array_equal(processed(root, image, ["rotate=-270"]),
                          [[40, 10], [50, 20], [60, 30]])
    assert np.array_equal(processed(root, image, ["rotate=180"]), [[60, 50, 40], [30, 20, 10]])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("direction, flipped", [
    ("h", lambda a: a[:, ::-1]), ("v", lambda a: a[::-1]), ("hv", lambda a: a[::-1, ::-1])])
def test_geometry_flip_is_exact(root: Path, kind: tuple[int, Any], direction: str,
                                flipped: Any) -> None:
    image = image_of(kind)
    assert np.array_equal(processed(root, image, [f"flip={direction}"]), flipped(image))


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_geometry_rotate_each_kind(root: Path, kind: tuple[int, Any]) -> None:
    image = image_of(kind)
    assert np.array_equal(processed(root, image, ["rotate=270"]), rotate_reference(image, 270))


# -- orders, and each tile after a split -------------------------------------------------


def test_geometry_crop_then_rotate_differs_from_rotate_then_crop(root: Path) -> None:
    image = np.array([[10, 20, 30], [40, 50, 60]], np.uint8)
    # Crop the top-left 2 x 1, then turn it: a column.
    assert np.array_equal(processed(root, image, ["crop=0,0,2,1", "rotate=90"]), [[10], [20]])
    # Turn first ([[40, 10], [50, 20], [60, 30]]), then crop its top-left 2 x 1: a row.
    assert np.array_equal(processed(root, image, ["rotate=90", "crop=0,0,2,1"]), [[40, 10]])


def test_geometry_flip_then_crop_differs_from_crop_then_flip(root: Path) -> None:
    image = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.uint8)
    assert np.array_equal(processed(root, image, ["flip=h", "crop=0,0,2,2"]), [[4, 3], [8, 7]])
    assert np.array_equal(processed(root, image, ["crop=0,0,2,2", "flip=h"]), [[2, 1], [6, 5]])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_geometry_operations_after_a_split_apply_to_each_tile(root: Path,
                                                               kind: tuple[int, Any]) -> None:
    image = image_of(kind)  # 53 x 37: tiles of 27 or 26 by 19 or 18
    tiles = processed_tiles(root, image, ["split", "rotate=90", "crop=1,2,15,40", "flip=v",
                                          "fit=x10", "fill=6x6,southwest"])
    parts = {"_lt": image[:19, :27], "_rt": image[:19, 27:], "_lb": image[19:, :27],
             "_rb": image[19:, 27:]}
    assert list(tiles) == list(parts)
    for suffix, part in parts.items():
        expected = rotate_reference(part, 90)[2:42, 1:16][::-1]
        expected = fill_reference(fit_reference(expected, None, 10), 6, 6, "southwest")
        assert close(tiles[suffix], expected), suffix
