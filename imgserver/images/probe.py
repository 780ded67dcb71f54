"""Read an image's format and size from its header, and its EXIF orientation.

The size is read before anything is decoded, so that an image too large for the pixel
limit is refused without allocating it: JPEG, PNG, WebP, BMP, GIF, TIFF (and BigTIFF),
PNM and PAM. A format not known here is left to OpenCV's own pixel limit
(``OPENCV_IO_MAX_IMAGE_PIXELS``, which the pool sets to the same value).
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
    channels: int = 0  # known for JPEG (its components); 0 when not read


def read_header(data: bytes) -> Header | None:
    """The format and size of the image in ``data``, or None when the format is not known."""
    try:
        for magic, reader in _READERS:
            if data.startswith(magic):
                return reader(data)
    except (struct.error, IndexError, ValueError, KeyError):
        return None
    return None


def _jpeg(data: bytes) -> Header | None:
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            # libjpeg skips bytes between segments ("extraneous bytes before marker"),
            # so the size must be found past them too.
            pos = data.find(b"\xff", pos)
            if pos < 0:
                return None
            continue
        marker = data[pos + 1]
        if marker == 0xFF or marker == 0x00:  # fill byte, or a stuffed zero
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            pos += 2
            continue
        (length,) = struct.unpack(">H", data[pos + 2:pos + 4])
        # SOF0..SOF15 carry the frame size, except DHT (C4), JPG (C8) and DAC (CC).
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height, width = struct.unpack(">HH", data[pos + 5:pos + 9])
            return Header("jpeg", width, height, data[pos + 9])
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
    tags = tiff_tags(data, (256, 257))
    if 256 not in tags or 257 not in tags:
        return None
    return Header("tiff", tags[256], tags[257])


def _bigtiff(data: bytes) -> Header | None:
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack(order + "Q", data[8:16])
    (count,) = struct.unpack(order + "Q", data[ifd:ifd + 8])
    found: dict[int, int] = {}
    for index in range(min(count, 1000)):
        entry = ifd + 8 + 20 * index
        tag, kind = struct.unpack(order + "HH", data[entry:entry + 4])
        if tag in (256, 257):
            fmt = {3: "H", 4: "I", 16: "Q"}.get(kind)
            if fmt:
                (found[tag],) = struct.unpack_from(order + fmt, data, entry + 12)
    if 256 not in found or 257 not in found:
        return None
    return Header("tiff", found[256], found[257])


def _pnm(data: bytes) -> Header | None:
    # P1..P6: magic, then width and height as decimal text, with comments after "#".
    text = data[2:512].decode("latin-1")
    numbers: list[int] = []
    for line in text.splitlines():
        for token in line.split("#", 1)[0].split():
            numbers.append(int(token))
            if len(numbers) == 2:
                return Header("pnm", numbers[0], numbers[1])
    return None


def _pam(data: bytes) -> Header | None:
    fields = dict(line.split(None, 1) for line in data[3:512].decode("latin-1").splitlines()
                  if len(line.split(None, 1)) == 2)
    return Header("pam", int(fields["WIDTH"]), int(fields["HEIGHT"]))


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
    (b"II+\x00", _bigtiff),
    (b"MM\x00+", _bigtiff),
    (b"P7\n", _pam),
) + tuple((b"P" + bytes([digit]), _pnm) for digit in b"123456")
