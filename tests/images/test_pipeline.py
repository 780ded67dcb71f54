"""One image end to end in this process: outputs are right, atomic, and failures leave nothing."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import pytest

from imgserver.errors import ImageError
from imgserver.images.codec import Limits, decode_scaled
from imgserver.images.operations import Context, parse_operations
from imgserver.images.pipeline import (
    TEMP_SUFFIX,
    ImageTask,
    process_image,
    read_input,
    remove_partial,
    temp_prefix,
)

from conftest import mean_abs_diff, photo, processed, processed_tiles

LIMITS = Limits(max_pixels=10**9, max_file_bytes=1 << 30)


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


@pytest.mark.parametrize("size", [0, 1, 4095, 4096, 3 << 20])
def test_pipeline_read_input_returns_the_whole_file(root: Path, size: int) -> None:
    # Read in one go, by the size fstat gives: every byte, and not one more.
    data = np.random.default_rng(size).integers(0, 256, size, np.uint8).tobytes()
    (root / "in").mkdir()
    (root / "in" / "a.jpg").write_bytes(data)
    assert read_input(root, root / "in" / "a.jpg", 1 << 30) == data
    assert read_input(root, root / "in" / "a.jpg", size) == data


@pytest.mark.parametrize("name", ["status", "stat"])
def test_pipeline_read_input_reads_on_where_the_size_is_not_the_content(name: str) -> None:
    # /proc's files say 0 bytes and hold more: the read goes on to the end, as a file
    # growing while it is read does, and stops one byte past the limit.
    proc = Path(f"/proc/{os.getpid()}")
    whole = read_input(proc, proc / name, 1 << 20)
    assert os.stat(proc / name).st_size == 0 < len(whole)
    assert whole.endswith(b"\n") and whole[:5] == (proc / name).read_bytes()[:5]
    assert len(read_input(proc, proc / name, 3)) == 4


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


# -- quality, AVIF, shrink on load: SPEC §12 ---------------------------------------------


def smooth(height: int, width: int, channels: int = 3, dtype: type = np.uint8) -> np.ndarray:
    """A photo with little noise: what a lossy encoder keeps well."""
    return photo(height, width, channels, dtype, noise=0.01)


@pytest.mark.parametrize("quality", [1, 40, 100])
def test_pipeline_jpeg_quality_is_the_encoders(root: Path, quality: int) -> None:
    image = smooth(48, 64)
    result = processed(root, image, [f"quality={quality}"], ".jpg")
    ok, reference = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, quality])
    assert np.array_equal(result, cv2.imdecode(reference, cv2.IMREAD_UNCHANGED))


@pytest.mark.parametrize("extension", [".jpg", ".webp", ".avif"])
def test_pipeline_higher_quality_makes_a_larger_file(root: Path, extension: str) -> None:
    image = smooth(48, 64)
    sizes = []
    for quality in (20, 60, 95):
        processed(root, image, [f"quality={quality}"], extension)
        sizes.append((root / f"out{extension}").stat().st_size)
    assert sizes == sorted(sizes) and len(set(sizes)) == 3, sizes


@pytest.mark.parametrize("extension", [".jpg", ".webp", ".avif", ".png", ".tif"])
def test_pipeline_quality_is_a_setting_where_it_stands(root: Path, extension: str) -> None:
    image = smooth(48, 64)
    outputs = set()
    for operations in (["quality=30", "fit=32x", "flip=h"], ["fit=32x", "quality=30", "flip=h"],
                       ["fit=32x", "flip=h", "quality=30"]):
        processed(root, image, operations, extension)
        outputs.add((root / f"out{extension}").read_bytes())
    assert len(outputs) == 1
    if extension in (".png", ".tif"):  # formats without a quality ignore it
        processed(root, image, ["fit=32x", "flip=h"], extension)
        assert (root / f"out{extension}").read_bytes() in outputs


def test_pipeline_quality_with_a_split_applies_to_every_tile(root: Path) -> None:
    image = smooth(48, 64)
    tiles = processed_tiles(root, image, ["split", "quality=10"], ".jpg")
    low = cv2.imencode(".jpg", image[:24, :32], [cv2.IMWRITE_JPEG_QUALITY, 10])[1]
    assert np.array_equal(tiles["_lt"], cv2.imdecode(low, cv2.IMREAD_UNCHANGED))


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_pipeline_avif_is_written_and_read_back(root: Path, channels: int) -> None:
    image = smooth(48, 64, channels)
    result = processed(root, image, [], ".avif")
    assert (root / "out.avif").read_bytes()[4:12] == b"ftypavif"
    expected = image if channels != 1 else cv2.cvtColor(image, cv2.COLOR_GRAY2BGR)
    if result.ndim == 2:
        result = cv2.cvtColor(result, cv2.COLOR_GRAY2BGR)
    assert result.shape == expected.shape and result.dtype == np.uint8
    assert mean_abs_diff(result, expected) <= 5  # lossy, at the default quality


def test_pipeline_avif_input_is_read(root: Path) -> None:
    image = smooth(48, 64)
    ok, data = cv2.imencode(".avif", image, [cv2.IMWRITE_AVIF_QUALITY, 100])
    (root / "in.avif").write_bytes(data.tobytes())
    process_image(task(root, "in.avif", ["out.png"], ["rotate=90"]))
    result = cv2.imread(str(root / "out.png"), cv2.IMREAD_UNCHANGED)
    assert result.shape == (64, 48, 3)
    assert mean_abs_diff(result, cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)) <= 3


@pytest.mark.parametrize("channels", [3, 4])
def test_pipeline_16bit_into_avif_is_scaled_to_8bit(root: Path, channels: int) -> None:
    image = smooth(48, 64, channels, np.uint16)
    result = processed(root, image, ["quality=100"], ".avif")
    assert result.dtype == np.uint8 and result.shape == image.shape
    # round(v / 257): not saturated (which would make nearly everything 255).
    assert mean_abs_diff(result, np.round(image / 257)) <= 3


def jpeg_photo(root: Path, name: str, height: int, width: int, seed: int = 0) -> bytes:
    """A photo-like JPEG under the root, as a camera's would be: smooth, little noise."""
    ok, data = cv2.imencode(".jpg", photo(height, width, 3, np.uint8, seed, noise=0.01),
                            [cv2.IMWRITE_JPEG_QUALITY, 90])
    (root / name).write_bytes(data.tobytes())
    return data.tobytes()


def fill_full(image: np.ndarray, width: int, height: int, gravity: str) -> np.ndarray:
    """fill, from SPEC §12, on the picture decoded in full (gravities only, not smart)."""
    rows, columns = image.shape[:2]
    s = max(width / columns, height / rows)
    size = (max(width, round(columns * s)), max(height, round(rows * s)))
    scaled = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    excess_x, excess_y = size[0] - width, size[1] - height
    x = 0 if "west" in gravity else excess_x if "east" in gravity else excess_x // 2
    y = 0 if "north" in gravity else excess_y if "south" in gravity else excess_y // 2
    return scaled[y:y + height, x:x + width]


@pytest.mark.parametrize("operation, size", [("fit=160x160", (160, 120)), ("fit=100x", (100, 75)),
                                             ("fit=x45", (60, 45)),
                                             ("fit=70x70", (70, 52))])  # 52.5 -> 52
def test_pipeline_fit_shrunk_on_load_is_within_a_grey_level(root: Path, operation: str,
                                                           size: tuple[int, int]) -> None:
    data = jpeg_photo(root, "photo.jpg", 480, 640)
    op = parse_operations([operation], Context(root))[0]
    assert decode_scaled(data, LIMITS, op.scaled_size) is not None  # a reduced decode
    process_image(task(root, "photo.jpg", ["out.png"], [operation, "quality=50"]))
    result = cv2.imread(str(root / "out.png"), cv2.IMREAD_UNCHANGED)
    full = cv2.resize(cv2.imread(str(root / "photo.jpg")), size, interpolation=cv2.INTER_AREA)
    assert result.shape == full.shape and mean_abs_diff(result, full) <= 1


@pytest.mark.parametrize("gravity", ["centre", "north", "southeast", "west"])
@pytest.mark.parametrize("box", [(100, 100), (60, 150), (120, 40)])
def test_pipeline_fill_shrunk_on_load_is_within_a_grey_level(root: Path, gravity: str,
                                                            box: tuple[int, int]) -> None:
    data = jpeg_photo(root, "photo.jpg", 480, 640)
    operation = f"fill={box[0]}x{box[1]},{gravity}"
    op = parse_operations([operation], Context(root))[0]
    assert decode_scaled(data, LIMITS, op.scaled_size) is not None  # a reduced decode
    process_image(task(root, "photo.jpg", ["out.png"], [operation]))
    result = cv2.imread(str(root / "out.png"), cv2.IMREAD_UNCHANGED)
    full = fill_full(cv2.imread(str(root / "photo.jpg")), *box, gravity)
    assert result.shape == full.shape and mean_abs_diff(result, full) <= 1


@pytest.mark.parametrize("width, height, box, seed", [
    (640, 480, (120, 40), 0), (640, 480, (100, 100), 5), (480, 640, (60, 150), 0),
    (480, 640, (40, 120), 5)])
def test_pipeline_fill_smart_of_a_jpeg_is_within_a_grey_level_of_the_full_decode(
        root: Path, width: int, height: int, box: tuple[int, int], seed: int) -> None:
    # The smart window depends on the scaled image's finest detail: a reduced decode may
    # move it by a pixel, which on a detailed photo is more than a grey level on average.
    jpeg_photo(root, "photo.jpg", height, width, seed)
    operation = f"fill={box[0]}x{box[1]},smart"
    process_image(task(root, "photo.jpg", ["out.png"], [operation]))
    result = cv2.imread(str(root / "out.png"), cv2.IMREAD_UNCHANGED)
    full = parse_operations([operation], Context(root))[0].apply(
        cv2.imread(str(root / "photo.jpg")))
    assert result.shape == full.shape and mean_abs_diff(result, full) <= 1


def test_pipeline_geometry_filters_and_watermark_on_each_tile(root: Path) -> None:
    image = photo(30, 40, 4, np.uint16)
    mark = np.full((4, 6, 3), 255, np.uint8)
    cv2.imwrite(str(root / "mark.png"), mark)
    tiles = processed_tiles(root, image, ["crop=2,0,38,30", "split", "rotate=-90",
                                          "grayscale", "watermark=mark.png,northwest"])
    parts = [image[:15, 2:21], image[:15, 21:], image[15:, 2:21], image[15:, 21:]]
    for (suffix, tile), part in zip(tiles.items(), parts, strict=True):
        turned = np.rot90(part)  # counter-clockwise
        grey = cv2.cvtColor(np.ascontiguousarray(turned[..., :3]), cv2.COLOR_BGR2GRAY)
        expected = np.dstack([grey, grey, grey, turned[..., 3]])
        expected[:4, :6] = 65535  # an opaque white mark, flush top-left
        assert np.array_equal(tile, expected), suffix
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
