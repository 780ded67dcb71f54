"""Read an image's format and size from its header, and its EXIF orientation.

The size is read before anything is decoded, so that an image too large for the pixel
limit is refused without allocating it. Only the first bytes of the file are parsed; a
format not known here is left for OpenCV to judge (the decoder has its own pixel limit).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass


@dataclass(frozen=True)
class Header:
    """What the first bytes of an image file say."""

    format: str
    width: int
    height: int
    orientation: int = 1  # EXIF orientation, read here only for TIFF (the tag is in IFD0)


def read_header(data: bytes) -> Header | None:
    """The format and size of the image in ``data``, or None when the format is not known."""
    try:
        for magic, reader in _READERS:
            if data.startswith(magic):
                return reader(data)
    except (struct.error, IndexError, ValueError):
        return None
    return None


def _jpeg(data: bytes) -> Header | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return None
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        # SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return Header("jpeg", width, height)
        pos += 2 + length
    return None


def _png(data: bytes) -> Header | None:
    if data[12:16] != b"IHDR":
        return None
    width, height = struct.unpack(">II", data[16:24])
    return Header("png", width, height)


def _webp(data: bytes) -> Header | None:
    if data[8:12] != b"WEBP":
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":
        width, height = struct.unpack("<HH", data[26:30])
        return Header("webp", width & 0x3FFF, height & 0x3FFF)
    if chunk == b"VP8L":
        bits = int.from_bytes(data[21:25], "little")
        return Header("webp", (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1)
    if chunk == b"VP8X":
        width = int.from_bytes(data[24:27], "little") + 1
        height = int.from_bytes(data[27:30], "little") + 1
        return Header("webp", width, height)
    return None


def _bmp(data: bytes) -> Header | None:
    (info_size,) = struct.unpack("<I", data[14:18])
    if info_size == 12:  # OS/2 BITMAPCOREHEADER
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    return Header("bmp", abs(width), abs(height))


def _gif(data: bytes) -> Header | None:
    width, height = struct.unpack("<HH", data[6:10])
    return Header("gif", width, height)


def _tiff(data: bytes) -> Header | None:
    tags = tiff_tags(data, (256, 257, 274))
    if 256 not in tags or 257 not in tags:
        return None
    return Header("tiff", tags[256], tags[257], tags.get(274, 1))


def tiff_tags(data: bytes, wanted: tuple[int, ...]) -> dict[int, int]:
    """Integer values of the ``wanted`` tags of a TIFF structure's first IFD (TIFF or EXIF)."""
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None:
        return {}
    (ifd,) = struct.unpack(order + "I", data[4:8])
    (count,) = struct.unpack(order + "H", data[ifd:ifd + 2])
    found: dict[int, int] = {}
    for index in range(count):
        entry = ifd + 2 + 12 * index
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in wanted:
            if kind == 3:  # SHORT
                (found[tag],) = struct.unpack(order + "H", data[entry + 8:entry + 10])
            elif kind == 4:  # LONG
                (found[tag],) = struct.unpack(order + "I", data[entry + 8:entry + 12])
    return found


def exif_orientation(exif: bytes) -> int:
    """The orientation (1..8) in an EXIF block; 1 when it is absent or unreadable.

    A damaged EXIF block says nothing about the picture, so it never fails an image.
    """
    if exif.startswith(b"Exif\x00\x00"):
        exif = exif[6:]
    try:
        value = tiff_tags(exif, (274,)).get(274, 1)
    except (struct.error, IndexError, ValueError):
        return 1
    return value if 1 <= value <= 8 else 1


_READERS = (
    (b"\xff\xd8", _jpeg),
    (b"\x89PNG\r\n\x1a\n", _png),
    (b"RIFF", _webp),
    (b"BM", _bmp),
    (b"GIF87a", _gif),
    (b"GIF89a", _gif),
    (b"II*\x00", _tiff),
    (b"MM\x00*", _tiff),
)
