"""Paths confined to the root directory: the security boundary of the server.

Every path in a request is resolved against ROOT on its real path (symlinks followed)
before any file is opened, and refused when it ends up outside ROOT: by ``..``, by an
absolute path, or by a symlink that points out. The worker checks again right before it
opens a file (``recheck``), so a symlink swapped in after validation is caught too.
"""

from __future__ import annotations

import os
from pathlib import Path


class OutsideRoot(ValueError):
    """A path that resolves outside the root, or that cannot be a path at all."""


def confine(root: Path, raw: str) -> Path:
    """The real path of ``raw`` (relative to ``root``, or absolute inside it).

    ``root`` must itself be a real path. Raises OutsideRoot with a message for the user.
    """
    if not raw:
        raise OutsideRoot("path is empty")
    if any(ord(char) < 32 or ord(char) == 127 for char in raw):
        raise OutsideRoot(f"{raw!r} contains a control character")
    candidate = Path(raw)
    if not candidate.is_absolute():
        candidate = root / candidate
    real = Path(os.path.realpath(candidate))
    if real != root and not real.is_relative_to(root):
        raise OutsideRoot(f"{raw!r} is outside the root")
    return real


def recheck(root: Path, path: Path) -> None:
    """Refuse ``path`` if it no longer resolves to itself inside ``root`` (a swapped symlink)."""
    real = Path(os.path.realpath(path))
    if real != path or not real.is_relative_to(root):
        raise OutsideRoot(f"{str(path)!r} changed after validation and now resolves to {str(real)!r}")


def relative(root: Path, path: Path) -> str:
    """``path`` as a string relative to ``root`` (as status documents list outputs)."""
    return path.relative_to(root).as_posix()
