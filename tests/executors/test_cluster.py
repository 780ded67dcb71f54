"""The same jobs on a real Dask cluster (distributed.LocalCluster: processes, loopback)."""

from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

distributed = pytest.importorskip("distributed")
# A second cluster finds the first one's HTTP port taken and says so; it takes another.
pytestmark = pytest.mark.filterwarnings("ignore:Port 8787 is already in use")

from imgserver.executors.cluster import DaskPool  # noqa: E402
from imgserver.executors.pool import LocalPool  # noqa: E402
from imgserver.jobs.engine import Engine  # noqa: E402
from imgserver.settings import Settings  # noqa: E402

from conftest import final_status, request_body, wait_for  # noqa: E402
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


@pytest.fixture
def dask_engine(root: Path, cluster: distributed.LocalCluster) -> Iterator[Engine]:
    """An engine in this process on the module's cluster (its pool is ``engine.pool``)."""
    pool = DaskPool(cluster.scheduler_address, root, max_pixels=200_000_000)
    engine = Engine(Settings.build({"root": str(root)}, environ={}), pool)
    engine.pool = pool  # type: ignore[attr-defined]
    engine.start(recover=False)
    yield engine
    engine.close()
    pool.shutdown()


def batches(address: str, topic: str | None = None) -> dict[int, dict[str, Any]]:
    """What the workers reported on a pool's topic (the only pool's, when None): per batch,
    its size and the outputs of each image that ended, by its place in the batch."""
    with distributed.Client(address, set_as_default=False) as client:
        events = client.get_events()
    if topic is None:
        [topic] = [name for name in events if name.startswith("imgserver-")]
    found: dict[int, dict[str, Any]] = defaultdict(lambda: {"size": None, "ended": {}})
    for _, message in events[topic]:
        if message[0] == "start":
            found[message[1]]["size"] = message[2]
        else:
            for place, _, payload in message[2]:
                result = pickle.loads(payload)
                found[message[1]]["ended"][place] = getattr(result, "outputs", result)
    return dict(found)


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


def test_cluster_small_images_go_in_batches_and_all_finish(
        dask_engine: Engine, root: Path, make_image: Callable[..., Path],
        cluster: distributed.LocalCluster) -> None:
    for number in range(4):
        make_image(f"in/{number}.png", 48, 32, seed=number)
    pairs = [(f"in/{n % 4}.png", f"out/{n:02d}.png") for n in range(48)]
    job = dask_engine.submit(request_body(pairs, ["resize=50"]), source="cli")
    final = final_status(dask_engine, job["id"])
    assert [image["state"] for image in final["images"]] == ["done"] * 48
    reported = batches(cluster.scheduler_address, dask_engine.pool.topic)  # type: ignore
    outputs = sorted(o for batch in reported.values() for ended in batch["ended"].values()
                     for o in ended)
    assert outputs == [f"out/{n:02d}.png" for n in range(48)]  # each image once
    assert len(reported) < 48 / 2, reported  # a task per two images at most, not per image
    assert max(batch["size"] for batch in reported.values()) >= 4


def test_cluster_big_image_goes_alone(
        dask_engine: Engine, root: Path, make_image: Callable[..., Path],
        cluster: distributed.LocalCluster) -> None:
    make_image("small.png", 48, 32)
    make_image("big.png", 3000, 2000)  # a thousand times the bytes: expected to take long
    pairs = [("small.png", f"out/{n:02d}.png") for n in range(30)]
    pairs.insert(20, ("big.png", "out/big.png"))
    job = dask_engine.submit(request_body(pairs, ["resize=50"]), source="cli")
    final = final_status(dask_engine, job["id"])
    assert all(image["state"] == "done" for image in final["images"])
    reported = batches(cluster.scheduler_address, dask_engine.pool.topic)  # type: ignore
    [big] = [batch for batch in reported.values() if ["out/big.png"] in batch["ended"].values()]
    assert big["size"] == 1
    assert any(batch["size"] > 1 for batch in reported.values())


def test_cluster_worker_killed_mid_batch_loses_only_its_unfinished_images(
        dask_engine: Engine, root: Path, make_image: Callable[..., Path],
        cluster: distributed.LocalCluster) -> None:
    make_image("in.png", 1200, 800)  # about 0.1 s each: several in a batch, for seconds
    pairs = [("in.png", f"out/{n:02d}.png") for n in range(60)]
    job = dask_engine.submit(request_body(pairs, ["blur=61"]), source="cli")

    def finished_some() -> list[str] | None:
        done = [image["output"] for image in dask_engine.status(job["id"])["images"]
                if image["state"] == "done"]
        return done if len(done) >= 6 else None

    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        pids = client.run(os.getpid)
    before = {output: os.stat(root / output).st_ino for output in wait_for(finished_some)}
    killed = next(iter(pids.values()))
    os.kill(killed, signal.SIGKILL)
    final = final_status(dask_engine, job["id"], timeout=120)
    assert [image["state"] for image in final["images"]] == ["done"] * 60
    # Finished images were not run again (an output written again is a new file) ...
    assert {output: os.stat(root / output).st_ino for output in before} == before
    # ... and only the image the worker was on counts as a crash: the others were given
    # back to the queue, not retried one by one as suspects.
    assert dask_engine.stats()["restarts"].get("died", 0) <= 1
    # The worker started again runs without Dask's sampling profiler, as the others do.
    with distributed.Client(cluster.scheduler_address, set_as_default=False) as client:
        wait_for(lambda: (lambda now: len(now) == 2 and killed not in now)(
            list(client.run(os.getpid).values())), timeout=60)
        profiling = client.run(lambda dask_worker: any(
            callback.is_running() for name, callback in dask_worker.periodic_callbacks.items()
            if name.startswith("profile")))
    assert list(profiling.values()) == [False, False]


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


def test_cluster_image_over_time_limit_inside_a_batch_fails_alone(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("small.png", 40, 30)
    # A small file (one flat colour) that takes long: nothing tells it from the others, so
    # it goes in a batch with them.
    assert cv2.imwrite(str(root / "slow.png"), np.full((4000, 6000, 3), 128, np.uint8))
    names = ["1", "2", "slow", "3", "4", "5"]
    pairs = [("slow.png" if name == "slow" else "small.png", f"out/{name}.png")
             for name in names]
    with local_cluster(workers=1) as one:
        server = start_server(root, "--executor", "dask", "--scheduler", one.scheduler_address,
                              "--image-timeout", "1")
        try:
            # A first job tells the pool how long such images take.
            warm = [("small.png", f"warm/{n}.png") for n in range(3)]
            assert server.request("POST", "/jobs?wait=true", request_body(
                warm, ["blur=61,9"])).json()["state"] == "done"
            reply = server.request("POST", "/jobs?wait=true",
                                   request_body(pairs, ["blur=61,9"]), timeout=120)
        finally:
            server.stop()
        reported = batches(one.scheduler_address)
    states = {image["output"]: image for image in reply.json()["images"]}
    slow = states.pop("out/slow.png")
    assert slow["state"] == "failed" and "--image-timeout" in slow["error"], slow
    assert {image["state"] for image in states.values()} == {"done"}  # their wait not counted
    # The one batch that did not end is the slow image's, and it held others too.
    [unfinished] = [batch for batch in reported.values()
                    if len(batch["ended"]) < batch["size"]]
    assert unfinished["size"] > 1, reported


def test_cluster_bad_scheduler_address_is_refused(root: Path) -> None:
    result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                             "--executor", "dask", "--scheduler", "127.0.0.1"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "expected a Dask scheduler address" in result.stderr
