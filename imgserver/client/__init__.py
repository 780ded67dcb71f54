"""The client side: talking to a running server, and showing a job's progress.

    client    a client of a running server (HTTP, event streams followed across drops)
    commands  ``imgserver submit``, ``jobs`` and ``cancel``
    progress  the progress bar of ``imgserver run`` and ``submit --wait``

It runs in the user's process, not the server's: it may import ``imgserver.jobs.events``
(what a progress bar shows) and ``imgserver.errors``, and nothing of the engine, the
executors or the HTTP surface.
"""
