"""Shared fixtures: a root with inbox/ and outbox/, an image factory, settings and engines."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import struct
import subprocess
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
import trustme
from hypothesis import strategies as st

from imgserver.errors import JobNotFound
from imgserver.executors.pool import LocalPool
from imgserver.images.operations import Context, output_suffixes, parse_operations
from imgserver.images.pipeline import ImageTask, process_image
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings


def photo(height: int, width: int, channels: int = 3, dtype: Any = np.uint8,
          seed: int = 0, noise: float = 0.05) -> np.ndarray:
    """A deterministic photo-like image: smooth gradients, an edge and (heavy) noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    planes = [0.5 + 0.4 * np.sin(xx / max(width, 1) * 6.28 * (1 + c))
              * np.cos(yy / max(height, 1) * 3.14 * (2 + c)) for c in range(channels)]
    image = np.dstack(planes) + rng.normal(0, noise, (height, width, channels))
    image[height // 4:height // 2, width // 3:width // 2] += 0.2
    top = np.iinfo(dtype).max
    image = np.clip(image * top, 0, top).astype(dtype)
    return image[..., 0] if channels == 1 else image


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """A server root with empty inbox/ and outbox/ folders."""
    (tmp_path / "inbox").mkdir()
    (tmp_path / "outbox").mkdir()
    return tmp_path


@pytest.fixture
def make_image(root: Path) -> Callable[..., Path]:
    """Write a photo-like image under the root: make_image("a.png", 64, 48, channels=4)."""

    def make(name: str, width: int = 64, height: int = 48, *, channels: int = 3,
             dtype: Any = np.uint8, seed: int = 0) -> Path:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(path), photo(height, width, channels, dtype, seed))
        return path

    return make


@pytest.fixture(scope="session")
def test_ca() -> trustme.CA:
    """A throwaway certificate authority, made in memory and trusted by no system: the
    issuer of the HTTPS tests' certificates (``serving.tls_files``)."""
    return trustme.CA()


@pytest.fixture
def settings(root: Path) -> Settings:
    """Settings for the root, with two workers and a short image timeout."""
    return Settings.build({"root": str(root), "workers": 2, "image_timeout": 60.0}, environ={})


@pytest.fixture(scope="session")
def pool() -> Iterator[LocalPool]:
    """One process pool for the whole session (starting workers costs time)."""
    executor = LocalPool(2, max_pixels=200_000_000, max_tasks_per_child=None)
    yield executor
    executor.shutdown()


@pytest.fixture
def engine(settings: Settings, pool: LocalPool) -> Iterator[Engine]:
    """A started engine on the root, sharing the session's pool."""
    instance = Engine(settings, pool)
    instance.start()
    yield instance
    instance.close()


def request_body(images: list[tuple[str, str]], operations: list[str] | None = None) -> bytes:
    """The JSON bytes of a request."""
    return json.dumps({"images": [{"input": i, "output": o} for i, o in images],
                       "operations": operations or []}).encode()


def _document(images: Any, operations: Any = (), **more: Any) -> bytes:
    return json.dumps({"images": images, "operations": list(operations), **more}).encode()


def _images(count: int) -> list[dict[str, str]]:
    return [{"input": "a.png", "output": f"{index}.png"} for index in range(count)]


#: Settings every road must refuse the bodies of INVALID_BODIES with.
CORPUS_LIMITS: dict[str, Any] = {"max_images": 5, "max_queue": 3}

#: Bodies that HTTP refuses with 422, and so every road refuses: (name, body, a field the
#: refusal names). One corpus for the HTTP tests and the drop-folder tests alike.
INVALID_BODIES: list[tuple[str, bytes, str]] = [
    ("not-json", b"not json", "request"),
    ("empty", b"", "request"),
    ("blank", b" \n\t ", "request"),
    ("cut-short", b'{"images": [{"input": "a.png"', "request"),
    ("list", b"[]", "request"),
    ("null", b"null", "request"),
    ("string", b'"images"', "request"),
    ("not-utf8", b"\xff\xfe\x00", "request"),
    ("latin1-inside", b'{"images": "caf\xe9", "operations": []}', "request"),
    ("nan", b'{"images": NaN, "operations": []}', "request"),
    ("duplicate-key", b'{"images": [], "images": [], "operations": []}', "request"),
    ("nested-deep", b"[" * 100_000 + b"]" * 100_000, "request"),
    ("nested-deep-in-a-field",
     b'{"images": ' + b"[" * 100_000 + b"]" * 100_000 + b', "operations": []}', "request"),
    ("number-5000-digits", b'{"images": ' + b"7" * 5000 + b', "operations": []}', "request"),
    ("images-missing", b'{"operations": []}', "images"),
    ("images-empty", b'{"images": []}', "images"),
    ("images-a-string", _document("a.png"), "images"),
    ("images-a-huge-float", b'{"images": 1e999, "operations": []}', "images"),
    ("unknown-key", _document(_images(1), extra=1), "extra"),
    ("image-not-an-object", _document(["a.png"]), "images[0]"),
    ("input-a-number", _document([{"input": 5, "output": "b.png"}]), "images[0].input"),
    ("input-missing", _document([{"output": "b.png"}]), "images[0].input"),
    ("operation-unknown", _document(_images(1), ["emboss=1"]), "operations[0]"),
    ("operation-not-a-string", _document(_images(1), [5]), "operations[0]"),
    ("blur-negative", _document(_images(1), ["blur=-1"]), "operations[0]"),
    ("resize-zero", _document(_images(1), ["resize=0"]), "operations[0]"),
    ("resize-5000-digits", _document(_images(1), ["resize=" + "9" * 5000]), "operations[0]"),
    ("fill-unknown-gravity", _document(_images(1), ["fill=10x10,middle"]), "operations[0]"),
    ("watermark-outside", _document(_images(1), ["resize=50", "watermark=../mark.png"]),
     "operations[1]"),
    ("quality-twice", _document(_images(1), ["quality=80", "fit=10x", "quality=90"]),
     "operations[2]"),
    ("forty-splits", _document(_images(2), ["split"] * 40), "operations"),
    ("input-dot-dot", _document([{"input": "../../etc/passwd", "output": "b.png"}]),
     "images[0].input"),
    ("output-absolute-outside", _document([{"input": "a.png", "output": "/tmp/evil.png"}]),
     "images[0].output"),
    ("output-exe", _document([{"input": "a.png", "output": "b.exe"}]), "images[0].output"),
    ("input-nul", _document([{"input": "a\x00.png", "output": "b.png"}]), "images[0].input"),
    ("input-lone-surrogate", b'{"images": [{"input": "\\ud800.png", "output": "b.png"}], '
                             b'"operations": []}', "images[0].input"),
    ("output-empty", _document([{"input": "a.png", "output": ""}]), "images[0].output"),
    ("outputs-collide", _document([{"input": "a.png", "output": "x.png"},
                                   {"input": "b.png", "output": "./x.png"}]),
     "images[1].output"),
    ("output-name-over-255-bytes",
     _document([{"input": "a.png", "output": "out/" + "é" * 126 + ".png"}]), "images[0].output"),
    ("input-folder-over-255-bytes",
     _document([{"input": "d" * 256 + "/a.png", "output": "b.png"}]), "images[0].input"),
    ("tile-name-over-255-bytes",
     _document([{"input": "a.png", "output": "t" * 249 + ".png"}], ["split"]), "images[0].output"),
    ("watermark-name-over-255-bytes",
     _document(_images(1), [f"watermark={'ü' * 128}.png"]), "operations[0]"),
    ("more-images-than-max-images", _document(_images(6)), "images"),
    ("more-images-than-the-queue", _document(_images(4)), "images"),
]


_CHARACTERS = st.characters(exclude_categories=()) | st.sampled_from("\ud800\udfff\udc80\x00/.")
_TEXTS = st.text(_CHARACTERS, max_size=8) | st.sampled_from(
    ["a.png", "out/b.jpg", "../c.png", "/", "\ud800.png", "d\udfff.jpg", "e\udc80.png",
     "resize=50", "split", "blur=3", "blur=3,0"])
#: Any JSON value, leaning to request-like shapes and to the characters paths and JSON find
#: hard (lone surrogates, NUL): the request fuzz, on every road.
json_values = st.fixed_dictionaries({
    "images": st.lists(st.fixed_dictionaries({"input": _TEXTS, "output": _TEXTS}), max_size=2),
    "operations": st.lists(_TEXTS, max_size=3)}) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXTS,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.sampled_from(["images", "operations", "input", "output", "x"]),
                      children, max_size=3),
    max_leaves=12)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    crc = zlib.crc32(kind + body)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


def job_summary(job_id: str, created_at: str, state: str = "done",
                source: str = "http") -> dict:
    """A job's status document without its images, as the index keeps it."""
    return {"id": job_id, "state": state, "source": source, "created_at": created_at,
            "started_at": None, "finished_at": created_at if state != "queued" else None,
            "expires_at": None, "operations": [], "progress": {"done": 0, "total": 1},
            "error": None}


def sql(path: Path, query: str) -> list[tuple]:
    """The rows a query of the SQLite file at ``path`` answers."""
    with contextlib.closing(sqlite3.connect(path)) as db, db:
        return db.execute(query).fetchall()


def sqlite_indexes(path: Path) -> set[str]:
    """The names of the indexes made in the SQLite file at ``path``."""
    return {name for (name,) in sql(
        path, "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL")}


def final_status(engine: Engine, job_id: str, timeout: float = 60.0) -> dict:
    """Poll the engine until ``job_id`` is finished (a job found by the background scan of
    the outbox appears only once the scan reaches it); its status document."""
    def reached() -> dict | None:
        try:
            document = engine.status(job_id)
        except JobNotFound:
            return None
        return document if document["state"] in ("done", "failed", "cancelled") else None
    return wait_for(reached, timeout=timeout)


def job_files(outbox: Path) -> list[str]:
    """The names of the jobs' files in ``outbox``: what requests write (the index, temporary
    files and the server's lock are hidden and left out)."""
    return sorted(p.name for p in outbox.iterdir() if not p.name.startswith("."))


def wait_for(predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05) -> Any:
    """Poll ``predicate`` until it returns something true, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(interval)


def processed_tiles(root: Path, image: np.ndarray, operations: list[str],
                    extension: str = ".png", input_name: str = "in.png") -> dict[str, np.ndarray]:
    """``image`` written to ``input_name`` under the root (a PNG: decoded exactly), put
    through ``process_image`` with ``operations`` into ``out{extension}``, and each file
    written read back as it is, by its tile suffix ("" without a split)."""
    source = root / input_name
    source.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(source), image)
    parsed = parse_operations(operations, Context(root))
    suffixes = output_suffixes(parsed)
    outputs = [f"out{suffix}{extension}" for suffix in suffixes]
    task = ImageTask(root=str(root), input=str(source),
                     outputs=tuple(str(root / output) for output in outputs),
                     operations=parsed, max_pixels=10**9, max_file_bytes=1 << 30)
    assert process_image(task) == outputs
    return {suffix: cv2.imread(str(root / output), cv2.IMREAD_UNCHANGED)
            for suffix, output in zip(suffixes, outputs, strict=True)}


def processed(root: Path, image: np.ndarray, operations: list[str],
              extension: str = ".png") -> np.ndarray:
    """``image`` through ``process_image`` with ``operations`` (no split), read back."""
    tiles = processed_tiles(root, image, operations, extension)
    assert list(tiles) == [""]
    return tiles[""]


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two images of the same shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


@pytest.fixture
def mount(root: Path) -> Iterator[Callable[..., Path]]:
    """Mount a tmpfs at root/<name> (as root); unmounted afterwards."""
    mounted: list[Path] = []

    def make(name: str, *options: str) -> Path:
        target = root / name
        target.mkdir(exist_ok=True)
        result = subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options), "tmpfs",
                                 str(target)], capture_output=True, text=True)
        if result.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
        mounted.append(target)
        return target

    yield make
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def fill(folder: Path) -> Path:
    """Fill the file system of ``folder`` to the last byte; the file that does it."""
    filler = folder / "filler"
    with open(filler, "wb", buffering=0) as file:
        for size in (65536, 1):
            with contextlib.suppress(OSError):  # ENOSPC: full at this grain
                while True:
                    file.write(b"\0" * size)
    return filler
