"""The server's settings: one frozen object, built once from flags and environment.

Every option has a command-line flag and an ``IMGSERVER_*`` environment variable; a flag
wins over the variable, and the variable over the default. ``OPTIONS`` is the single table
of them, from which the command line builds its parser and its help.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgserver.errors import ConfigError
from imgserver.urls import check_prefix, check_url


def _positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise ValueError(f"must be at least 1, got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"expected a whole number, got {text!r}") from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"expected a number, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise ValueError(f"must be greater than 0, got {text}")
    return value


def _boolean(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected 1/true/yes or 0/false/no, got {text!r}")


def _port(text: str) -> int:
    value = _int(text)
    if not 0 <= value <= 65535:
        raise ValueError(f"must be between 0 and 65535, got {value}")
    return value


def _scheduler(text: str) -> str:
    scheme, _, rest = text.partition("://")
    if not rest or scheme not in ("tcp", "tls", "ws", "wss", "inproc", "ucx"):
        raise ValueError(f"expected a Dask scheduler address such as tcp://host:8786, "
                         f"got {text!r}")
    return text


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(text: str) -> float:
    """Seconds from a duration such as ``30d``, ``12h``, ``15m``, ``90s`` or ``90``."""
    number, unit = text.strip(), "s"
    if number and number[-1] in _UNITS:
        number, unit = number[:-1], number[-1]
    try:
        value = float(number) * _UNITS[unit]
    except ValueError:
        value = -1.0
    if not 0 <= value < float("inf"):
        raise ValueError(f"expected a duration such as 30d, 12h, 15m, 90s or 0, got {text!r}")
    return value


def _prefixes(text: str) -> tuple[str, ...]:
    prefixes = tuple(part.strip() for part in text.split(",") if part.strip())
    for prefix in prefixes:
        check_prefix(prefix)
    return prefixes


def _secret(text: str) -> bytes:
    """The key of a Standard Webhooks secret, ``whsec_`` + base64."""
    body = text.strip().removeprefix("whsec_")
    try:
        key = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        key = b""
    if not text.strip().startswith("whsec_") or len(key) < 16:
        raise ValueError("expected whsec_ followed by the base64 of at least 16 bytes "
                         "(e.g. whsec_ + `openssl rand -base64 32`)")
    return key


def _executor(text: str) -> str:
    if text not in ("local", "dask"):
        raise ValueError(f"must be 'local' or 'dask', got {text!r}")
    return text


@dataclass(frozen=True)
class Option:
    """One setting: its field name, how to parse it, its default and its help."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    commands: tuple[str, ...] = ("serve", "run")
    shown: str | None = None  # the default as the help shows it, when not ``str(default)``
    switch: bool = False      # a flag without a value (its variable: 1/true/yes or 0/...)

    @property
    def env(self) -> str:
        """The environment variable that sets this option."""
        return "IMGSERVER_" + self.name.upper()

    @property
    def flag(self) -> str:
        """The command-line flag that sets this option."""
        return "--" + self.name.replace("_", "-")


OPTIONS: tuple[Option, ...] = (
    Option("root", str, ".", "directory every input and output path is resolved against"),
    Option("inbox", str, None, "drop folder watched for request files (default: ROOT/inbox)",
           ("serve",)),
    Option("outbox", str, None, "folder for status and request files (default: ROOT/outbox)"),
    Option("host", str, "127.0.0.1", "address to bind", ("serve",)),
    Option("port", _port, 8000, "port to bind", ("serve",)),
    Option("workers", _positive_int, os.cpu_count() or 1, "image worker processes"),
    Option("max_pixels", _positive_int, 200_000_000,
           "largest input in pixels, read from its header before decoding"),
    Option("max_file_bytes", _positive_int, 512 * 1024 * 1024, "largest input file in bytes"),
    Option("max_body_bytes", _positive_int, 1024 * 1024,
           "largest request body or request file in bytes"),
    Option("max_images", _positive_int, 1000, "most images in one request"),
    Option("max_queue", _positive_int, 10_000,
           "most images accepted and not yet finished, all jobs together", ("serve",)),
    Option("image_timeout", _positive_float, 300.0,
           "seconds one image may take before it fails and its worker is stopped"),
    Option("max_tasks_per_child", _positive_int, 1000,
           "images a worker process handles before it is replaced"),
    Option("keep_finished", duration, 30 * 86400.0,
           "how long a finished job's request and status files are kept: 30d, 12h, 90s; "
           "0 keeps them for ever (outputs are never removed)", ("serve",), shown="30d"),
    Option("notify_url", check_url, None, "a URL told of every finished job (a signed webhook; "
           "needs IMGSERVER_NOTIFY_SECRET)"),
    Option("notify_allow", _prefixes, (), "comma-separated URL prefixes a request's own "
           "'notify' URL may start with (none by default)", shown="none"),
    Option("read_timeout", _positive_float, 10.0,
           "seconds a client may take to send a whole request before its connection is closed",
           ("serve",)),
    Option("max_streams", _positive_int, 1000,
           "event streams open at once (GET /events, /jobs/<id>/events); beyond, 503",
           ("serve",)),
    Option("tls_cert", str, None, "certificate (PEM, with its chain) to serve HTTPS with; "
           "needs --tls-key", ("serve",), shown="none (plain HTTP)"),
    Option("tls_key", str, None, "private key (PEM, unencrypted) of --tls-cert",
           ("serve",), shown="none"),
    Option("tokens", str, None, "the tokens file: who may use the server, with which scopes, "
           "folders and limits ('imgserver token add' writes it)", ("serve",), shown="none"),
    Option("allow_anonymous", _boolean, False, "serve an address other than loopback without "
           "any token (everyone may do everything)", ("serve",), switch=True),
    Option("executor", _executor, "local", "where images run: 'local' process pool or 'dask'",
           ("serve",)),
    Option("scheduler", _scheduler, None, "Dask scheduler address, e.g. tcp://host:8786",
           ("serve",)),
)


@dataclass(frozen=True)
class Settings:
    """Everything the server needs to know, resolved and checked."""

    root: Path
    inbox: Path
    outbox: Path
    host: str = "127.0.0.1"
    port: int = 8000
    workers: int = os.cpu_count() or 1
    max_pixels: int = 200_000_000
    max_file_bytes: int = 512 * 1024 * 1024
    max_body_bytes: int = 1024 * 1024
    max_images: int = 1000
    max_queue: int = 10_000
    image_timeout: float = 300.0
    max_tasks_per_child: int = 1000
    keep_finished: float = 30 * 86400.0
    notify_url: str | None = None
    notify_allow: tuple[str, ...] = ()
    read_timeout: float = 10.0
    max_streams: int = 1000
    tls_cert: str | None = None
    tls_key: str | None = None
    tokens: str | None = None
    allow_anonymous: bool = False
    executor: str = "local"
    scheduler: str | None = None
    token: str | None = dataclasses.field(default=None, repr=False)
    notify_secret: bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def build(cls, values: Mapping[str, Any] | None = None,
              environ: Mapping[str, str] | None = None) -> Settings:
        """Settings from explicit ``values`` (flags), then ``environ``, then the defaults."""
        values = dict(values or {})
        environ = os.environ if environ is None else environ
        resolved: dict[str, Any] = {}
        for option in OPTIONS:
            value = values.get(option.name)
            if value is None and environ.get(option.env):
                try:
                    value = option.parse(environ[option.env])
                except ValueError as exc:
                    raise ConfigError(f"{option.env}={environ[option.env]!r}: {exc}") from None
            resolved[option.name] = option.default if value is None else value
        root = Path(resolved.pop("root")).expanduser()
        if not root.is_dir():
            raise ConfigError(f"root {str(root)!r} is not a directory")
        root = Path(os.path.realpath(root))
        inbox = resolved.pop("inbox")
        outbox = resolved.pop("outbox")
        secret = values.get("notify_secret") or environ.get("IMGSERVER_NOTIFY_SECRET") or None
        if isinstance(secret, str):
            try:
                secret = _secret(secret)
            except ValueError as exc:
                raise ConfigError(f"IMGSERVER_NOTIFY_SECRET: {exc}") from None
        if (resolved["notify_url"] or resolved["notify_allow"]) and not secret:
            raise ConfigError("a notify URL is configured (--notify-url or --notify-allow) but "
                              "IMGSERVER_NOTIFY_SECRET is not set: webhooks are signed with it "
                              "(whsec_ + base64 of at least 16 random bytes)")
        return cls(
            root=root,
            inbox=Path(os.path.realpath(root / (inbox or "inbox"))),
            outbox=Path(os.path.realpath(root / (outbox or "outbox"))),
            token=values.get("token") or environ.get("IMGSERVER_TOKEN") or None,
            notify_secret=secret,
            **resolved,
        )
