"""Faults, proven: dead workers, images over their time limit, a broken pool, a full or
read-only disk, hostile paths and hostile images. Each test tries to break the server."""

from __future__ import annotations

import json
import os
import signal
import struct
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import pytest
from fastapi.testclient import TestClient

from imgserver.executors.pool import LocalPool
from imgserver.http.app import create_app
from imgserver.images.pipeline import TEMP_SUFFIX, ImageTask
from imgserver.jobs.engine import Engine
from imgserver.settings import Settings

from conftest import photo, png_chunk, request_body, wait_for
from processes import alive, workers


def exit_worker(task: ImageTask) -> list[str]:
    """Stands in for process_image on a poison image: the worker process dies at once."""
    os._exit(3)


class PoisonPool(LocalPool):
    """A real process pool whose worker dies on any image named ``poison*``."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future:
        if args and isinstance(args[0], ImageTask) and Path(args[0].input).name.startswith(
                "poison"):
            return super().submit(exit_worker, *args)
        return super().submit(fn, *args, **kwargs)


def broken_init(server_pid: int) -> None:
    """A worker initializer that dies: no worker of the pool ever starts."""
    os._exit(4)


class BrokenPool(LocalPool):
    """A real process pool whose workers cannot start."""

    _initializer = staticmethod(broken_init)


def started(settings: Settings, executor: Any, **kwargs: Any) -> Engine:
    engine = Engine(settings, executor, **kwargs)
    engine.start()
    return engine


@pytest.fixture
def poison_engine(settings: Settings) -> Iterator[Engine]:
    pool = PoisonPool(2, max_pixels=10**9)
    engine = started(settings, pool)
    yield engine
    engine.close()
    pool.shutdown()


def test_reliability_poison_image_fails_alone_and_pool_recovers(
        poison_engine: Engine, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("poison.png")
    make_image("good.png")
    body = request_body([("good.png", f"out/{i}.png") for i in range(4)] + [
        ("poison.png", "out/poison.png")] + [("good.png", f"out/{i}.png") for i in range(4, 8)])
    final = poison_engine.wait(poison_engine.submit(body, source="http")["id"]).result(60)
    states = {image["output"]: (image["state"], image["error"]) for image in final["images"]}
    assert states.pop("out/poison.png")[1].startswith("the worker process died while "
                                                      "processing this image, twice")
    assert all(state == "done" for state, _ in states.values())
    assert final["error"] == "1 of 9 images failed"
    assert not list(root.rglob(f"*{TEMP_SUFFIX}"))
    again = poison_engine.wait(poison_engine.submit(request_body([("good.png", "after.png")]),
                                                    source="http")["id"]).result(60)
    assert again["state"] == "done" and poison_engine.healthy


def test_reliability_worker_killed_mid_image_is_retried(
        settings: Settings, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("big.png", 3000, 2000)
    pool = LocalPool(2, max_pixels=10**9)
    engine = started(settings, pool)
    try:
        body = request_body([("big.png", f"out/{i}.png") for i in range(6)], ["blur=31"])
        job_id = engine.submit(body, source="http")["id"]
        victims = wait_for(lambda: workers(os.getpid()) if engine.status(job_id)["state"]
                           == "running" else None)
        os.kill(victims[0], signal.SIGKILL)
        final = engine.wait(job_id).result(120)
    finally:
        engine.close()
        pool.shutdown()
    assert final["state"] == "done", final
    assert len(list((root / "out").iterdir())) == 6


def test_reliability_image_over_time_limit_fails_and_only_its_worker_ends(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("huge.png", 6000, 4000)
    make_image("small.png", 40, 30)
    settings = Settings.build({"root": str(root), "image_timeout": 0.5, "workers": 2},
                              environ={})
    # Workers of earlier tests' pools in this process may still be on their way out.
    earlier = set(workers(os.getpid()))
    pool = LocalPool(2, max_pixels=10**9)
    pool.warm()  # a worker's start would count in the small image's 0.5 s on a busy machine
    engine = started(settings, pool)
    try:
        body = request_body([("huge.png", "out/huge.png"), ("small.png", "out/small.png")],
                            ["blur=61,9"])
        job_id = engine.submit(body, source="http")["id"]
        before = wait_for(lambda: found if len(found := [
            pid for pid in workers(os.getpid()) if pid not in earlier]) == 2 else None)
        final = engine.wait(job_id).result(60)
        # The huge image's worker is stopped; the other, which ran the small one, goes on.
        survivors = wait_for(lambda: found if len(found := [
            pid for pid in before if alive(pid)]) == 1 else None, timeout=10)
        after = engine.wait(engine.submit(request_body([("small.png", "out/again.png")]),
                                          source="http")["id"]).result(60)
        assert alive(survivors[0])
    finally:
        engine.close()
        pool.shutdown()
    huge, small = final["images"]
    assert huge["state"] == "failed"
    assert huge["error"] == ("processing took longer than the limit of 0.5 s (--image-timeout); "
                             "its worker was stopped")
    assert small["state"] == "done" and after["state"] == "done"
    assert not (root / "out" / "huge.png").exists() and not list(root.rglob(f"*{TEMP_SUFFIX}"))


def test_reliability_broken_pool_makes_health_503(settings: Settings, root: Path,
                                                  make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    pool = BrokenPool(1, max_pixels=10**9)
    engine = started(settings, pool)
    try:
        with TestClient(create_app(engine, settings)) as client:
            assert client.get("/healthz").status_code == 200
            body = request_body([("a.png", f"{i}.png") for i in range(3)])
            job = client.post("/jobs?wait=true", content=body).json()
            assert job["state"] == "failed"
            assert all("worker process died" in image["error"] for image in job["images"])
            health = client.get("/healthz")
            assert health.status_code == 503
            assert "worker processes keep dying" in health.json()["reason"]
    finally:
        engine.close()
        pool.shutdown()


def test_reliability_job_table_stays_empty_after_many_jobs(engine: Engine,
                                                           make_image: Callable[..., Path]) -> None:
    make_image("a.png", 8, 8)
    ids = [engine.submit(request_body([("a.png", f"many/{i}.png")]), source="http")["id"]
           for i in range(300)]
    for job_id in ids:
        engine.wait(job_id).result(60)
    assert engine.active_jobs == 0 and engine.open_images == 0
    assert engine.status(ids[0])["state"] == "done"  # from its status file


def test_reliability_full_disk_fails_image_and_leaves_nothing(
        engine: Engine, root: Path, make_image: Callable[..., Path],
        mount: Callable[..., Path]) -> None:
    full = mount("full", "size=64k")
    make_image("big.png", 600, 400)
    make_image("small.png", 8, 8)
    body = request_body([("big.png", "full/big.png"), ("small.png", "full/small.png")])
    final = engine.wait(engine.submit(body, source="http")["id"]).result(60)
    big, small = final["images"]
    assert big["state"] == "failed" and big["error"] == ("cannot write output: no space left "
                                                         "on device")
    assert small["state"] == "done"
    assert sorted(p.name for p in full.iterdir()) == ["small.png"]


def test_reliability_read_only_folder_fails_image_and_status_records_it(
        engine: Engine, root: Path, make_image: Callable[..., Path],
        mount: Callable[..., Path]) -> None:
    mount("ro", "ro,size=64k")
    make_image("a.png")
    final = engine.wait(engine.submit(request_body([("a.png", "ro/a.png")]),
                                      source="http")["id"]).result(60)
    assert final["images"][0]["error"] == "cannot write output: read-only file system"
    saved = (root / "outbox" / f"{final['id']}.status.json").read_text()
    assert "read-only file system" in saved


HOSTILE_PATHS = [
    "../outside/x.png",
    "a/../../outside/x.png",
    "./../outside/x.png",
    "outside/../../outside/x.png",
    "{outside}/x.png",                 # absolute, outside the root
    "/etc/passwd",
    "/",
    "..",
    "escape-file.png",                 # symlink to a file outside
    "escape-dir/x.png",                # symlink to a folder outside
    "escape-dir/../../outside/x.png",
    "nul\x00byte.png",
    "new\nline.png",
    "",
]


@pytest.fixture
def outside(root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the root, with symlinks into it from the root."""
    folder = tmp_path_factory.mktemp("outside")
    cv2.imwrite(str(folder / "x.png"), photo(10, 10))
    (root / "escape-file.png").symlink_to(folder / "x.png")
    (root / "escape-dir").symlink_to(folder)
    return folder


@pytest.mark.parametrize("path", HOSTILE_PATHS)
@pytest.mark.parametrize("field", ["input", "output"])
def test_reliability_hostile_paths_are_rejected_over_http(
        settings: Settings, engine: Engine, root: Path, outside: Path, make_image: Callable,
        path: str, field: str) -> None:
    make_image("a.png")
    path = path.replace("{outside}", str(outside))
    image = {"input": "a.png", "output": "ok.png", field: path}
    before = {p: p.stat().st_mtime_ns for p in outside.rglob("*")}
    with TestClient(create_app(engine, settings)) as client:
        reply = client.post("/jobs", content=json.dumps({"images": [image],
                                                         "operations": ["resize=50"]}))
    assert reply.status_code == 422, reply.text
    assert f"images[0].{field}" in [problem["field"] for problem in reply.json()["errors"]]
    assert {p: p.stat().st_mtime_ns for p in outside.rglob("*")} == before
    assert not (root / "ok.png").exists()


def test_reliability_symlink_swapped_in_after_validation_is_caught(
        settings: Settings, root: Path, outside: Path, make_image: Callable[..., Path]) -> None:
    make_image("photos/a.png")
    (root / "out").mkdir()
    executor = ThreadPoolExecutor(1)
    release = threading.Event()
    executor.submit(release.wait)
    engine = started(settings, executor, concurrency=1)
    try:
        job_id = engine.submit(request_body([("photos/a.png", "out/a.png")]), source="http")["id"]
        (root / "out").rmdir()                 # now swap the output folder for a way out
        (root / "out").symlink_to(outside)
        release.set()
        final = engine.wait(job_id).result(60)
    finally:
        release.set()
        engine.close()
        executor.shutdown()
    assert "changed after validation" in final["images"][0]["error"]
    assert sorted(p.name for p in outside.iterdir()) == ["x.png"]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG header announcing ``width`` x ``height``, with almost no data."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header)
            + png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + png_chunk(b"IEND", b""))


def test_reliability_hostile_images_each_fail_alone(root: Path, pool: LocalPool) -> None:
    settings = Settings.build({"root": str(root), "max_pixels": 4_000_000}, environ={})
    good = photo(300, 400)
    files = {
        "good.png": cv2.imencode(".png", good)[1].tobytes(),
        "empty.jpg": b"",
        "cut.jpg": cv2.imencode(".jpg", good)[1].tobytes()[:4000],
        "cut.png": cv2.imencode(".png", good)[1].tobytes()[:5000],
        "cut.webp": cv2.imencode(".webp", good)[1].tobytes()[:3000],
        "text.png": b"hello, I am not an image\n" * 10,
        "png-named.jpg": cv2.imencode(".png", good)[1].tobytes(),   # wrong extension, fine
        "bomb.png": png_claiming(20000, 20000),
        "near-limit.png": cv2.imencode(".png", photo(2000, 1999))[1].tobytes(),
        "over-limit.png": cv2.imencode(".png", photo(2000, 2001))[1].tobytes(),
    }
    for name, data in files.items():
        (root / name).write_bytes(data)
    engine = started(settings, pool)
    try:
        body = request_body([(name, f"out/{name}.png") for name in files])
        final = engine.wait(engine.submit(body, source="http")["id"]).result(120)
        health = engine.healthy
    finally:
        engine.close()
    results = {image["input"]: image for image in final["images"]}
    for name in ("good.png", "png-named.jpg", "near-limit.png"):
        assert results[name]["state"] == "done", results[name]
    expected = {
        "empty.jpg": "input file is empty",
        "cut.jpg": "damaged or truncated JPEG",
        "cut.png": "damaged or truncated PNG",
        "cut.webp": "damaged or truncated WEBP",
        "text.png": "not an image OpenCV can decode",
        "bomb.png": "input is 20000x20000 = 400 megapixels, the limit is 4",
        "over-limit.png": "input is 2001x2000 = 4.002 megapixels, the limit is 4",
    }
    for name, message in expected.items():
        assert results[name]["state"] == "failed" and message in results[name]["error"], name
    assert health
    assert sorted(p.name for p in (root / "out").iterdir()) == [
        "good.png.png", "near-limit.png.png", "png-named.jpg.png"]


def test_reliability_health_recovers_without_new_work(
        settings: Settings, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("poison-1.png")
    make_image("poison-2.png")
    pool = PoisonPool(1, max_pixels=10**9)
    engine = started(settings, pool)
    try:
        body = request_body([("poison-1.png", "1.png"), ("poison-2.png", "2.png")])
        engine.wait(engine.submit(body, source="http")["id"]).result(60)
        assert wait_for(lambda: engine.healthy, timeout=15)  # an empty task proved the pool
    finally:
        engine.close()
        pool.shutdown()


def test_reliability_full_outbox_refuses_requests_with_503(
        root: Path, pool: LocalPool, make_image: Callable[..., Path],
        mount: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "outbox").rmdir()
    outbox = mount("outbox", "size=1m")  # room for the index, then filled
    settings = Settings.build({"root": str(root)}, environ={})
    engine = started(settings, pool)
    try:
        with TestClient(create_app(engine, settings)) as client:
            fd = os.open(outbox / "filler", os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, b"x" * 4096)
            except OSError:  # the tmpfs is full
                pass
            finally:
                os.close(fd)
            reply = client.post("/jobs", content=request_body([("a.png", "b.png")]))
            assert reply.status_code == 503 and "cannot store requests" in reply.json()["detail"]
            health = client.get("/healthz")
            assert health.status_code == 503 and "outbox" in health.json()["reason"]
            (outbox / "filler").unlink()
            assert client.post("/jobs", content=request_body([("a.png", "b.png")])).status_code \
                == 202
            assert client.get("/healthz").status_code == 200
    finally:
        engine.close()
