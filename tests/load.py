"""A load run: N clients posting jobs to a real server for a while, then a full audit."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from conftest import request_body, wait_for
from processes import peak_rss_kib, rss_kib, workers
from serving import Server


@dataclass
class LoadReport:
    """What a load run measured."""

    clients: int
    seconds: float
    accepted: list[str] = field(default_factory=list)
    rejected: int = 0                  # 503: queue full
    other: list[str] = field(default_factory=list)
    latencies_ms: list[float] = field(default_factory=list)
    server_rss_start_kib: int = 0
    server_rss_end_kib: int = 0
    server_peak_kib: int = 0
    workers_peak_kib: int = 0
    lost: list[str] = field(default_factory=list)
    twice: list[str] = field(default_factory=list)

    def percentile(self, share: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(share * len(ordered)))] if ordered else 0.0

    def summary(self) -> str:
        return (f"{self.clients} clients for {self.seconds:.0f} s: {len(self.accepted)} accepted, "
                f"{self.rejected} rejected (503), {len(self.other)} other; POST latency p50 "
                f"{self.percentile(0.5):.1f} ms, p99 {self.percentile(0.99):.1f} ms; server RSS "
                f"{self.server_rss_start_kib // 1024} -> {self.server_rss_end_kib // 1024} MiB "
                f"(peak {self.server_peak_kib // 1024} MiB), worker peak "
                f"{self.workers_peak_kib // 1024} MiB; lost {len(self.lost)}, "
                f"run twice {len(self.twice)}")


def run_load(server: Server, image: str, clients: int, seconds: float) -> LoadReport:
    """Post one-image jobs from ``clients`` threads for ``seconds``; audit every accepted job."""
    report = LoadReport(clients, seconds)
    report.server_rss_start_kib = rss_kib(server.process.pid)
    lock = threading.Lock()
    stop = time.monotonic() + seconds
    pool_peak = [0]

    def client(number: int) -> None:
        sequence = 0
        while time.monotonic() < stop:
            sequence += 1
            body = request_body([(image, f"load/{number}-{sequence}.png")], ["resize=50"])
            started = time.perf_counter()
            reply = server.request("POST", "/jobs", body)
            elapsed = (time.perf_counter() - started) * 1000
            with lock:
                if reply.status == 202:
                    report.accepted.append(reply.json()["id"])
                    report.latencies_ms.append(elapsed)
                elif reply.status == 503:
                    report.rejected += 1
                else:
                    report.other.append(f"{reply.status} {reply.body[:200]!r}")
            if reply.status == 503:
                time.sleep(0.05)

    def watch_workers() -> None:
        while time.monotonic() < stop:
            for pid in workers(server.process.pid):
                with contextlib.suppress(OSError):
                    pool_peak[0] = max(pool_peak[0], peak_rss_kib(pid))
            time.sleep(0.5)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    threads.append(threading.Thread(target=watch_workers))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    outbox = server.root / "outbox"

    def all_final() -> bool:
        return all(_state(outbox, job_id) in ("done", "failed") for job_id in report.accepted)

    wait_for(all_final, timeout=max(120.0, seconds * 4), interval=0.5)
    for job_id in report.accepted:
        if _state(outbox, job_id) != "done":
            report.lost.append(job_id)
    requests = len(list(outbox.glob("*.request.json")))
    statuses = len(list(outbox.glob("*.status.json")))
    outputs = len(list((server.root / "load").glob("*.png")))
    if not requests == statuses == outputs == len(report.accepted):
        report.twice.append(f"{requests} requests, {statuses} statuses, {outputs} outputs for "
                            f"{len(report.accepted)} accepted")
    report.server_rss_end_kib = rss_kib(server.process.pid)
    report.server_peak_kib = peak_rss_kib(server.process.pid)
    report.workers_peak_kib = pool_peak[0]
    return report


def _state(outbox: Path, job_id: str) -> str | None:
    try:
        return json.loads((outbox / f"{job_id}.status.json").read_text())["state"]
    except (OSError, ValueError):
        return None


