"""The files of a job over HTTP: thumbnails made by a worker, and the files themselves.

    GET /jobs/{id}/images/{n}/thumbnail?output=k&size=px   a JPEG (PNG with alpha) no larger
                                                          than px x px, made in the pool
    GET /jobs/{id}/images/{n}/file?output=k                the file itself

Only a file the job lists is served: output ``k`` of image ``n``, or, without ``output``,
the image's input; it is found again inside the root (confined like any path) and read
through folder descriptors that follow no symlink. Both answers carry an ``ETag`` made from
the file's identity and time, so a browser asks again with ``If-None-Match`` and gets a 304
for nothing.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Header, Query
from fastapi import Path as PathParameter
from fastapi.responses import Response, StreamingResponse
from starlette.concurrency import iterate_in_threadpool, run_in_threadpool

from imgserver.access.principal import Principal
from imgserver.errors import JobNotFound
from imgserver.http.auth import Auth
from imgserver.http.schema import ErrorResponse
from imgserver.images.paths import OutsideRoot, open_file
from imgserver.images.thumbnail import (
    DEFAULT_SIZE,
    MAX_SIZE,
    ThumbnailTask,
    listed_file,
    make_thumbnail,
)
from imgserver.jobs.engine import Engine

CHUNK = 1 << 20


def router(engine: Engine, auth: Auth) -> APIRouter:
    """The routes serving ``engine``'s jobs' files to principals with the ``read`` scope
    (of their folder's jobs only), asked of ``auth``."""
    routes = APIRouter()
    reader = auth.need("read")
    image = PathParameter(ge=0, description="The image's index in the request (from 0).")
    output = Query(None, ge=0, description="The index of the file in the image's `outputs` "
                                           "(tiles after a split); absent: its input.")
    match = Header(None, alias="If-None-Match", description="The ETag of a copy you have.")
    answers: dict[int | str, dict[str, Any]] = {
        304: {"description": "Not modified: the copy you have is current."},
        404: {"model": ErrorResponse, "description": "No such job, image or file, or the file "
              "cannot be read or decoded (the detail says why)."},
        422: {"model": ErrorResponse, "description": "A parameter is invalid."},
        **auth.errors}

    @routes.get("/jobs/{job_id}/images/{index}/thumbnail", summary="A thumbnail of a job's file",
                response_class=Response, responses={200: {"content": {
                    "image/jpeg": {}, "image/png": {}}, "description": "JPEG, or PNG when the "
                    "image has alpha."}, **answers})
    async def thumbnail(job_id: str, index: int = image, output: int | None = output,
                        size: int = Query(DEFAULT_SIZE, ge=16, le=MAX_SIZE, description=(
                            "The largest side of the thumbnail, in pixels.")),
                        if_none_match: str | None = match,
                        principal: Principal = Depends(reader)) -> Response:
        root, path = await run_in_threadpool(_listed, engine, job_id, index, output,
                                             principal.view)
        etag = await run_in_threadpool(_etag, path, f"thumbnail-{size}")
        if if_none_match == etag:
            return Response(status_code=304, headers=_cache(etag))
        settings = engine.settings
        task = ThumbnailTask(str(root), str(path), size, settings.max_pixels,
                             settings.max_file_bytes)  # as strict as a job's image
        data, media_type = await asyncio.wrap_future(engine.run_now(make_thumbnail, task))
        return Response(data, media_type=media_type, headers=_cache(etag))

    @routes.get("/jobs/{job_id}/images/{index}/file", summary="A job's file itself",
                response_class=Response, responses={200: {"content": {"image/*": {}}},
                                                   **answers})
    async def file(job_id: str, index: int = image, output: int | None = output,
                   if_none_match: str | None = match,
                   principal: Principal = Depends(reader)) -> Response:
        root, path = await run_in_threadpool(_listed, engine, job_id, index, output,
                                             principal.view)
        etag = await run_in_threadpool(_etag, path, "file")
        if if_none_match == etag:
            return Response(status_code=304, headers=_cache(etag))
        fd = await run_in_threadpool(_open, root, path)
        media_type = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        return StreamingResponse(iterate_in_threadpool(_chunks(fd)), media_type=media_type,
                                 headers={**_cache(etag), "Content-Length": str(
                                     os.fstat(fd).st_size)})

    return routes


def _listed(engine: Engine, job_id: str, index: int, output: int | None, view: str | None
            ) -> tuple[Path, Path]:
    """The root of the job ``job_id`` (of ``view``, unless None) and the real path of the
    file of it asked for; JobNotFound if there is none."""
    document = engine.status(job_id, view)
    root = engine.settings.root
    folder = engine.folder(job_id)
    if folder:  # its paths are relative to its folder: found again in there
        root = Path(os.path.realpath(root / folder))
        if not root.is_relative_to(engine.settings.root):
            raise JobNotFound(f"job {job_id!r}: its folder is not under the root")
    return root, listed_file(document, root, index, output)


def _etag(path: Path, kind: str) -> str:
    """An ETag for ``path`` as it is now (a replaced or rewritten file gets a new one)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        raise JobNotFound(f"{path.name}: {exc.strerror}") from None
    identity = f"{kind}:{info.st_dev}:{info.st_ino}:{info.st_size}:{info.st_mtime_ns}"
    return '"' + hashlib.sha256(identity.encode()).hexdigest()[:32] + '"'


def _cache(etag: str) -> dict[str, str]:
    # private: the files may be behind a token; no-cache: ask each time, with the ETag.
    return {"ETag": etag, "Cache-Control": "private, no-cache"}


def _open(root: Path, path: Path) -> int:
    """A descriptor of the regular file ``path``, reached from ``root`` without symlinks."""
    try:
        fd = open_file(root, path)
    except (OSError, OutsideRoot) as exc:
        raise JobNotFound(f"{path.name}: {getattr(exc, 'strerror', None) or exc}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise JobNotFound(f"{path.name}: not a regular file")
    return fd


def _chunks(fd: int) -> Iterator[bytes]:
    try:
        while chunk := os.read(fd, CHUNK):
            yield chunk
    finally:
        os.close(fd)
