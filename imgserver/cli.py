"""The command line: ``imgserver serve`` and ``imgserver run``; the commands that talk to a
running server (``submit``, ``jobs``, ``cancel``) are in ``imgserver.client.commands``.

Every option is a flag and an ``IMGSERVER_*`` variable (see ``imgserver.settings.OPTIONS``).
Exit codes of ``run``: 0 every image done, 1 some image failed, 2 invalid request or
settings, 130 interrupted (the job resumes at the next ``imgserver serve``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from imgserver import __version__
from imgserver.access import commands as token_commands
from imgserver.client import commands as remote
from imgserver.errors import ConfigError, RequestError
from imgserver.settings import OPTIONS, Settings

EXIT_DONE, EXIT_FAILED, EXIT_INVALID, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, with one flag per option of each command."""
    parser = argparse.ArgumentParser(
        prog="imgserver", description="Resize, split and blur images on this machine.")
    parser.add_argument("--version", action="version", version=f"imgserver {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve", help="run the HTTP API and the drop folder",
        description="Serve the HTTP API and watch the drop folder; images run on a process "
                    "pool. Set IMGSERVER_TOKEN to require a bearer token.")
    run = commands.add_parser(
        "run", help="run one request in the foreground",
        description="Run one request file in the foreground and write its status file. "
                    "Exit 0: all images done; 1: some image failed; 2: invalid request.")
    run.add_argument("request", type=Path, help="the request file (JSON)")
    remote.add_commands(commands)
    token_commands.add_commands(commands)
    for command, sub in (("serve", serve), ("run", run)):
        for option in OPTIONS:
            if command in option.commands and option.switch:
                sub.add_argument(option.flag, dest=option.name, action="store_const",
                                 const=True, default=None,
                                 help=f"{option.help} [env {option.env}=1]")
            elif command in option.commands:
                sub.add_argument(option.flag, dest=option.name, type=_checked(option.parse),
                                 default=None,
                                 metavar=option.name.upper(),
                                 help=f"{option.help} [env {option.env}; "
                                      f"default: {option.shown or option.default}]")
    return parser


def _checked(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` with its ValueError message shown by argparse (not 'invalid value')."""
    def checked(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return checked


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``imgserver`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "token":
        return token_commands.main(args)
    if args.command not in ("serve", "run"):
        return remote.main(args)
    values = {k: v for k, v in vars(args).items() if k not in ("command", "request")}
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # The format names no thread, process or caller: not looking them up for every record
    # (the logging HOWTO's "Optimization") saves 20-35 µs of each access-log line here.
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    logging._srcfile = None  # type: ignore[attr-defined]  # the caller's frame, unused
    try:
        settings = Settings.build(values)
    except ConfigError as exc:
        print(f"imgserver: {exc}", file=sys.stderr)
        return EXIT_INVALID
    if args.command == "run":
        return run(settings, args.request)
    from imgserver.server import serve

    return serve(settings)


def run(settings: Settings, request_file: Path) -> int:
    """Run one request in the foreground; print its final status document."""
    from imgserver.client.progress import Progress
    from imgserver.executors.pool import LocalPool
    from imgserver.jobs.engine import Engine
    from imgserver.jobs.outbox import job_name

    try:
        with open(request_file, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            if size > settings.max_body_bytes:
                print(f"imgserver: invalid request {str(request_file)!r}: request: file is {size} "
                      f"bytes, the limit is {settings.max_body_bytes} bytes (--max-body-bytes)",
                      file=sys.stderr)
                return EXIT_INVALID
            body = file.read()
    except OSError as exc:
        print(f"imgserver: cannot read {str(request_file)!r}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID
    pool = LocalPool(settings.workers, max_pixels=settings.max_pixels,
                     max_tasks_per_child=settings.max_tasks_per_child)
    # One job in the foreground: the shared queue's limit does not apply to it.
    settings = dataclasses.replace(settings, max_queue=max(settings.max_queue,
                                                           settings.max_images))
    engine = Engine(settings, pool, lock_jobs=True)
    engine.subscribe(Progress(sys.stderr))
    try:
        engine.start(recover=False)
        document = engine.submit(body, source="cli", name=job_name(request_file.stem))
        document = engine.wait(document["id"]).result()
    except RequestError as exc:
        print(f"imgserver: invalid request {str(request_file)!r}: {exc}", file=sys.stderr)
        return EXIT_INVALID
    except KeyboardInterrupt:
        print("\nimgserver: interrupted; the job resumes at the next 'imgserver serve'",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        engine.close()
        pool.shutdown()
    print(json.dumps(document, indent=2))
    print(f"status: {engine.outbox.status_path(document['id'])}", file=sys.stderr)
    return EXIT_DONE if document["state"] == "done" else EXIT_FAILED
