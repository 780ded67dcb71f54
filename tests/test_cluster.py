"""The same jobs on a real Dask cluster (distributed.LocalCluster: processes, loopback)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
# A second cluster finds the first one's HTTP port taken and says so; it takes another.
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use")

from imgserver.engine import Engine  # noqa: E402
from imgserver.pool import LocalPool  # noqa: E402
from imgserver.settings import Settings  # noqa: E402

from conftest import request_body, wait_for  # noqa: E402
from serving import Server, start_server  # noqa: E402


def local_cluster(workers: int = 2) -> distributed.LocalCluster:
    return distributed.LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                    host="127.0.0.1", dashboard_address=None)


@pytest.fixture(scope="module")
def cluster() -> Iterator[distributed.LocalCluster]:
    with local_cluster() as running:
        yield running


@pytest.fixture
def dask_server(root: Path, cluster: distributed.LocalCluster) -> Iterator[Server]:
    server = start_server(root, "--executor", "dask", "--scheduler", cluster.scheduler_address)
    yield server
    server.stop(signal.SIGKILL if server.process.poll() is None else signal.SIGTERM)


def images(make_image: Callable[..., Path]) -> list[tuple[str, str]]:
    make_image("in/a.jpg", 640, 480)
    make_image("in/b.png", 300, 200, channels=4)
    make_image("in/c.png", 320, 240, channels=3, dtype=np.uint16)
    return [("in/a.jpg", "a.jpg"), ("in/b.png", "b.png"), ("in/c.png", "c.tif")]


def test_cluster_http_and_drop_jobs_equal_local_pool(
        dask_server: Server, root: Path, make_image: Callable[..., Path], pool: LocalPool) -> None:
    pairs = images(make_image)
    operations = ["resize=50", "split", "blur=31"]
    reply = dask_server.request("POST", "/jobs?wait=true", request_body(
        [(i, f"dask-http/{o}") for i, o in pairs], operations))
    assert reply.status == 200 and reply.json()["state"] == "done", reply.body
    (root / "inbox" / ".dropped.json").write_bytes(request_body(
        [(i, f"dask-drop/{o}") for i, o in pairs], operations))
    (root / "inbox" / ".dropped.json").rename(root / "inbox" / "dropped.json")
    status = root / "outbox" / "dropped.status.json"
    wait_for(lambda: status.exists() and json.loads(status.read_text())["state"] == "done")
    engine = Engine(Settings.build({"root": str(root)}, environ={}), pool)
    engine.start(recover=False)
    try:
        local = engine.submit(request_body([(i, f"local/{o}") for i, o in pairs], operations),
                              source="cli")
        assert engine.wait(local["id"]).result(60)["state"] == "done"
    finally:
        engine.close()
    expected = sorted(p.name for p in (root / "local").iterdir())
    assert len(expected) == 12
    for folder in ("dask-http", "dask-drop"):
        assert sorted(p.name for p in (root / folder).iterdir()) == expected
        for name in expected:
            mine = cv2.imread(str(root / folder / name), cv2.IMREAD_UNCHANGED)
            assert np.array_equal(mine, cv2.imread(str(root / "local" / name),
                                                   cv2.IMREAD_UNCHANGED)), (folder, name)


def test_cluster_worker_killed_mid_job_loses_nothing(
        dask_server: Server, root: Path, make_image: Callable[..., Path],
        cluster: distributed.LocalCluster) -> None:
    make_image("big.png", 3000, 2000)
    body = request_body([("big.png", f"out/{i}.png") for i in range(6)], ["blur=31"])
    job_id = dask_server.request("POST", "/jobs", body).json()["id"]
    wait_for(lambda: dask_server.request("GET", f"/jobs/{job_id}").json()["state"] == "running")
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        pids = client.run(os.getpid)
    os.kill(next(iter(pids.values())), signal.SIGKILL)
    final = wait_for(lambda: (lambda d: d if d["state"] in ("done", "failed") else None)(
        dask_server.request("GET", f"/jobs/{job_id}").json()), timeout=120)
    for image in final["images"]:
        assert image["state"] == "done" or "died" in image["error"], image
    done = [image["output"] for image in final["images"] if image["state"] == "done"]
    assert sorted(p.relative_to(root).as_posix() for p in (root / "out").iterdir()) == sorted(done)
    assert len(done) >= 5


def test_cluster_worker_that_cannot_see_root_refuses_start(
        root: Path, cluster: distributed.LocalCluster) -> None:
    blind = subprocess.Popen(
        ["unshare", "--mount", "sh", "-c",
         f"mount -t tmpfs tmpfs {root} && exec {sys.executable} -m distributed.cli.dask_worker "
         f"{cluster.scheduler_address} --nthreads 1 --no-dashboard --name blind"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
            try:
                client.wait_for_workers(3, timeout=30)
            except TimeoutError:
                blind.kill()
                pytest.skip("a worker with its own mount namespace could not start here: "
                            + blind.stderr.read().decode(errors="replace")[-300:])
            address = next(a for a, w in client.scheduler_info()["workers"].items()
                           if w.get("name") == "blind")
        result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                                 "--port", "0", "--executor", "dask", "--scheduler",
                                 cluster.scheduler_address], capture_output=True, text=True,
                                timeout=60)
    finally:
        blind.terminate()
        blind.wait(30)
    assert result.returncode == 2, result.stderr
    assert f"Dask worker {address} does not see the root" in result.stderr


def test_cluster_without_the_extra_says_how_to_install(root: Path, tmp_path_factory:
                                                       pytest.TempPathFactory) -> None:
    missing = tmp_path_factory.mktemp("no-distributed")
    (missing / "distributed").mkdir()
    (missing / "distributed" / "__init__.py").write_text(
        "raise ImportError('No module named distributed')\n")
    result = subprocess.run(
        [sys.executable, "-m", "imgserver", "serve", "--root", str(root), "--port", "0",
         "--executor", "dask", "--scheduler", "tcp://127.0.0.1:1"], capture_output=True,
        text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(missing)})
    assert result.returncode == 2
    assert "pip install 'imgserver[dask]'" in result.stderr


def test_cluster_needs_a_scheduler_address(root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                             "--executor", "dask"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "--executor dask needs --scheduler" in result.stderr


def test_cluster_lost_scheduler_makes_health_503_and_keeps_jobs(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    doomed = local_cluster(workers=1)
    server = start_server(root, "--executor", "dask", "--scheduler", doomed.scheduler_address)
    try:
        doomed.close()

        def unhealthy() -> dict | None:
            reply = server.request("GET", "/healthz")
            return reply.json() if reply.status == 503 else None

        assert "Dask scheduler" in wait_for(unhealthy, timeout=30)["reason"]
        reply = server.request("POST", "/jobs", request_body([("a.png", "kept.png")]))
        assert reply.status == 202
        time.sleep(2)
        assert server.request("GET", reply.headers["location"]).json()["state"] == "queued"
    finally:
        assert server.stop() == 0
    saved = json.loads((root / "outbox" / f"{reply.json()['id']}.status.json").read_text())
    assert saved["state"] == "queued"  # kept for the next start, not failed


def test_cluster_image_over_time_limit_fails_and_the_rest_runs(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("huge.png", 6000, 4000)
    make_image("small.png", 40, 30)
    with local_cluster(workers=1) as one:
        server = start_server(root, "--executor", "dask", "--scheduler", one.scheduler_address,
                              "--image-timeout", "1")
        try:
            body = request_body([("huge.png", "out/huge.png"), ("small.png", "out/1.png"),
                                 ("small.png", "out/2.png")], ["blur=61,9"])
            reply = server.request("POST", "/jobs?wait=true", body, timeout=120)
        finally:
            server.stop()
    huge, first, second = reply.json()["images"]
    assert huge["state"] == "failed" and "--image-timeout" in huge["error"]
    assert first["state"] == "done" and second["state"] == "done"  # their wait is not counted


def test_cluster_bad_scheduler_address_is_refused(root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                             "--executor", "dask", "--scheduler", "127.0.0.1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected a Dask scheduler address" in result.stderr
