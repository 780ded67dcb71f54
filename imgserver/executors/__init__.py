"""Where images run: ``concurrent.futures.Executor`` implementations the engine is given.

    pool         the local process pool (forkserver), rebuilt when a worker dies
    cluster      the same Executor over the workers of a Dask cluster
    batch        several small images in one Dask task, each reported as it ends
    daskworkers  what each Dask worker is given, and the check that it sees ROOT

They run the image code's worker function and know nothing of jobs, HTTP or watchdog:
they may import ``imgserver.images`` and ``imgserver.errors``.
"""
