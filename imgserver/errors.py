"""The exceptions imgserver raises.

Each layer raises one of these; only the edges (the HTTP API, the drop folder, the command
line) turn them into status codes, status-file errors or exit codes.

    ImgserverError
     +-- RequestError      the request is invalid; nothing was read or written
     +-- ImageError        one image failed; the rest of its job goes on
     +-- CapacityError     the queue is full; try again later
     +-- JobNotFound       no job has that id
     +-- JobConflict       the job is not in a state that allows it (cancel a finished job)
     +-- AccessDenied      the request's token does not allow it
     |    +-- Unauthorized     no token, or one the server does not know
     |    +-- Forbidden        the token lacks the scope the request needs
     |    +-- TooManyRequests  the token's rate or its quota of queued images is used up
     +-- ConfigError       the server cannot start with these settings
     +-- ServerUnavailable a client cannot reach the server, or is refused (not for content)

    concurrent.futures.BrokenExecutor
     +-- LostWork          an executor dropped a task through no fault of its image
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor
from dataclasses import dataclass


class ImgserverError(Exception):
    """Base class of every error imgserver raises on purpose."""


@dataclass(frozen=True)
class Problem:
    """One reason a request is invalid: the field it concerns and what is wrong."""

    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


class RequestError(ImgserverError):
    """The request is invalid; ``problems`` lists every field at fault."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(str(p) for p in self.problems))

    @classmethod
    def single(cls, field: str, message: str) -> RequestError:
        """A request error with one problem."""
        return cls([Problem(field, message)])


class ImageError(ImgserverError):
    """One image failed; the message says why, in words for the user."""


class CapacityError(ImgserverError):
    """The queue cannot take the request now; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class JobNotFound(ImgserverError):
    """No job with the given id exists."""


class JobConflict(ImgserverError):
    """The job's state does not allow what was asked; ``document`` is its status."""

    def __init__(self, message: str, document: dict) -> None:
        super().__init__(message)
        self.document = document


class AccessDenied(ImgserverError):
    """The request's token does not allow what it asks; the message says why (never the
    secret)."""


class Unauthorized(AccessDenied):
    """No token, or a token the server does not know."""


class Forbidden(AccessDenied):
    """The token lacks ``scope``."""

    def __init__(self, message: str, scope: str) -> None:
        super().__init__(message)
        self.scope = scope


class TooManyRequests(AccessDenied):
    """The token's rate or quota is used up; ``retry_after`` is a hint in seconds."""

    def __init__(self, message: str, retry_after: int = 1) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ConfigError(ImgserverError):
    """The settings are unusable (a missing folder, a bad value, a missing extra)."""


class ServerUnavailable(ImgserverError):
    """The server cannot be reached, or refuses a client for a reason other than the
    request's content (a token, a full queue after retrying)."""


class LostWork(BrokenExecutor):
    """The executor lost a task, not because of its image (the connection to a cluster's
    scheduler broke): the image is run again, and nothing is held against it."""
