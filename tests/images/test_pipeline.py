"""One image end to end in this process: outputs are right, atomic, and failures leave nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from imgserver.errors import ImageError
from imgserver.images.operations import Context, parse_operations
from imgserver.images.pipeline import (
    TEMP_SUFFIX,
    ImageTask,
    process_image,
    remove_partial,
    temp_prefix,
)

from conftest import photo


def task(root: Path, source: str, outputs: list[str], operations: list[str],
         max_pixels: int = 10**9, max_file_bytes: int = 1 << 30) -> ImageTask:
    return ImageTask(root=str(root), input=str(root / source),
                     outputs=tuple(str(root / o) for o in outputs),
                     operations=parse_operations(operations, Context(root)),
                     max_pixels=max_pixels, max_file_bytes=max_file_bytes)


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(TEMP_SUFFIX)]


def test_pipeline_resize_matches_opencv(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("in/a.png", 101, 67)
    written = process_image(task(root, "in/a.png", ["out/deep/a.png"], ["resize=33"]))
    assert written == ["out/deep/a.png"]
    expected = cv2.resize(photo(67, 101), (33, 22), interpolation=cv2.INTER_AREA)
    assert np.array_equal(cv2.imread(str(root / "out/deep/a.png"), -1), expected)


@pytest.mark.parametrize("operations", [["blur=301"], ["blur=301", "split=True"]])
def test_pipeline_wide_blur_of_jpeg_matches_opencv(root: Path, operations: list[str]) -> None:
    # A wide blur first on a large JPEG starts from its 8x8 block means (decoded at 1/8).
    source = root / "in" / "a.jpg"
    source.parent.mkdir()
    assert cv2.imwrite(str(source), photo(1080, 1920, noise=0.02))
    outputs = ["out/a.png"] if len(operations) == 1 else [
        f"out/a{suffix}.png" for suffix in ("_lt", "_rt", "_lb", "_rb")]
    assert process_image(task(root, "in/a.jpg", outputs, operations)) == outputs
    expected = cv2.GaussianBlur(cv2.imread(str(source)), (301, 301), 0)
    tiles = [expected] if len(operations) == 1 else [
        expected[:540, :960], expected[:540, 960:], expected[540:, :960], expected[540:, 960:]]
    for output, reference in zip(outputs, tiles, strict=True):
        written = cv2.imread(str(root / output), cv2.IMREAD_UNCHANGED)
        difference = np.abs(written.astype(np.float64) - reference)
        assert written.shape == reference.shape
        assert difference.mean() <= 1 and difference.max() <= 8


def test_pipeline_split_tiles_are_pixel_exact(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 9, 7, channels=4)
    names = ["t_lt.png", "t_rt.png", "t_lb.png", "t_rb.png"]
    assert process_image(task(root, "a.png", names, ["split"])) == names
    image = photo(7, 9, 4)
    tiles = [image[:4, :5], image[:4, 5:], image[4:, :5], image[4:, 5:]]
    for name, tile in zip(names, tiles, strict=False):
        assert np.array_equal(cv2.imread(str(root / name), cv2.IMREAD_UNCHANGED), tile)


def test_pipeline_missing_input_fails(root: Path) -> None:
    with pytest.raises(ImageError, match="cannot open input: no such file"):
        process_image(task(root, "nope.jpg", ["x.png"], []))
    assert not (root / "x.png").exists()


def test_pipeline_directory_and_fifo_inputs_fail(root: Path) -> None:
    (root / "folder.jpg").mkdir()
    with pytest.raises(ImageError, match="not a regular file"):
        process_image(task(root, "folder.jpg", ["x.png"], []))
    os.mkfifo(root / "pipe.jpg")  # would block a plain open() for ever
    with pytest.raises(ImageError, match="not a regular file"):
        process_image(task(root, "pipe.jpg", ["x.png"], []))


def test_pipeline_file_size_limit(root: Path, make_image: Callable[..., Path]) -> None:
    path = make_image("a.png")
    size = path.stat().st_size
    with pytest.raises(ImageError, match=f"input is {size} bytes, the limit is 100 bytes"):
        process_image(task(root, "a.png", ["x.png"], [], max_file_bytes=100))


def test_pipeline_failed_image_leaves_nothing(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("thin.png", 1, 10)
    with pytest.raises(ImageError, match="cannot split a 1x10 image"):
        process_image(task(root, "thin.png", ["t_lt.png", "t_rt.png", "t_lb.png", "t_rb.png"],
                           ["split"]))
    assert sorted(p.name for p in root.iterdir()) == ["inbox", "outbox", "thin.png"]


def test_pipeline_output_that_is_a_folder_fails_cleanly(root: Path,
                                                        make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "out").mkdir()
    (root / "out" / "x_rb.png").mkdir()  # the last tile cannot be written
    names = ["out/x_lt.png", "out/x_rt.png", "out/x_lb.png", "out/x_rb.png"]
    with pytest.raises(ImageError, match="cannot write output"):
        process_image(task(root, "a.png", names, ["split"]))
    assert [p.name for p in (root / "out").iterdir()] == ["x_rb.png"]
    assert not leftovers(root)


def test_pipeline_output_replaces_atomically(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 40, 30)
    (root / "x.png").write_bytes(b"old")
    inode = (root / "x.png").stat().st_ino
    process_image(task(root, "a.png", ["x.png"], []))
    assert (root / "x.png").stat().st_ino != inode  # a new file renamed over the old one
    assert cv2.imread(str(root / "x.png")).shape == (30, 40, 3)


def test_pipeline_input_symlink_swapped_after_validation_fails(
        root: Path, make_image: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    make_image("photos/a.png")
    job = task(root, "photos/a.png", ["x.png"], [])
    outside = tmp_path_factory.mktemp("outside")
    cv2.imwrite(str(outside / "a.png"), photo(10, 10))
    (root / "photos").rename(root / "old")
    (root / "photos").symlink_to(outside)
    with pytest.raises(ImageError, match="changed after validation"):
        process_image(job)
    assert not (root / "x.png").exists()


def test_pipeline_output_folder_swapped_for_symlink_fails(
        root: Path, make_image: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> None:
    make_image("a.png")
    (root / "out").mkdir()
    job = task(root, "a.png", ["out/x.png"], [])
    outside = tmp_path_factory.mktemp("outside")
    (root / "out").rmdir()
    (root / "out").symlink_to(outside)
    with pytest.raises(ImageError, match="changed after validation"):
        process_image(job)
    assert list(outside.iterdir()) == []


def test_pipeline_remove_partial_clears_temp_files(root: Path) -> None:
    (root / "out").mkdir()
    stale = root / "out" / f".x.png.1234abcd{TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    other = root / "out" / f".y.png.1234abcd{TEMP_SUFFIX}"
    other.write_bytes(b"half")
    remove_partial((str(root / "out" / "x.png"),))
    assert not stale.exists() and other.exists()


def test_pipeline_output_names_of_255_bytes_are_written(root: Path,
                                                        make_image: Callable[..., Path]) -> None:
    # The temporary name each output is written under first must fit in 255 bytes as well.
    make_image("a.png", 8, 6)
    longest = "é" * 125 + "a.png"
    tiled = [f"{'t' * 248}{suffix}.png" for suffix in ("_lt", "_rt", "_lb", "_rb")]
    assert process_image(task(root, "a.png", [f"out/{longest}"], [])) == [f"out/{longest}"]
    assert process_image(task(root, "a.png", [f"out/{t}" for t in tiled], ["split"])) == [
        f"out/{t}" for t in tiled]
    assert sorted(p.name for p in (root / "out").iterdir()) == sorted([longest, *tiled])
    assert cv2.imread(str(root / "out" / longest)).shape == (6, 8, 3)


def test_pipeline_remove_partial_clears_temp_files_of_the_longest_names(root: Path) -> None:
    longest, near = "é" * 125 + "a.png", "é" * 125 + "b.png"
    (root / "out").mkdir()
    stale = root / "out" / f"{temp_prefix(longest)}1234abcd{TEMP_SUFFIX}"
    stale.write_bytes(b"half")
    other = root / "out" / f"{temp_prefix(near)}1234abcd{TEMP_SUFFIX}"
    other.write_bytes(b"half")
    assert len(stale.name.encode()) <= 255 and stale.name.startswith(".éé")
    remove_partial((str(root / "out" / longest),))
    assert not stale.exists() and other.exists()
