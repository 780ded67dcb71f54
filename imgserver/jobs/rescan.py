"""Rescan: the index of jobs rebuilt from the files in the outbox.

    outbox folder --ids--> missing from the index --read (READERS threads, in order)-->
        final:     a row in the index (in bulk, without its indexes, when many)
        not final: ``unfinished(id)`` (the engine queues it again), unless a live process
                   holds its request's lock

A new or damaged index needs it (``Index.needs_scan``); the engine runs ``rebuild`` in a
thread of its own at start, and listing jobs waits for it.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, TypeVar

from imgserver.jobs.index import BATCH
from imgserver.jobs.job import FINAL_STATES, summary
from imgserver.jobs.outbox import (
    OWNER_SUFFIX,
    REQUEST_SUFFIX,
    STATUS_SUFFIX,
    Outbox,
    locked,
    valid_id,
)

logger = logging.getLogger("imgserver.jobs.outbox")

#: How a status file (indented JSON) introduces its images, after every other key.
_IMAGES_KEY = b',\n  "images": ['
#: The bytes of a status file read first for its summary (a few hundred are enough).
_HEAD = 4096
#: A scan adding at least this many rows, and more than the index has, loads them in bulk.
BULK_SCAN = 5000
#: Threads reading status files for a scan, besides the one writing their rows.
READERS = 2
T = TypeVar("T")
R = TypeVar("R")
#: A status file read for its summary: the summary and its JSON text, or None (unreadable).
_Read = tuple[dict[str, Any], str | None] | None


def scan(outbox: Outbox, unfinished: Callable[[str], None],
         stopping: Callable[[], bool] = lambda: False) -> int:
    """Give every job on disk without a row in the index its row; call ``unfinished(id)``
    for each of those not final. How many rows were added.

    Stops early when ``stopping()`` says so; the index then stays marked incomplete and
    the next start scans again.

    The jobs are read in the order of their ids, so that each batch of rows extends the
    index's table at its end. Many rows for an index that has few (a new one, or one
    rebuilt) go in without the indexes over the table, made once at the end
    (``Index.bulk``).
    """
    known = outbox.index.ids()
    on_disk, owned = _ids_on_disk(outbox)
    missing = sorted(on_disk - known)
    bulk = len(missing) >= max(BULK_SCAN, len(known))
    del known
    added = 0
    with contextlib.ExitStack() as stack:
        folder = os.open(outbox.path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        stack.callback(os.close, folder)
        if bulk:
            stack.enter_context(outbox.index.bulk())
        batches = (missing[start:start + BATCH] for start in range(0, len(missing), BATCH))

        def read(ids: list[str]) -> list[tuple[_Read, str]]:
            return [(_read_summary(job_id + STATUS_SUFFIX, folder),
                     _folder_of(outbox, job_id) if job_id in owned else "")
                    for job_id in ids]

        read_batches: Generator[tuple[list[str], list[tuple[_Read, str]]], None, None]
        if READERS:
            pool = stack.enter_context(ThreadPoolExecutor(
                READERS, thread_name_prefix="imgserver-index-read"))
            read_batches = _ahead(pool, read, batches, READERS + 1)
        else:
            read_batches = ((ids, read(ids)) for ids in batches)
        stack.callback(read_batches.close)  # a scan stopped early reads no further
        for ids, documents in read_batches:
            if stopping():
                return added
            found: list[tuple[dict[str, Any], str | None, str]] = []
            for job_id, (read_back, owner_folder) in zip(ids, documents, strict=True):
                document, text = read_back or ({}, None)
                if document.get("state") not in FINAL_STATES:
                    request = outbox.request_path(job_id)
                    if request.exists() and not locked(request):
                        unfinished(job_id)
                    continue
                if _indexable(document):
                    if document.get("id") != job_id:  # the file's name says
                        document["id"], text = job_id, None
                    found.append((document, text, owner_folder))
            outbox.index.add(found)
            added += len(found)
    outbox.index.scanned()
    return added


def rebuild(outbox: Outbox, unfinished: Callable[[str], None],
            stopping: Callable[[], bool]) -> None:
    """``scan``, logged (a thread of its own at start, when the index needs it): a
    failure leaves listing unavailable until the next start tries again."""
    started = time.monotonic()
    logger.info("building the job index from the files in %s", outbox.path)
    try:
        added = scan(outbox, unfinished, stopping)
    except Exception:
        logger.exception("cannot build the job index; listing jobs stays unavailable")
        return
    if not outbox.index.needs_scan:
        logger.info("job index built: %d jobs added in %.1f s", added,
                    time.monotonic() - started)

def _ids_on_disk(outbox: Outbox) -> tuple[set[str], set[str]]:
    """The id of every job with a request or status file; and those kept with an
    owner."""
    ids: set[str] = set()
    owned: set[str] = set()
    with os.scandir(outbox.path) as entries:
        for entry in entries:
            name = entry.name
            if name.endswith(STATUS_SUFFIX):
                ids.add(name[:-len(STATUS_SUFFIX)])
            elif name.endswith(REQUEST_SUFFIX):
                ids.add(name[:-len(REQUEST_SUFFIX)])
            elif name.endswith(OWNER_SUFFIX):
                owned.add(name[:-len(OWNER_SUFFIX)])
    return {job_id for job_id in ids if valid_id(job_id)}, owned

def _folder_of(outbox: Outbox, job_id: str) -> str:
    """The folder of a job kept with an owner; a job whose owner cannot be read is
    listed under a folder nobody has ("?"), never the root."""
    try:
        return outbox.read_owner(job_id).folder
    except OSError:
        return "?"


def _read_summary(name: str, folder: int) -> _Read:
    """The status document in the file ``name`` (relative to the open folder ``folder``)
    without its images, and its JSON text when that was at hand; None if the file cannot be
    read or holds no document.

    Only the file's head is read and parsed when the images' key is in it: the status files
    written here have the images last, and the summary before them in a few hundred bytes.
    """
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return None
    try:
        data = os.read(fd, _HEAD)
        cut = data.find(_IMAGES_KEY)
        if cut < 0:  # a long summary, or a file written otherwise: all of it
            chunks = [data]
            while chunk := os.read(fd, 1 << 20):
                chunks.append(chunk)
            data = b"".join(chunks)
            cut = data.find(_IMAGES_KEY)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Decoded here: json.loads is twice as slow on bytes (it guesses their encoding).
    with contextlib.suppress(ValueError):
        if cut > 0:
            with contextlib.suppress(ValueError):
                text = data[:cut].decode() + "}"
                head = json.loads(text)
                if isinstance(head, dict):
                    return head, text
        document = json.loads(data.decode())
        if isinstance(document, dict):
            return summary(document), None
    return None


def _ahead(pool: ThreadPoolExecutor, work: Callable[[T], R], items: Iterable[T],
           ahead: int) -> Generator[tuple[T, R], None, None]:
    """``(item, work(item))`` for each of ``items`` in order, ``work`` done on ``pool`` for
    at most ``ahead`` items ahead of the one given."""
    pending: collections.deque[tuple[T, Future[R]]] = collections.deque()
    try:
        for item in items:
            pending.append((item, pool.submit(work, item)))
            if len(pending) > ahead:
                first, future = pending.popleft()
                yield first, future.result()
        while pending:
            first, future = pending.popleft()
            yield first, future.result()
    finally:
        for _, future in pending:
            future.cancel()


def _indexable(document: dict[str, Any]) -> bool:
    return all(isinstance(document.get(key), str) for key in ("created_at", "state", "source"))
