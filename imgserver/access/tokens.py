"""The tokens file (``--tokens FILE``, ``IMGSERVER_TOKENS``): who may use the server.

One JSON document, readable and editable by hand::

    {"version": 1,
     "tokens": [{"name": "shop", "sha256": "9f86d0…", "scopes": ["submit", "read", "cancel"],
                 "folder": "clients/shop", "rate": 10, "max_queued": 2000,
                 "created_at": "2026-12-07T12:00:00.000+00:00"}]}

Only a hash of each secret is stored: SHA-256, which is enough because a secret is 32 random
bytes (a slow password hash protects guessable passwords, and would cost every request
milliseconds). A secret is shown once, when its token is added. The file is created with
mode 0600 and replaced atomically (written beside it, synced, renamed), under a lock, so
that two ``imgserver token`` commands at once lose neither change. ``TokenFile.tokens``
reads it again when it has changed (checked at most every CHECK_INTERVAL seconds), so that
a running server picks up additions and revocations without a restart.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError

logger = logging.getLogger("imgserver.access")

SCOPES = ("submit", "read", "cancel", "admin")
DEFAULT_SCOPES = ("submit", "read", "cancel")
#: A running server looks at the file's modification at most this often (seconds).
CHECK_INTERVAL = 1.0
#: What every secret starts with: a secret found in a log or a file can be told for one.
SECRET_PREFIX = "imgs_"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


@dataclass(frozen=True)
class Token:
    """One token as the file keeps it: never its secret, only the secret's hash."""

    name: str
    sha256: str
    scopes: tuple[str, ...] = DEFAULT_SCOPES
    folder: str | None = None       # relative to ROOT; None: the whole root
    rate: float | None = None       # requests a second, on average (bursts of as many)
    max_queued: int | None = None   # images accepted and unfinished, at most
    created_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="milliseconds"))

    def to_document(self) -> dict[str, Any]:
        """The token as the file writes it."""
        return {**asdict(self), "scopes": list(self.scopes)}

    @classmethod
    def from_document(cls, document: dict[str, Any]) -> Token:
        """A token read from the file; ValueError saying what is wrong with it."""
        name = check_name(str(document.get("name", "")))
        digest = document.get("sha256")
        if not isinstance(digest, str) or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"token {name!r}: 'sha256' is not a SHA-256 hex digest")
        return cls(name=name, sha256=digest,
                   scopes=check_scopes(document.get("scopes", list(DEFAULT_SCOPES))),
                   folder=check_folder(document.get("folder")),
                   rate=_positive(document.get("rate"), f"token {name!r}: rate", float),
                   max_queued=_positive(document.get("max_queued"),
                                        f"token {name!r}: max_queued", int),
                   created_at=str(document.get("created_at", "")))


def new_secret() -> str:
    """A fresh secret: the prefix and 32 random bytes, URL-safe."""
    return SECRET_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def digest(secret: str) -> str:
    """The SHA-256 hex digest the file keeps of ``secret``."""
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).hexdigest()


def check_name(name: str) -> str:
    """``name`` if it can name a token; ValueError saying what a name may be."""
    if not _NAME.fullmatch(name):
        raise ValueError(f"token name {name[:80]!r}: 1 to 64 letters, digits, '.', '_' or "
                         f"'-', starting with a letter or digit")
    return name


def check_scopes(value: Any) -> tuple[str, ...]:
    """``value`` (a list, or comma-separated text) as scopes; ValueError naming a wrong one."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list | tuple) or not items:
        raise ValueError(f"scopes: expected one or more of {', '.join(SCOPES)}")
    scopes = tuple(dict.fromkeys(str(item).strip() for item in items))
    wrong = [scope for scope in scopes if scope not in SCOPES]
    if wrong:
        raise ValueError(f"scopes: {', '.join(map(repr, wrong))} (expected one or more of "
                         f"{', '.join(SCOPES)})")
    return scopes


def check_folder(value: Any) -> str | None:
    """``value`` as a token's folder: a relative path inside ROOT without ``..``, in the
    form ``a/b`` (None: the whole root); ValueError otherwise."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ValueError(f"folder: expected a path, got {value!r}")
    parts = [part for part in value.replace("\\", "/").split("/") if part not in ("", ".")]
    if value.startswith("/") or any(part == ".." for part in parts) or not parts:
        raise ValueError(f"folder {value[:200]!r}: expected a folder under the root, "
                         f"relative to it, without '..'")
    if any(ord(char) < 32 for char in value):
        raise ValueError(f"folder {value[:200]!r}: control characters are not allowed")
    return "/".join(parts)


def _positive(value: Any, what: str, kind: type) -> Any:
    if value is None:
        return None
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what}: expected a positive number, got {value!r}") from None
    if not number > 0 or isinstance(value, bool):
        raise ValueError(f"{what}: expected a positive number, got {value!r}")
    return number


class TokenFile:
    """The tokens file at ``path``: read, changed atomically, and followed while serving."""

    def __init__(self, path: Path) -> None:
        """The file at ``path`` (it need not exist yet: then there are no tokens)."""
        self.path = path
        self._lock = threading.Lock()
        self._tokens: dict[str, Token] = {}      # by digest
        self._seen: tuple[int, int, int] | None = None
        self._checked = -CHECK_INTERVAL

    # -- while serving ----------------------------------------------------------------------

    def tokens(self) -> dict[str, Token]:
        """The tokens by the digest of their secret, as the file says now (re-read when it
        has changed, looked at at most every CHECK_INTERVAL seconds). A file that cannot be
        read keeps the tokens read last, and says why in the log."""
        moment = time.monotonic()
        if moment - self._checked < CHECK_INTERVAL:
            return self._tokens
        with self._lock:
            if moment - self._checked < CHECK_INTERVAL:
                return self._tokens
            self._checked = moment
            try:
                info = os.stat(self.path)
                identity = (info.st_ino, info.st_mtime_ns, info.st_size)
            except FileNotFoundError:
                identity = (0, 0, 0)
            if identity != self._seen:
                try:
                    self._tokens = {token.sha256: token for token in self.read()}
                    if self._seen is not None:
                        logger.info("tokens file %s read again: %d tokens", self.path,
                                    len(self._tokens))
                except ConfigError as exc:
                    logger.error("%s; the tokens read before stay in use", exc)
                self._seen = identity
        return self._tokens

    # -- the file ---------------------------------------------------------------------------

    def read(self) -> list[Token]:
        """Every token in the file (none if there is no file); ConfigError if it is not a
        tokens file."""
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise ConfigError(f"cannot read the tokens file {self.path}: {exc.strerror}") from None
        try:
            document = json.loads(text)
            if not isinstance(document, dict) or not isinstance(document.get("tokens"), list):
                raise ValueError('expected {"version": 1, "tokens": [...]}')
            tokens = [Token.from_document(entry) for entry in document["tokens"]]
        except (ValueError, TypeError, AttributeError) as exc:
            raise ConfigError(f"the tokens file {self.path} is not valid: {exc}") from None
        names = [token.name for token in tokens]
        if len(set(names)) != len(names):
            raise ConfigError(f"the tokens file {self.path} names a token twice")
        return tokens

    def add(self, token: Token) -> None:
        """Add ``token``; ConfigError if its name is taken."""
        with self._changing() as tokens:
            if any(existing.name == token.name for existing in tokens):
                raise ConfigError(f"a token named {token.name!r} exists already (revoke it "
                                  f"first to replace it)")
            tokens.append(token)

    def revoke(self, name: str) -> Token:
        """Remove the token ``name``; the token removed. ConfigError if there is none."""
        with self._changing() as tokens:
            for index, token in enumerate(tokens):
                if token.name == name:
                    return tokens.pop(index)
        raise ConfigError(f"no token named {name!r} in {self.path}")

    @contextlib.contextmanager
    def _changing(self) -> Iterator[list[Token]]:
        """The tokens, to change in place; written back atomically, under a lock that other
        processes changing the file take too."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_name(self.path.name + ".lock"),
                       os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            tokens = self.read()
            before = list(tokens)
            yield tokens
            if tokens != before:
                self._write(tokens)
        finally:
            os.close(lock)

    def _write(self, tokens: list[Token]) -> None:
        data = json.dumps({"version": 1, "tokens": [token.to_document() for token in tokens]},
                          indent=2) + "\n"
        temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            try:
                view = memoryview(data.encode())
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(temp, self.path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp)
        folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
