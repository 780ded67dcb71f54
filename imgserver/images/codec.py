"""Decoding and encoding images with OpenCV, strictly.

``decode`` refuses what OpenCV would quietly accept: a JPEG that is truncated or whose data
is damaged decodes to a partly grey picture with only a libjpeg warning on stderr, so the
decoder's stderr is captured and read. It keeps the pixels as ``IMREAD_UNCHANGED`` reads
them (alpha, 16-bit, grayscale) and applies the EXIF orientation, which that flag ignores.

``encode`` converts explicitly where the output format cannot hold the pixels: 16-bit is
scaled to 8-bit (``round(v / 257)``) for JPEG, WebP, AVIF and BMP, and alpha is composited
onto white for JPEG. It writes no metadata but the colour profile it is given
(``imgserver.images.profiles``): no EXIF, XMP or GPS position.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from imgserver.errors import ImageError
from imgserver.images.blur import BLOCK, blocks_suffice, blur_blocks
from imgserver.images.probe import Header, exif_orientation, read_header
from imgserver.images.profiles import bmp_with_profile, fits, tiff_with_profile

#: Output extensions and the encoder parameters used for each.
FORMATS: dict[str, list[int]] = {
    ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 95],
    ".jpeg": [cv2.IMWRITE_JPEG_QUALITY, 95],
    ".png": [],  # OpenCV's default: the fastest zlib level, as a hand-written loop gets
    ".webp": [cv2.IMWRITE_WEBP_QUALITY, 90],
    # AVIF at quality 60 and encoder speed 8: on a 1080p test photo, 58 ms and 20 kB at
    # 39.3 dB PSNR (JPEG at 80: 115 kB at 39.5 dB); speed 6 took 8.6 times as long for the
    # same file, OpenCV's default (quality 95, speed 9) 5 times as long for a 25 times
    # larger one (docs/api.md).
    ".avif": [cv2.IMWRITE_AVIF_QUALITY, 60, cv2.IMWRITE_AVIF_SPEED, 8],
    ".tif": [],
    ".tiff": [],
    ".bmp": [],
}
#: Where ``quality=Q`` goes, for the formats that have one.
_QUALITY = {".jpg": cv2.IMWRITE_JPEG_QUALITY, ".jpeg": cv2.IMWRITE_JPEG_QUALITY,
            ".webp": cv2.IMWRITE_WEBP_QUALITY, ".avif": cv2.IMWRITE_AVIF_QUALITY}
_EIGHT_BIT_ONLY = (".jpg", ".jpeg", ".webp", ".avif", ".bmp")
_LARGEST = {".jpg": 65500, ".jpeg": 65500, ".webp": 16383}  # pixels a side
_NO_ALPHA = (".jpg", ".jpeg")
#: The formats OpenCV writes a colour profile into itself; TIFF and BMP get theirs after.
_PROFILE_WRITTEN = (".jpg", ".jpeg", ".png", ".webp", ".avif")

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


@dataclass(frozen=True)
class Picture:
    """A decoded image, and the colour profile embedded in its file (None: none)."""

    pixels: np.ndarray
    icc: bytes | None = None


def decode(data: bytes, limits: Limits) -> np.ndarray:
    """Decode ``data`` completely, upright, keeping depth, alpha and grayscale.

    Raises ImageError for anything that is not a complete, supported image.
    """
    return decode_picture(data, limits).pixels


def decode_picture(data: bytes, limits: Limits) -> Picture:
    """``decode``, with the colour profile embedded in the file."""
    header = _checked_header(data, limits)
    image, _, icc = _decode(data, header, limits, cv2.IMREAD_UNCHANGED)
    return Picture(image, icc)


def decode_scaled(data: bytes, limits: Limits,
                  size_of: Callable[[int, int], tuple[int, int]]) -> Picture | None:
    """Decode and shrink in one go to ``size_of(width, height)`` (of the upright picture):
    a JPEG shrinks while it is decoded (its DCT is scaled by 1/2, 1/4 or 1/8 inside
    libjpeg), then area interpolation gives the exact size. None when that would not be
    exact enough, would not shrink, or the input is not such a JPEG: then decode and scale
    separately.
    """
    header = _checked_header(data, limits)
    if header is None or header.format != "jpeg" or header.channels not in (1, 3):
        return None
    # Both sides or neither turn with the EXIF orientation: the smaller ratio is the same.
    target = size_of(header.width, header.height)
    turned = size_of(header.height, header.width)
    ratio = min(header.width / target[0], header.height / target[1],
                header.height / turned[0], header.width / turned[1])
    if ratio <= 1:
        return None
    reduce = shrink_factor(100 / ratio)
    # libjpeg's scaled decode and an area average part ways on fine detail and noise, which
    # is what a JPEG spends its bits on: a detailed file is decoded in full. Whole blocks
    # keep the two sampling grids aligned.
    bits_per_sample = len(data) * 8 / (header.width * header.height * header.channels)
    while reduce > 1 and (header.width % reduce or header.height % reduce
                          or min(header.width, header.height) // reduce < MIN_REDUCED):
        reduce //= 2
    if reduce == 1 or bits_per_sample > MAX_BITS_PER_SAMPLE[header.channels]:
        return None
    flags = (_REDUCED_GRAY if header.channels == 1 else _REDUCED)[reduce]
    image, orientation, icc = _decode(data, header, limits,
                                      flags | cv2.IMREAD_IGNORE_ORIENTATION)
    # The exact size comes from the full picture, upright.
    width, height = _upright(header, orientation)
    size = size_of(width, height)
    if (image.shape[1], image.shape[0]) != size:
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA)
    return Picture(image, icc)


def decode_blurred(data: bytes, limits: Limits, ksize: int, sigma: float) -> Picture | None:
    """Decode and blur (``blur=ksize,sigma``) in one go, for a blur wide enough to need only
    the means of the JPEG's 8 x 8 blocks: libjpeg decodes those at 1/8, from the DC
    coefficients alone, without the inverse DCTs and colour conversion of the full picture.
    None when the blur or the input does not allow it (blur.blocks_suffice): then decode
    and blur separately.
    """
    header = _checked_header(data, limits)
    if (header is None or header.format != "jpeg" or header.channels not in (1, 3)
            or not blocks_suffice(header.width, header.height, ksize, sigma)):
        return None
    flags = (_REDUCED_GRAY if header.channels == 1 else _REDUCED)[BLOCK]
    blocks, orientation, icc = _decode(data, header, limits,
                                       flags | cv2.IMREAD_IGNORE_ORIENTATION)
    width, height = _upright(header, orientation)
    if blocks.shape[:2] != (height // BLOCK, width // BLOCK) or blocks.dtype != np.uint8:
        return None  # not what a 1/8 decode gives (a 12-bit JPEG, say): decode in full
    return Picture(blur_blocks(blocks, width, height, ksize, sigma), icc)


def _upright(header: Header, orientation: int) -> tuple[int, int]:
    """The picture's width and height once its EXIF ``orientation`` is applied."""
    if orientation in (5, 6, 7, 8):  # turned a quarter: the sides swap
        return header.height, header.width
    return header.width, header.height


#: Shrink on load only for JPEGs of at most this many bits per sample (colour photos take
#: 0.3 to 0.8). Colour is stricter: libjpeg's scaled decode also rebuilds the subsampled
#: chroma differently, which shows on noisy colour, while gray stays close even on noise.
MAX_BITS_PER_SAMPLE = {1: 3.0, 3: 0.9}
#: ... and only down to this many pixels on the short side.
MIN_REDUCED = 32


def shrink_factor(percent: float) -> int:
    """How much a JPEG may shrink while decoding before scaling to ``percent`` percent.

    The area resize that follows must either be a whole factor (1 included) or at least
    1.5: a small fractional step after libjpeg's scaling is where the two disagree most.
    Measured on photos (bench/inputs.py): the result stays within half a grey level on
    average and above 45 dB PSNR of decoding in full and resizing with INTER_AREA.
    """
    for reduce in (8, 4, 2):
        remaining = 100 / percent / reduce
        if remaining >= 1.5 or abs(remaining - round(remaining)) < 1e-9 and remaining >= 1:
            return reduce
    return 1


def _checked_header(data: bytes, limits: Limits) -> Header | None:
    if not data:
        raise ImageError("input file is empty")
    header = read_header(data)
    check_pixels(header, limits)
    return header


def _decode(data: bytes, header: Header | None, limits: Limits, flags: int
            ) -> tuple[np.ndarray, int, bytes | None]:
    """The decoded image, upright; the EXIF orientation that was applied; and the colour
    profile embedded in the file."""
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
        raise ImageError(f"input has {image.dtype} samples; only 8- and 16-bit images are "
                         f"supported")
    orientation = 1  # OpenCV applies a TIFF's own Orientation tag itself; EXIF it leaves
    icc = None
    for kind, block in zip(kinds, blocks, strict=False):
        if kind == cv2.IMAGE_METADATA_EXIF:
            orientation = exif_orientation(bytes(np.asarray(block).ravel()))
        elif kind == cv2.IMAGE_METADATA_ICCP:
            icc = bytes(np.asarray(block).ravel()) or None
    if orientation in _ORIENT:
        image = _ORIENT[orientation](image)
    return image, orientation, icc


def encode(image: np.ndarray, extension: str, *, quality: int | None = None,
           icc: bytes | None = None) -> bytes:
    """Encode ``image`` for a file ending in ``extension``, converting what the format lacks;
    at ``quality`` (JPEG, WebP and AVIF; None: the format's default), carrying the colour
    profile ``icc``."""
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
    if icc is not None and not fits(icc, 1 if image.ndim == 2 else image.shape[2]):
        icc = None  # a colour profile cannot describe gray pixels (profiles.py)
    parameters = list(FORMATS[extension])
    if quality is not None and extension in _QUALITY:
        parameters[parameters.index(_QUALITY[extension]) + 1] = quality
    try:
        if icc is not None and extension in _PROFILE_WRITTEN:
            ok, buffer = cv2.imencodeWithMetadata(
                extension, image, [cv2.IMAGE_METADATA_ICCP], [np.frombuffer(icc, np.uint8)],
                parameters)
        else:
            ok, buffer = cv2.imencode(extension, image, parameters)
    except cv2.error as exc:
        raise ImageError(f"cannot encode {extension} output: {_opencv_message(exc)}") from None
    if not ok:
        raise ImageError(f"cannot encode {extension} output"
                         + (" with the input's colour profile" if icc else ""))
    if icc is None or extension in _PROFILE_WRITTEN:
        return buffer.tobytes()
    try:
        if extension == ".bmp":
            return bmp_with_profile(buffer.tobytes(), icc)
        return tiff_with_profile(buffer.tobytes(), icc)
    except ValueError as exc:
        raise ImageError(f"cannot keep the input's colour profile in the {extension} "
                         f"output: {exc}") from None


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
_REDUCED_GRAY = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
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
    way to learn of it. File descriptor 2 belongs to the whole process, so captures take
    turns (a Dask worker may decode in several threads), and what was captured is written
    on to the real stderr afterwards: another thread's messages are not lost.
    """
    with _CAPTURE_LOCK:
        with _capture_fd2() as captured:
            yield captured
        if captured.text:
            os.write(2, captured.text.encode("utf-8", "replace"))


_CAPTURE_LOCK = threading.Lock()


@contextlib.contextmanager
def _capture_fd2() -> Iterator[_Captured]:
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
