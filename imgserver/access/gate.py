"""The gate: a request's ``Authorization`` header becomes its principal, or is refused.

    no token configured            everyone may do everything (loopback use; ``serve`` on
                                   another address refuses to start so, unless told to)
    IMGSERVER_TOKEN                that secret: every scope over the whole root
    --tokens FILE                  each token of the file, as its principal (tokens.py)

Secrets are compared in constant time: the presented one's SHA-256 digest is looked up, and
the digest found compared with ``hmac.compare_digest``. The gate never logs or keeps a
presented secret.
"""

from __future__ import annotations

import hashlib
import hmac

from imgserver.access.principal import Principal
from imgserver.access.ratelimit import RateLimits
from imgserver.access.tokens import TokenFile, digest
from imgserver.errors import Forbidden, TooManyRequests, Unauthorized


class Gate:
    """Authenticates requests and checks their scopes and rate."""

    def __init__(self, token: str | None = None, tokens: TokenFile | None = None) -> None:
        """A gate for the one ``token`` (IMGSERVER_TOKEN) and the ``tokens`` file, either or
        both; with neither, it lets everyone in."""
        self._token = hashlib.sha256(token.encode()).digest() if token else None
        self._tokens = tokens
        self._rates = RateLimits()

    @property
    def open(self) -> bool:
        """Whether no token is needed."""
        return self._token is None and self._tokens is None

    def principal(self, authorization: str | None) -> Principal:
        """The principal of a request's Authorization header; Unauthorized if none fits."""
        if self.open:
            return Principal.everyone()
        scheme, _, secret = (authorization or "").partition(" ")
        secret = secret.strip()
        if scheme.lower() != "bearer" or not secret:
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
        presented = hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()
        if self._token is not None and hmac.compare_digest(presented, self._token):
            return Principal.everyone("IMGSERVER_TOKEN")
        if self._tokens is not None:
            token = self._tokens.tokens().get(presented.hex())
            if token is not None and hmac.compare_digest(digest(secret), token.sha256):
                return Principal.of(token)
        raise Unauthorized("the bearer token is not one this server knows (revoked, or "
                           "never added)")

    def admit(self, principal: Principal, scope: str) -> None:
        """Let ``principal`` do what needs ``scope`` now: Forbidden naming the scope it
        lacks, TooManyRequests when its rate is used up."""
        if not principal.may(scope):
            raise Forbidden(f"{principal.describe()} lacks the '{scope}' scope this needs",
                            scope)
        if principal.rate is not None and principal.name is not None:
            wait = self._rates.take(principal.name, principal.rate)
            if wait is not None:
                raise TooManyRequests(
                    f"{principal.describe()} is over its rate of {principal.rate:g} requests "
                    f"a second (--rate)", RateLimits.retry_after(wait))
