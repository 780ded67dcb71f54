"""watermark against a reference written from SPEC §12 (placement, shrinking, blending by
alpha times opacity), its path confined to the root, unreadable marks, and the worker's cache
of decoded marks; through real PNG files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from imgserver.errors import ImageError, RequestError
from imgserver.images import watermark
from imgserver.images.operations import Context, Watermark, parse_operation
from imgserver.jobs.request import RequestLimits, parse_request

from conftest import mean_abs_diff, photo, processed, processed_tiles

GRAVITIES = ["centre", "center", "north", "south", "east", "west", "northeast", "northwest",
             "southeast", "southwest"]


def mark_place(gravity: str, image_shape: tuple[int, ...],
               mark_shape: tuple[int, ...]) -> tuple[int, int]:
    """Flush with the edges the gravity names, centred ((excess)//2) along the others."""
    excess_x, excess_y = image_shape[1] - mark_shape[1], image_shape[0] - mark_shape[0]
    x = 0 if "west" in gravity else excess_x if "east" in gravity else excess_x // 2
    y = 0 if "north" in gravity else excess_y if "south" in gravity else excess_y // 2
    return x, y


def watermark_reference(image: np.ndarray, mark: np.ndarray, gravity: str = "southeast",
                        opacity: float = 1.0) -> tuple[np.ndarray, tuple[slice, slice]]:
    """The image with the mark drawn on, and the rectangle the mark covers."""
    height, width = image.shape[:2]
    rows, columns = mark.shape[:2]
    s = min(width / columns, height / rows)
    if s < 1:  # larger than the image: shrunk to fit, keeping its aspect ratio
        size = (max(1, round(columns * s)), max(1, round(rows * s)))
        mark = cv2.resize(mark, size, interpolation=cv2.INTER_AREA)
        rows, columns = mark.shape[:2]
    x, y = mark_place(gravity, image.shape, mark.shape)
    mark_top = float(np.iinfo(mark.dtype).max)
    top = float(np.iinfo(image.dtype).max)
    mark_alpha = mark[..., 3] / mark_top if mark.ndim == 3 and mark.shape[2] == 4 else 1.0
    weight = np.broadcast_to(mark_alpha * opacity, (rows, columns)).astype(np.float64)
    paint = mark[..., :3] if mark.ndim == 3 else np.dstack([mark] * 3)
    has_alpha = image.ndim == 3 and image.shape[2] == 4
    if image.ndim == 2:
        paint = cv2.cvtColor(np.ascontiguousarray(paint), cv2.COLOR_BGR2GRAY)
    else:
        weight = weight[..., None]
    paint = paint.astype(np.float64) * (top / mark_top)
    region = (slice(y, y + rows), slice(x, x + columns))
    out = image.astype(np.float64)
    colour = out[region][..., :3] if image.ndim == 3 else out[region]
    mixed = paint * weight + colour * (1 - weight)
    if image.ndim == 3:
        out[region + (slice(0, 3),)] = mixed
    else:
        out[region] = mixed
    if has_alpha:
        out[region + (3,)] = weight[..., 0] * top + out[region + (3,)] * (1 - weight[..., 0])
    return np.clip(np.round(out), 0, top).astype(image.dtype), region


def write_mark(root: Path, name: str, mark: np.ndarray) -> str:
    """Write ``mark`` under the root; the path a request gives for it."""
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), mark)
    return name


def logo(rows: int = 12, columns: int = 20, alpha: bool = True, dtype: Any = np.uint8
         ) -> np.ndarray:
    """A mark: coloured, with an alpha that runs from transparent to opaque across it."""
    top = np.iinfo(dtype).max
    colour = photo(rows, columns, 3, dtype, seed=7)
    if not alpha:
        return colour
    ramp = np.linspace(0, top, columns).round().astype(dtype)
    return np.dstack([colour, np.broadcast_to(ramp, (rows, columns))])


def check(result: np.ndarray, image: np.ndarray, expected: np.ndarray,
          region: tuple[slice, slice]) -> None:
    """Outside the mark's rectangle nothing changed; inside, within a grey level on average."""
    outside = np.ones(image.shape[:2], bool)
    outside[region] = False
    assert result.shape == expected.shape and result.dtype == expected.dtype
    assert np.array_equal(result[outside], image[outside])
    scale = 257 if image.dtype == np.uint16 else 1
    assert mean_abs_diff(result[region], expected[region]) / scale <= 1


@pytest.mark.parametrize("gravity", GRAVITIES)
def test_watermark_blends_at_each_gravity(root: Path, gravity: str) -> None:
    image, mark = photo(37, 53), logo()
    path = write_mark(root, "marks/logo.png", mark)
    result = processed(root, image, [f"watermark={path},{gravity},0.6"])
    expected, region = watermark_reference(image, mark, gravity, 0.6)
    check(result, image, expected, region)


def test_watermark_defaults_to_southeast_and_opaque(root: Path) -> None:
    image, mark = photo(37, 53), logo(alpha=False)
    path = write_mark(root, "logo.png", mark)
    result = processed(root, image, [f"watermark={path}"])
    # No alpha and no opacity: the mark replaces its rectangle exactly, flush bottom-right.
    assert np.array_equal(result[-12:, -20:], mark)
    assert np.array_equal(result[:-12], image[:-12]) and np.array_equal(result[:, :-20],
                                                                         image[:, :-20])


@pytest.mark.parametrize("image_kind, mark_kind", [
    ((3, np.uint16), (4, np.uint8)),   # an 8-bit mark on a 16-bit image
    ((4, np.uint8), (4, np.uint8)),    # onto alpha: the mark makes it more opaque
    ((1, np.uint8), (4, np.uint8)),    # a colour mark on a gray image
    ((1, np.uint16), (3, np.uint16)),
    ((3, np.uint8), (4, np.uint16)),
], ids=["16bit-image", "alpha-image", "gray-image", "gray16-opaque-mark", "16bit-mark"])
def test_watermark_kinds(root: Path, image_kind: tuple[int, Any],
                         mark_kind: tuple[int, Any]) -> None:
    image = photo(37, 53, *image_kind)
    mark = logo(alpha=mark_kind[0] == 4, dtype=mark_kind[1])
    path = write_mark(root, "logo.png", mark)
    result = processed(root, image, [f"watermark={path},northwest,0.7"])
    expected, region = watermark_reference(image, mark, "northwest", 0.7)
    check(result, image, expected, region)


@pytest.mark.parametrize("mark_size, expected_size", [((100, 40), (53, 21)),
                                                      ((30, 90), (12, 37)),
                                                      ((200, 200), (37, 37))])
def test_watermark_larger_than_the_image_is_shrunk_keeping_its_aspect(
        root: Path, mark_size: tuple[int, int], expected_size: tuple[int, int]) -> None:
    image = photo(37, 53)
    mark = logo(mark_size[1], mark_size[0], alpha=False)
    path = write_mark(root, "big.png", mark)
    result = processed(root, image, [f"watermark={path},centre"])
    expected, region = watermark_reference(image, mark, "centre")
    rows, columns = region
    assert (columns.stop - columns.start, rows.stop - rows.start) == expected_size
    check(result, image, expected, region)


def test_watermark_after_a_split_on_each_tile(root: Path) -> None:
    image, mark = photo(30, 40, 4), logo(6, 8)
    path = write_mark(root, "logo.png", mark)
    tiles = processed_tiles(root, image, ["split", f"watermark={path},north,0.5"])
    parts = [image[:15, :20], image[:15, 20:], image[15:, :20], image[15:, 20:]]
    for tile, part in zip(tiles.values(), parts, strict=True):
        expected, region = watermark_reference(part, mark, "north", 0.5)
        check(tile, part, expected, region)


# -- the path, confined to the root; unreadable marks -----------------------------------


def request_problems(root: Path, operations: list[str]) -> dict[str, str]:
    document = {"images": [{"input": "a.png", "output": "b.png"}], "operations": operations}
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps(document).encode(), root, RequestLimits(1 << 20, 10))
    return {problem.field: problem.message for problem in info.value.problems}


def test_watermark_outside_the_root_is_refused(root: Path,
                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    outside = tmp_path_factory.mktemp("outside")
    write_mark(outside, "logo.png", logo())
    (root / "marks").mkdir()
    (root / "marks" / "link.png").symlink_to(outside / "logo.png")
    (root / "away").symlink_to(outside)
    for operation in ["watermark=../logo.png", "watermark=marks/link.png,north",
                      "watermark=away/logo.png,north,0.5",
                      f"watermark={outside / 'logo.png'}", "watermark=marks/../../x.png"]:
        found = request_problems(root, ["resize=50", operation])
        assert set(found) == {"operations[1]"}, operation
        assert "outside the root" in found["operations[1]"], found
        assert found["operations[1]"].startswith(operation), found


def test_watermark_inside_the_root_by_an_absolute_path_or_symlink_is_accepted(root: Path) -> None:
    write_mark(root, "marks/logo.png", logo())
    (root / "alias.png").symlink_to(root / "marks" / "logo.png")
    for text in [f"watermark={root / 'marks' / 'logo.png'}", "watermark=alias.png",
                 "watermark=x/../marks/logo.png"]:
        op = parse_operation(text, Context(root))
        assert isinstance(op, Watermark) and op.path == str(root / "marks" / "logo.png")


@pytest.mark.parametrize("setup, message", [
    ("missing", "cannot read watermark 'mark.png': No such file"),
    ("garbage", "watermark: input is not an image OpenCV can decode"),
    ("empty", "watermark: input file is empty"),
    ("folder", "cannot read watermark 'mark.png': not a regular file"),
    ("fifo", "cannot read watermark 'mark.png': not a regular file"),
])
def test_watermark_unreadable_fails_each_image_saying_why(root: Path, setup: str,
                                                          message: str) -> None:
    mark = root / "mark.png"
    if setup == "garbage":
        mark.write_bytes(b"not an image at all")
    elif setup == "empty":
        mark.write_bytes(b"")
    elif setup == "folder":
        mark.mkdir()
    elif setup == "fifo":
        os.mkfifo(mark)  # would block a plain read for ever
    for _ in range(2):  # each image fails alike
        with pytest.raises(ImageError, match=message):
            processed(root, photo(10, 10), ["watermark=mark.png"])
        assert not list(root.glob("out.*"))


def test_watermark_symlink_swapped_in_after_validation_fails(
        root: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    path = write_mark(root, "marks/logo.png", logo())
    op = parse_operation(f"watermark={path}", Context(root))
    assert isinstance(op, Watermark)
    outside = tmp_path_factory.mktemp("outside")
    write_mark(outside, "logo.png", logo())
    (root / "marks").rename(root / "old")
    (root / "marks").symlink_to(outside)
    with pytest.raises(ImageError, match="cannot read watermark 'marks/logo.png'.*symlink"):
        op.apply(photo(20, 30))


def test_watermark_is_decoded_once_while_the_file_is_unchanged(root: Path) -> None:
    first = logo(alpha=False)
    path = write_mark(root, "logo.png", first)

    def cached() -> list[np.ndarray]:
        return [mark for key, mark in watermark._MARKS.items() if key[0] == str(root / path)]

    result = processed(root, photo(20, 30), [f"watermark={path}"])
    assert np.array_equal(result[-12:, -20:], first)
    [decoded] = cached()
    processed(root, photo(20, 30, seed=1), [f"watermark={path}"])
    assert len(cached()) == 1 and cached()[0] is decoded  # the second image decoded nothing
    # A new mark in the same place is read again.
    second = 255 - first
    write_mark(root, path, second)
    stat = (root / path).stat()
    os.utime(root / path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    result = processed(root, photo(20, 30), [f"watermark={path}"])
    assert np.array_equal(result[-12:, -20:], second)
    assert any(mark is not decoded and np.array_equal(mark, second) for mark in cached())
