"""A principal: what one request may do and see, by the token it came with.

    scopes   submit (POST /jobs), read (listing, status, events, files, the page),
             cancel, admin (everything, every folder)
    folder   the token's root: its paths are resolved and confined there, and it sees only
             the jobs of its folder (any other job is, to it, not there at all)
    limits   requests a second (``rate``), images accepted and unfinished (``max_queued``)

A job's owner (``imgserver.jobs.job.Owner``) is what the engine keeps of the principal
that submitted it: a name for fair share and quotas, and the folder its paths are relative
to.
"""

from __future__ import annotations

from dataclasses import dataclass

from imgserver.access.tokens import SCOPES, Token
from imgserver.jobs.job import Owner


@dataclass(frozen=True)
class Principal:
    """What a request may do and see."""

    name: str | None                  # the token's name; None: no token was needed
    scopes: frozenset[str]
    folder: str | None = None         # relative to ROOT; None: the whole root
    rate: float | None = None
    max_queued: int | None = None

    @classmethod
    def of(cls, token: Token) -> Principal:
        """The principal ``token`` stands for."""
        return cls(token.name, frozenset(token.scopes), token.folder, token.rate,
                   token.max_queued)

    @classmethod
    def everyone(cls, name: str | None = None) -> Principal:
        """Every scope over the whole root (no tokens configured, or IMGSERVER_TOKEN)."""
        return cls(name, frozenset(SCOPES))

    def may(self, scope: str) -> bool:
        """Whether the principal has ``scope`` (``admin`` has all)."""
        return scope in self.scopes or "admin" in self.scopes

    def sees(self, folder: str) -> bool:
        """Whether a job of ``folder`` ("": ROOT) exists for this principal."""
        return self.folder is None or "admin" in self.scopes or folder == self.folder

    @property
    def view(self) -> str | None:
        """The one folder whose jobs it sees, or None when it sees every job."""
        return None if self.folder is None or "admin" in self.scopes else self.folder

    @property
    def owner(self) -> Owner:
        """What a job it submits keeps of it (IMGSERVER_TOKEN's jobs, as those of no token,
        are nobody's in particular)."""
        name = "" if self.name in (None, "IMGSERVER_TOKEN") else self.name
        return Owner(name or "", self.folder or "", self.max_queued)

    def describe(self) -> str:
        """The principal, for a log line: its token's name, never a secret."""
        return f"token {self.name!r}" if self.name else "no token"
