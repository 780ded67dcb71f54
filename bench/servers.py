"""The contenders' servers and what every suite does with them: imgserver in its own process
(this checkout's code or an earlier revision's), thumbor's own server, a Dask cluster; the
request bodies, a root of fresh folders, and the machine they ran on."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import platform
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import cv2

from loops import cpu_seconds, peak_kib

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def free_port() -> int:
    """A loopback port nobody listens on (for a moment)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- imgserver ------------------------------------------------------------------------------

class Server:
    """``imgserver serve`` in its own process, on a free loopback port."""

    def __init__(self, root: Path, processes: int, extra: list[str],
                 workers: list[int] | None = None, code: Path | None = None,
                 start_timeout: float = 60.0) -> None:
        """``code``: a checkout whose imgserver package to run instead of this one's."""
        self.workers = workers or []  # processes outside the server's tree (Dask workers)
        self.port = free_port()
        self.root = root
        self.log = open(root / "server.log", "ab")  # noqa: SIM115 (open while it runs)
        begun = time.monotonic()
        self.process = subprocess.Popen(
            [sys.executable, "-m", "imgserver", "serve", "--root", str(root), "--port",
             str(self.port), "--workers", str(processes), "--max-images", "10000", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, cwd=code,
            env={**os.environ, "PYTHONPATH": str(code)} if code else None)
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                if self.request("GET", "/healthz")[0] == 200:
                    self.started_in = time.monotonic() - begun  # seconds to a healthy answer
                    break
            except OSError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"imgserver did not start; see {root / 'server.log'}")
            time.sleep(0.05)
        self.connection = self.connect()

    def connect(self) -> http.client.HTTPConnection:
        """A new connection to the server (kept alive while the caller keeps it)."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        """One request on a connection of its own."""
        connection = self.connect()
        try:
            connection.request(method, path, body=body)
            response = connection.getresponse()
            return response.status, response.read()
        finally:
            connection.close()

    def post(self, body: bytes) -> tuple[int, bytes]:
        """POST /jobs?wait=true on one kept-alive connection (as a client library would)."""
        return post_wait(self.connection, body)

    def pids(self) -> list[int]:
        """The server's process, its workers and any workers outside its tree."""
        return [self.process.pid] + descendants(self.process.pid) + self.workers

    def cpu_seconds(self) -> float:
        """The CPU seconds the server and its workers have used so far, those replaced
        included."""
        return cpu_seconds(self.pids(), reaped=True)

    def peak_mib(self) -> float:
        """The peak RSS of the server and its workers, summed."""
        return sum(peak_kib(pid) for pid in self.pids()) / 1024

    def stop(self) -> None:
        """SIGTERM, and wait for the server to exit."""
        self.connection.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(60)
        self.log.close()


def post_wait(connection: http.client.HTTPConnection, body: bytes) -> tuple[int, bytes]:
    """POST /jobs?wait=true on ``connection``: the status and the answer."""
    connection.request("POST", "/jobs?wait=true", body=body,
                       headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    return response.status, response.read()


def body(pairs: list[tuple[str, str]], operations: list[str]) -> bytes:
    """A job's request: (input, output) pairs under the root, and the operations."""
    return json.dumps({"images": [{"input": i, "output": o} for i, o in pairs],
                       "operations": operations}).encode()


def done(status: int, answer: bytes) -> None:
    """Raise unless a ``?wait=true`` answer says the job is done."""
    if status != 200 or json.loads(answer)["state"] != "done":
        raise RuntimeError(f"imgserver answered {status}: {answer[:300]!r}")


def timed_post(server: Server, data: bytes) -> float:
    """Milliseconds for one POST /jobs?wait=true to answer done."""
    started = time.perf_counter()
    done(*server.post(data))
    return (time.perf_counter() - started) * 1000


def drop(root: Path, name: str, data: bytes) -> None:
    """A job dropped into the root's inbox (written hidden, then renamed), waited for until
    its status file says done."""
    hidden = root / "inbox" / f".{name}.json"
    hidden.write_bytes(data)
    status = root / "outbox" / f"{name}.status.json"
    os.rename(hidden, root / "inbox" / f"{name}.json")
    while True:
        try:
            state = json.loads(status.read_bytes())["state"]
        except (OSError, ValueError):
            state = None
        if state == "done":
            return
        if state == "failed":
            raise RuntimeError(f"dropped job failed: {status.read_text()[:500]}")
        time.sleep(0.002)


def checkout(work: Path, revision: str) -> Path:
    """The package of ``revision``, checked out once into the work folder."""
    target = work / f"code-{revision}"
    if not (target / "imgserver").is_dir():
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(REPO), "archive", revision, "imgserver"],
                                 check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(target)], input=archive, check=True)
    return target


def fresh_root(work: Path, name: str, inputs: list[Path]) -> Path:
    """An empty root with the inputs in ``in/`` (hard links: paths must stay inside it)."""
    root = work / name
    shutil.rmtree(root, ignore_errors=True)
    (root / "inbox").mkdir(parents=True)
    (root / "outbox").mkdir()
    (root / "in").mkdir()
    for path in inputs:
        os.link(path, root / "in" / path.name)
    return root


def descendants(pid: int) -> list[int]:
    """Every process below ``pid``, from /proc."""
    found: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
        for child in children:
            found += [child] + descendants(child)
    return found


@contextlib.contextmanager
def dask_cluster(processes: int) -> Iterator[tuple[str, list[int]]]:
    """A distributed.LocalCluster of ``processes`` single-threaded workers: its address and
    its worker processes."""
    import distributed

    with distributed.LocalCluster(n_workers=processes, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=None) as cluster, \
            distributed.Client(cluster.scheduler_address) as client:
        yield cluster.scheduler_address, list(client.run(os.getpid).values())


# -- thumbor --------------------------------------------------------------------------------

class Thumbor:
    """thumbor's own server: ``processes`` single-process instances, each on a loopback port
    of its own (its --processes forks share one listening socket, and their balance is left
    to chance), loading files from ``folder`` with no storage of its own and encoding JPEG at
    imgserver's default quality (95)."""

    def __init__(self, work: Path, folder: Path, processes: int,
                 start_timeout: float = 60.0) -> None:
        config = work / "thumbor.conf"
        config.write_text(
            "LOADER = 'thumbor.loaders.file_loader'\n"
            f"FILE_LOADER_ROOT_PATH = {str(folder)!r}\n"
            "STORAGE = 'thumbor.storages.no_storage'\n"
            "RESULT_STORAGE = None\n"
            "QUALITY = 95\n")
        self.log = open(work / "thumbor.log", "ab")  # noqa: SIM115 (open while it runs)
        self.ports: list[int] = []
        self.processes: list[subprocess.Popen[bytes]] = []
        for _ in range(processes):
            port = free_port()
            self.ports.append(port)
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "thumbor.server", "--ip", "127.0.0.1", "--port",
                 str(port), "--conf", str(config), "--processes", "1", "--log-level", "error"],
                stdout=self.log, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + start_timeout
        for port, process in zip(self.ports, self.processes, strict=True):
            while not _healthy(port):
                if time.monotonic() > deadline or process.poll() is not None:
                    self.stop()
                    raise RuntimeError(f"thumbor did not start; see {work / 'thumbor.log'}")
                time.sleep(0.05)

    def pids(self) -> list[int]:
        """The instances' processes."""
        return [process.pid for process in self.processes]

    def cpu_seconds(self) -> float:
        """The CPU seconds the instances have used so far."""
        return cpu_seconds(self.pids(), reaped=True)

    def peak_mib(self) -> float:
        """The peak RSS of the instances, summed."""
        return sum(peak_kib(pid) for pid in self.pids()) / 1024

    def stop(self) -> None:
        """SIGTERM every instance, and wait for them (killed if they linger)."""
        for process in self.processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.log.close()


def _healthy(port: int) -> bool:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/healthcheck")
        return connection.getresponse().status == 200
    except OSError:
        return False
    finally:
        connection.close()


def thumbor_installed() -> bool:
    """Whether thumbor can be run here (it comes with the bench extra)."""
    try:
        import thumbor  # noqa: F401
    except ImportError:
        return False
    return True


# -- the machine ----------------------------------------------------------------------------

def machine() -> dict[str, str]:
    """The CPU, the core count and the versions of every library the figures depend on."""
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    jpeg = re.search(r"JPEG:\s+(.*)", cv2.getBuildInformation())
    try:
        import pyvips

        vips = f"{pyvips.version(0)}.{pyvips.version(1)}.{pyvips.version(2)}"
    except (ImportError, OSError):
        vips = "not installed"
    try:
        from importlib.metadata import version

        thumbor = f"{version('thumbor')} (Pillow {version('pillow')})"
    except ImportError:
        thumbor = "not installed"
    return {"CPU": model, "cores": str(os.cpu_count()), "Python": platform.python_version(),
            "OpenCV": cv2.__version__, "libjpeg": jpeg.group(1).strip() if jpeg else "?",
            "libvips": vips, "thumbor": thumbor}
