"""Colour profiles carried from an input into its outputs.

An input's embedded ICC profile says what its pixels' numbers mean; dropped, a Display P3
or Adobe RGB photo looks dull. Outputs carry the input's profile unchanged, with the pixels
untouched (no colour conversion, so 16-bit and wide-gamut colour survive):

    JPEG, PNG, WebP, AVIF   OpenCV writes the profile itself (imencodeWithMetadata)
    TIFF                    OpenCV cannot: the profile is added as the InterColorProfile
                            tag (34675) to the file OpenCV wrote, in a new first IFD
    BMP                     OpenCV cannot: the file's info header becomes (or, with alpha,
                            is already) a BITMAPV5HEADER with the profile embedded
                            (PROFILE_EMBEDDED)

A profile describes one kind of pixel: an RGB profile colour pixels, a GRAY profile gray
ones. An output whose pixels are not of that kind (``grayscale`` makes one channel of a
colour photo) carries none: an RGB profile on one channel is wrong (libpng drops it with
only a warning, other readers misread it), and the gray an RGB photo becomes is the
luminance of its encoded values, which viewers show as they show a gray image without a
profile. Nothing else of the input's metadata is carried: no EXIF, XMP or GPS position.
"""

from __future__ import annotations

import struct

#: The TIFF tag that holds an ICC profile.
TIFF_ICC_TAG = 34675
_TIFF_UNDEFINED = 7
#: BITMAPV5HEADER: bV5CSType PROFILE_EMBEDDED ('MBED'), bV5Intent LCS_GM_IMAGES.
_PROFILE_EMBEDDED = 0x4D424544
_LCS_GM_IMAGES = 4
_V5_SIZE = 124


def fits(icc: bytes, channels: int) -> bool:
    """Whether the profile ``icc`` describes pixels of ``channels`` channels (alpha
    included): an RGB profile 3 or 4, a GRAY one 1 or 2 (other kinds: never, here)."""
    space = icc[16:20]
    return (space == b"RGB " and channels in (3, 4)) or (space == b"GRAY" and channels in (1, 2))


def tiff_with_profile(data: bytes, icc: bytes) -> bytes:
    """The classic TIFF ``data`` with ``icc`` as its first image's InterColorProfile tag.

    The profile and a copy of the first IFD with the tag added go at the end; the header
    then points at the copy (the old IFD stays, unreferenced). ValueError for a file that
    is not a classic TIFF.
    """
    order = data[:2]
    if order not in (b"II", b"MM"):
        raise ValueError("not a TIFF file")
    endian = "<" if order == b"II" else ">"
    (magic, first) = struct.unpack(endian + "HI", data[2:8])
    if magic != 42:
        raise ValueError("not a classic TIFF file (BigTIFF)")
    (count,) = struct.unpack(endian + "H", data[first:first + 2])
    entries = [data[first + 2 + 12 * i:first + 14 + 12 * i] for i in range(count)]
    following = data[first + 2 + 12 * count:first + 6 + 12 * count]
    out = bytearray(data)
    out += b"\0" * (len(out) % 2)  # TIFF offsets are word-aligned
    offset = len(out)
    out += icc
    out += b"\0" * (len(out) % 2)
    entries = [entry for entry in entries
               if struct.unpack(endian + "H", entry[:2])[0] != TIFF_ICC_TAG]
    entries.append(struct.pack(endian + "HHII", TIFF_ICC_TAG, _TIFF_UNDEFINED, len(icc), offset))
    entries.sort(key=lambda entry: struct.unpack(endian + "H", entry[:2])[0])
    ifd = len(out)
    out += struct.pack(endian + "H", len(entries)) + b"".join(entries) + following
    out[4:8] = struct.pack(endian + "I", ifd)
    return bytes(out)


def bmp_with_profile(data: bytes, icc: bytes) -> bytes:
    """The BMP ``data``, as OpenCV writes it, with ``icc`` embedded after the pixels: its
    info header, a BITMAPINFOHEADER grown to a BITMAPV5HEADER (gray, BGR) or already one
    (BGRA, for its alpha mask), says PROFILE_EMBEDDED. ValueError for another kind of BMP."""
    if data[:2] != b"BM":
        raise ValueError("not a BMP file")
    (header_size,) = struct.unpack("<I", data[14:18])
    (pixels_at,) = struct.unpack("<I", data[10:14])
    if header_size == 40:
        info = bytearray(data[14:54])
        info[0:4] = struct.pack("<I", _V5_SIZE)
        info += struct.pack("<IIII", 0, 0, 0, 0)  # colour masks: unused with BI_RGB
        info += b"\0" * (_V5_SIZE - len(info))   # colour space, endpoints, gammas: set below
    elif header_size == _V5_SIZE:
        info = bytearray(data[14:14 + _V5_SIZE])
    else:
        raise ValueError(f"a BMP info header of {header_size} bytes, expected 40 or "
                         f"{_V5_SIZE}")
    grown = _V5_SIZE - header_size
    body = data[14 + header_size:]  # the palette, if any, then the pixels
    profile_at = _V5_SIZE + len(body)  # from the start of the info header
    info[56:60] = struct.pack("<I", _PROFILE_EMBEDDED)  # bV5CSType (endpoints, gammas unused)
    info[108:124] = struct.pack("<IIII", _LCS_GM_IMAGES, profile_at, len(icc), 0)
    total = 14 + _V5_SIZE + len(body) + len(icc)
    file_header = b"BM" + struct.pack("<IHHI", total, 0, 0, pixels_at + grown)
    return file_header + bytes(info) + body + icc
