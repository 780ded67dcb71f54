"""Where images run: ``concurrent.futures.Executor`` implementations the engine is given.

    pool         the local process pool: forkserver workers, one pipe each; a dead one is replaced
    worker       what runs in a pool worker: its set-up and its task loop
    started      a Future that says when its task starts (an image's time limit starts then)
    cluster      the same Executor over the workers of a Dask cluster
    batcher      the images handed to the Dask pool: formed into batches, tracked to the end
    batch        what a batch is, and what runs it on a Dask worker
    scheduler    the link to the Dask scheduler: connected, reconnected, workers checked
    daskworkers  what each Dask worker is given, and the check that it sees ROOT

They run the image code's worker function and know nothing of jobs, HTTP or watchdog:
they may import ``imgserver.images`` and ``imgserver.errors``. Only ``imgserver.server``
chooses one.
"""
