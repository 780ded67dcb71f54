"""Thumbnails of a job's files, made in a worker like any image: the same confined reading,
the same strict decoding and limits, only the encoded thumbnail comes back.

    ThumbnailTask (root, path, size, limits) --make_thumbnail, in a worker-->
        read (confined) -> decode (shrunk on load where exact) -> fit in size x size
        -> JPEG (PNG when the image has alpha), with the file's colour profile
        -> (bytes, media type)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2

from imgserver.errors import ImageError, JobNotFound
from imgserver.images.codec import Limits, decode_picture, decode_scaled, encode
from imgserver.images.geometry import Fit
from imgserver.images.paths import OutsideRoot, confine
from imgserver.images.pipeline import read_input

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
    fit = Fit(task.size, task.size)
    try:
        picture = decode_scaled(data, limits, fit.scaled_size) or decode_picture(data, limits)
        image = fit.apply(picture.pixels)
        alpha = image.ndim == 3 and image.shape[2] == 4
        extension = ".png" if alpha else ".jpg"
        return (encode(image, extension, icc=picture.icc),
                "image/png" if alpha else "image/jpeg")
    except cv2.error as exc:
        raise ImageError(f"OpenCV failed: {str(exc).strip().splitlines()[-1]}") from None
