"""The headers every answer carries, so that a browser runs only what the server meant.

    X-Content-Type-Options: nosniff      every answer: a file is what its type says
    X-Frame-Options: DENY                every answer: no other site frames a page of it
    Referrer-Policy: no-referrer         every answer: a link out tells nothing of job ids
    Content-Security-Policy              what a page may load and run; no framing

A page says what it needs (``PAGE_POLICY`` for the status page, ``docs_policy`` for /docs,
whose one inline script is allowed by its hash); every other answer gets ``LOCKED_POLICY``,
under which nothing loads or runs at all: a job's file that holds HTML (an input may be any
file) is shown inert. The middleware adds a header only where the answer has none.
"""

from __future__ import annotations

import base64
import hashlib
import re

from starlette.types import ASGIApp, Message, Receive, Scope, Send

#: The status page: its own script, style, data (fetch, and its event streams) and images
#: (thumbnails arrive as blobs; the page's empty icon is a data: URL). Nothing else.
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
               "img-src 'self' blob: data:; connect-src 'self'; object-src 'none'; "
               "base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
#: Everything that is not a page (JSON, metrics, a job's files, errors).
LOCKED_POLICY = "default-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

#: The headers of every answer, each added where the answer does not set it (a page sets its
#: own Content-Security-Policy).
HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
           (b"referrer-policy", b"no-referrer"),
           (b"content-security-policy", LOCKED_POLICY.encode()))

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def docs_policy(html: str) -> str:
    """The policy of the /docs page ``html``: Swagger UI from /docs-assets, its inline start
    script by its hash, its schema (and "Try it out") from this server."""
    hashes = " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(script.encode()).digest()).decode() + "'"
        for script in _INLINE_SCRIPT.findall(html))
    return (f"default-src 'self'; script-src 'self' {hashes}; "
            f"style-src 'self'; img-src 'self' data:; connect-src 'self'; "
            f"object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")


class SecurityHeaders:
    """ASGI middleware: HEADERS on every answer that does not set them itself."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in HEADERS if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)
