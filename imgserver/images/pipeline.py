"""One image, from input file to output files: the function the worker processes run.

    ImageTask (paths, parsed operations, limits: plain data, picklable)
        |  process_image, in a worker process
        v
    read input (confined, regular file, size limit) -> decode (pixel limit, strict)
        -> operations -> encode every output -> temp files -> rename all
        |
        v
    list of outputs written, relative to the root  |  ImageError with the reason

Pixels never leave the worker: it reads and writes the files itself. Every output is
written to a temporary file in its own folder and renamed into place only when all outputs
of the image are encoded and on disk, so a reader never sees half an image and a failed
image leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import cv2

from imgserver.errors import ImageError
from imgserver.images.codec import (
    Limits,
    Picture,
    decode_blurred,
    decode_picture,
    decode_scaled,
    encode,
)
from imgserver.images.operations import Blur, Operation, Scaling, apply, quality
from imgserver.images.paths import NAME_MAX, OutsideRoot, open_file, open_folder, relative

#: Temporary outputs end with this; they are hidden (dot files) in the output's folder.
TEMP_SUFFIX = ".imgserver-tmp"
#: What a temporary name adds after its prefix: 8 random hex digits and TEMP_SUFFIX.
_TEMP_TAIL = 8 + len(TEMP_SUFFIX)


@dataclass(frozen=True)
class ImageTask:
    """Everything a worker needs for one image: paths and parsed operations, no pixels."""

    root: str
    input: str
    outputs: tuple[str, ...]  # absolute paths, one per file the image produces
    operations: tuple[Operation, ...]
    max_pixels: int
    max_file_bytes: int


@dataclass(frozen=True)
class Processed:
    """What a worker reports of an image: the files written and its own time on it."""

    outputs: list[str]
    seconds: float


def run_image(task: ImageTask) -> Processed:
    """``process_image``, timed in the worker (the server's metrics count worker time).

    A failed image's ImageError carries the time too, as ``seconds``.
    """
    started = time.perf_counter()
    try:
        outputs = process_image(task)
    except ImageError as error:
        error.seconds = time.perf_counter() - started  # type: ignore[attr-defined]
        raise
    return Processed(outputs, time.perf_counter() - started)


def process_image(task: ImageTask) -> list[str]:
    """Process one image; return the files written, relative to the root.

    Raises ImageError with a message for the user when the image fails.
    """
    root = Path(task.root)
    try:
        data = read_input(root, Path(task.input), task.max_file_bytes)
        picture, steps = _decoded(data, Limits(task.max_pixels, task.max_file_bytes),
                                  task.operations)
        tiles = apply([("", picture.pixels)], steps)
        level = quality(task.operations)
        encoded = [(Path(path), encode(pixels, Path(path).suffix, quality=level,
                                       icc=picture.icc))
                   for path, (_, pixels) in zip(task.outputs, tiles, strict=False)]
        del picture, tiles
        written = write_outputs(root, encoded)
    except ImageError:
        raise
    except OutsideRoot as exc:
        raise ImageError(str(exc)) from None
    except ValueError as exc:  # an operation that cannot apply, e.g. splitting a 1-pixel image
        raise ImageError(str(exc)) from None
    except cv2.error as exc:
        raise ImageError(f"OpenCV failed: {str(exc).strip().splitlines()[-1]}") from None
    except MemoryError:
        raise ImageError("out of memory while processing the image") from None
    return [relative(root, path) for path in written]


def _decoded(data: bytes, limits: Limits, operations: tuple[Operation, ...]
             ) -> tuple[Picture, tuple[Operation, ...]]:
    """The input decoded, and the operations still to apply. Where the first step scales
    the image down (resize, fit, fill but for smart) or is a wide blur, a JPEG is decoded
    already scaled or blurred (``decode_scaled``, ``decode_blurred``), and that step is done."""
    steps = tuple(op for op in operations if not op.setting)
    first = steps[0] if steps else None
    picture = None
    if isinstance(first, Scaling) and first.scales_on_decode():
        picture = decode_scaled(data, limits, first.scaled_size)  # shrink on load
        if picture is not None:
            picture = Picture(first.after_scaling(picture.pixels), picture.icc)
    elif isinstance(first, Blur):
        picture = decode_blurred(data, limits, first.ksize, first.sigma)  # a wide blur from 1/8
    if picture is None:
        return decode_picture(data, limits), steps
    return picture, steps[1:]


def ping() -> int:
    """A task that does no work: it proves a worker can run tasks (its pid)."""
    return os.getpid()


def read_input(root: Path, path: Path, max_bytes: int) -> bytes:
    """The bytes of the input file, a regular file reached inside the root."""
    try:
        fd = open_file(root, path)
    except OSError as exc:
        raise ImageError(f"cannot open input: {_reason(exc)}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ImageError("input is not a regular file")
        if info.st_size > max_bytes:
            raise ImageError(f"input is {info.st_size} bytes, the limit is {max_bytes} bytes "
                             f"(--max-file-bytes)")
        # One read of the size fstat gave, and a byte more to see the end: a buffer of the
        # file's size comes from the worker's kept heap, where reading max_bytes at once
        # maps a fresh buffer of the limit's size and faults in every page the file fills
        # (1.8 ms of CPU on a 2.9 MB photo, 5% of a thumbnail).
        data = os.read(fd, info.st_size + 1)
        if len(data) == info.st_size:
            return data
        # Short, or longer than it was: the file is changing. Read on to its end, as far
        # as the limit allows.
        with open(fd, "rb", closefd=False) as file:
            return data + file.read(max_bytes + 1 - len(data))
    finally:
        os.close(fd)


def write_outputs(root: Path, outputs: list[tuple[Path, bytes]]) -> list[Path]:
    """Write every (path, bytes) atomically, all or none; return the paths written."""
    folders: dict[Path, int] = {}
    temps: list[tuple[int, str, Path]] = []
    placed: list[tuple[int, Path]] = []
    try:
        for path, data in outputs:
            if path.parent not in folders:
                folders[path.parent] = open_folder(root, path.parent, create=True)
            folder = folders[path.parent]
            temps.append((folder, _write_temp(folder, path.name, data), path))
        for folder, temp, path in temps:
            os.replace(temp, path.name, src_dir_fd=folder, dst_dir_fd=folder)
            placed.append((folder, path))
        temps.clear()
    except OSError as exc:
        for folder, path in placed:
            _unlink(path.name, folder)
        raise ImageError(f"cannot write output: {_reason(exc)}") from None
    finally:
        for folder, temp, _ in temps:
            _unlink(temp, folder)
        for folder in folders.values():
            os.close(folder)
    return [path for _, path in placed]


def _write_temp(folder: int, name: str, data: bytes) -> str:
    try:
        if stat.S_ISDIR(os.stat(name, dir_fd=folder, follow_symlinks=False).st_mode):
            raise IsADirectoryError(errno.EISDIR, "output is a directory", name)
    except FileNotFoundError:
        pass
    temp = f"{temp_prefix(name)}{secrets.token_hex(4)}{TEMP_SUFFIX}"
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o644, dir_fd=folder)
    try:
        # No fsync: the rename makes the output atomic against a crash of any process,
        # which is what a reader and a restart need; an fsync per file would cost a tenth
        # of a PNG split job (bench/), for power failures only.
        with open(fd, "wb", closefd=False) as file:
            file.write(data)
    except BaseException:
        _unlink(temp, folder)
        raise
    finally:
        os.close(fd)
    return temp


def temp_prefix(name: str) -> str:
    """How the temporary names of the output ``name`` start: ``.NAME.``, or, where the whole
    temporary name would be longer than a name may be, the start of NAME and a digest of all
    of it (``.NAME-START~DIGEST.``): an output of NAME_MAX bytes is written like any other."""
    prefix = f".{name}."
    if len(os.fsencode(prefix)) + _TEMP_TAIL <= NAME_MAX:
        return prefix
    digest = hashlib.blake2b(os.fsencode(name), digest_size=8).hexdigest()
    room = NAME_MAX - _TEMP_TAIL - len(f".~{digest}.")
    start = name
    while len(os.fsencode(start)) > room:
        start = start[:-1]
    return f".{start}~{digest}."


def remove_partial(outputs: tuple[str, ...]) -> None:
    """Remove temporary files a killed worker may have left for these outputs."""
    for output in outputs:
        path = Path(output)
        try:
            leftovers = list(path.parent.glob(
                f"{_glob_escape(temp_prefix(path.name))}*{TEMP_SUFFIX}"))
        except OSError:
            continue
        for leftover in leftovers:
            _unlink(leftover)


def _glob_escape(name: str) -> str:
    return "".join(f"[{char}]" if char in "*?[" else char for char in name)


def _unlink(path: Path | str, folder: int | None = None) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path, dir_fd=folder)


def _reason(exc: OSError) -> str:
    reasons = {
        errno.ENOENT: "no such file",
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted",
        errno.EISDIR: "is a directory",
        errno.ENOTDIR: "a folder in its path is a file",
        errno.EEXIST: "a folder in its path is a file",
        errno.ELOOP: "is a symlink (it changed after validation)",
        errno.ENAMETOOLONG: "name too long",
    }
    return reasons.get(exc.errno or 0, exc.strerror or str(exc))
