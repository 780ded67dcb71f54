"""Request validation: every invalid form is refused with the field and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from imgserver.errors import RequestError
from imgserver.jobs.request import RequestLimits, parse_request

from conftest import json_values

LIMITS = RequestLimits(max_body_bytes=1 << 20, max_images=1000)


def body(document: object) -> bytes:
    return json.dumps(document).encode()


def problems(root: Path, raw: bytes, limits: RequestLimits = LIMITS) -> dict[str, str]:
    with pytest.raises(RequestError) as info:
        parse_request(raw, root, limits)
    assert str(info.value)
    return {p.field: p.message for p in info.value.problems}


def test_request_valid_resolves_paths_and_tiles(root: Path) -> None:
    request = parse_request(body({
        "images": [{"input": "photos/cat.jpg", "output": "thumbs/cat.png"}],
        "operations": ["resize=50", "split=True"]}), root, LIMITS)
    image = request.images[0]
    assert image.input == "photos/cat.jpg" and image.input_path == root / "photos" / "cat.jpg"
    assert [p.name for p in image.outputs] == ["cat_lt.png", "cat_rt.png", "cat_lb.png",
                                               "cat_rb.png"]
    assert request.operations == ("resize=50", "split=True")


def test_request_empty_operations_is_valid(root: Path) -> None:
    request = parse_request(body({"images": [{"input": "a.jpg", "output": "b.tiff"}],
                                  "operations": []}), root, LIMITS)
    assert request.parsed == () and request.images[0].outputs == (root / "b.tiff",)


@pytest.mark.parametrize("document, field, message", [
    ({"images": [{"input": "a.jpg", "output": "b.jpg"}]}, "operations", "field required"),
    ({"operations": []}, "images", "field required"),
    ({"images": [], "operations": []}, "images", "at least one image"),
    ({"images": "a.jpg", "operations": []}, "images", "expected a list of objects, got a string"),
    ({"images": [{"input": "a.jpg", "output": "b.jpg"}], "operations": "resize=50"},
     "operations", "expected a list of strings, got a string"),
    ({"images": [{"input": "a.jpg", "output": "b.jpg"}], "operations": [], "extra": 1},
     "extra", "unknown field"),
    ({"images": [{"input": "a.jpg", "output": "b.jpg", "mode": "x"}], "operations": []},
     "images[0].mode", "unknown field"),
    ({"images": [{"input": "a.jpg"}], "operations": []}, "images[0].output", "field required"),
    ({"images": [{"input": 5, "output": "b.jpg"}], "operations": []},
     "images[0].input", "expected a string, got a number"),
    ({"images": [{"input": None, "output": "b.jpg"}], "operations": []},
     "images[0].input", "expected a string, got null"),
    ({"images": None, "operations": []}, "images", "expected a list of objects, got null"),
    ({"images": [{"input": "a.jpg", "output": "b.jpg"}], "operations": None},
     "operations", "expected a list of strings, got null"),
    ({"images": ["a.jpg"], "operations": []}, "images[0]", "expected an object"),
    ({"images": [{"input": "a.jpg", "output": "b.jpg"}], "operations": ["resize=50", 5]},
     "operations[1]", "expected a string, got a number"),
    ({"images": [{"input": "a.jpg", "output": "b.jpg"}], "operations": ["resize=50", "resize=150"]},
     "operations[1]", "resize=150: scaling factor must be in (0.05, 100]"),
    ({"images": [{"input": "a.jpg", "output": "b.gif"}], "operations": []},
     "images[0].output", "unsupported extension '.gif' (expected one of .avif, .bmp, .jpeg"),
    ({"images": [{"input": "a.jpg", "output": "noext"}], "operations": []},
     "images[0].output", "unsupported extension '(none)'"),
    ({"images": [{"input": "../a.jpg", "output": "b.jpg"}], "operations": []},
     "images[0].input", "'../a.jpg' is outside the root"),
    ({"images": [{"input": "a.jpg", "output": "/tmp/b.jpg"}], "operations": []},
     "images[0].output", "'/tmp/b.jpg' is outside the root"),
    ({"images": [{"input": "a.jpg", "output": "x.png"}, {"input": "b.jpg", "output": "./x.png"}],
      "operations": []}, "images[1].output", "which images[0].output also writes"),
])
def test_request_invalid_names_field_and_reason(root: Path, document: object, field: str,
                                                message: str) -> None:
    found = problems(root, body(document))
    assert field in found, found
    assert message in found[field]


def test_request_outputs_colliding_through_a_symlink_are_refused(root: Path) -> None:
    (root / "thumbs").mkdir()
    (root / "alias").symlink_to(root / "thumbs")
    document = {"images": [{"input": "a.jpg", "output": "thumbs/x.png"},
                           {"input": "b.jpg", "output": "alias/x.png"}], "operations": ["split"]}
    found = problems(root, body(document))
    message = found["images[1].output"]
    assert "writes 'thumbs/x_lt.png', which images[0].output also writes" in message


def test_request_tiles_are_named_after_the_output_as_written(root: Path) -> None:
    (root / "sub").mkdir()
    (root / "link.png").symlink_to(root / "sub" / "target.png")
    request = parse_request(body({"images": [{"input": "a.jpg", "output": "link.png"}],
                                  "operations": ["split"]}), root, LIMITS)
    assert [p.relative_to(root).as_posix() for p in request.images[0].outputs] == [
        "link_lt.png", "link_rt.png", "link_lb.png", "link_rb.png"]


def test_request_tile_that_is_a_symlink_out_is_refused(root: Path,
                                                       tmp_path_factory: pytest.TempPathFactory
                                                       ) -> None:
    outside = tmp_path_factory.mktemp("outside")
    (root / "x_rb.png").symlink_to(outside / "evil.png")
    found = problems(root, body({"images": [{"input": "a.jpg", "output": "x.png"}],
                                 "operations": ["split"]}))
    assert "outside the root" in found["images[0].output"]


@pytest.mark.parametrize("images, operations, field, message", [
    ([{"input": "a.png", "output": "out/" + "é" * 126 + ".png"}], [],
     "images[0].output", "is 256 bytes in UTF-8, more than the 255 a file or folder name"),
    ([{"input": "in/" + "i" * 256 + "/a.png", "output": "b.png"}], [],
     "images[0].input", "the name 'iiii"),
    ([{"input": "a.png", "output": "ok.png"},
      {"input": "a.png", "output": "t" * 249 + ".png"}], ["split"],
     "images[1].output", "after a split, the tile 'tttt"),
    ([{"input": "a.png", "output": "t" * 248 + ".png"}], ["split", "blur=3", "split"],
     "images[0].output", "_lt_lt.png' is 258 bytes in UTF-8"),
    ([{"input": "a.png", "output": "b.png"}], [f"watermark={'m' * 252}.png"],
     "operations[0]", "mark 'mmmm"),
])
def test_request_names_the_filesystem_would_refuse_are_refused(
        root: Path, images: list, operations: list, field: str, message: str) -> None:
    found = problems(root, body({"images": images, "operations": operations}))
    assert list(found) == [field] and message in found[field], found


def test_request_names_of_255_bytes_are_accepted(root: Path) -> None:
    longest = "é" * 125 + "a.png"
    request = parse_request(body({"images": [{"input": longest, "output": f"{longest}/{longest}"}],
                                  "operations": []}), root, LIMITS)
    assert request.images[0].outputs == (root / longest / longest,)
    tiled = "t" * 245 + ".png"  # 249 bytes: its tiles (t..._lt_lt.png) have 255
    request = parse_request(body({"images": [{"input": longest, "output": tiled}],
                                  "operations": ["split", "split"]}), root, LIMITS)
    assert request.images[0].outputs[0].name == "t" * 245 + "_lt_lt.png"
    assert max(len(p.name.encode()) for p in request.images[0].outputs) == 255


@pytest.mark.parametrize("raw, message", [
    (b"", "not valid JSON"),
    (b"{", "not valid JSON"),
    (b"[]", "expected a JSON object, got a list"),
    (b"null", "expected a JSON object, got null"),
    (b'{"images": NaN, "operations": []}', "NaN is not valid JSON"),
    (b"\xff\xfe\x00", "not"),
])
def test_request_not_a_json_object(root: Path, raw: bytes, message: str) -> None:
    assert message in problems(root, raw)["request"]


def test_request_duplicate_key_is_refused(root: Path) -> None:
    raw = b'{"images": [], "images": [], "operations": []}'
    assert problems(root, raw)["request"] == "key 'images' appears twice in one object"


def test_request_limits(root: Path) -> None:
    images = [{"input": f"{i}.jpg", "output": f"{i}.png"} for i in range(5)]
    found = problems(root, body({"images": images, "operations": []}), RequestLimits(1 << 20, 4))
    assert "lists 5 images, the limit is 4" in found["images"]
    found = problems(root, body({"images": images, "operations": []}), RequestLimits(100, 10))
    assert "the limit is 100 bytes" in found["request"]


def test_request_too_many_splits_is_refused_before_naming_tiles(root: Path) -> None:
    found = problems(root, body({"images": [{"input": "a.jpg", "output": "b.png"}] * 2,
                                 "operations": ["split"] * 40}))
    assert "40 splits make" in found["operations"] and "at most 100000 files" in found["operations"]
    parse_request(body({"images": [{"input": "a.jpg", "output": "b.png"}],
                        "operations": ["split"] * 8}), root, LIMITS)  # 65536 tiles: allowed


def test_request_reports_every_problem(root: Path) -> None:
    found = problems(root, body({"images": [{"input": "../a", "output": "b.gif"}],
                                 "operations": ["blur=x"], "more": 1}))
    assert set(found) == {"images[0].input", "images[0].output", "operations[0]", "more"}


def test_request_rejected_writes_nothing(root: Path) -> None:
    before = sorted(root.rglob("*"))
    problems(root, body({"images": [{"input": "a.jpg", "output": "new/dir/b.gif"}],
                         "operations": []}))
    assert sorted(root.rglob("*")) == before


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(json_values)
def test_request_any_json_is_accepted_or_rejected_with_problems(root: Path, value: object) -> None:
    try:
        request = parse_request(json.dumps(value).encode(), root, LIMITS)
    except RequestError as error:
        assert error.problems and all(p.field and p.message for p in error.problems)
    else:
        assert request.images
        for image in request.images:
            assert image.input_path.is_relative_to(root) and image.output_path.is_relative_to(root)


@settings(max_examples=200, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=40) | st.builds(lambda head, tail: head + tail,
                                           st.sampled_from([b'{"images": ', b"[" * 3000,
                                                            b'{"x": ' + b"9" * 4301]),
                                           st.binary(max_size=20)))
def test_request_any_bytes_are_accepted_or_rejected_with_problems(root: Path, raw: bytes
                                                                  ) -> None:
    # Never anything but RequestError: every road turns that, and only that, into its answer.
    try:
        parse_request(raw, root, LIMITS)
    except RequestError as error:
        assert error.problems and all(p.field and p.message for p in error.problems)


@pytest.mark.parametrize("raw, field, message", [
    (b'{"images": ' + b"1" * 5000 + b', "operations": []}', "request",
     "has a number of more than 4300 digits"),
    (b'{"images": [{"input": "\\ud800.png", "output": "b.png"}], "operations": []}',
     "images[0].input", "'\\ud800.png' cannot be a file name: '\\ud800' is a lone UTF-16 "
                        "surrogate"),
    (b'{"images": [{"input": "a.png", "output": "b\\udfff.png"}], "operations": []}',
     "images[0].output", "is a lone UTF-16 surrogate"),
    (b"[" * 100_000 + b"]" * 100_000, "request", "is nested too deeply"),
])
def test_request_what_json_and_file_names_cannot_hold_is_refused(root: Path, raw: bytes,
                                                                 field: str, message: str) -> None:
    assert message in problems(root, raw)[field]
