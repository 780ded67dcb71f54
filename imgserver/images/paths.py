"""Paths confined to the root directory: the security boundary of the server.

Every path in a request is resolved against ROOT on its real path (symlinks followed)
before any file is opened, and refused when it ends up outside ROOT: by ``..``, by an
absolute path, or by a symlink that points out. A name the filesystem would refuse (over
NAME_MAX bytes) is refused too, so that it fails the request rather than every image. The
worker reaches every file from the root through folder descriptors that never follow a
symlink (``open_folder``), so a symlink swapped in after validation cannot lead it out
either.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from pathlib import Path, PurePosixPath

#: The most bytes one name in a path (of a file or a folder) may have, in UTF-8: what the
#: filesystems of Linux (ext4, xfs, btrfs, tmpfs) allow.
NAME_MAX = 255


class OutsideRoot(ValueError):
    """A path that resolves outside the root, or that cannot be a path at all."""


def check_name(name: str, before: str = "") -> None:
    """Raise OutsideRoot when ``name`` (one file or folder name) has more than NAME_MAX bytes;
    ``before`` starts its message."""
    size = len(os.fsencode(name))
    if size > NAME_MAX:
        raise OutsideRoot(f"{before}{shown(name)} is {size} bytes in UTF-8, more than the "
                          f"{NAME_MAX} a file or folder name may have")


def shown(text: str) -> str:
    """``text`` quoted for a message, its middle left out when it is long."""
    return repr(text) if len(text) <= 60 else repr(f"{text[:32]}...{text[-20:]}")


def confine(root: Path, raw: str) -> Path:
    """The real path of ``raw`` (relative to ``root``, or absolute inside it).

    ``root`` must itself be a real path. Raises OutsideRoot with a message for the user.
    """
    if not raw:
        raise OutsideRoot("path is empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in raw):
        raise OutsideRoot(f"{raw!r} contains a control character")
    try:
        os.fsencode(raw)
    except UnicodeEncodeError as exc:  # a lone surrogate, as JSON's "\ud800" writes one
        raise OutsideRoot(f"{raw!r} cannot be a file name: {raw[exc.start]!r} is a lone "
                          f"UTF-16 surrogate") from None
    _check_names(raw, PurePosixPath(raw).parts)
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = _realpath(root, candidate)
    if real != root and not real.is_relative_to(root):
        raise OutsideRoot(f"{raw!r} is outside the root")
    _check_names(raw, real.relative_to(root).parts)  # a dangling symlink's target, too
    return real


def _realpath(root: Path, candidate: Path) -> Path:
    """``os.path.realpath(candidate)``, given that ``root`` is a real path: below ``root``,
    only the parts under it are looked at (one lstat each, not one per part from ``/``),
    until a symlink or a ``..``, from where ``realpath`` resolves the whole path."""
    try:
        parts = candidate.relative_to(root).parts
    except ValueError:
        return Path(os.path.realpath(candidate))
    if ".." in parts:
        return Path(os.path.realpath(candidate))
    real = root
    for at, part in enumerate(parts):
        step = real / part
        try:
            mode = os.lstat(step).st_mode
        except OSError:  # missing, or under a file: the rest is taken as written, as realpath does
            return real.joinpath(*parts[at:])
        if stat.S_ISLNK(mode):
            return Path(os.path.realpath(candidate))
        real = step
    return real


def _check_names(raw: str, parts: tuple[str, ...]) -> None:
    for part in parts:
        check_name(part, "" if part == raw else f"{shown(raw)}: the name ")


def open_folder(root: Path, folder: Path, *, create: bool = False) -> int:
    """A file descriptor of ``folder``, reached from ``root`` without following any symlink.

    ``folder`` is a real path inside ``root`` (as ``confine`` returns it), so none of its
    parts is a symlink, unless one was swapped in since: then this raises OutsideRoot.
    With ``create``, missing folders are made, one level at a time, each inside the last.
    """
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        for part in folder.relative_to(root).parts:
            try:
                child = _open_child(part, fd)
            except FileNotFoundError:
                if not create:
                    raise
                with contextlib.suppress(FileExistsError):  # made meanwhile by another worker
                    os.mkdir(part, 0o777, dir_fd=fd)
                child = _open_child(part, fd)
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(root: Path, path: Path) -> int:
    """A read-only descriptor of ``path`` (a real path inside ``root``), reached without
    following any symlink: one swapped in since validation fails (OSError or OutsideRoot).

    O_NONBLOCK: a FIFO does not hang the open; the caller checks it is a regular file.
    """
    folder = open_folder(root, path.parent)
    try:
        return os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                       dir_fd=folder)
    finally:
        os.close(folder)


def _open_child(part: str, parent: int) -> int:
    try:
        return os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                       dir_fd=parent)
    except OSError as exc:
        # A symlink fails O_NOFOLLOW with ELOOP, or with ENOTDIR when O_DIRECTORY is checked
        # first; a file in the way fails with ENOTDIR too.
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and stat.S_ISLNK(
                os.stat(part, dir_fd=parent, follow_symlinks=False).st_mode):
            raise OutsideRoot(f"{part!r} changed after validation: it is now a symlink") from None
        raise


def relative(root: Path, path: Path) -> str:
    """``path`` as a string relative to ``root`` (as status documents list outputs)."""
    return path.relative_to(root).as_posix()
