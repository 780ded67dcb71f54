"""scripts/bench events: what live events, webhooks and metrics cost, in one run.

  cost     web-resize throughput (200 x 1080p JPEG: resize=50, blur=5) with 100 clients on
           GET /events and every job's webhook going to a receiver, against the same server
           with neither, alternating rounds; target: within 3%. Also the CPU each part spent
           per image (from /proc: the server, its event loop, its workers, and the clients
           themselves, which share the machine), whose sums say what the cost is made of on
           a machine shared with other work, where the rates are noisy
  latency  the time from a job's end (its finished_at) to its webhook's arrival at a
           receiver on this machine, p50 over sequential one-image jobs; target: under 50 ms
  metrics  web-resize throughput, and the p50 of sequential one-image requests, with
           /metrics scraped every second, against the revision before metrics (--baseline),
           alternating rounds; target: within 3%

Writes docs/benchmarks-events.md and prints it.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from inputs import make_inputs  # noqa: E402
from servers import Server, body, checkout, fresh_root, machine, timed_post  # noqa: E402

SECRET = "whsec_" + base64.b64encode(b"imgserver-benchmark-secret-key!!").decode()


class Receiver:
    """A webhook receiver that notes when each job's webhook arrived."""

    def __init__(self) -> None:
        arrivals: dict[str, float] = {}
        self.arrivals = arrivals

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                data = self.rfile.read(int(self.headers.get("content-length", 0)))
                arrivals[json.loads(data)["data"]["id"]] = time.time()
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/hook"
        threading.Thread(target=self._server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._server.shutdown()


def readers(port: int, count: int) -> None:
    """Hold ``count`` connections to GET /events, reading (and dropping) what comes."""
    async def read() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: bench\r\n\r\n")
        while await reader.read(65536):
            pass

    async def main() -> None:
        await asyncio.gather(*(read() for _ in range(count)), return_exceptions=True)

    asyncio.run(main())


def cpu_seconds(pid: int, thread: int | None = None) -> float:
    """The CPU time of process ``pid`` so far, every thread (or only ``thread``), from the
    scheduler's nanosecond counts; 0 for a process that has gone."""
    total = 0
    for task in Path(f"/proc/{pid}/task").glob("*" if thread is None else str(thread)):
        with contextlib.suppress(OSError, ValueError, IndexError):
            total += int((task / "schedstat").read_text().split()[0])
    return total / 1e9


#: The parts whose CPU is counted; ``clients``: the readers and this process (the webhook
#: receiver, and the client waiting for the job).
PARTS = ("server", "loop", "workers", "clients")


def _spent(server: Server, listeners: subprocess.Popen | None) -> dict[str, float]:
    pids = server.pids()
    return {"server": cpu_seconds(pids[0]), "loop": cpu_seconds(pids[0], pids[0]),
            "workers": sum(cpu_seconds(pid) for pid in pids[1:]),
            "clients": time.process_time() + (cpu_seconds(listeners.pid) if listeners else 0)}


def cost(work: Path, rounds: int, processes: int, clients: int) -> dict[str, float]:
    """Best web-resize images/s without and with the listeners, alternating; and the
    median CPU milliseconds per image of each part (``<name>-<part>``)."""
    inputs = make_inputs(work / "inputs", "hd", 20, 1920, 1080, ".jpg")
    receiver = Receiver()
    rates: dict[str, list[float]] = {"none": [], "listened": []}
    spent: dict[str, list[float]] = {f"{name}-{part}": [] for name in rates for part in PARTS}
    try:
        for _ in range(rounds):
            for name in rates:
                root = fresh_root(work, f"events-{name}", inputs)
                extra = ["--notify-url", receiver.url] if name == "listened" else []
                os.environ["IMGSERVER_NOTIFY_SECRET"] = SECRET
                server = Server(root, processes, extra)
                listeners = None
                try:
                    if name == "listened":
                        listeners = subprocess.Popen([sys.executable, __file__, "--readers",
                                                      str(server.port), str(clients)])
                        time.sleep(2.0)  # every client connected
                    timed_post(server, body([("in/" + inputs[0].name, "warm.jpg")],
                                            ["resize=50"]))
                    pairs = [("in/" + inputs[n % len(inputs)].name, f"out/{n:03d}.jpg")
                             for n in range(200)]
                    before = _spent(server, listeners)
                    milliseconds = timed_post(server, body(pairs, ["resize=50", "blur=5"]))
                    if name == "listened":  # the webhook arrives just after the answer
                        deadline = time.monotonic() + 10
                        while len(receiver.arrivals) < len(rates["listened"]) + 1 and (
                                time.monotonic() < deadline):
                            time.sleep(0.01)
                    after = _spent(server, listeners)
                    rates[name].append(200 / milliseconds * 1000)
                    for part in PARTS:
                        spent[f"{name}-{part}"].append((after[part] - before[part]) / 200 * 1000)
                finally:
                    if listeners is not None:
                        listeners.kill()
                        listeners.wait()
                    server.stop()
    finally:
        receiver.close()
    return {**{name: max(values) for name, values in rates.items()},
            **{key: statistics.median(values) for key, values in spent.items()}}


def latency(work: Path, jobs: int, processes: int) -> dict[str, float]:
    """Milliseconds from each job's finished_at to its webhook's arrival."""
    inputs = make_inputs(work / "inputs", "small", 4, 640, 480, ".jpg")
    receiver = Receiver()
    root = fresh_root(work, "events-latency", inputs)
    os.environ["IMGSERVER_NOTIFY_SECRET"] = SECRET
    server = Server(root, processes, ["--notify-url", receiver.url])
    delays: list[float] = []
    try:
        for number in range(jobs):
            status, answer = server.post(body([("in/" + inputs[0].name, f"l/{number}.jpg")],
                                              ["resize=50"]))
            document = json.loads(answer)
            deadline = time.monotonic() + 10
            while document["id"] not in receiver.arrivals and time.monotonic() < deadline:
                time.sleep(0.001)
            finished = datetime.fromisoformat(document["finished_at"]).timestamp()
            delays.append((receiver.arrivals[document["id"]] - finished) * 1000)
    finally:
        server.stop()
        receiver.close()
    return {"p50_ms": statistics.median(delays), "p90_ms": sorted(delays)[int(len(delays) * .9)],
            "jobs": jobs}


def metrics_cost(work: Path, baseline: Path, rounds: int, processes: int
                 ) -> dict[str, float]:
    """web-resize images/s and one-image p50 ms, with metrics scraped, and the baseline."""
    big = make_inputs(work / "inputs", "hd", 20, 1920, 1080, ".jpg")
    small = make_inputs(work / "inputs", "small", 4, 640, 480, ".jpg")
    measured: dict[str, list[float]] = {f"{name}-{kind}": [] for name in ("current", "baseline")
                                        for kind in ("rate", "p50")}
    for _ in range(rounds):
        for name, code in (("current", None), ("baseline", baseline)):
            root = fresh_root(work, f"metrics-{name}", big + small)
            server = Server(root, processes, [], code=code)
            stop = threading.Event()
            scraper = threading.Thread(target=_scrape, args=(server, stop), daemon=True)
            if code is None:
                scraper.start()
            try:
                timed_post(server, body([("in/" + small[0].name, "warm.jpg")], ["resize=50"]))
                pairs = [("in/" + big[n % len(big)].name, f"out/{n:03d}.jpg")
                         for n in range(200)]
                milliseconds = timed_post(server, body(pairs, ["resize=50", "blur=5"]))
                measured[f"{name}-rate"].append(200 / milliseconds * 1000)
                latencies = [timed_post(server, body([("in/" + small[0].name, f"l/{n}.jpg")],
                                                     ["resize=50"])) for n in range(200)]
                measured[f"{name}-p50"].append(statistics.median(latencies))
            finally:
                stop.set()
                server.stop()
    return {key: (max(values) if key.endswith("rate") else min(values))
            for key, values in measured.items()}


def _scrape(server: Server, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        server.request("GET", "/metrics")


def report(args: argparse.Namespace, results: dict[str, dict[str, float]]) -> str:
    lines = ["# Events and webhooks: benchmarks", "",
             f"Measured by `scripts/bench events` on {time.strftime('%Y-%m-%d')}, "
             f"{args.processes} worker processes.", ""]
    if "cost" in results:
        rates = results["cost"]
        ratio = rates["listened"] / rates["none"]
        lines += ["## Cost", "",
                  f"web-resize (200 × 1080p JPEG, `resize=50`, `blur=5`, one job), best of "
                  f"{args.rounds} alternating rounds: {rates['none']:.1f} images/s with no "
                  f"listener; {rates['listened']:.1f} with {args.clients} clients on "
                  f"`GET /events` and a webhook for every job: **{ratio:.3f}×** (target ≥ "
                  f"0.97×: {'met' if ratio >= 0.97 else 'missed'}).", ""]
        lines += _cpu_table(rates, args.clients)
    if "latency" in results:
        measured = results["latency"]
        lines += ["## Webhook latency", "",
                  f"From a job's `finished_at` to its webhook's arrival at a receiver on this "
                  f"machine, {measured['jobs']:.0f} sequential one-image jobs: p50 "
                  f"**{measured['p50_ms']:.1f} ms**, p90 {measured['p90_ms']:.1f} ms (target "
                  f"p50 < 50 ms: {'met' if measured['p50_ms'] < 50 else 'missed'}).", ""]
    if "metrics" in results:
        measured = results["metrics"]
        rate = measured["current-rate"] / measured["baseline-rate"]
        latency_ratio = measured["baseline-p50"] / measured["current-p50"]
        lines += ["## Metrics", "",
                  f"With `/metrics` scraped every second and every request counted by the "
                  f"middleware, against revision `{args.baseline}` (before metrics), best of "
                  f"{args.rounds} alternating rounds:", "",
                  "| workload | with metrics | before | ratio |", "|---|---:|---:|---:|",
                  f"| web-resize, images/s | {measured['current-rate']:.1f} | "
                  f"{measured['baseline-rate']:.1f} | **{rate:.3f}×** |",
                  f"| latency, one-image request p50 ms | {measured['current-p50']:.2f} | "
                  f"{measured['baseline-p50']:.2f} | **{latency_ratio:.3f}×** |", "",
                  f"Target: within 3% (≥ 0.97×): "
                  f"{'met' if min(rate, latency_ratio) >= 0.97 else 'missed'}.", ""]
    lines += ["## Machine", ""] + [f"- {key}: {value}" for key, value in machine().items()]
    return "\n".join(lines) + "\n"


def _cpu_table(measured: dict[str, float], clients: int) -> list[str]:
    """The CPU of each part per image, and the share of the machine the listeners take."""
    def row(name: str, label: str) -> str:
        return f"| {label} | " + " | ".join(f"{measured[f'{name}-{part}']:.3f}"
                                           for part in PARTS) + " |"

    total = measured["none-server"] + measured["none-workers"] + measured["none-clients"]
    server = measured["listened-server"] - measured["none-server"]
    own = measured["listened-clients"] - measured["none-clients"]
    return ["CPU per image (ms, median of the rounds, from `/proc/<pid>/task/*/schedstat`; "
            "`clients`: the readers' process and the benchmark's own, with the webhook "
            "receiver):", "",
            "| listeners | server | its event loop | workers | clients |",
            "|---|---:|---:|---:|---:|", row("none", "none"),
            row("listened", f"{clients} on `GET /events`, webhooks"), "",
            f"With every core busy, CPU spent beside the workers is taken from them: the "
            f"listeners add {server:.3f} ms per image in the server and {own:.3f} ms in the "
            f"clients themselves, against {total:.2f} ms per image in all without them: "
            f"{server / total:.1%} of the machine for the server's part, {own / total:.1%} "
            f"for the clients'.", ""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=REPO / ".bench")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks-events.md")
    parser.add_argument("--only", nargs="*", default=["cost", "latency", "metrics"])
    parser.add_argument("--baseline", default="cf397bd",
                        help="the revision before metrics, to compare with")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--readers", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.readers:
        readers(*args.readers)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    results: dict[str, dict[str, float]] = {}
    if "cost" in args.only:
        results["cost"] = cost(args.work, args.rounds, args.processes, args.clients)
        print(json.dumps(results["cost"]), flush=True)
    if "latency" in args.only:
        results["latency"] = latency(args.work, args.jobs, args.processes)
        print(json.dumps(results["latency"]), flush=True)
    if "metrics" in args.only:
        baseline = checkout(args.work, args.baseline)
        results["metrics"] = metrics_cost(args.work, baseline, args.rounds, args.processes)
        print(json.dumps(results["metrics"]), flush=True)
    text = report(args, results)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
