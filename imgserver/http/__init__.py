"""The HTTP surface (FastAPI on uvicorn): the API, its event streams, the page, metrics.

    app         the application: routes, errors turned into status codes, the docs page
    schema      typed models of the bodies, for the OpenAPI schema
    connection  a deadline for every request; clients that leave logged as such
    streams     Server-Sent Event streams of the engine's events
    files       a job's files: thumbnails (made by a worker) and the files themselves
    page        the status page (/ui), with static/ (HTML, CSS, one script)
    metrics     Prometheus metrics, counted in the server process

A thin edge over the job engine: it may import ``imgserver.jobs``, ``imgserver.images``
(paths and thumbnails), ``imgserver.settings`` and ``imgserver.errors``; nothing below
imports it.
"""
