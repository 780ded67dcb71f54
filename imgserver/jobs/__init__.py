"""The job engine and its storage: what happens to a job, and the record that keeps it.

    engine        the job engine: the one place that decides what happens to a job
    intake        a request becomes an accepted job (validated, admitted, stored), or not
    ledger        the live jobs, their status files, and questions about any job
    request       a request parsed and validated in one place, for every road
    job           a job's states and its status document
    events        what the engine tells its subscribers, numbered as it happens
    fairqueue     the queue of images, round-robin between jobs
    runner        hands images to an executor within its capacity; retries, time limits
    recovery      what an unfinished job found at start becomes
    outbox        request and status files, written atomically, and their index
    arrivals      a new job's request comes into the outbox, once, under an id of its own
    index         the SQLite index of the outbox: listing without reading every file
    keys          idempotency keys
    housekeeping  retention: expired jobs' files removed, crash leftovers swept

It takes any ``concurrent.futures.Executor`` and knows nothing of HTTP, asyncio or
watchdog: it may import ``imgserver.images``, ``imgserver.settings``, ``imgserver.urls``
and ``imgserver.errors``.
"""
