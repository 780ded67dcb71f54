"""Completion webhooks: signed as Standard Webhooks v1 prescribes, delivered at least once.

    engine --JobFinished--> Notifier (a thread of its own, with its own event loop)
        POST {"type": "job.done|job.failed|job.cancelled", "timestamp", "data": document}
        headers webhook-id (the same on every attempt), webhook-timestamp, webhook-signature
        2xx: delivered    410: failed, at once    anything else: again after 5 s, 5 min,
        30 min, 2 h, 5 h, 10 h and 10 h (with jitter; Retry-After honoured), then failed
    each outcome --Engine.note_delivery--> the job's status document ("notifications")

An attempt is judged by the receiver's status line: its headers are read, then at most
``ANSWER_BYTES`` of its body for at most ``ANSWER_SECONDS`` (so that a short answer leaves
the connection reusable), and the connection is closed. A receiver that streams an endless
body costs a few kilobytes and a second, and its 2xx counts.

A delivery's state lives in the job's status document (``pending`` with ``next_attempt_at``),
so pending deliveries survive a restart: at start, and every ``SCAN`` seconds, the index
names the finished jobs that still have one (also those of ``imgserver run``, which
delivers nothing itself); an attempt whose time has passed is made at once. Deliveries run
as tasks on the notifier's loop, each with its own 10 s limit: a slow or dead receiver
delays neither the engine, the HTTP API, nor other receivers.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import functools
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from typing import Any

import httpx2

from imgserver.jobs.engine import Engine
from imgserver.jobs.events import Event, JobFinished
from imgserver.jobs.job import DELIVERED, PENDING, Notification, timestamp
from imgserver.urls import redacted

logger = logging.getLogger("imgserver.webhooks")

#: Seconds to wait before each retry after a failed attempt.
RETRIES = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
#: Seconds one attempt may take.
TIMEOUT = 10.0
#: The finished jobs with a pending delivery are looked up this often (seconds).
SCAN = 30.0
#: Deliveries in flight at once.
CONCURRENCY = 100
#: Of a receiver's answer, at most this many bytes of body are read, for at most this long:
#: its status says everything, and a hostile receiver must cost next to nothing.
ANSWER_BYTES = 4096
ANSWER_SECONDS = 1.0
FAILED = "failed"


def sign(key: bytes, message_id: str, moment: int, body: bytes) -> str:
    """The ``webhook-signature`` header of ``body``: ``v1,`` + base64 HMAC-SHA256 of
    ``id.timestamp.body``."""
    digest = hmac.new(key, f"{message_id}.{moment}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def message_id(job_id: str, index: int) -> str:
    """The ``webhook-id`` of a job's notification ``index``: the same on every attempt."""
    return "msg_" + uuid.uuid5(uuid.NAMESPACE_URL, f"imgserver:{job_id}/{index}").hex


def retry_delay(attempts: int, retry_after: float | None = None,
                retries: tuple[float, ...] = RETRIES) -> float | None:
    """Seconds to wait after ``attempts`` failed attempts, or None when none is left: the
    schedule's step with +-10 % jitter, or what the receiver asked for with Retry-After
    (at least 1 s, at most the schedule's longest step)."""
    if attempts > len(retries):
        return None
    if retry_after is not None:
        return min(max(retry_after, 1.0), retries[-1])
    return retries[attempts - 1] * random.uniform(0.9, 1.1)


def payload(document: dict[str, Any]) -> bytes:
    """The body sent for a final status document (the same bytes on every attempt)."""
    data = {**document, "notifications": [Notification(entry["url"]).to_document()
                                          for entry in document.get("notifications", [])]}
    return json.dumps({"type": f"job.{document['state']}", "timestamp": document["finished_at"],
                       "data": data}, separators=(",", ":")).encode()


class Notifier:
    """Delivers the completion webhooks of finished jobs, on a thread of its own."""

    def __init__(self, engine: Engine, *, clock: Callable[[], float] = time.time,
                 retries: tuple[float, ...] = RETRIES) -> None:
        if engine.settings.notify_secret is None:
            raise ValueError("webhooks need a secret (IMGSERVER_NOTIFY_SECRET)")
        self.engine = engine
        self._key = engine.settings.notify_secret
        self._clock = clock
        self._retries = retries
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="imgserver-webhooks",
                                        daemon=True)
        self._tasks: dict[tuple[str, int], asyncio.Task] = {}
        self._stopping: asyncio.Event | None = None
        self._client: httpx2.AsyncClient | None = None
        self._limit: asyncio.Semaphore | None = None
        self.on_result: Callable[[str], None] = lambda result: None  # counted by /metrics
        engine.subscribe(self._on_event)

    def start(self) -> None:
        """Start delivering (pending deliveries from before are found at once)."""
        self._thread.start()

    def stop(self) -> None:
        """Stop; deliveries not made stay pending in the status documents."""
        if self._stopping is not None:
            self._loop.call_soon_threadsafe(self._stopping.set)
        if self._thread.is_alive():
            self._thread.join()

    def _on_event(self, event: Event) -> None:
        # The engine's thread: hand the job to the notifier's loop, never wait.
        if (isinstance(event, JobFinished) and event.document.get("notifications")
                and self._thread.is_alive() and not self._loop.is_closed()):
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(self._schedule, event.job_id, event.document)

    # -- the notifier's loop ----------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            self._loop.close()

    async def _main(self) -> None:
        self._stopping = asyncio.Event()
        self._limit = asyncio.Semaphore(CONCURRENCY)
        async with httpx2.AsyncClient(timeout=TIMEOUT, follow_redirects=False) as client:
            self._client = client
            while not self._stopping.is_set():
                try:
                    await self._scan()
                except Exception:  # a failed scan is tried again at the next one
                    logger.exception("cannot look up pending webhooks")
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), SCAN)
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)

    async def _scan(self) -> None:
        """Schedule the pending deliveries of finished jobs not scheduled yet."""
        for job_id in await asyncio.to_thread(self.engine.outbox.index.notify_pending):
            if any(key[0] == job_id for key in self._tasks):
                continue
            document = await asyncio.to_thread(self.engine.outbox.read_status, job_id)
            if document is not None:
                self._schedule(job_id, document)

    def _schedule(self, job_id: str, document: dict[str, Any]) -> None:
        for index, entry in enumerate(document.get("notifications", [])):
            key = (job_id, index)
            if entry.get("state") != PENDING or key in self._tasks:
                continue
            task = self._loop.create_task(self._deliver(job_id, index, document))
            self._tasks[key] = task
            task.add_done_callback(functools.partial(self._forget, key))

    def _forget(self, key: tuple[str, int], task: asyncio.Task) -> None:
        self._tasks.pop(key, None)

    async def _deliver(self, job_id: str, index: int, document: dict[str, Any]) -> None:
        """Attempt one notification until it is delivered or fails for good."""
        notification = Notification(**document["notifications"][index])
        # Posted once the job's final status file is on disk: a receiver may read it.
        await asyncio.to_thread(self.engine.written, job_id)
        url = await asyncio.to_thread(self._target, job_id, notification.url)
        body = payload(document)
        identifier = message_id(job_id, index)
        while notification.state == PENDING:
            if notification.next_attempt_at:
                due = datetime.fromisoformat(notification.next_attempt_at).timestamp()
                await asyncio.sleep(max(0.0, due - self._clock()))
            assert self._limit is not None
            async with self._limit:
                outcome, retry_after = await self._attempt(url, identifier, body)
            notification.attempts += 1
            notification.last_error = None if outcome is None else outcome
            delay = (None if outcome is None or outcome.startswith("HTTP 410")
                     else retry_delay(notification.attempts, retry_after, self._retries))
            if outcome is None:
                notification.state, notification.next_attempt_at = DELIVERED, None
                result = "delivered"
            elif delay is None:
                notification.state, notification.next_attempt_at = FAILED, None
                result = "failed"
                logger.warning("webhook of job %s to %s failed for good: %s", job_id,
                               notification.url, outcome)
            else:
                notification.next_attempt_at = timestamp(
                    datetime.fromtimestamp(self._clock(), timezone.utc) + timedelta(seconds=delay))
                result = "retried"
                logger.info("webhook of job %s to %s: %s; again at %s", job_id,
                            notification.url, outcome, notification.next_attempt_at)
            self.on_result(result)
            await asyncio.to_thread(self.engine.note_delivery, job_id, index,
                                    Notification(**notification.to_document()))

    async def _attempt(self, url: str, identifier: str, body: bytes
                       ) -> tuple[str | None, float | None]:
        """POST once; None if delivered, else what went wrong (and Retry-After, seconds)."""
        moment = int(self._clock())
        headers = {"content-type": "application/json", "user-agent": "imgserver",
                   "webhook-id": identifier, "webhook-timestamp": str(moment),
                   "webhook-signature": sign(self._key, identifier, moment, body)}
        try:
            # The client's timeout is per step (connect, each read); the whole attempt has
            # its own, or a receiver that drips its headers would hold a slot for ever.
            status, phrase, retry_after = await asyncio.wait_for(
                self._exchange(url, body, headers), TIMEOUT)
        except (httpx2.TimeoutException, asyncio.TimeoutError):
            return f"no answer within {TIMEOUT:g} s", None
        except httpx2.HTTPError as exc:
            return f"cannot connect: {exc or type(exc).__name__}", None
        if 200 <= status < 300:
            return None, None
        reason = f"HTTP {status} {phrase}".strip()
        return reason, _retry_after(retry_after, self._clock())

    async def _exchange(self, url: str, body: bytes, headers: dict[str, str]
                        ) -> tuple[int, str, str | None]:
        """POST ``body``; the answer's status, reason phrase and Retry-After, read from its
        head. Of its body, at most ANSWER_BYTES are read, within ANSWER_SECONDS."""
        assert self._client is not None
        async with self._client.stream("POST", url, content=body, headers=headers) as response:
            answer = (response.status_code, response.reason_phrase,
                      response.headers.get("retry-after"))
            with contextlib.suppress(httpx2.HTTPError, asyncio.TimeoutError):
                await asyncio.wait_for(_skim(response), ANSWER_SECONDS)
        return answer  # leaving the block closes the connection if the body was not all read

    def _target(self, job_id: str, shown: str) -> str:
        """The URL to post to: the configured or requested one whose redacted form is
        ``shown`` (documents keep URLs without credentials)."""
        candidates = [self.engine.settings.notify_url]
        with contextlib.suppress(OSError, ValueError, AttributeError):
            candidates.append(json.loads(self.engine.outbox.read_request(job_id)).get("notify"))
        for candidate in candidates:
            if isinstance(candidate, str) and redacted(candidate) == shown:
                return candidate
        return shown


async def _skim(response: httpx2.Response) -> None:
    """Read at most ANSWER_BYTES of the body, as it comes (raw: nothing is decompressed)."""
    read = 0
    async for chunk in response.aiter_raw():
        read += len(chunk)
        if read >= ANSWER_BYTES:
            return


def _retry_after(value: str | None, now: float) -> float | None:
    """Seconds a Retry-After header asks for (a number or an HTTP date), or None."""
    if not value:
        return None
    if value.strip().isdigit():
        return float(value.strip())
    with contextlib.suppress(TypeError, ValueError):
        return email.utils.parsedate_to_datetime(value).timestamp() - now
    return None
