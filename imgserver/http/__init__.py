"""The HTTP surface (FastAPI on uvicorn): the API, its event streams, the page, metrics.

    app         the application: its parts put together, /healthz and /metrics
    jobs        the routes of jobs: submit, list, status, cancel, event streams
    files       a job's files: thumbnails (made by a worker) and the files themselves
    streams     Server-Sent Event streams of the engine's events
    page        the status page (/ui), with static/ (HTML, CSS, one script)
    metrics     Prometheus metrics, counted in the server process
    schema      typed models of the bodies, for the OpenAPI schema
    docs        /docs and /openapi.json, served without internet
    errors      imgserver's errors become status codes here, and nowhere else
    responses   ASCII JSON answers; event streams as the schema shows them
    connection  a deadline for every request; clients that leave logged as such

A thin edge over the job engine: it may import ``imgserver.jobs``, ``imgserver.images``
(paths and thumbnails), ``imgserver.settings`` and ``imgserver.errors``; nothing below
imports it.
"""
