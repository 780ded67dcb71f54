"""Metadata, SPEC §12: an input's ICC profile is carried, byte for byte, into every output
format (a real Display P3 JPEG made by libvips, read back by libvips and by hand); no EXIF,
XMP or GPS position reaches an output."""

from __future__ import annotations

import struct
from pathlib import Path

import cv2
import numpy as np
import pytest
import pyvips

from imgserver.images.codec import Limits, decode_scaled
from imgserver.images.operations import Context, parse_operations
from imgserver.images.pipeline import ImageTask, process_image
from imgserver.images.profiles import bmp_with_profile, tiff_with_profile

from conftest import photo
from test_codec import with_exif

FORMATS = [".jpg", ".png", ".webp", ".avif", ".tif", ".bmp"]
LIMITS = Limits(max_pixels=10**9, max_file_bytes=1 << 30)


def p3_jpeg(height: int, width: int, noise: float = 0.01) -> bytes:
    """A JPEG in Display P3 with its profile embedded (and no other metadata), as libvips
    writes one."""
    rgb = np.ascontiguousarray(photo(height, width, 3, noise=noise)[..., ::-1])
    image = pyvips.Image.new_from_memory(rgb.tobytes(), width, height, 3, "uchar")
    return image.copy(interpretation="srgb").icc_transform("p3").cast("uchar").jpegsave_buffer(
        Q=95, keep="icc")


def bmp_profile(data: bytes) -> bytes | None:
    """The profile embedded in a BMP (a BITMAPV5HEADER with bV5CSType 'MBED'), read by hand."""
    (header_size,) = struct.unpack_from("<I", data, 14)
    if header_size != 124:
        return None
    (colour_space,) = struct.unpack_from("<I", data, 14 + 56)
    offset, size = struct.unpack_from("<II", data, 14 + 112)  # from the info header's start
    assert colour_space == 0x4D424544  # PROFILE_EMBEDDED
    return data[14 + offset:14 + offset + size]


def profile_of(data: bytes, extension: str) -> bytes | None:
    """The ICC profile a file carries, as libvips reads it (by hand for BMP)."""
    if extension == ".bmp":
        return bmp_profile(data)
    image = pyvips.Image.new_from_buffer(data, "")
    if image.get_typeof("icc-profile-data") == 0:
        return None
    return bytes(image.get("icc-profile-data"))


def run(root: Path, source: str, operations: list[str], extensions: list[str]
        ) -> dict[str, bytes]:
    """Process ``source`` into out.<extension> for each extension; the files' bytes."""
    files = {}
    for extension in extensions:
        task = ImageTask(root=str(root), input=str(root / source),
                         outputs=(str(root / f"out{extension}"),),
                         operations=parse_operations(operations, Context(root)),
                         max_pixels=10**9, max_file_bytes=1 << 30)
        process_image(task)
        files[extension] = (root / f"out{extension}").read_bytes()
    return files


@pytest.fixture(scope="module")
def p3() -> tuple[bytes, bytes]:
    """A small Display P3 JPEG, and its profile as libvips reads it."""
    data = p3_jpeg(48, 64)
    profile = profile_of(data, ".jpg")
    assert profile and "P3".encode("utf-16-be") in profile  # its description, "sP3C"
    return data, profile


def p3_png(height: int, width: int, *, alpha: bool, depth: int) -> bytes:
    """A PNG in Display P3 (8- or 16-bit, with or without alpha), as libvips writes one."""
    rgb = np.ascontiguousarray(photo(height, width, 3)[..., ::-1])
    image = pyvips.Image.new_from_memory(rgb.tobytes(), width, height, 3, "uchar")
    image = image.copy(interpretation="srgb").icc_transform("p3", depth=depth)
    if alpha:
        image = image.bandjoin(image[1])  # an alpha that varies
    return image.pngsave_buffer()


@pytest.mark.parametrize("operations", [[], ["fit=40x", "sharpen=1"], ["split"]])
def test_profiles_every_format_carries_the_inputs_profile(
        root: Path, p3: tuple[bytes, bytes], operations: list[str]) -> None:
    data, profile = p3
    (root / "p3.jpg").write_bytes(data)
    suffixes = ["_lt", "_rt", "_lb", "_rb"] if operations == ["split"] else [""]
    for extension in FORMATS:
        outputs = [f"out{suffix}{extension}" for suffix in suffixes]
        process_image(ImageTask(root=str(root), input=str(root / "p3.jpg"),
                                outputs=tuple(str(root / output) for output in outputs),
                                operations=parse_operations(operations, Context(root)),
                                max_pixels=10**9, max_file_bytes=1 << 30))
        for output in outputs:
            assert profile_of((root / output).read_bytes(), extension) == profile, output


def test_profiles_grayscale_output_carries_no_colour_profile_and_no_warning(
        root: Path, p3: tuple[bytes, bytes], capfd: pytest.CaptureFixture[str]) -> None:
    (root / "p3.jpg").write_bytes(p3[0])
    for extension, files in run(root, "p3.jpg", ["grayscale"], FORMATS).items():
        assert profile_of(files, extension) is None, extension
    assert "iCCP" not in capfd.readouterr().err  # libpng warned of an RGB profile on gray
    png = p3_png(30, 40, alpha=True, depth=8)
    (root / "p3a.png").write_bytes(png)
    colour = profile_of(png, ".png")
    for extension, files in run(root, "p3a.png", ["grayscale"], [".png", ".tif"]).items():
        assert profile_of(files, extension) == colour  # B = G = R and alpha: still RGB


@pytest.mark.parametrize("alpha, depth", [(True, 8), (False, 16), (True, 16)])
def test_profiles_alpha_and_16bit_inputs_carry_their_profile_into_every_format(
        root: Path, alpha: bool, depth: int) -> None:
    data = p3_png(24, 32, alpha=alpha, depth=depth)
    profile = profile_of(data, ".png")
    assert profile
    (root / "p3.png").write_bytes(data)
    files = run(root, "p3.png", ["flip=h"], FORMATS)
    for extension, output in files.items():
        assert profile_of(output, extension) == profile, extension
    # Nothing of the pixels changed for the profile: the lossless outputs are the input's.
    source = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)[:, ::-1]
    assert source.shape == (24, 32, 4 if alpha else 3)
    for extension in (".png", ".tif", ".bmp"):
        pixels = cv2.imdecode(np.frombuffer(files[extension], np.uint8), cv2.IMREAD_UNCHANGED)
        expected = np.round(source / 257).astype(np.uint8) if (
            extension == ".bmp" and depth == 16) else source
        assert np.array_equal(pixels, expected), extension


def test_profiles_tiff_and_bmp_with_a_profile_decode_to_the_same_pixels(
        root: Path, p3: tuple[bytes, bytes]) -> None:
    (root / "p3.jpg").write_bytes(p3[0])
    files = run(root, "p3.jpg", ["rotate=90"], [".png", ".tif", ".bmp"])
    reference = cv2.imdecode(np.frombuffer(files[".png"], np.uint8), cv2.IMREAD_UNCHANGED)
    assert reference.shape == (64, 48, 3)
    for extension in (".tif", ".bmp"):
        pixels = cv2.imdecode(np.frombuffer(files[extension], np.uint8), cv2.IMREAD_UNCHANGED)
        assert np.array_equal(pixels, reference), extension
        via_vips = pyvips.Image.new_from_buffer(files[".tif"], "").numpy()
        assert np.array_equal(via_vips[..., ::-1], reference)


@pytest.mark.parametrize("channels, dtype", [(1, np.uint8), (3, np.uint8), (4, np.uint8),
                                             (3, np.uint16), (1, np.uint16)])
@pytest.mark.parametrize("extension", [".tif", ".bmp"])
def test_profiles_added_by_hand_keep_every_kind_of_pixels(channels: int, dtype: type,
                                                          extension: str) -> None:
    # OpenCV cannot write a profile into these two: it is added to the file OpenCV wrote.
    image = photo(13, 17, channels, dtype)
    if extension == ".bmp" and dtype == np.uint16:
        image = (image // 257).astype(np.uint8)  # BMP holds 8 bits
    ok, plain = cv2.imencode(extension, image)
    profile = bytes(range(256)) * 3 + b"odd"  # any bytes: the writer does not read them
    adder = bmp_with_profile if extension == ".bmp" else tiff_with_profile
    data = adder(plain.tobytes(), profile)
    assert profile_of(data, extension) == profile
    expected = cv2.imdecode(plain, cv2.IMREAD_UNCHANGED)
    assert np.array_equal(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED),
                          expected)


@pytest.mark.parametrize("operation", ["fit=160x", "fill=100x100", "fill=120x40,north",
                                       "resize=25"])
def test_profiles_shrink_on_load_keeps_the_profile(root: Path, operation: str) -> None:
    data = p3_jpeg(480, 640)
    profile = profile_of(data, ".jpg")
    (root / "big.jpg").write_bytes(data)
    first = parse_operations([operation], Context(root))[0]
    assert decode_scaled(data, LIMITS, first.scaled_size) is not None  # decoded reduced
    for extension, output in run(root, "big.jpg", [operation], [".jpg", ".png"]).items():
        assert profile_of(output, extension) == profile, extension


def test_profiles_no_profile_in_none_out(root: Path) -> None:
    ok, data = cv2.imencode(".jpg", photo(20, 30))
    (root / "plain.jpg").write_bytes(data.tobytes())
    for extension, output in run(root, "plain.jpg", [], FORMATS).items():
        assert profile_of(output, extension) is None, extension


# -- no EXIF, XMP or GPS ----------------------------------------------------------------


def exif_with_gps(orientation: int = 1) -> bytes:
    """An EXIF block: IFD0 with an orientation and a GPS IFD holding a position."""
    ifd0, gps = 8, 8 + 2 + 2 * 12 + 4
    rationals = gps + 2 + 2 * 12 + 4
    tiff = b"II*\x00" + struct.pack("<I", ifd0)
    tiff += struct.pack("<H", 2)
    tiff += struct.pack("<HHIHH", 274, 3, 1, orientation, 0)   # Orientation, SHORT
    tiff += struct.pack("<HHII", 34853, 4, 1, gps)             # GPSInfo IFD pointer
    tiff += struct.pack("<I", 0)
    tiff += struct.pack("<H", 2)
    tiff += struct.pack("<HHI4s", 1, 2, 2, b"N\0\0\0")         # GPSLatitudeRef "N"
    tiff += struct.pack("<HHII", 2, 5, 3, rationals)           # GPSLatitude, 3 RATIONAL
    tiff += struct.pack("<I", 0)
    tiff += struct.pack("<6I", 48, 1, 51, 1, 29, 1)            # 48° 51' 29"
    return b"Exif\x00\x00" + tiff


def xmp_block() -> bytes:
    """An XMP packet as an APP1 segment holds it, with a position in it."""
    return (b"http://ns.adobe.com/xap/1.0/\x00<x:xmpmeta xmlns:x='adobe:ns:meta/'>"
            b"<rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
            b"<rdf:Description xmlns:exif='http://ns.adobe.com/exif/1.0/' "
            b"exif:GPSLatitude='48,51.48N'/></rdf:RDF></x:xmpmeta>")


def test_profiles_outputs_carry_no_exif_xmp_or_gps(root: Path, p3: tuple[bytes, bytes]) -> None:
    data, profile = p3
    tagged = with_exif(with_exif(data, xmp_block()), exif_with_gps(orientation=6))
    fields = pyvips.Image.new_from_buffer(tagged, "").get_fields()
    assert "exif-data" in fields and "xmp-data" in fields
    assert any("GPSLatitude" in field for field in fields)  # the input does hold a position
    (root / "tagged.jpg").write_bytes(tagged)
    for extension, output in run(root, "tagged.jpg", ["fit=32x"], FORMATS).items():
        pixels, kinds, _ = cv2.imdecodeWithMetadata(np.frombuffer(output, np.uint8),
                                                    cv2.IMREAD_UNCHANGED)
        assert cv2.IMAGE_METADATA_EXIF not in kinds and cv2.IMAGE_METADATA_XMP not in kinds
        assert pixels.shape[:2] == (43, 32)  # turned upright (orientation 6), then fit
        assert b"GPS" not in output and b"xap/1.0" not in output and b"Exif\0" not in output
        if extension != ".bmp":
            fields = pyvips.Image.new_from_buffer(output, "").get_fields()
            assert not [f for f in fields if f.startswith(("exif", "xmp"))], (extension, fields)
        assert profile_of(output, extension) == profile, extension
