"""URLs given by users: checked to be http(s), and shown without their credentials."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


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
