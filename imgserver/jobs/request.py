"""The request: one JSON document, parsed and validated in one place for every road.

    {"images": [{"input": "photos/cat.jpg", "output": "thumbs/cat.jpg"}, ...],
     "operations": ["resize=50", "split=True", "blur=5"],
     "notify": "https://example.com/hooks/imgserver"}          (optional)

``parse_request`` reads the raw bytes (exactly what the HTTP body, the drop-folder file or
the command-line file holds) and returns a ``Request`` whose paths are real paths inside the
root, or raises ``RequestError`` naming every field at fault. It reads no file and writes
nothing: a rejected request leaves no trace.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from imgserver.errors import Problem, RequestError
from imgserver.images.codec import FORMATS
from imgserver.images.operations import (
    Context,
    Operation,
    Split,
    output_suffixes,
    parse_operation,
)
from imgserver.images.paths import OutsideRoot, check_name, confine, shown
from imgserver.urls import check_allowed, check_url

#: Most files one request may write (each split multiplies an image's files by four).
MAX_OUTPUTS = 100_000
_TOP_KEYS = ("images", "operations")
_OPTIONAL_KEYS = ("notify",)
_MISSING = object()
_IMAGE_KEYS = ("input", "output")


@dataclass(frozen=True)
class ImageSpec:
    """One image of a request: the paths as written, and as resolved inside the root."""

    input: str
    output: str
    input_path: Path
    output_path: Path
    outputs: tuple[Path, ...]  # every file the image produces (tiles after a split)


@dataclass(frozen=True)
class Request:
    """A valid request."""

    images: tuple[ImageSpec, ...]
    operations: tuple[str, ...]  # as written, for the status document
    parsed: tuple[Operation, ...]
    notify: str | None = None    # a URL to tell when the job is finished


@dataclass(frozen=True)
class RequestLimits:
    """Limits that apply to a whole request."""

    max_body_bytes: int
    max_images: int
    notify_allow: tuple[str, ...] = field(default=())  # URL prefixes ``notify`` may start with


def parse_request(body: bytes, root: Path, limits: RequestLimits,
                  size: int | None = None) -> Request:
    """Parse and validate ``body``; raise RequestError listing every problem.

    ``size`` is the size of the file ``body`` was read from, when that may be cut short.
    """
    size = len(body) if size is None else size
    if size > limits.max_body_bytes:
        raise RequestError.single(
            "request", f"is {size} bytes, the limit is {limits.max_body_bytes} bytes "
                       f"(--max-body-bytes)")
    document = _load_json(body)
    problems: list[Problem] = []
    if not isinstance(document, dict):
        raise RequestError.single("request", f"expected a JSON object, got {_kind(document)}")
    for key in document:
        if key not in _TOP_KEYS + _OPTIONAL_KEYS:
            problems.append(Problem(_key(key), "unknown field (expected images, operations "
                                               "and optionally notify)"))
    for key in _TOP_KEYS:
        if key not in document:
            problems.append(Problem(key, "field required"))
    texts, parsed = _operations(document.get("operations", _MISSING), root, problems)
    images = _images(document.get("images", _MISSING), root, limits, parsed, problems)
    notify = _notify(document.get("notify", _MISSING), limits, problems)
    if problems:
        raise RequestError(problems)
    return Request(images=tuple(images), operations=tuple(texts), parsed=parsed, notify=notify)


def _notify(value: Any, limits: RequestLimits, problems: list[Problem]) -> str | None:
    if value is _MISSING:
        return None
    if not isinstance(value, str):
        problems.append(Problem("notify", f"expected a URL string, got {_kind(value)}"))
        return None
    try:
        check_url(value)
    except ValueError as exc:
        problems.append(Problem("notify", str(exc)))
        return None
    # Matched on the URL's boundaries (imgserver.urls), and kept as checked: the webhook
    # goes to the URL with its dot segments resolved, never to what a receiver would make
    # of "/hooks/../admin".
    try:
        return check_allowed(value, limits.notify_allow)
    except ValueError as exc:
        allowed = ", ".join(map(repr, limits.notify_allow)) or "none (--notify-allow)"
        problems.append(Problem("notify", f"{exc} (allowed prefixes: {allowed})"))
        return None


def _load_json(body: bytes) -> Any:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result: dict[str, Any] = {}
        for key, value in pairs:
            if key in result:
                raise RequestError.single("request", f"key {key!r} appears twice in one object")
            result[key] = value
        return result

    def no_constants(name: str) -> None:
        raise RequestError.single("request", f"{name} is not valid JSON")

    try:
        return json.loads(body, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except json.JSONDecodeError as exc:
        raise RequestError.single(
            "request", f"not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except UnicodeDecodeError:
        raise RequestError.single("request", "is not UTF-8 text") from None
    except RecursionError:
        raise RequestError.single("request", "is nested too deeply") from None
    except ValueError:  # an integer too long to convert (Python caps it: sys.int_info)
        raise RequestError.single(
            "request", f"has a number of more than {sys.get_int_max_str_digits()} digits"
        ) from None


def load_json(body: bytes) -> Any:
    """``body`` as JSON, read as ``parse_request`` reads it; RequestError if it is not."""
    return _load_json(body)


def _operations(value: Any, root: Path, problems: list[Problem]
                ) -> tuple[list[str], tuple[Operation, ...]]:
    if value is _MISSING:
        return [], ()
    if not isinstance(value, list):
        problems.append(Problem("operations", f"expected a list of strings, got {_kind(value)}"))
        return [], ()
    parsed: list[Operation] = []
    settings: dict[str, str] = {}  # a setting's name -> the field that gave it
    context = Context(root)
    for index, text in enumerate(value):
        field = f"operations[{index}]"
        if not isinstance(text, str):
            problems.append(Problem(field, f"expected a string, got {_kind(text)}"))
            continue
        try:
            op = parse_operation(text, context)
        except ValueError as exc:
            problems.append(Problem(field, f"{text[:200]}: {exc}"))
            continue
        if op is not None and op.setting:
            if op.name in settings:
                problems.append(Problem(field, f"{text[:200]}: {op.name} may be given once "
                                               f"({settings[op.name]} gives it already)"))
                continue
            settings[op.name] = field
        if op is not None:
            parsed.append(op)
    return list(value), tuple(parsed)


def _images(value: Any, root: Path, limits: RequestLimits, operations: tuple[Operation, ...],
            problems: list[Problem]) -> list[ImageSpec]:
    if value is _MISSING:
        return []
    if not isinstance(value, list):
        problems.append(Problem("images", f"expected a list of objects, got {_kind(value)}"))
        return []
    if not value:
        problems.append(Problem("images", "must list at least one image"))
        return []
    if len(value) > limits.max_images:
        problems.append(Problem(
            "images",
            f"lists {len(value)} images, the limit is {limits.max_images} (--max-images)"))
        return []
    splits = sum(isinstance(op, Split) for op in operations)
    if len(value) * 4 ** splits > MAX_OUTPUTS:
        problems.append(Problem(
            "operations", f"{splits} splits make {4 ** splits} files of each of {len(value)} "
                          f"images; a request may write at most {MAX_OUTPUTS} files"))
        return []
    suffixes = output_suffixes(operations)
    specs: list[ImageSpec] = []
    writers: dict[Path, str] = {}
    for index, entry in enumerate(value):
        field = f"images[{index}]"
        spec = _image(entry, field, root, suffixes, problems)
        if spec is None:
            continue
        for path in spec.outputs:
            if path in writers:
                problems.append(Problem(
                    f"{field}.output",
                    f"{spec.output!r} writes {path.relative_to(root).as_posix()!r}, "
                    f"which {writers[path]} also writes"))
                break
        else:
            writers.update((path, f"{field}.output") for path in spec.outputs)
            specs.append(spec)
    return specs


def _image(entry: Any, field: str, root: Path, suffixes: list[str],
           problems: list[Problem]) -> ImageSpec | None:
    if not isinstance(entry, dict):
        problems.append(Problem(
            field, f"expected an object with input and output, got {_kind(entry)}"))
        return None
    before = len(problems)
    for key in entry:
        if key not in _IMAGE_KEYS:
            problems.append(Problem(f"{field}.{_key(key)}",
                                    "unknown field (expected input and output)"))
    paths: dict[str, Path] = {}
    for key in _IMAGE_KEYS:
        raw = entry.get(key, _MISSING)
        if raw is _MISSING:
            problems.append(Problem(f"{field}.{key}", "field required"))
        elif not isinstance(raw, str):
            problems.append(Problem(f"{field}.{key}", f"expected a string, got {_kind(raw)}"))
        else:
            try:
                paths[key] = confine(root, raw)
            except OutsideRoot as exc:
                problems.append(Problem(f"{field}.{key}", str(exc)))
    outputs: list[Path] = []
    if "output" in paths:
        # Tiles are named after the output as written (out/cat.png -> out/cat_lt.png), then
        # each is confined like any path.
        written = PurePosixPath(entry["output"])
        try:
            outputs = _tile_paths(root, written, paths["output"], suffixes)
        except OutsideRoot as exc:
            problems.append(Problem(f"{field}.output", str(exc)))
        extension = paths["output"].suffix.lower()
        if extension not in FORMATS:
            problems.append(Problem(
                f"{field}.output",
                f"{entry['output']!r}: unsupported extension {extension or '(none)'!r} "
                f"(expected one of {', '.join(sorted(FORMATS))})"))
    if len(problems) > before:
        return None
    return ImageSpec(entry["input"], entry["output"], paths["input"], paths["output"],
                     tuple(outputs))


def _tile_paths(root: Path, written: PurePosixPath, output: Path,
                suffixes: list[str]) -> list[Path]:
    """The real path of every file an image writes: ``output``, or its tiles.

    Tiles share the folder of the output as written; only a tile name that exists as a
    symlink needs resolving on its own (the folder is resolved once). A tile name is longer
    than the output's, so it may be one the filesystem refuses when the output's is not.
    """
    if suffixes == [""]:
        return [output]
    folder = confine(root, str(written.parent))
    paths = []
    check_name(written.stem + max(suffixes, key=len) + written.suffix,
               f"{shown(str(written))}: after a split, the tile ")
    for suffix in suffixes:
        name = written.stem + suffix + written.suffix
        tile = folder / name
        paths.append(confine(root, str(tile)) if os.path.islink(tile) else tile)
    return paths


def _key(key: str) -> str:
    """A key as a field name; quoted when it would not read as one (empty, odd characters)."""
    return key if key.isidentifier() else json.dumps(key)


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string",
            list: "a list", dict: "an object"}.get(type(value), type(value).__name__)
