"""The job index: one SQLite file beside the status files, so that listing jobs and starting
the server cost the same with ten jobs in the outbox or a million.

    OUTBOX/<id>.request.json, <id>.status.json    the record: always written first
    OUTBOX/.jobs.sqlite3                            one row per job: state, source, times,
                                                    folder (its owner's, "" for the root) and
                                                    its summary (the document without images)

The files stay the record; the index is derived from them and can be rebuilt from them at
any time (``imgserver.jobs.rescan``). A job's row is written before its request file
exists, and again after every write of its status file, so after a crash (``kill -9``) every
job on disk has a row, and a row that is not final is checked against its files at start.
The database runs in WAL mode with ``synchronous=NORMAL``: a commit survives the death of
the process, not necessarily a power cut; after an unclean stop on a machine that has since
rebooted, the outbox is scanned for jobs the index lost (``needs_scan``).
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from imgserver.errors import RequestError

FILENAME = ".jobs.sqlite3"
#: Bump when the schema changes: an index of another version is rebuilt.
VERSION = "3"
#: The rows written in one transaction while scanning the outbox.
BATCH = 2000

_TABLES = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at TEXT NOT NULL,
    state TEXT NOT NULL,
    source TEXT NOT NULL,
    finished_at TEXT,
    notify INTEGER NOT NULL DEFAULT 0,
    summary TEXT NOT NULL,
    folder TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
#: The indexes over the jobs, by name. A scan that adds many rows drops them and makes them
#: again at its end (``Index.bulk``): sorting every row once is far cheaper than keeping
#: five indexes in order row by row, in an order that is random to each of them.
INDEXES = {
    "jobs_newest": "ON jobs (created_at, id)",
    "jobs_state": "ON jobs (state, created_at, id)",
    "jobs_source": "ON jobs (source, state, created_at, id)",
    "jobs_finished": "ON jobs (finished_at) WHERE finished_at IS NOT NULL",
    "jobs_notify": "ON jobs (notify) WHERE notify = 1",
    "jobs_folder": "ON jobs (folder, created_at, id)",
}
_SCHEMA = _TABLES + "".join(f"CREATE INDEX IF NOT EXISTS {name} {definition};\n"
                            for name, definition in INDEXES.items())


class IndexDamaged(Exception):
    """The index file cannot be used; it is replaced and rebuilt from the files."""


class IndexUnavailable(OSError):
    """The index cannot be read or written (a full disk, a lost folder): a storage error
    like any other, for the callers that handle those."""


class Index:
    """The SQLite index of one outbox; safe to use from several threads and processes."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / FILENAME
        self._lock = threading.RLock()  # opening on first use happens inside a use
        self._db: sqlite3.Connection | None = None
        #: Whether the outbox must be scanned for jobs without a row (a new or rebuilt
        #: index, or one that may have lost commits in a power cut).
        self.needs_scan = False

    def open(self) -> None:
        """Open the index, creating it, or replacing a damaged one, as needed.

        Any use opens it too: a process that never stores a job never creates it.
        """
        if self._db is not None:
            return
        try:
            self._open()
        except (sqlite3.DatabaseError, IndexDamaged, IndexUnavailable) as exc:
            if isinstance(exc, IndexUnavailable) and not _damaged(exc):
                self._forget()
                raise  # no room, no permission: not the file's fault
            self._forget()
            self._discard()
            self._open()
            self.needs_scan = True

    def _open(self) -> None:
        with _unavailable():
            self._connect()

    def _connect(self) -> None:
        _check_length(self.path)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE below).
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None,
                             check_same_thread=False)
        self._db = db
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.executescript(_SCHEMA)
        with self._transaction() as cursor:
            version = self._meta(cursor, "version")
            if version is None:  # a new file
                cursor.execute("DELETE FROM jobs")
                self._set_meta(cursor, "version", VERSION)
                self._set_meta(cursor, "complete", "0")
            elif version != VERSION:
                raise IndexDamaged(f"index version {version}, expected {VERSION}")
            complete = self._meta(cursor, "complete") == "1"
            clean = self._meta(cursor, "clean") != "0"
            boot = self._meta(cursor, "boot")
            self.needs_scan = not complete or (not clean and boot != _boot_id())
            self._set_meta(cursor, "clean", "0")
            self._set_meta(cursor, "boot", _boot_id())

    def _forget(self) -> None:
        if self._db is not None:
            with contextlib.suppress(sqlite3.Error):
                self._db.close()
            self._db = None

    def _discard(self) -> None:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(str(self.path) + suffix)

    def close(self) -> None:
        """Close the index; after a clean close no scan is needed at the next start."""
        if self._db is None:
            return
        with contextlib.suppress(OSError), self._transaction() as cursor:
            self._set_meta(cursor, "clean", "1")
        with contextlib.suppress(sqlite3.Error):
            self._db.close()
        self._db = None

    def scanned(self) -> None:
        """Record that every job on disk has a row (the scan of the outbox is complete)."""
        with self._transaction() as cursor:
            self._set_meta(cursor, "complete", "1")
        self.needs_scan = False

    # -- writing ------------------------------------------------------------------------

    def reserve(self, job_id: str, source: str, created_at: str, folder: str = "") -> bool:
        """Claim ``job_id`` for a new job of ``folder``; False if a row has it already."""
        try:
            with self._transaction() as cursor:
                cursor.execute("INSERT INTO jobs VALUES (?, ?, 'queued', ?, NULL, 0, ?, ?)",
                               (job_id, created_at, source, json.dumps({
                                   "id": job_id, "state": "queued", "source": source,
                                   "created_at": created_at}), folder))
        except sqlite3.IntegrityError:
            return False
        return True

    def put(self, summary: dict[str, Any], folder: str = "") -> None:
        """Write the row of the job ``summary`` describes (a status document without images).
        A job's folder is set when its row is made (``folder``) and never changed after."""
        with self._transaction() as cursor:
            cursor.execute("INSERT INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(id) "
                           "DO UPDATE SET created_at = excluded.created_at, state = "
                           "excluded.state, source = excluded.source, finished_at = "
                           "excluded.finished_at, notify = excluded.notify, summary = "
                           "excluded.summary", _row(summary, folder=folder))

    def add(self, summaries: Iterable[tuple[dict[str, Any], str | None, str]]) -> None:
        """Write rows for jobs that have none (a scan: a row written meanwhile is newer).

        Each job comes as its summary, that summary as JSON text when at hand (the head of
        its status file, which then need not be encoded again), and its folder.
        """
        rows = [_row(summary, text, folder) for summary, text, folder in summaries]
        with self._transaction() as cursor:
            cursor.executemany("INSERT OR IGNORE INTO jobs VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                               rows)

    @contextlib.contextmanager
    def bulk(self) -> Iterator[None]:
        """For adding many rows (``add``) to an index that has few: the indexes over the
        jobs are dropped meanwhile and made again at the end, also when the adding fails or
        stops early. Meanwhile every query still answers, by reading the whole table.

        A process killed in between leaves them missing; the next ``open`` makes them.
        """
        with self._transaction() as cursor:
            for name in INDEXES:
                cursor.execute(f"DROP INDEX IF EXISTS {name}")
        try:
            yield
        finally:
            for name, definition in INDEXES.items():  # one at a time: writers wait less
                with self._transaction() as cursor:
                    cursor.execute(f"CREATE INDEX IF NOT EXISTS {name} {definition}")

    def remove(self, job_ids: Sequence[str]) -> None:
        """Delete the rows of ``job_ids``."""
        with self._transaction() as cursor:
            cursor.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in job_ids])

    # -- reading ------------------------------------------------------------------------

    def ids(self) -> set[str]:
        """Every job id that has a row."""
        return {job_id for (job_id,) in self._query("SELECT id FROM jobs", ())}

    def unfinished(self) -> list[str]:
        """Ids of jobs whose row is not final, oldest first."""
        return [job_id for (job_id,) in self._query(
            "SELECT id FROM jobs WHERE state IN ('queued', 'running') "
            "ORDER BY created_at, id", ())]

    def expired(self, cutoff: str, limit: int) -> list[str]:
        """Ids of jobs finished at or before ``cutoff`` (ISO-8601), at most ``limit``; not
        those with a webhook still to deliver (their status file holds its progress)."""
        return [job_id for (job_id,) in self._query(
            "SELECT id FROM jobs WHERE finished_at IS NOT NULL AND finished_at <= ? "
            "AND notify = 0 ORDER BY finished_at LIMIT ?", (cutoff, limit))]

    def finished_since(self, moment: str, limit: int, folder: str | None = None
                       ) -> list[dict[str, Any]]:
        """Summaries of the jobs (of ``folder`` only, unless None) finished at or after
        ``moment`` (ISO-8601), newest first, at most ``limit``."""
        only = "" if folder is None else " AND folder = ?"
        values = (moment, limit) if folder is None else (moment, folder, limit)
        return [json.loads(summary) for (summary,) in self._query(
            f"SELECT summary FROM jobs WHERE finished_at >= ?{only} ORDER BY finished_at "
            f"DESC LIMIT ?", values)]

    def notify_pending(self) -> list[str]:
        """Ids of finished jobs with a webhook still to deliver."""
        return [job_id for (job_id,) in self._query("SELECT id FROM jobs WHERE notify = 1", ())]

    def page(self, *, states: Sequence[str] = (), source: str | None = None, limit: int = 50,
             cursor: str | None = None, folder: str | None = None
             ) -> tuple[list[dict[str, Any]], str | None]:
        """Summaries of jobs newest first (by ``created_at``, then id), filtered by state,
        source and folder, and the cursor of the next page (None on the last page)."""
        after = decode_cursor(cursor) if cursor else None
        # One query per state, each walking its own index in order, merged here: an index on
        # (state, created_at) cannot give several states in order in one query.
        rows: list[tuple[str, str, str]] = []
        for state in states or (None,):
            rows += self._newest(state, source, folder, after, limit + 1)
        rows.sort(key=lambda row: (row[0], row[1]), reverse=True)
        rows = rows[:limit + 1]
        more = len(rows) > limit
        rows = rows[:limit]
        summaries = [json.loads(summary) for _, _, summary in rows]
        return summaries, encode_cursor(rows[-1][0], rows[-1][1]) if more else None

    def _newest(self, state: str | None, source: str | None, folder: str | None,
                after: tuple[str, str] | None, limit: int) -> list[tuple[str, str, str]]:
        conditions, values = [], []
        if folder is not None:
            conditions.append("folder = ?")
            values.append(folder)
        if state is not None:
            conditions.append("state = ?")
            values.append(state)
        if source is not None:
            conditions.append("source = ?")
            values.append(source)
        if after is not None:
            conditions.append("(created_at, id) < (?, ?)")
            values += list(after)
        where = f"WHERE {' AND '.join(conditions)}" if conditions else ""
        return self._query(f"SELECT created_at, id, summary FROM jobs {where} "
                           f"ORDER BY created_at DESC, id DESC LIMIT ?", (*values, limit))

    # -- plumbing -----------------------------------------------------------------------

    def _query(self, sql: str, values: Sequence[Any]) -> list[Any]:
        with self._lock, _unavailable():
            return self._connection().execute(sql, values).fetchall()

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Cursor]:
        with self._lock, _unavailable():
            cursor = self._connection().cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield cursor
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    cursor.execute("ROLLBACK")
                raise
            cursor.execute("COMMIT")

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            self.open()
        assert self._db is not None
        return self._db

    @staticmethod
    def _meta(cursor: sqlite3.Cursor, key: str) -> str | None:
        row = cursor.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @staticmethod
    def _set_meta(cursor: sqlite3.Cursor, key: str, value: str) -> None:
        cursor.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))


@contextlib.contextmanager
def _unavailable() -> Iterator[None]:
    """sqlite3's errors as IndexUnavailable, except a duplicate id (the caller's to handle)."""
    try:
        yield
    except (sqlite3.IntegrityError, sqlite3.ProgrammingError):
        raise
    except sqlite3.Error as exc:
        raise IndexUnavailable(f"the job index {FILENAME}: {exc}") from exc


def _row(summary: dict[str, Any], text: str | None = None, folder: str = ""
         ) -> tuple[str, str, str, str, str | None, int, str, str]:
    final = summary["state"] in _FINAL
    notify = final and any(entry.get("state") == "pending"
                           for entry in summary.get("notifications") or ())
    return (summary["id"], summary["created_at"], summary["state"], summary["source"],
            summary.get("finished_at") if final else None, int(notify),
            json.dumps(summary) if text is None else text, folder)


_FINAL = ("done", "failed", "cancelled")


def encode_cursor(created_at: str, job_id: str) -> str:
    """An opaque cursor for the page after the job (``created_at``, ``job_id``)."""
    return base64.urlsafe_b64encode(json.dumps([created_at, job_id]).encode()).decode()


def decode_cursor(cursor: str) -> tuple[str, str]:
    """The position a cursor stands for; RequestError naming ``cursor`` if it is not one."""
    try:
        created_at, job_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        if isinstance(created_at, str) and isinstance(job_id, str):
            return created_at, job_id
    except (ValueError, TypeError, binascii.Error, UnicodeError):
        pass
    raise RequestError.single("cursor", f"{cursor[:100]!r} is not a cursor this server gave "
                                        f"(use the 'next' of the previous page)")


def _damaged(exc: IndexUnavailable) -> bool:
    """Whether the error says the file is not a sound database (rather than the disk is
    full or the folder unwritable)."""
    return isinstance(exc.__cause__, sqlite3.DatabaseError) and not isinstance(
        exc.__cause__, sqlite3.OperationalError)


def _check_length(path: Path) -> None:
    """Raise IndexDamaged if the file is shorter than its header says (it was cut short).

    SQLite would open such a file and fail only when a missing page is read.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(100)
            size = os.fstat(file.fileno()).st_size
    except FileNotFoundError:
        return
    if not header:
        return
    if len(header) < 100 or not header.startswith(b"SQLite format 3\x00"):
        raise IndexDamaged("not an SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    # The page count is valid when the two change counters agree (SQLite 3.7.0 and later).
    if header[24:28] == header[92:96] and size < pages * page_size:
        raise IndexDamaged(f"{size} bytes, its header says {pages * page_size}")


def _boot_id() -> str:
    """This boot of the machine (Linux); a power cut in between means a new one."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""
