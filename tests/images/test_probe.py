"""Image headers are read without decoding; EXIF orientation is read and damage ignored."""

from __future__ import annotations

import struct

import cv2
import pytest

from imgserver.images.probe import exif_orientation, read_header

from conftest import photo


def exif_block(orientation: int, little_endian: bool = True) -> bytes:
    """A minimal EXIF block (with its "Exif" header) holding one orientation tag."""
    order = "<" if little_endian else ">"
    tiff = (b"II*\x00" if little_endian else b"MM\x00*") + struct.pack(order + "I", 8)
    tiff += struct.pack(order + "H", 1) + struct.pack(order + "HHIHH", 274, 3, 1, orientation, 0)
    return b"Exif\x00\x00" + tiff + struct.pack(order + "I", 0)


@pytest.mark.parametrize("extension", [".jpg", ".png", ".webp", ".bmp", ".tif"])
def test_probe_reads_size_of_each_format(extension: str) -> None:
    ok, data = cv2.imencode(extension, photo(37, 53))
    header = read_header(data.tobytes())
    assert header is not None and (header.width, header.height) == (53, 37)


def test_probe_reads_lossless_webp_and_gif_headers() -> None:
    ok, data = cv2.imencode(".webp", photo(21, 34), [cv2.IMWRITE_WEBP_QUALITY, 101])
    assert (read_header(data.tobytes()).width, read_header(data.tobytes()).height) == (34, 21)
    gif = b"GIF89a" + struct.pack("<HH", 640, 480) + b"\x00" * 10
    assert (read_header(gif).width, read_header(gif).height) == (640, 480)


def test_probe_unknown_or_garbage_is_none() -> None:
    assert read_header(b"hello world") is None
    assert read_header(b"\x89PNG\r\n\x1a\n") is None  # truncated inside the header
    assert read_header(b"\xff\xd8\xff\xe0\x00") is None


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("little_endian", [True, False])
def test_probe_exif_orientation(orientation: int, little_endian: bool) -> None:
    assert exif_orientation(exif_block(orientation, little_endian)) == orientation


@pytest.mark.parametrize("block", [
    b"", b"Exif\x00\x00", b"Exif\x00\x00II*\x00\xff\xff\xff\x7f", b"garbage" * 10,
    exif_block(9), exif_block(0),
])
def test_probe_broken_exif_means_upright(block: bytes) -> None:
    assert exif_orientation(block) == 1


def test_probe_jpeg_size_found_past_junk_bytes() -> None:
    ok, data = cv2.imencode(".jpg", photo(37, 53))
    data = data.tobytes()
    dqt = data.find(b"\xff\xdb")
    junk = data[:dqt] + b"\x00\x00junk" + data[dqt:]  # libjpeg skips these and decodes
    header = read_header(junk)
    assert header is not None and (header.width, header.height) == (53, 37)


@pytest.mark.parametrize("magic", [b"P5", b"P6"])
def test_probe_reads_pnm_headers(magic: bytes) -> None:
    data = magic + b"\n# a comment\n5000 4000\n255\n" + b"\x00" * 10
    header = read_header(data)
    assert header is not None and (header.width, header.height) == (5000, 4000)
    ok, real = cv2.imencode(".ppm", photo(21, 34))
    assert (read_header(real.tobytes()).width, read_header(real.tobytes()).height) == (34, 21)
