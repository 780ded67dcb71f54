"""Shared fixtures: a root with inbox/ and outbox/, an image factory, settings and engines."""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from imgserver.engine import Engine
from imgserver.errors import JobNotFound
from imgserver.pool import LocalPool
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


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk: length, type, data and CRC."""
    crc = zlib.crc32(kind + body)
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)


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


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    """Mean absolute difference of two images of the same shape."""
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())
