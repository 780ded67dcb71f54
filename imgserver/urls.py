"""URLs given by users: checked to be http(s), shown without their credentials, and matched
against the prefixes a request's ``notify`` URL must start with (``--notify-allow``).

A prefix matches on the URL's own boundaries, never on its characters:

- **scheme, host and port exactly.** Scheme and host are compared without regard to case;
  a port left out is the scheme's default (``https://h`` and ``https://h:443`` are one
  origin), and a prefix without a port allows no other. Hosts are compared as written, in
  ASCII: ``hooks.example.com.`` (a trailing dot) is not ``hooks.example.com``, an
  international name is written in its ``xn--`` form (a host that is not ASCII is refused:
  converters disagree on some names), and a percent-encoded host matches no prefix. An IPv6
  literal is compared as an address (``[::1]`` is ``[0:0::1]``); one with a zone
  (``%25eth0``) matches no prefix, and a prefix may not have one.
- **no credentials.** A URL with a user name or password (``https://hooks.example.com@
  evil.net/`` is one, to ``evil.net``) is never allowed, and a prefix may not carry any.
- **the path by whole segments, after dot segments are resolved** (RFC 3986, 5.2.4) in the
  prefix and in the URL; ``%2e`` is a dot (RFC 3986, 6.2.2.2: an encoded unreserved
  character is the character), so ``%2e%2e`` is ``..``. ``/hooks`` and ``/hooks/`` both
  allow ``/hooks``, ``/hooks/`` and ``/hooks/x``, never ``/hooks-evil`` nor
  ``/hooks/../admin``. Other percent-encodings are compared as written (``/hook%73`` is not
  ``/hooks``: refused, never wrongly allowed).
- **what receivers read differently is refused**: a backslash (a WHATWG parser reads it as
  ``/``), an encoded ``/`` or ``\\`` in the path (``%2F``, ``%5C``: servers and proxies that
  decode them see other segments), a segment ``..;x`` or ``.;x`` (servlet containers read
  it as a dot segment).
- **a prefix** is a scheme, host, port and path: no query, no fragment.

``check_allowed`` returns the URL as checked: scheme and host in lower case, the path with
its dot segments resolved and ``%2e`` decoded. That is the URL to keep and to post to (an
HTTP client resolves literal dot segments itself, and leaves ``%2e%2e`` for the receiver
to read as it likes: neither remains in it).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit, urlunsplit

_DEFAULT_PORTS = {"http": 80, "https": 443}
#: A host a prefix may name: an ASCII name or IPv4 address (an IPv6 literal is parsed apart).
_NAME = re.compile(r"[a-z0-9._-]+")
_ENCODED_DOT = re.compile(r"%2e", re.IGNORECASE)
_ENCODED_SEPARATOR = re.compile(r"%(2f|5c)", re.IGNORECASE)


def check_url(text: str) -> str:
    """``text`` if it is an absolute http or https URL; ValueError saying what is wrong."""
    try:
        parts = urlsplit(text)
        valid = (parts.scheme in ("http", "https") and bool(parts.hostname)
                 and parts.port != 0 and text.isprintable())
    except ValueError:
        valid = False
    if not valid:
        raise ValueError(f"{redacted(text)[:200]!r} is not an http or https URL")
    return text


def redacted(url: str) -> str:
    """``url`` without the user name and password it may carry (for documents and logs)."""
    try:
        parts = urlsplit(url)
        if parts.username is None and parts.password is None:
            return url
        host = parts.hostname or ""
        port = parts.port
    except ValueError:
        return url.rpartition("@")[2] if "@" in url else url
    if ":" in host:
        host = f"[{host}]"
    netloc = host + (f":{port}" if port else "")
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def check_prefix(text: str) -> str:
    """``text`` if it can be a ``--notify-allow`` prefix; ValueError saying what is wrong."""
    check_url(text)
    shown = repr(redacted(text)[:200])
    if "?" in text or "#" in text:
        raise ValueError(f"{shown} has a query or a fragment: a prefix is a scheme, a host, "
                         f"a port and a path")
    place = _place(text)
    if place.reason:
        raise ValueError(f"{shown} {place.reason}")
    if not place.host_valid:
        raise ValueError(f"{shown}: the host must be an ASCII name (an international one "
                         f"in its xn-- form) or an IP address, without a zone")
    return text


def check_allowed(url: str, prefixes: Iterable[str]) -> str:
    """``url`` as checked (dot segments resolved, scheme and host in lower case) if it is
    under one of ``prefixes``; ValueError saying why not."""
    check_url(url)
    place = _place(url)
    shown = repr(redacted(url)[:200])
    if place.reason:
        raise ValueError(f"{shown} {place.reason}")
    for prefix in prefixes:
        allowing = _prefix(prefix)
        if allowing is not None and place.origin == allowing.origin and (
                place.segments[:len(allowing.segments)] == allowing.segments):
            return place.url
    if place.resolved:
        raise ValueError(f"{shown} resolves to {place.url[:200]!r}, which does not start "
                         f"with an allowed prefix")
    raise ValueError(f"{shown} does not start with an allowed prefix")


def allowed(url: str, prefixes: Iterable[str]) -> bool:
    """Whether ``url`` is under one of ``prefixes`` (see ``check_allowed``)."""
    try:
        check_allowed(url, prefixes)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class _Place:
    """Where a URL points, as prefixes are matched: its origin and its path's segments."""

    origin: tuple[str, str, int]  # scheme, host (an IPv6 address compressed), port
    segments: tuple[str, ...]     # of the path with its dot segments resolved
    url: str                      # the URL rebuilt from the above (and its query, fragment)
    resolved: bool                # whether resolving changed the path
    host_valid: bool              # an ASCII name or an IP literal
    reason: str | None            # why the URL is refused whatever the prefixes


@functools.lru_cache(maxsize=256)
def _prefix(text: str) -> _Place | None:
    """A prefix's place, its final empty segment dropped (``/hooks/`` is ``/hooks``); None
    if it cannot be one."""
    try:
        check_prefix(text)
    except ValueError:
        return None
    place = _place(text)
    segments = place.segments[:-1] if place.segments[-1:] == ("",) else place.segments
    return _Place(place.origin, segments, place.url, place.resolved, True, None)


def _place(text: str) -> _Place:
    """The place of a URL ``check_url`` accepts."""
    parts = urlsplit(text)
    assert parts.hostname is not None
    host, port = parts.hostname, parts.port
    reason = _refused(parts)
    if ":" in host:  # an IPv6 literal (urlsplit has checked its brackets)
        try:
            host_valid = "%" not in host  # no zone: an address on every interface
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            host_valid = False
        netloc = f"[{parts.hostname}]"
    else:
        host_valid = bool(_NAME.fullmatch(host))
        netloc = host
    netloc += f":{port}" if port is not None else ""
    path = _remove_dot_segments(_ENCODED_DOT.sub(".", parts.path))
    segments = tuple(path.split("/")[1:]) if path else ("",)
    if reason is None and any(segment.partition(";")[0] in (".", "..")
                              for segment in segments):
        reason = "has a segment '..;' or '.;', which some receivers read as a dot segment"
    url = urlunsplit((parts.scheme, netloc, path, parts.query, parts.fragment))
    return _Place((parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme]), segments, url,
                  path != parts.path, host_valid, reason)


def _refused(parts: SplitResult) -> str | None:
    """Why a URL is refused as a notify URL or a prefix, whatever it is compared with."""
    if "@" in parts.netloc:
        return "carries a user name or password, which is never allowed"
    if not parts.netloc.isascii():
        return "has a host that is not plain ASCII (an international name is written xn--...)"
    if "\\" in parts.netloc or "\\" in parts.path:
        return "has a backslash, which some receivers read as '/'"
    if _ENCODED_SEPARATOR.search(parts.path):
        return "has an encoded '/' or '\\' (%2F, %5C) in its path, which some receivers decode"
    return None


def _remove_dot_segments(path: str) -> str:
    """``path`` (empty or absolute) without its ``.`` and ``..`` segments, RFC 3986 5.2.4:
    ``/a/b/../c`` is ``/a/c``, ``/a/b/..`` is ``/a/``, ``/..`` is ``/``."""
    if not path:
        return path
    segments = path.split("/")[1:]
    kept: list[str] = []
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment in (".", ".."):
            if segment == ".." and kept:
                kept.pop()
            if last:
                kept.append("")  # what follows a final dot segment is a folder: a final "/"
        else:
            kept.append(segment)
    return "/" + "/".join(kept)
