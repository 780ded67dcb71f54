"""``imgserver token add``, ``list`` and ``revoke``: the tokens file from the command line.

    token add NAME [--scopes S,...] [--folder DIR] [--rate N] [--max-queued N]
        prints the new token's secret on one line of stdout, the only time it is shown
    token list      names, scopes, folders, limits and creation times (never a secret)
    token revoke NAME

The file is ``--tokens FILE`` or ``IMGSERVER_TOKENS``; a running server picks up every
change within two seconds. Exit 0 done, 2 a wrong argument or no such token.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from imgserver.access.tokens import (
    DEFAULT_SCOPES,
    SCOPES,
    Token,
    TokenFile,
    check_folder,
    check_name,
    check_scopes,
    digest,
    new_secret,
)
from imgserver.errors import ConfigError

EXIT_DONE, EXIT_INVALID = 0, 2


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``token`` and its subcommands to the command line."""
    token = commands.add_parser(
        "token", help="add, list or revoke the tokens clients use",
        description="Manage the tokens file a server reads (--tokens or IMGSERVER_TOKENS); a "
                    "running server picks up changes within 2 s.")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="create a token; print its secret once",
                             description="Create a token and print its secret, once, on "
                                         "one line of stdout.")
    add.add_argument("name", help="the token's name (shown in logs; never the secret)")
    add.add_argument("--scopes", default=",".join(DEFAULT_SCOPES),
                     help=f"comma-separated, of {', '.join(SCOPES)} "
                          f"[default: {','.join(DEFAULT_SCOPES)}]")
    add.add_argument("--folder", help="a folder under the root that is this token's root: "
                                      "it sees only its own jobs [default: the whole root]")
    add.add_argument("--rate", type=float, help="requests a second, on average (bursts of as "
                                                "many) [default: no limit]")
    add.add_argument("--max-queued", type=int, help="images accepted and not finished, at "
                                                    "most [default: no limit]")
    actions.add_parser("list", help="the tokens: names, scopes, folders, limits (no secrets)")
    revoke = actions.add_parser("revoke", help="end a token")
    revoke.add_argument("name")
    for sub in actions.choices.values():
        sub.add_argument("--tokens", default=None, metavar="FILE",
                         help="the tokens file [env IMGSERVER_TOKENS]")


def main(args: argparse.Namespace) -> int:
    """Run ``imgserver token ACTION``; its exit code."""
    path = args.tokens or os.environ.get("IMGSERVER_TOKENS")
    if not path:
        print("imgserver: no tokens file: give --tokens FILE or set IMGSERVER_TOKENS",
              file=sys.stderr)
        return EXIT_INVALID
    tokens = TokenFile(Path(path))
    try:
        if args.action == "add":
            secret = new_secret()
            tokens.add(Token(
                name=check_name(args.name), sha256=digest(secret),
                scopes=check_scopes(args.scopes), folder=check_folder(args.folder),
                rate=_positive("--rate", args.rate),
                max_queued=None if args.max_queued is None else int(
                    _positive("--max-queued", args.max_queued) or 0)))
            print(secret)
            print(f"token {args.name!r} added to {path}; its secret is shown this once",
                  file=sys.stderr)
        elif args.action == "list":
            _table(tokens.read())
        else:
            tokens.revoke(args.name)
            print(f"token {args.name!r} revoked", file=sys.stderr)
    except (ConfigError, ValueError) as exc:
        print(f"imgserver: {exc}", file=sys.stderr)
        return EXIT_INVALID
    return EXIT_DONE


def _positive(flag: str, value: float | None) -> float | None:
    if value is not None and not value > 0:
        raise ValueError(f"{flag} must be greater than 0, got {value:g}")
    return value


def _table(tokens: list[Token]) -> None:
    rows = [("NAME", "SCOPES", "FOLDER", "RATE", "MAX-QUEUED", "CREATED")]
    rows += [(token.name, ",".join(token.scopes), token.folder or "(root)",
              "-" if token.rate is None else f"{token.rate:g}/s",
              "-" if token.max_queued is None else str(token.max_queued), token.created_at)
             for token in tokens]
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
              .rstrip())
