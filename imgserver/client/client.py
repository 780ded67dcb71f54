"""A client of a running server: what ``imgserver submit``, ``jobs`` and ``cancel`` use.

    submit: POST /jobs with an Idempotency-Key (so that a retry after a lost answer or a
            503 never makes a second job), then, to wait, GET /jobs/<id>/events, resumed
            with Last-Event-ID whenever the connection drops
    jobs:   GET /jobs (following the cursors)
    cancel: POST /jobs/<id>/cancel

The server's answers become the engine's own exceptions (RequestError for a 422,
JobNotFound, JobConflict), and a server that cannot be reached, or that refuses for a reason
other than the request's content, ServerUnavailable: the command line turns them into exit
codes.

An ``https://`` server is verified with the system's CA certificates, or with those of the
``cacert`` file instead. A certificate that does not verify is ServerUnavailable at once,
saying why: trying again cannot change a certificate.
"""

from __future__ import annotations

import json
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any
from urllib.parse import quote

import httpx2

from imgserver.errors import (
    ConfigError,
    JobConflict,
    JobNotFound,
    Problem,
    RequestError,
    ServerUnavailable,
)

#: Attempts at a request the server answers 503 (busy) before giving up.
ATTEMPTS = 5
#: Attempts to reach a server that refuses connections (it may be restarting).
CONNECT_ATTEMPTS = 3
#: The longest wait between two attempts (seconds), whatever Retry-After says.
MAX_WAIT = 30.0


def trusted(cacert: str | None) -> ssl.SSLContext | bool:
    """What an ``https://`` server's certificate is verified with: the CA certificates (PEM)
    in the file ``cacert``, or, without one, the system's (True). ConfigError when the file
    cannot be read or holds no certificate."""
    if not cacert:
        return True
    try:
        return ssl.create_default_context(cafile=cacert)
    except ssl.SSLError:
        raise ConfigError(f"--cacert {cacert!r} holds no PEM certificate") from None
    except OSError as exc:
        raise ConfigError(f"cannot read --cacert {cacert!r}: {exc.strerror or exc}") from None


class Client:
    """Talks to the server at ``url``, with ``token`` if it needs one; an ``https://`` server
    must have a certificate signed by a CA in ``cacert`` (a PEM file), or, without it, by
    one the system trusts."""

    def __init__(self, url: str, token: str | None = None, *, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep,
                 cacert: str | None = None) -> None:
        headers = {"authorization": f"Bearer {token}"} if token else {}
        self.url = url.rstrip("/")
        self._http = httpx2.Client(base_url=self.url, headers=headers, timeout=timeout,
                                   verify=trusted(cacert))
        self._sleep = sleep

    def close(self) -> None:
        """Close the connections."""
        self._http.close()

    def submit(self, body: bytes) -> dict[str, Any]:
        """Submit a request; its job's status document."""
        key = {"idempotency-key": uuid.uuid4().hex}  # the same on every attempt: one job
        return self._call("POST", "/jobs", content=body,
                          headers={"content-type": "application/json", **key})

    def jobs(self, *, states: str | None = None, source: str | None = None,
             limit: int = 1000) -> Iterator[dict[str, Any]]:
        """Job summaries, newest first, page after page."""
        params: dict[str, Any] = {"limit": min(limit, 1000)}
        if states:
            params["state"] = states
        if source:
            params["source"] = source
        count = 0
        while True:
            page = self._call("GET", "/jobs", params=params)
            for job in page["jobs"]:
                if count >= limit:
                    return
                count += 1
                yield job
            if page["next"] is None:
                return
            params["cursor"] = page["next"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Cancel a job; its status document (JobConflict if it was finished already)."""
        return self._call("POST", f"/jobs/{_quoted(job_id)}/cancel")

    def follow(self, job_id: str, on_event: Callable[[str, dict[str, Any]], None]
               ) -> dict[str, Any]:
        """Follow a job's events until its end; its final status document.

        ``on_event(name, data)`` sees every event. A dropped connection is resumed where it
        stopped (Last-Event-ID), however often it drops, as long as the server answers.
        """
        last_id: str | None = None
        failures = 0
        while True:
            headers = {"last-event-id": last_id} if last_id else {}
            try:
                with self._http.stream("GET", f"/jobs/{_quoted(job_id)}/events",
                                       headers=headers, timeout=httpx2.Timeout(
                                           30.0, read=60.0)) as response:
                    if response.status_code != 200:
                        response.read()
                        self._raise(response)
                    for event in httpx2.EventSource(response):
                        failures = 0
                        if event.id:
                            last_id = event.id
                        if event.event in ("status", "image", "state", "end"):
                            data = json.loads(event.data)
                            on_event(event.event, data)
                            if event.event == "end":
                                return data
            except (httpx2.TransportError, ServerUnavailable) as exc:
                self._check_certificate(exc)
                failures += 1
                if failures >= ATTEMPTS:
                    raise ServerUnavailable(f"lost the connection to {self.url}: {exc}") from None
                self._sleep(min(2.0 ** (failures - 1), MAX_WAIT))

    def _call(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        """One request, tried again while the server is unreachable or busy (503)."""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                response = self._http.request(method, path, **kwargs)
            except httpx2.TransportError as exc:
                self._check_certificate(exc)
                if attempt >= CONNECT_ATTEMPTS:
                    raise ServerUnavailable(f"cannot reach the server at {self.url}: "
                                            f"{exc or type(exc).__name__}") from None
                self._sleep(min(2.0 ** (attempt - 1), MAX_WAIT))
                continue
            if response.status_code == 503 and attempt < ATTEMPTS:
                self._sleep(_wait(response, attempt))
                continue
            if response.status_code < 300:
                return response.json()
            self._raise(response)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _check_certificate(self, exc: BaseException) -> None:
        """ServerUnavailable, at once, if ``exc`` comes from a certificate that does not
        verify (another CA, another host name, expired): retrying cannot help."""
        cause: BaseException | None = exc
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, ssl.SSLCertVerificationError):
                reason = cause.verify_message or cause.reason or str(cause)
                raise ServerUnavailable(
                    f"the certificate of the server at {self.url} does not verify: {reason} "
                    f"(a certificate of a private CA needs that CA's certificate: --cacert "
                    f"FILE or IMGSERVER_CACERT)") from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__

    def _raise(self, response: httpx2.Response) -> None:
        """The exception for an error answer."""
        try:
            body = response.json()
        except ValueError:
            body = {"detail": response.text[:500]}
        detail = body.get("detail") if isinstance(body, dict) else None
        if response.status_code == 422:
            raise RequestError([Problem(error["field"], error["message"])
                                for error in body.get("errors") or []]
                               or [Problem("request", str(detail))])
        if response.status_code == 404:
            raise JobNotFound(str(detail))
        if response.status_code == 409:
            raise JobConflict(f"job {body.get('id')} is already {body.get('state')}", body)
        if response.status_code == 401:
            raise ServerUnavailable(f"the server at {self.url} refused the token (set "
                                    f"IMGSERVER_TOKEN): {detail}")
        raise ServerUnavailable(f"the server at {self.url} answered {response.status_code}: "
                                f"{detail or response.reason_phrase}")


def _wait(response: httpx2.Response, attempt: int) -> float:
    """Seconds to wait before trying again after a 503."""
    header = response.headers.get("retry-after", "")
    seconds = float(header) if header.isdigit() else 2.0 ** attempt
    return min(max(seconds, 0.5), MAX_WAIT)


def _quoted(job_id: str) -> str:
    return quote(job_id, safe="")
