"""The status page: plain HTML, CSS and one script, all served by the server itself.

    GET /               -> redirect to /ui
    GET /ui             the jobs, newest first, live (fed by GET /events), filtered by state
    GET /ui/jobs/{id}   a job: its operations, each image with thumbnails, Cancel
    GET /ui/static/...  page.js, page.css

The pages hold no data: the script reads it from the API (GET /jobs, the event streams,
the thumbnails), so the API's token rule protects the page too. With a token set, the
script asks for it, keeps it in the tab's session storage, and sends it as a header: never
in a URL, where logs would keep it. (A browser's EventSource cannot send headers, so the
streams are read with fetch.) The pages run only what the server serves, and no other site
may frame them (their Content-Security-Policy, ``imgserver.http.security``).
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

from imgserver.http.security import PAGE_POLICY

STATIC = Path(__file__).parent / "static"


def add_routes(app: FastAPI) -> None:
    """Serve the status page from ``app``."""
    app.mount("/ui/static", StaticFiles(directory=STATIC), name="ui-static")

    @app.get("/", include_in_schema=False)
    async def home() -> RedirectResponse:
        return RedirectResponse("/ui")

    @app.get("/ui", include_in_schema=False)
    async def jobs_page() -> FileResponse:
        return FileResponse(STATIC / "jobs.html", headers=_HEADERS)

    @app.get("/ui/jobs/{job_id}", include_in_schema=False)
    async def job_page(job_id: str) -> FileResponse:
        return FileResponse(STATIC / "job.html", headers=_HEADERS)


#: The pages are the same for every job and change with the server's version (so: ask each
#: time); they run only what the server serves, and no other site may frame them.
_HEADERS = {"Cache-Control": "no-cache", "Content-Security-Policy": PAGE_POLICY}
