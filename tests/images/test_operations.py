"""The operation grammar (every operation, and through the request parser), the registry,
and the pixel operations resize and split."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgserver.errors import RequestError
from imgserver.images.operations import (
    Blur,
    Context,
    Crop,
    Fill,
    Fit,
    Flip,
    Grayscale,
    Operation,
    Quality,
    Resize,
    Rotate,
    Sharpen,
    Split,
    Watermark,
    apply,
    output_suffixes,
    parse_operation,
    parse_operations,
    quality,
)
from imgserver.jobs.request import RequestLimits, parse_request

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


# -- the operations of SPEC §12: registry and grammar -------------------------------------


def test_operations_registry_has_every_operation_with_a_valid_example(tmp_path: Path) -> None:
    assert set(Operation.registry) == {
        "resize", "split", "blur", "fit", "fill", "crop", "rotate", "flip", "grayscale",
        "sharpen", "watermark", "quality"}
    for name, kind in Operation.registry.items():
        assert kind.name == name and kind.summary and kind.example.startswith(name)
        op = parse_operation(kind.example, Context(tmp_path))
        assert isinstance(op, kind), kind.example
    assert [name for name, kind in Operation.registry.items() if kind.setting] == ["quality"]


ROOT = Path("/nonexistent-root")


@pytest.mark.parametrize("text, expected", [
    ("fit=400x300", Fit(400, 300)),
    ("fit=400x", Fit(400, None)),
    ("fit=x300", Fit(None, 300)),
    (" fit = 400 X 300 ", Fit(400, 300)),
    ("fit=1x100000", Fit(1, 100000)),
    ("fill=200x100", Fill(200, 100, "centre")),
    ("fill=200x100,center", Fill(200, 100, "centre")),
    ("fill=200x100, North ", Fill(200, 100, "north")),
    ("fill=200x100,southwest", Fill(200, 100, "southwest")),
    ("fill=200x100,smart", Fill(200, 100, "smart")),
    ("crop=0,0,1,1", Crop(0, 0, 1, 1)),
    ("crop= 10 , 20 , 300 , 200 ", Crop(10, 20, 300, 200)),
    ("crop=5000000,0,100000,1", Crop(5000000, 0, 100000, 1)),
    ("rotate=0", Rotate(0)),
    ("rotate=90", Rotate(90)),
    ("rotate=-90", Rotate(270)),
    ("rotate=-180", Rotate(180)),
    ("rotate=-270", Rotate(90)),
    ("rotate=+270", Rotate(270)),
    ("flip=h", Flip("h")),
    ("flip= v ", Flip("v")),
    ("flip=hv", Flip("hv")),
    ("grayscale", Grayscale()),
    ("grayscale=True", Grayscale()),
    ("grayscale=no", Grayscale()),
    ("grayscale=None", None),
    ("grayscale=false", None),
    ("grayscale= False", None),
    ("sharpen=1.5", Sharpen(1.5, 1.0)),
    ("sharpen=100,10", Sharpen(100.0, 10.0)),
    ("sharpen= 0.5 , 0.25 ", Sharpen(0.5, 0.25)),
    ("quality=1", Quality(1)),
    ("quality= 100 ", Quality(100)),
    ("watermark=logo.png", Watermark(str(ROOT), str(ROOT / "logo.png"), "logo.png")),
    ("watermark=logos/a,b.png,north",
     Watermark(str(ROOT), str(ROOT / "logos/a,b.png"), "logos/a,b.png", "north")),
    ("watermark= logo.png , Center , 0.5 ",
     Watermark(str(ROOT), str(ROOT / "logo.png"), "logo.png", "centre", 0.5)),
    ("watermark=logo.png,southwest,1", Watermark(str(ROOT), str(ROOT / "logo.png"),
                                                 "logo.png", "southwest", 1.0)),
])
def test_operations_parse_valid_more(text: str, expected: object) -> None:
    assert parse_operation(text, Context(ROOT)) == expected


@pytest.mark.parametrize("text, message", [
    ("fit", "needs a value: fit=WxH, fit=Wx or fit=xH"),
    ("fit=400", "'400' is not a box: expected WxH, Wx or xH"),
    ("fit=x", "gives neither a width nor a height: expected WxH, Wx or xH"),
    ("fit=0x10", "width must be from 1 to 100000, got 0"),
    ("fit=10x100001", "height must be from 1 to 100000, got 100001"),
    ("fit=-5x10", "width must be from 1 to 100000, got -5"),
    ("fit=1.5x10", "width '1.5' is not an integer"),
    ("fit=10x20x30", "height '20x30' is not an integer"),
    ("fill=200", "'200' is not a box: expected WxH"),
    ("fill=200x", "the height is missing: expected WxH"),
    ("fill=x200", "the width is missing: expected WxH"),
    ("fill=200x100,middle", "unknown gravity 'middle' (expected one of centre, center, north"),
    ("fill=200x100,centre,x", "has 3 parts, expected at most 2: fill=WxH or fill=WxH,G"),
    ("fill=0x100", "width must be from 1 to 100000, got 0"),
    ("crop", "needs a value: crop=X,Y,W,H"),
    ("crop=1,2,3", "has 3 parts, expected 4: crop=X,Y,W,H"),
    ("crop=1,2,3,4,5", "has 5 parts, expected at most 4: crop=X,Y,W,H"),
    ("crop=-1,0,10,10", "X must be >= 0, got -1"),
    ("crop=0,-1,10,10", "Y must be >= 0, got -1"),
    ("crop=0,0,0,10", "width must be from 1 to 100000, got 0"),
    ("crop=0,0,10,100001", "height must be from 1 to 100000, got 100001"),
    ("crop=0,0,ten,10", "width 'ten' is not an integer"),
    ("crop=0.5,0,10,10", "X '0.5' is not an integer"),
    ("rotate", "needs a value: rotate=A, with A one of 0, 90, 180, 270, -90, -180, -270"),
    ("rotate=45", "angle must be a multiple of 90"),
    ("rotate=360", "angle must be from -270 to 270, got 360"),
    ("rotate=-360", "angle must be from -270 to 270, got -360"),
    ("rotate=90.0", "angle '90.0' is not an integer"),
    ("rotate=right", "angle 'right' is not an integer"),
    ("flip", "needs a value: flip=h, flip=v or flip=hv"),
    ("flip=x", "direction 'x' is not h, v or hv"),
    ("flip=vh", "direction 'vh' is not h, v or hv"),
    ("flip=H", "direction 'H' is not h, v or hv"),
    ("sharpen", "needs a value: sharpen=S or sharpen=S,A"),
    ("sharpen=0", "sigma must be in (0, 100], got 0"),
    ("sharpen=100.5", "sigma must be in (0, 100], got 100.5"),
    ("sharpen=1,0", "amount must be in (0, 10], got 0"),
    ("sharpen=1,10.5", "amount must be in (0, 10], got 10.5"),
    ("sharpen=1,2,3", "has 3 parts, expected at most 2: sharpen=S or sharpen=S,A"),
    ("sharpen=nan", "sigma 'nan' is not a number"),
    ("quality", "needs a value: quality=Q, from 1 to 100"),
    ("quality=0", "quality must be from 1 to 100, got 0"),
    ("quality=101", "quality must be from 1 to 100, got 101"),
    ("quality=80.5", "quality '80.5' is not an integer"),
    ("quality=high", "quality 'high' is not an integer"),
    ("watermark", "needs a value: watermark=PATH, watermark=PATH,G or watermark=PATH,G,O"),
    ("watermark=logo.png,sideways", "unknown gravity 'sideways' (expected one of centre"),
    ("watermark=logo.png,smart", "unknown gravity 'smart'"),
    ("watermark=logo.png,sideways,0.5", "unknown gravity 'sideways'"),
    ("watermark=logo.png,,0.5", "unknown gravity ''"),
    ("watermark=logo.png,0.5", "an opacity follows a gravity: expected watermark=PATH, "
                               "watermark=PATH,G or watermark=PATH,G,O"),
    ("watermark=logo.png,north,0", "opacity must be in (0, 1], got 0"),
    ("watermark=logo.png,north,1.5", "opacity must be in (0, 1], got 1.5"),
    ("watermark=logo.png,north,-0.5", "opacity must be in (0, 1], got -0.5"),
    ("watermark=logo.png,north,0.5x", "opacity '0.5x' is not a number"),
    ("watermark=,north", "needs the path of the mark"),
    ("watermark= ,north,0.5", "needs the path of the mark"),
    ("watermark=../logo.png", "mark '../logo.png' is outside the root"),
    ("watermark=/etc/passwd,north", "mark '/etc/passwd' is outside the root"),
])
def test_operations_parse_invalid_more(text: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_operation(text, Context(ROOT))
    assert message in str(info.value)


@pytest.mark.parametrize("operations, field, message", [
    (["fit=400"], "operations[0]", "fit=400: '400' is not a box: expected WxH, Wx or xH"),
    (["resize=50", "fill=10x10,middle"], "operations[1]",
     "fill=10x10,middle: unknown gravity 'middle'"),
    (["crop=1,2,3"], "operations[0]", "crop=1,2,3: has 3 parts, expected 4: crop=X,Y,W,H"),
    (["split", "flip=x", "blur=3"], "operations[1]", "flip=x: direction 'x' is not h, v or hv"),
    (["rotate=45"], "operations[0]", "rotate=45: angle must be a multiple of 90"),
    (["sharpen=1,11"], "operations[0]", "sharpen=1,11: amount must be in (0, 10], got 11"),
    (["quality=0"], "operations[0]", "quality=0: quality must be from 1 to 100, got 0"),
    (["quality=80", "fit=10x", "quality=80"], "operations[2]",
     "quality=80: quality may be given once (operations[0] gives it already)"),
    (["watermark=../x.png,north"], "operations[0]",
     "watermark=../x.png,north: mark '../x.png' is outside the root"),
    (["grayscale", "watermark=a.png,0.5"], "operations[1]", "an opacity follows a gravity"),
])
def test_operations_malformed_refuse_the_request_naming_the_operation(
        root: Path, operations: list[str], field: str, message: str) -> None:
    document = {"images": [{"input": "a.png", "output": "b.png"}], "operations": operations}
    with pytest.raises(RequestError) as info:
        parse_request(json.dumps(document).encode(), root, RequestLimits(1 << 20, 10))
    found = {problem.field: problem.message for problem in info.value.problems}
    assert found == {field: found[field]} and message in found[field], found


def test_operations_quality_is_a_setting_not_a_step() -> None:
    image = np.arange(4 * 6, dtype=np.uint8).reshape(4, 6)
    for texts in (["quality=70", "flip=h"], ["flip=h", "quality=70"]):
        operations = ops(texts)
        assert quality(operations) == 70
        assert np.array_equal(dict(apply([("", image)], operations))[""], image[:, ::-1])
    assert quality(ops(["flip=h"])) is None
    assert output_suffixes(ops(["quality=5", "split"])) == ["_lt", "_rt", "_lb", "_rb"]


def test_operations_once_valid_request_keeps_every_operation(root: Path) -> None:
    texts = ["quality=80", "fit=400x", "fill=100x100,smart", "crop=0,0,50,50", "rotate=-90",
             "flip=hv", "grayscale=False", "grayscale", "sharpen=1,0.5",
             "watermark=logo.png,north,0.5"]
    document = {"images": [{"input": "a.png", "output": "b.png"}], "operations": texts}
    request = parse_request(json.dumps(document).encode(), root, RequestLimits(1 << 20, 10))
    assert request.operations == tuple(texts)
    assert [op.name for op in request.parsed] == [
        "quality", "fit", "fill", "crop", "rotate", "flip", "grayscale", "sharpen", "watermark"]
