"""scripts/bench jobs: jobs over time, this version against an earlier one in the same run.

  fairness  the latency of a one-image job (POST ?wait=true) submitted behind a batch of
            1080p blurs, against the same job on an idle server; target: within 2x of idle
            plus one batch image
  scale     with N finished jobs (10 images each) in the outbox: seconds from start to the
            first healthy /healthz, and p50 of GET /jobs (first page) and GET /jobs/<id>;
            the index rebuilt from the files when it is missing
  cost      web-resize throughput (200 x 1080p JPEG: resize=50, blur=5), this version
            against the baseline, alternating, in one run; target: within 3%

The baseline is a git revision (--baseline, default: the parent of the commit that added
jobs over time), checked out into the work folder and run from there. Writes
docs/benchmarks-jobs.md and prints it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from inputs import make_inputs  # noqa: E402
from servers import Server, body, checkout, fresh_root, machine, timed_post  # noqa: E402

DEFAULT_BASELINE = "42f93f4"
IMAGES_PER_JOB = 10
#: Bump when ``history`` writes other files: a history made before is made anew.
HISTORY_FORMAT = 2


# -- fairness -------------------------------------------------------------------------------

def fairness(work: Path, code: Path | None, batch: int, samples: int,
             processes: int) -> dict[str, float]:
    """Idle and behind-a-batch latency of a one-image job, and one batch image's time."""
    inputs = make_inputs(work / "inputs", "hd", 20, 1920, 1080, ".jpg")
    root = fresh_root(work, "fairness", inputs)
    server = Server(root, processes, [], code=code)
    try:
        small = body([("in/" + inputs[0].name, "small.jpg")], ["resize=10"])
        idle = [timed_post(server, small) for _ in range(20)]
        pairs = [("in/" + inputs[n % len(inputs)].name, f"batch/{n:04d}.jpg")
                 for n in range(batch)]
        status, answer = server.request("POST", "/jobs", body(pairs, ["blur=31"]))
        batch_id = json.loads(answer)["id"]
        time.sleep(0.5)
        first_done, begun = _done(server, batch_id), time.perf_counter()
        behind = [timed_post(server, small) for _ in range(samples)]
        done, elapsed = _done(server, batch_id) - first_done, time.perf_counter() - begun
        # One batch image's time in a worker, from the batch's own pace meanwhile.
        image_ms = processes * elapsed * 1000 / max(done, 1)
    finally:
        server.process.kill()
        server.process.wait()
        server.log.close()
    return {"idle_ms": statistics.median(idle), "behind_ms": statistics.median(behind),
            "behind_max_ms": max(behind), "image_ms": image_ms, "samples": samples}


def _done(server: Server, job_id: str) -> int:
    return json.loads(server.request("GET", f"/jobs/{job_id}")[1])["progress"]["done"]


# -- scale ----------------------------------------------------------------------------------

def history(work: Path, count: int) -> Path:
    """An outbox of ``count`` finished jobs of 10 images each (made once, then reused).

    Their files are as the server wrote them until 2026-12-07 (the status document as
    indented JSON, the images last; a scan reads today's files, a key per line, the same
    way), their ids random hex like the server's, in no relation to the order the jobs
    were made in.
    """
    root = work / f"history-{count}"
    marker = root / f"complete-{HISTORY_FORMAT}"
    if marker.exists():
        return root
    shutil.rmtree(root, ignore_errors=True)
    outbox = root / "outbox"
    outbox.mkdir(parents=True)
    (root / "inbox").mkdir()
    pairs = [(f"photos/{n}.jpg", f"thumbs/{n}.jpg") for n in range(IMAGES_PER_JOB)]
    request = body(pairs, ["resize=50"])
    # One document, its varying fields as placeholders, filled in for each job.
    template = json.dumps({
        "id": "@id", "state": "done", "source": "http", "created_at": "@0.000+00:00",
        "started_at": "@0.100+00:00", "finished_at": "@0.900+00:00", "expires_at": None,
        "operations": ["resize=50"], "progress": {"done": IMAGES_PER_JOB,
                                                  "total": IMAGES_PER_JOB},
        "error": None, "notifications": [],
        "images": [{"input": i, "output": o, "state": "done", "outputs": [o], "error": None}
                   for i, o in pairs]}, indent=2) + "\n"
    start = time.time() - count - 86400
    for number in range(count):
        name = job_id(number)
        moment = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(start + number))
        document = template.replace("@id", name).replace("@0", moment)
        (outbox / f"{name}.status.json").write_text(document)
        (outbox / f"{name}.request.json").write_bytes(request)
    marker.touch()
    return root


def job_id(number: int) -> str:
    """The id of the history's job ``number``."""
    return hashlib.blake2b(str(number).encode(), digest_size=16).hexdigest()


def scale(work: Path, code: Path | None, count: int, processes: int,
          rebuild: bool) -> dict[str, float]:
    """Start time and listing latencies with ``count`` finished jobs in the outbox."""
    root = history(work, count)
    extra = ["--keep-finished", "0"] if code is None else []
    result: dict[str, float] = {}
    if code is None and rebuild and count:
        for leftover in (root / "outbox").glob(".jobs.sqlite3*"):
            leftover.unlink()
        server = Server(root, processes, extra, code=code, start_timeout=600)
        begun = time.monotonic()
        while server.request("GET", "/jobs")[0] != 200:
            time.sleep(0.2)
        result["rebuild_s"] = server.started_in + time.monotonic() - begun
        server.stop()
    server = Server(root, processes, extra, code=code, start_timeout=600)
    try:
        result["start_s"] = server.started_in
        if code is None:
            result["list_ms"] = _p50(server, lambda: "/jobs")
        if count:
            ids = [job_id(random.randrange(count)) for _ in range(200)]
            result["get_ms"] = _p50(server, lambda: f"/jobs/{ids.pop()}")
    finally:
        server.stop()
    return result


def _p50(server: Server, path: object, repeats: int = 200) -> float:
    """The median milliseconds of GET ``path()`` on one kept-alive connection."""
    connection = server.connection
    times: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        connection.request("GET", path())  # type: ignore[operator]
        response = connection.getresponse()
        response.read()
        times.append((time.perf_counter() - started) * 1000)
        if response.status != 200:
            raise RuntimeError(f"GET answered {response.status}")
    return statistics.median(times)


# -- cost -----------------------------------------------------------------------------------

def cost(work: Path, baseline: Path, rounds: int, processes: int) -> dict[str, float]:
    """web-resize images/s for this version and the baseline, alternating, best of rounds."""
    inputs = make_inputs(work / "inputs", "hd", 20, 1920, 1080, ".jpg")
    rates: dict[str, list[float]] = {"current": [], "baseline": []}
    for _ in range(rounds):
        for name, code in (("current", None), ("baseline", baseline)):
            root = fresh_root(work, f"cost-{name}", inputs)
            server = Server(root, processes, [], code=code)
            try:
                timed_post(server, body([("in/" + inputs[0].name, "warm.jpg")], ["resize=50"]))
                pairs = [("in/" + inputs[n % len(inputs)].name, f"out/{n:03d}.jpg")
                         for n in range(200)]
                milliseconds = timed_post(server, body(pairs, ["resize=50", "blur=5"]))
                rates[name].append(200 / milliseconds * 1000)
            finally:
                server.stop()
    return {name: max(values) for name, values in rates.items()}


# -- the report -----------------------------------------------------------------------------

def report(args: argparse.Namespace, results: dict[str, object]) -> str:
    lines = ["# Jobs over time: benchmarks", "",
             f"Measured by `scripts/bench jobs` on {time.strftime('%Y-%m-%d')}, "
             f"{args.processes} worker processes, against the baseline revision "
             f"`{args.baseline}` (before fair share, the index and retention) in the same "
             f"run. Times are medians unless said otherwise.", ""]
    fair = results.get("fairness")
    if isinstance(fair, dict):
        current, old = fair["current"], fair.get("baseline")
        bound = 2 * current["idle_ms"] + current["image_ms"]
        met = "met" if current["behind_ms"] <= bound else "missed"
        lines += ["## Fairness", "",
                  f"A one-image job (`resize=10` on a 1080p JPEG, `POST /jobs?wait=true`), "
                  f"submitted 0.5 s after a batch of {args.batch} 1080p `blur=31` images:", "",
                  "| version | idle p50 ms | behind the batch p50 ms (max) | one batch image ms |",
                  "|---|---:|---:|---:|",
                  f"| this one | {current['idle_ms']:.1f} | {current['behind_ms']:.1f} "
                  f"({current['behind_max_ms']:.1f}) | {current['image_ms']:.1f} |"]
        if old:
            lines.append(f"| baseline | {old['idle_ms']:.1f} | {old['behind_ms']:.1f} "
                         f"({old['behind_max_ms']:.1f}) | {old['image_ms']:.1f} |")
        lines += ["", f"Target: behind the batch ≤ 2 × idle + one batch image = {bound:.1f} ms: "
                      f"**{met}** ({current['behind_ms']:.1f} ms).", ""]
    sizes = results.get("scale")
    if isinstance(sizes, dict):
        lines += ["## Scale", "",
                  "N finished jobs of 10 images each in the outbox. Start: seconds from "
                  "`imgserver serve` to its first healthy `/healthz` (worker start-up "
                  "included). Rebuild: with the index deleted, seconds until `GET /jobs` "
                  "answers again (the server is healthy meanwhile). 0 jobs: an empty outbox, "
                  "what starting costs without any history.", "",
                  "| jobs | start s | GET /jobs p50 ms | GET /jobs/<id> p50 ms | rebuild s "
                  "| baseline start s | baseline GET /jobs/<id> p50 ms |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for count, measured in sizes.items():
            current, old = measured["current"], measured.get("baseline") or {}
            lines.append(
                f"| {count:,} | {current['start_s']:.2f} | {current['list_ms']:.2f} | "
                f"{current.get('get_ms', float('nan')):.2f} | "
                f"{current.get('rebuild_s', float('nan')):.1f} | "
                f"{old.get('start_s', float('nan')):.2f} | {old.get('get_ms', float('nan')):.2f} |")
        counts = sorted(count for count in sizes if count)
        if len(counts) >= 2:
            small, large = sizes[counts[0]]["current"], sizes[counts[-1]]["current"]
            lines += ["", f"From {counts[0]:,} to {counts[-1]:,} jobs "
                          f"({counts[-1] / counts[0]:.0f}× the history): start × "
                          f"{large['start_s'] / small['start_s']:.2f}, GET /jobs × "
                          f"{large['list_ms'] / small['list_ms']:.2f}, GET /jobs/<id> × "
                          f"{large['get_ms'] / small['get_ms']:.2f}."]
            lines += [f"Targets at {counts[-1]:,}: start ≤ 3 s, GET /jobs < 20 ms, "
                      f"GET /jobs/<id> < 5 ms: **"
                      + ("met" if large["start_s"] <= 3 and large["list_ms"] < 20
                         and large["get_ms"] < 5 else "missed") + "**."]
        lines.append("")
    rates = results.get("cost")
    if isinstance(rates, dict):
        ratio = rates["current"] / rates["baseline"]
        lines += ["## Cost", "",
                  f"web-resize (200 × 1080p JPEG, `resize=50`, `blur=5`, one job), best of "
                  f"{args.rounds} alternating rounds: this version {rates['current']:.1f} "
                  f"images/s, the baseline {rates['baseline']:.1f}: **{ratio:.3f}×** "
                  f"(target ≥ 0.97×: {'met' if ratio >= 0.97 else 'missed'}).", ""]
    details = machine()
    lines += ["## Machine", ""] + [f"- {key}: {value}" for key, value in details.items()]
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work", type=Path, default=REPO / ".bench")
    parser.add_argument("--output", type=Path, default=REPO / "docs" / "benchmarks-jobs.md")
    parser.add_argument("--only", nargs="*", default=["fairness", "scale", "cost"])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--sizes", type=int, nargs="*", default=[0, 10_000, 300_000],
                        help="histories to measure (0: an empty outbox, the floor)")
    parser.add_argument("--baseline-sizes", type=int, nargs="*", default=[10_000],
                        help="sizes at which the baseline's start is measured too")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    baseline = checkout(args.work, args.baseline)
    results: dict[str, object] = {}
    if "fairness" in args.only:
        results["fairness"] = {
            "current": fairness(args.work, None, args.batch, args.samples, args.processes),
            "baseline": fairness(args.work, baseline, args.batch, 1, args.processes)}
        print(json.dumps(results["fairness"]), flush=True)
    if "scale" in args.only:
        results["scale"] = {count: {
            "current": scale(args.work, None, count, args.processes, rebuild=True),
            "baseline": (scale(args.work, baseline, count, args.processes, rebuild=False)
                         if count in args.baseline_sizes else None)} for count in args.sizes}
        print(json.dumps(results["scale"]), flush=True)
    if "cost" in args.only:
        results["cost"] = cost(args.work, baseline, args.rounds, args.processes)
        print(json.dumps(results["cost"]), flush=True)
    text = report(args, results)
    args.output.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
