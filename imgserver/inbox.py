"""The drop folder: every complete ``*.json`` file that appears in INBOX becomes a job.

    watchdog observer --events--> queue --> one drop-folder thread --> Engine.submit(claim=)
    periodic rescan (start, missed events, files that waited) ---^

A file is taken only when it is complete: on close-after-write, on a rename into INBOX (the
atomic way to drop: write ``.name.json``, then rename it to ``name.json``), or, for a file
that appeared without being written here (moved in from another folder, hard-linked), once
nobody opened it right after it appeared. A file that is not valid JSON yet is given time
to be finished (``SETTLE`` seconds after its last change) before it is judged invalid.

Taking a file moves it into the outbox as the job's request (one rename-like link), so it is
processed exactly once: a later event for the same name finds nothing. When the queue is
full the file waits in INBOX and is tried again as images finish. Hidden files and files
not ending in ``.json`` are ignored.

Whether a file is valid is decided by the engine, with the very validation HTTP uses: a file
that HTTP would refuse with 422 becomes a failed job at once, with the same message. A file
that cannot be taken for any other reason (it cannot be read, a bug) is tried ``RETRIES``
times, then left alone in INBOX until it changes: nothing is retried in a loop.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileMovedEvent,
    FileOpenedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer

from imgserver.errors import CapacityError, RequestError
from imgserver.jobs.engine import Engine
from imgserver.jobs.events import Event
from imgserver.jobs.outbox import job_name
from imgserver.jobs.request import load_json

logger = logging.getLogger("imgserver.inbox")

#: A file that is not valid JSON is judged only this long after its last change.
SETTLE = 2.0
#: A file that appeared without being opened here (moved in, linked) is taken after this.
GRACE = 0.3
#: INBOX is listed again this often, to catch what no event announced.
RESCAN = 2.0
#: The thread wakes at least this often to look at its timers.
TICK = 0.1
#: A file that could not be taken for an unexpected reason is tried again after this many
#: seconds, at most RETRIES times in all; then not until it changes.
RETRY = 10.0
RETRIES = 3


def is_request_name(name: str) -> bool:
    """Whether a file name is one the drop folder takes (``*.json``, not hidden)."""
    return name.endswith(".json") and not name.startswith(".") and len(name) > len(".json")


class _Events(FileSystemEventHandler):
    """Hands watchdog's events to the drop-folder thread."""

    def __init__(self, events: queue.SimpleQueue) -> None:
        self.events = events

    def on_any_event(self, event: FileSystemEvent) -> None:
        self.events.put(event)


class DropFolder:
    """Watches INBOX and submits each complete request file to the engine, once."""

    def __init__(self, engine: Engine, inbox: Path) -> None:
        self.engine = engine
        self.inbox = inbox
        self._events: queue.SimpleQueue = queue.SimpleQueue()
        self._appeared: dict[Path, float] = {}   # created here, not opened (yet)
        self._writing: set[Path] = set()          # opened right after creation: wait for close
        self._waiting: dict[Path, float] = {}     # try again at this time (still settling)
        self._full = False                        # the queue refused a file: wait for room
        self._ignored: set[Path] = set()          # not regular files, reported once
        self._deferred: set[Path] = set()         # waited for room in the queue
        #: Told what became of each file: "taken", "invalid" or "waiting" (for metrics).
        self.on_result: Callable[[str], None] = lambda result: None
        self._failures: dict[Path, int] = {}      # could not be taken, this many times
        self._given_up: dict[Path, tuple[int, int, int]] = {}  # ... as it was then
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="imgserver-inbox", daemon=True)
        self._observer = Observer()
        engine.subscribe(self._on_engine_event)

    def start(self) -> None:
        """Create INBOX if needed, start watching it, and take what is already there."""
        self.inbox.mkdir(parents=True, exist_ok=True)
        self._observer.schedule(_Events(self._events), str(self.inbox), recursive=False)
        self._observer.start()
        self._thread.start()

    def stop(self) -> None:
        """Stop watching; files not taken stay in INBOX for the next start."""
        self._stop.set()
        self._observer.stop()
        self._observer.join()
        self._thread.join()

    def __enter__(self) -> DropFolder:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()

    # -- the drop-folder thread ---------------------------------------------------------

    def _loop(self) -> None:
        next_scan = 0.0
        while not self._stop.is_set():
            try:
                self._handle(self._events.get(timeout=TICK))
                while True:
                    self._handle(self._events.get_nowait())
            except queue.Empty:
                pass
            moment = time.monotonic()
            if moment >= next_scan:
                self._scan()
                next_scan = moment + RESCAN
            for path, since in list(self._appeared.items()):
                if moment - since >= GRACE:
                    del self._appeared[path]
                    self._take(path)
            for path, at in list(self._waiting.items()):
                if moment >= at:
                    del self._waiting[path]
                    self._take(path)

    def _handle(self, event: FileSystemEvent | object) -> None:
        if not isinstance(event, FileSystemEvent):  # _ROOM: the engine has room again
            if self._full:
                self._full = False
                self._scan()
            return
        if isinstance(event, FileMovedEvent):
            self._forget(Path(os.fsdecode(event.src_path)))
            self._take(Path(os.fsdecode(event.dest_path)))
            return
        path = Path(os.fsdecode(event.src_path))
        if isinstance(event, FileCreatedEvent):
            self._appeared[path] = time.monotonic()
        elif isinstance(event, FileOpenedEvent) and path in self._appeared:
            del self._appeared[path]   # a writer opened it: wait for its close
            self._writing.add(path)
        elif isinstance(event, FileClosedEvent):
            self._forget(path)
            self._take(path)

    def _forget(self, path: Path) -> None:
        self._appeared.pop(path, None)
        self._writing.discard(path)
        self._waiting.pop(path, None)
        self._failures.pop(path, None)
        self._given_up.pop(path, None)

    def _scan(self) -> None:
        """Try every file in INBOX that no timer is watching, oldest first."""
        self._full = False
        try:
            entries = sorted(os.scandir(self.inbox), key=_mtime)
        except OSError as exc:
            logger.error("cannot list the drop folder %s: %s", self.inbox, exc)
            return
        for entry in entries:
            if self._full:
                return  # no room: the rest waits for the engine to free some
            path = Path(entry.path)
            if path in self._appeared or path in self._waiting:
                continue
            if path in self._writing and _age(path) < SETTLE * 5:
                continue  # a writer has it open; its close will announce it
            self._writing.discard(path)
            self._take(path)

    def _take(self, path: Path) -> None:
        """Submit the request file at ``path`` if it is complete; leave it otherwise."""
        try:
            self._try_take(path)
        except Exception as exc:  # one odd file must not stop the drop folder
            self._could_not_take(path, exc)

    def _could_not_take(self, path: Path, exc: Exception) -> None:
        tries = self._failures.get(path, 0) + 1
        self._failures[path] = tries
        # An OSError is the file's or the disk's doing: one line. Anything else is a bug:
        # its traceback, once.
        reason = (exc.strerror or str(exc)) if isinstance(exc, OSError) else repr(exc)
        trace = exc if tries == 1 and not isinstance(exc, OSError) else None
        if tries < RETRIES:
            logger.error("cannot take %s (%s); trying again in %g s", path, reason, RETRY,
                         exc_info=trace)
            self._waiting[path] = time.monotonic() + RETRY
            return
        logger.error("cannot take %s (%s), %d times; it stays in the drop folder, untouched "
                     "until it changes", path, reason, tries, exc_info=trace)
        with contextlib.suppress(OSError):
            self._given_up[path] = _signature(os.lstat(path))

    def _try_take(self, path: Path) -> None:
        if path.parent != self.inbox or not is_request_name(path.name):
            return
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            return  # already taken
        if path in self._given_up:
            if self._given_up[path] == _signature(info):
                return  # tried enough; a change (written again, chmod) earns new tries
            del self._given_up[path]
            self._failures.pop(path, None)
        if not stat.S_ISREG(info.st_mode):
            if path not in self._ignored:
                self._ignored.add(path)
                logger.warning("ignoring %s: not a regular file", path)
            return
        if self.engine.outbox.taken(info):
            os.unlink(path)  # taken by a server stopped before it could remove the name
            return
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        with open(fd, "rb") as file:
            peek = file.read(self.engine.settings.max_body_bytes + 1)
        if not _is_json(peek) and _age(path) < SETTLE:
            self._waiting[path] = time.monotonic() + SETTLE  # perhaps still being written
            return
        try:
            document = self.engine.take(path, name=job_name(path.stem), peek=peek)
        except CapacityError:
            self._full = True  # the file waits in INBOX; the next scan tries it again
            if path not in self._deferred:
                self._deferred.add(path)
                self.on_result("waiting")
            return
        except FileNotFoundError:
            return  # taken between our read and the claim (a second event): nothing to do
        self._forget(path)
        self._deferred.discard(path)
        self.on_result("invalid" if document["state"] == "failed" else "taken")
        logger.info("took %s as job %s (%s)", path.name, document["id"], document["state"])

    def _on_engine_event(self, event: Event) -> None:
        # Room in the queue: files waiting for it may go now. (Runs on the engine thread.)
        if self._full:
            self._events.put(_ROOM)


_ROOM = object()  # a message from the engine: images finished, the queue has room


def _mtime(entry: os.DirEntry) -> float:
    try:
        return entry.stat(follow_symlinks=False).st_mtime
    except OSError:
        return 0.0


def _is_json(body: bytes) -> bool:
    # Read as the request is read, so that no body can fail here in a way it does not there.
    try:
        load_json(body)
    except RequestError:
        return False
    return True


def _signature(info: os.stat_result) -> tuple[int, int, int]:
    """What changes when a file is written, replaced or has its mode changed."""
    return info.st_dev, info.st_ino, info.st_ctime_ns


def _age(path: Path) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return 0.0
