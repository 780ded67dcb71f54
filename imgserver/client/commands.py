"""``imgserver submit``, ``jobs`` and ``cancel``: the command line of a running server.

    submit REQUEST.json [--wait]   exit 0 accepted (with --wait: every image done), 1 some
                                   image failed or the job was cancelled, 2 invalid request,
                                   3 the server cannot be reached or refuses (401, 503)
    jobs [--state S] [--source S]  a table of jobs, newest first
    cancel ID                      exit 0 cancelled, 1 already done or failed, 2 no such job

The server is ``--server`` or ``IMGSERVER_URL`` (default http://127.0.0.1:8000); the token,
if it needs one, ``IMGSERVER_TOKEN``. An ``https://`` server is verified with the system's CA
certificates, or with ``--cacert FILE`` (``IMGSERVER_CACERT``) instead: a certificate that
does not verify is exit 3, a --cacert file that cannot be read exit 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from imgserver.client.client import Client
from imgserver.client.progress import Progress
from imgserver.errors import ConfigError, JobConflict, JobNotFound, RequestError, ServerUnavailable

EXIT_DONE, EXIT_FAILED, EXIT_INVALID, EXIT_UNAVAILABLE = 0, 1, 2, 3
DEFAULT_URL = "http://127.0.0.1:8000"


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``submit``, ``jobs`` and ``cancel`` to the command line's subcommands."""
    submit = commands.add_parser(
        "submit", help="submit a request to a running server",
        description="Submit a request file to a running server and print its job's status. "
                    "Exit 0: accepted (with --wait: every image done); 1: an image failed or "
                    "the job was cancelled; 2: invalid request (or a --cacert file that "
                    "cannot be read); 3: the server cannot be reached, refuses, or has a "
                    "certificate that does not verify.")
    submit.add_argument("request", type=Path, help="the request file (JSON)")
    submit.add_argument("--wait", action="store_true",
                        help="follow the job's progress until it ends; print its final status")
    jobs = commands.add_parser("jobs", help="list a running server's jobs, newest first")
    jobs.add_argument("--state", help="only these states, comma-separated "
                                      "(queued, running, done, failed, cancelled)")
    jobs.add_argument("--source", help="only this source (http, inbox, cli)")
    jobs.add_argument("--limit", type=int, default=50, help="at most this many (default 50)")
    jobs.add_argument("--json", action="store_true", help="one JSON summary per line")
    cancel = commands.add_parser(
        "cancel", help="cancel a job on a running server",
        description="Exit 0: cancelled; 1: already done or failed; 2: no such job (or a "
                    "--cacert file that cannot be read); 3: the server cannot be reached, "
                    "or has a certificate that does not verify.")
    cancel.add_argument("job", help="the job's id")
    for sub in (submit, jobs, cancel):
        sub.add_argument("--server", default=None, metavar="URL",
                         help=f"the server, http:// or https:// [env IMGSERVER_URL; default: "
                              f"{DEFAULT_URL}]")
        sub.add_argument("--cacert", default=None, metavar="FILE",
                         help="verify an https:// server with the CA certificates (PEM) in "
                              "FILE instead of the system's [env IMGSERVER_CACERT]")


def main(args: argparse.Namespace) -> int:
    """Run the client command ``args.command``; its exit code."""
    try:
        client = Client(args.server or os.environ.get("IMGSERVER_URL") or DEFAULT_URL,
                        os.environ.get("IMGSERVER_TOKEN") or None,
                        cacert=args.cacert or os.environ.get("IMGSERVER_CACERT") or None)
    except ConfigError as exc:
        _error(str(exc))
        return EXIT_INVALID
    try:
        if args.command == "submit":
            return _submit(client, args.request, args.wait)
        if args.command == "jobs":
            return _jobs(client, args.state, args.source, args.limit, args.json)
        return _cancel(client, args.job)
    except ServerUnavailable as exc:
        _error(str(exc))
        return EXIT_UNAVAILABLE
    except RequestError as exc:
        _error(f"invalid: {exc}")
        return EXIT_INVALID
    finally:
        client.close()


def _submit(client: Client, request_file: Path, wait: bool) -> int:
    try:
        body = request_file.read_bytes()
    except OSError as exc:
        _error(f"cannot read {str(request_file)!r}: {exc.strerror}")
        return EXIT_INVALID
    document = client.submit(body)
    if not wait:
        _print(document)
        return EXIT_DONE
    progress = Progress(sys.stderr)

    def shown(name: str, data: dict[str, Any]) -> None:
        if name == "status":  # images finished before the stream began, then the bar
            total = data["progress"]["total"]
            finished = [i for i in data["images"] if i["state"] in ("done", "failed")]
            if not progress.tty:
                for number, image in enumerate(finished, 1):
                    progress.image(image, number, total)
            progress.bar(len(finished), total)
        elif name == "image":
            progress.image(data["image"], data["progress"]["done"], data["progress"]["total"])

    document = client.follow(document["id"], shown)
    _print(document)
    return EXIT_DONE if document["state"] == "done" else EXIT_FAILED


def _jobs(client: Client, states: str | None, source: str | None, limit: int,
          as_json: bool) -> int:
    for job in client.jobs(states=states, source=source, limit=limit):
        if as_json:
            print(json.dumps(job))
            continue
        progress = f"{job['progress']['done']}/{job['progress']['total']}"
        print(f"{job['id']:<34} {job['state']:<9} {job['source']:<5} {progress:>9}  "
              f"{job['created_at']}  {job['error'] or ''}".rstrip())
    return EXIT_DONE


def _cancel(client: Client, job_id: str) -> int:
    try:
        document = client.cancel(job_id)
    except JobNotFound as exc:
        _error(str(exc))
        return EXIT_INVALID
    except JobConflict as exc:
        _error(str(exc))
        _print(exc.document)
        return EXIT_FAILED
    _print(document)
    return EXIT_DONE


def _print(document: dict[str, Any]) -> None:
    print(json.dumps(document, indent=2))


def _error(message: str) -> None:
    print(f"imgserver: {message}", file=sys.stderr)
