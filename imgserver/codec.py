"""Decoding and encoding images with OpenCV, strictly.

``decode`` refuses what OpenCV would quietly accept: a JPEG that is truncated or whose data
is damaged decodes to a partly grey picture with only a libjpeg warning on stderr, so the
decoder's stderr is captured and read. It keeps the pixels as ``IMREAD_UNCHANGED`` reads
them (alpha, 16-bit, grayscale) and applies the EXIF orientation, which that flag ignores.

``encode`` converts explicitly where the output format cannot hold the pixels: 16-bit is
scaled to 8-bit (``round(v / 257)``) for JPEG, WebP and BMP, and alpha is composited onto
white for JPEG.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from imgserver.errors import ImageError
from imgserver.probe import Header, exif_orientation, read_header

#: Output extensions and the encoder parameters used for each.
FORMATS: dict[str, list[int]] = {
    ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],
    ".jpeg": [cv2.IMWRITE_JPEG_QUALITY, 95],
    ".png": [cv2.IMWRITE_PNG_COMPRESSION, 3],
    ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90],
    ".tif": [],
    ".tiff": [],
    ".bmp": [],
}
_EIGHT_BIT_ONLY = (".jpg", ".jpeg", ".webp", ".bmp")
_LARGEST = {".jpg": 65500, ".jpeg": 65500, ".webp": 16383}  # pixels a side
_NO_ALPHA = (".jpg", ".jpeg")

# libjpeg's warnings about the picture's data. libjpeg prints only the first warning of a
# decode, so a harmless-looking one ("extraneous bytes before marker") can hide real damage
# behind it: every one of them fails the image.
_JPEG_DAMAGE = re.compile(
    r"Premature end of JPEG file|Corrupt JPEG data|Invalid SOS parameters"
    r"|Inconsistent progression sequence")

_ORIENT = {
    2: lambda a: cv2.flip(a, 1),
    3: lambda a: cv2.rotate(a, cv2.ROTATE_180),
    4: lambda a: cv2.flip(a, 0),
    5: lambda a: cv2.transpose(a),
    6: lambda a: cv2.rotate(a, cv2.ROTATE_90_CLOCKWISE),
    7: lambda a: cv2.rotate(cv2.transpose(a), cv2.ROTATE_180),
    8: lambda a: cv2.rotate(a, cv2.ROTATE_90_COUNTERCLOCKWISE),
}


@dataclass(frozen=True)
class Limits:
    """Per-image limits, checked before decoding."""

    max_pixels: int
    max_file_bytes: int


def check_pixels(header: Header | None, limits: Limits) -> None:
    """Refuse an image whose header announces more pixels than the limit."""
    if header is None:
        return
    pixels = header.width * header.height
    if pixels > limits.max_pixels:
        raise ImageError(
            f"input is {header.width}x{header.height} = {_megapixels(pixels)} megapixels, "
            f"the limit is {_megapixels(limits.max_pixels)} (--max-pixels {limits.max_pixels})")


def _over_limit(limits: Limits) -> ImageError:
    # OpenCV's own check, for formats whose header imgserver does not read: no size known.
    return ImageError(f"input has more pixels than the limit of {_megapixels(limits.max_pixels)} "
                      f"megapixels (--max-pixels {limits.max_pixels})")


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.6g}"


def decode(data: bytes, limits: Limits, reduce: int = 1) -> np.ndarray:
    """Decode ``data`` completely, upright, keeping depth, alpha and grayscale.

    ``reduce`` (2, 4 or 8) lets a JPEG decode at that fraction of its size (shrink on load).
    Raises ImageError for anything that is not a complete, supported image.
    """
    if not data:
        raise ImageError("input file is empty")
    header = read_header(data)
    check_pixels(header, limits)
    flags = cv2.IMREAD_UNCHANGED
    if reduce > 1 and header is not None and header.format == "jpeg":
        flags = _REDUCED[reduce] | cv2.IMREAD_IGNORE_ORIENTATION
    with _captured_stderr() as messages:
        try:
            image, kinds, blocks = cv2.imdecodeWithMetadata(np.frombuffer(data, np.uint8), flags)
        except cv2.error as exc:
            if "CV_IO_MAX_IMAGE_PIXELS" in str(exc):
                raise _over_limit(limits) from None
            raise ImageError(f"cannot decode input: {_opencv_message(exc)}") from None
    text = messages.text
    damage = _JPEG_DAMAGE.search(text) if header is None or header.format == "jpeg" else None
    if damage:
        raise ImageError(f"input is damaged or truncated ({_first_line(text, damage.start())})")
    if image is None or image.size == 0:
        if "CV_IO_MAX_IMAGE_PIXELS" in text:
            raise _over_limit(limits)
        if header is not None:
            raise ImageError(f"input is a damaged or truncated {header.format.upper()} file"
                             + _detail(text))
        raise ImageError("input is not an image OpenCV can decode" + _detail(text))
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageError(f"input has {image.dtype} samples; only 8- and 16-bit images are supported")
    orientation = 1  # OpenCV applies a TIFF's own Orientation tag itself; EXIF it leaves
    for kind, block in zip(kinds, blocks):
        if kind == cv2.IMAGE_METADATA_EXIF:
            orientation = exif_orientation(bytes(np.asarray(block).ravel()))
    if orientation in _ORIENT:
        image = _ORIENT[orientation](image)
    return image


def encode(image: np.ndarray, extension: str) -> bytes:
    """Encode ``image`` for a file ending in ``extension``, converting what the format lacks."""
    extension = extension.lower()
    if extension not in FORMATS:
        raise ImageError(f"cannot write {extension!r} files")
    largest = _LARGEST.get(extension)
    height, width = image.shape[:2]
    if largest is not None and max(width, height) > largest:
        raise ImageError(f"cannot write a {width}x{height} image as {extension}: the format "
                         f"holds at most {largest} pixels a side")
    if extension in _NO_ALPHA and image.ndim == 3 and image.shape[2] in (2, 4):
        image = composite_on_white(image)
    if extension in _EIGHT_BIT_ONLY and image.dtype == np.uint16:
        image = to_8bit(image)
    try:
        ok, buffer = cv2.imencode(extension, image, FORMATS[extension])
    except cv2.error as exc:
        raise ImageError(f"cannot encode {extension} output: {_opencv_message(exc)}") from None
    if not ok:
        raise ImageError(f"cannot encode {extension} output")
    return buffer.tobytes()


def to_8bit(image: np.ndarray) -> np.ndarray:
    """16-bit samples scaled to 8-bit, rounded: ``round(v / 257)``."""
    # v / 257 is never exactly halfway between integers, so rounding has no ties.
    return cv2.convertScaleAbs(image, alpha=1 / 257)


def composite_on_white(image: np.ndarray) -> np.ndarray:
    """Colour (or gray) with alpha, composited onto white; same depth, alpha dropped."""
    top = 65535.0 if image.dtype == np.uint16 else 255.0
    pixels = image.astype(np.float32) / top
    colour, alpha = pixels[..., :-1], pixels[..., -1:]
    blended = colour * alpha + (1.0 - alpha)
    if blended.shape[2] == 1:
        blended = blended[..., 0]
    return np.rint(blended * top).astype(image.dtype)


_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}


def _opencv_message(exc: cv2.error) -> str:
    text = str(exc).strip()
    match = re.search(r"error: \(-?\d+:[^)]*\) (.*)", text)
    return (match.group(1) if match else text.splitlines()[-1]).strip()


def _detail(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return ""
    line = re.sub(r"^\[\s*\w+:\S+\]\s*global \S+ ", "", lines[-1])
    return f" ({line[:200]})"


def _first_line(text: str, start: int) -> str:
    return text[start:].splitlines()[0].strip()


class _Captured:
    """Text a C library wrote to stderr, available once the capture has ended."""

    text = ""


@contextlib.contextmanager
def _captured_stderr() -> Iterator[_Captured]:
    """Capture what C libraries write to file descriptor 2 while the block runs.

    libjpeg reports damaged data only as a warning printed to stderr; reading it is the only
    way to learn of it. A worker process runs one image at a time, so nothing else of its
    own writes to fd 2 meanwhile.
    """
    sys.stderr.flush()
    captured = _Captured()
    buffer = os.memfd_create("imgserver-stderr") if hasattr(os, "memfd_create") else None
    with (open(buffer, "w+b") if buffer is not None else tempfile.TemporaryFile()) as sink:
        saved = os.dup(2)
        os.dup2(sink.fileno(), 2)
        try:
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            captured.text = sink.read().decode("utf-8", "replace")
