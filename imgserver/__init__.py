"""imgserver: a local image-processing service (resize, split, blur) on OpenCV.

    cli.py       the command line: ``imgserver serve``, ``run``, ``submit``, ``jobs``, ``cancel``
    server.py    ``imgserver serve``: the one module that wires the parts together
    http/        the HTTP API, its event streams, the status page, metrics
    inbox.py     the drop folder (watchdog): request files become jobs
    webhooks.py  completion webhooks: signed, retried, recorded
    client/      talking to a running server: submit, jobs, cancel; the progress bar
    jobs/        the job engine and the outbox: what happens to a job
    executors/   where images run: the local process pool, a Dask cluster
    images/      what happens to pixels: decoding, operations, encoding, the worker function
    settings.py  one frozen Settings object, from flags and IMGSERVER_* variables
    urls.py      URLs from users: checked, and shown without credentials
    errors.py    the exceptions; they become status codes or exit codes only at the edges

A part may import the parts below it in this list, never those above; parts on the same
level (the four edges; the engine and the executors) do not import each other. The
direction is checked by import-linter (its contracts are in setup.cfg).
"""

__version__ = "0.1.0"
