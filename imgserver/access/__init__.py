"""Who may do what: the tokens, the principal each stands for, and its limits.

    tokens     the tokens file: names, hashed secrets, scopes, folders, limits; written
               atomically, read again when it changes
    principal  what a request may do and see: its scopes, its folder, its limits
    gate       a request's Authorization header -> its principal (or why not)
    ratelimit  a token bucket per principal (--rate)

The one place that decides who may do what: the HTTP surface asks the gate for a principal
and the principal for each permission; the engine is told only a job's owner (its folder
and its quota). It may import ``imgserver.settings`` and ``imgserver.errors``.
"""
