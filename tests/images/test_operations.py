"""The operation grammar and the pixel operations resize and split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgserver.images.operations import (
    Blur,
    Context,
    Resize,
    Split,
    Watermark,
    apply,
    output_suffixes,
    parse_operation,
    parse_operations,
)

#: Where paths in operations would be resolved (no operation here has one).
CONTEXT = Context(Path("/nonexistent-root"))


def ops(texts: list[str]) -> tuple:
    """The operations ``texts`` parse to."""
    return parse_operations(texts, CONTEXT)


def split_tiles(image: np.ndarray) -> list[np.ndarray]:
    """The four tiles of ``image``, in order."""
    return [tile for _, tile in Split().tiles(image)]


@pytest.mark.parametrize("text, expected", [
    ("resize=50", Resize(50.0)),
    ("  resize =  12.5 ", Resize(12.5)),
    ("resize=100", Resize(100.0)),
    ("resize=0.06", Resize(0.06)),
    ("resize=1e1", Resize(10.0)),
    ("split", Split()),
    ("split=True", Split()),
    ("split=1", Split()),
    ("split=no", Split()),
    ("split=", Split()),
    ("split = yes ", Split()),
    ("split=None", None),
    ("split=false", None),
    ("split= False ", None),
    ("blur=5", Blur(5, 0.0)),
    ("blur=4", Blur(5, 0.0)),
    ("blur=0", Blur(0, 1.0)),
    ("blur=0,2.5", Blur(0, 2.5)),
    ("blur = 7 , 1.5 ", Blur(7, 1.5)),
    ("blur=1000001", Blur(1000001, 0.0)),
])
def test_operations_parse_valid(text: str, expected: object) -> None:
    assert parse_operation(text, CONTEXT) == expected


@pytest.mark.parametrize("text, message", [
    ("resize=150", "scaling factor must be in (0.05, 100]"),
    ("resize=0.05", "scaling factor must be in (0.05, 100]"),
    ("resize=0", "scaling factor must be in (0.05, 100]"),
    ("resize=-5", "scaling factor must be in (0.05, 100]"),
    ("resize=abc", "is not a number"),
    ("resize=nan", "is not a number"),
    ("resize=inf", "is not a number"),
    ("resize=50%", "is not a number"),
    ("resize", "needs a value"),
    ("resize=", "needs a value"),
    ("blur", "needs a value"),
    ("blur=-1", "must be >= 0"),
    ("blur=5.5", "is not an integer"),
    ("blur=x", "is not an integer"),
    ("blur=5,0", "sigma must be > 0"),
    ("blur=5,-1", "sigma must be > 0"),
    ("blur=5,abc", "is not a number"),
    ("blur=5,", "is not a number"),
    ("blur=5,1,2", "has 3 parts, expected at most 2"),
    ("rotate3d=90", "unknown operation 'rotate3d'"),
    ("Resize=50", "unknown operation 'Resize'"),
    ("resize=\u0665\u0660", "is not a number"),   # Arabic-Indic digits
    ("blur=\u0665", "is not an integer"),
    ("", "unknown operation ''"),
])
def test_operations_parse_invalid(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        parse_operation(text, CONTEXT)


@given(st.text(max_size=40))
def test_operations_parse_any_text_returns_or_raises_value_error(text: str) -> None:
    try:
        parse_operation(text, CONTEXT)
    except ValueError as exc:
        assert str(exc)


@given(st.floats(min_value=0.0501, max_value=100, allow_nan=False))
def test_operations_resize_any_valid_factor(percent: float) -> None:
    op = parse_operation(f"resize={percent!r}", CONTEXT)
    assert isinstance(op, Resize) and op.percent == percent


@pytest.mark.parametrize("width, height, percent, expected", [
    (640, 480, 50, (320, 240)),
    (5, 5, 50, (2, 2)),      # round(2.5) == 2: Python rounds half to even
    (7, 7, 50, (4, 4)),      # round(3.5) == 4
    (3, 1000, 10, (1, 100)),  # never below one pixel
    (100, 100, 0.06, (1, 1)),
    (101, 33, 100, (101, 33)),
])
def test_operations_resize_size_uses_python_round(width: int, height: int, percent: float,
                                                  expected: tuple[int, int]) -> None:
    assert Resize(percent).size(width, height) == expected


def test_operations_watermark_name_over_255_bytes_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="mark 'logos/.*' is 256 bytes in UTF-8, more than the "
                                         "255 a file or folder name may have"):
        parse_operation(f"watermark=logos/{'ü' * 126}.png,north", Context(tmp_path))
    mark = parse_operation(f"watermark=logos/{'ü' * 125}a.png,north", Context(tmp_path))
    assert isinstance(mark, Watermark) and mark.gravity == "north"


def test_operations_split_geometry_covers_image_exactly() -> None:
    image = np.arange(7 * 5).reshape(5, 7).astype(np.uint8)
    lt, rt, lb, rb = split_tiles(image)
    assert lt.shape == (3, 4) and rt.shape == (3, 3) and lb.shape == (2, 4) and rb.shape == (2, 3)
    top = np.hstack([lt, rt])
    bottom = np.hstack([lb, rb])
    assert np.array_equal(np.vstack([top, bottom]), image)


@pytest.mark.parametrize("shape", [(1, 5), (5, 1), (1, 1)])
def test_operations_split_too_small_fails(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="a tile would be empty"):
        split_tiles(np.zeros(shape, np.uint8))


def test_operations_nested_split_names_and_order() -> None:
    suffixes = output_suffixes(ops(["split", "split=None", "split"]))
    assert len(suffixes) == 16
    assert suffixes[:5] == ["_lt_lt", "_lt_rt", "_lt_lb", "_lt_rb", "_rt_lt"]
    assert suffixes[-1] == "_rb_rb"
    assert output_suffixes(ops(["resize=50"])) == [""]


def test_operations_nested_split_pixels_match_names() -> None:
    image = np.arange(8 * 6, dtype=np.uint8).reshape(6, 8)
    tiles = dict(apply([("", image)], ops(["split", "split"])))
    assert np.array_equal(tiles["_lt_lt"], image[:2, :2])
    assert np.array_equal(tiles["_rb_rb"], image[5:, 6:])
    assert np.array_equal(tiles["_rt_lb"], image[2:3, 4:6])


def test_operations_apply_in_order() -> None:
    image = np.zeros((100, 60), np.uint8)
    resized_then_split = dict(apply([("", image)], ops(["resize=50", "split"])))
    split_then_resized = dict(apply([("", image)], ops(["split", "resize=50"])))
    assert resized_then_split["_lt"].shape == (25, 15)
    # 60x100 -> tiles 30x50 -> 15x25; the same here, but a 7-wide image shows the order:
    odd = np.zeros((10, 7), np.uint8)
    assert dict(apply([("", odd)], ops(["resize=50", "split"])))["_lt"].shape == (3, 2)
    assert dict(apply([("", odd)], ops(["split", "resize=50"])))["_lt"].shape == (2, 2)
    assert split_then_resized["_rb"].shape == (25, 15)
