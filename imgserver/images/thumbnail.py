"""Thumbnails of a job's files, made in a worker like any image: the same confined reading,
the same strict decoding and limits, only the encoded thumbnail comes back.

    ThumbnailTask (root, path, size, limits) --make_thumbnail, in a worker-->
        read (confined) -> decode (shrunk on load where exact) -> fit in size x size
        -> JPEG (PNG when the image has alpha) -> (bytes, media type)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from imgserver.errors import ImageError, JobNotFound
from imgserver.images.codec import Limits, decode, decode_resized, encode
from imgserver.images.operations import Resize
from imgserver.images.paths import OutsideRoot, confine
from imgserver.images.pipeline import read_input
from imgserver.images.probe import read_header

#: Thumbnails are at most this many pixels on their longer side, by default and at most.
DEFAULT_SIZE, MAX_SIZE = 256, 1024


@dataclass(frozen=True)
class ThumbnailTask:
    """A thumbnail to make: which file (a real path inside the root) and how large."""

    root: str
    path: str
    size: int
    max_pixels: int
    max_file_bytes: int


def listed_file(document: dict, root: Path, index: int, output: int | None) -> Path:
    """The real path of output ``output`` of image ``index`` of the job ``document``
    describes (its input when ``output`` is None): only a file the job lists, found again
    inside the root. JobNotFound otherwise."""
    job_id, images = document["id"], document["images"]
    if not 0 <= index < len(images):
        raise JobNotFound(f"job {job_id!r} has no image {index} (it has {len(images)})")
    image = images[index]
    if output is None:
        listed = image["input"]
    elif 0 <= output < len(image["outputs"]):
        listed = image["outputs"][output]
    else:
        raise JobNotFound(f"image {index} of job {job_id!r} has no output {output} "
                          f"(it has {len(image['outputs'])})")
    try:
        return confine(root, listed)
    except OutsideRoot as exc:
        raise JobNotFound(f"image {index} of job {job_id!r}: {exc}") from None


def make_thumbnail(task: ThumbnailTask) -> tuple[bytes, str]:
    """The thumbnail of ``task.path``, no larger than ``task.size`` on either side, encoded;
    and its media type. ImageError when the file cannot be read or decoded."""
    try:
        data = read_input(Path(task.root), Path(task.path), task.max_file_bytes)
    except OutsideRoot as exc:
        raise ImageError(str(exc)) from None
    limits = Limits(task.max_pixels, task.max_file_bytes)
    image = None
    header = read_header(data)
    if header is not None and max(header.width, header.height) > task.size:
        image = decode_resized(data, limits, Resize(100 * task.size / max(header.width,
                                                                        header.height)))
    try:
        if image is None:
            image = decode(data, limits)
        image = _fit(image, task.size)
        alpha = image.ndim == 3 and image.shape[2] == 4
        return encode(image, ".png" if alpha else ".jpg"), "image/png" if alpha else "image/jpeg"
    except cv2.error as exc:
        raise ImageError(f"OpenCV failed: {str(exc).strip().splitlines()[-1]}") from None


def _fit(image: np.ndarray, size: int) -> np.ndarray:
    """``image`` shrunk (area interpolation) to fit in ``size`` x ``size``, if it does not."""
    height, width = image.shape[:2]
    scale = size / max(height, width)
    if scale >= 1:
        return image
    target = (max(1, round(width * scale)), max(1, round(height * scale)))
    return cv2.resize(image, target, interpolation=cv2.INTER_AREA)
