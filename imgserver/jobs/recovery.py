"""Recovery: what a job found unfinished in the outbox at start becomes.

    its request is empty or gone   nothing: an id reserved for a request that never came
    its status is final            nothing (the index, which said otherwise, is told)
    its request is invalid         failed, with the reason
    it was cancelled               every unfinished image cancelled, the job ends cancelled;
                                   but an image whose outputs are on disk, written since the
                                   job was accepted (it was running, and finished as the
                                   server died), is recorded with them: done, or failed with
                                   the ones it wrote. Outputs are never removed
    otherwise                      the job: images already finished are kept, the others
                                   queued again, after removing what a killed worker left
"""

from __future__ import annotations

import dataclasses
import logging
import os
from datetime import datetime
from pathlib import Path

from imgserver.errors import RequestError
from imgserver.images.paths import relative
from imgserver.images.pipeline import remove_partial
from imgserver.jobs.intake import Intake
from imgserver.jobs.job import (
    ANYONE,
    DONE,
    DROP_FOLDER,
    FAILED,
    FINAL_STATES,
    QUEUED,
    RUNNING,
    SOURCES,
    ImageStatus,
    Job,
    Owner,
    summary,
)
from imgserver.jobs.outbox import Outbox
from imgserver.jobs.request import Request

logger = logging.getLogger("imgserver.jobs.recovery")


def recover(outbox: Outbox, job_id: str, intake: Intake, keep: float
            ) -> tuple[Job, Request] | None:
    """The job and request of the unfinished job ``job_id``, to run again; None if there is
    nothing to run (its status file then says why). ``intake`` parses its request and makes
    a job that never started, for its owner (kept beside the request); ``keep`` is
    --keep-finished."""
    document = outbox.read_status(job_id)
    try:
        body = outbox.read_request(job_id)
        owner = outbox.read_owner(job_id)
    except FileNotFoundError:
        body, owner = b"", ANYONE
    except OSError as exc:
        logger.error("cannot read the request of job %s: %s", job_id, exc)
        return None
    if not owner.kept and _source(document) == "inbox":
        owner = Owner(DROP_FOLDER)
    if document is not None and document.get("state") in FINAL_STATES:
        outbox.index.put(summary(document), owner.folder)  # the index had not caught up
        return None
    if not body:
        outbox.discard(job_id)
        return None
    try:
        job = Job.from_document(document) if document else None
    except (KeyError, TypeError):
        job = None
    if job is not None:
        job = dataclasses.replace(job, owner=owner)
    try:
        request = intake.parse(body, owner)
    except RequestError as error:
        job = job or Job(id=job_id, source=_source(document), operations=[], images=[],
                         owner=owner)
        job.reject(str(error), keep)
        outbox.write_status(job.to_document(), folder=owner.folder)
        return None
    if job is None or len(job.images) != len(request.images):
        # Accepted, but stopped before its first full status file: it never started.
        job = intake.new_job(job_id, _source(document), request, owner)
        if document and isinstance(document.get("created_at"), str):
            job.created_at = document["created_at"]
    for spec, image in zip(request.images, job.images, strict=False):
        if image.state not in FINAL_STATES:
            remove_partial(tuple(str(path) for path in spec.outputs))
    if outbox.cancel_requested(job_id):
        # Less 10 ms: file systems stamp files from a clock that may lag by a tick.
        accepted = datetime.fromisoformat(job.created_at.replace("Z", "+00:00")).timestamp() - 0.01
        for spec, image in zip(request.images, job.images, strict=False):
            if image.state not in FINAL_STATES:
                _written_meanwhile(image, spec.outputs, accepted, intake.root_of(owner))
        job.cancel([index for index, image in enumerate(job.images)
                    if image.state not in FINAL_STATES])
    elif job.state == RUNNING and all(i.state not in FINAL_STATES for i in job.images):
        job.state = QUEUED
    return job, request


def _written_meanwhile(image: ImageStatus, outputs: tuple[Path, ...], accepted: float,
                       root: Path) -> None:
    """Record the outputs of a cancelled job's unfinished image that are on disk, written
    since the job was accepted (``accepted``, Unix seconds): all of them make it done, some
    of them failed (saying so); none leaves it to be cancelled."""
    written = []
    for path in outputs:
        try:
            if os.stat(path, follow_symlinks=False).st_mtime >= accepted:
                written.append(relative(root, path))
        except OSError:
            continue
    if not written:
        return
    image.outputs, image.error = written, None
    if len(written) == len(outputs):
        image.state = DONE
    else:
        image.state = FAILED
        image.error = (f"interrupted when the server stopped, after writing {len(written)} "
                       f"of its {len(outputs)} files")


def _source(document: dict | None) -> str:
    """Where a job came from, by its status file; a job without one came over HTTP (a
    drop-folder job has a status before its request is moved in, a command-line job is
    held by its own process)."""
    source = (document or {}).get("source")
    return source if source in SOURCES else "http"
