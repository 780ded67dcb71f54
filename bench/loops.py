"""The hand-written contenders: a naive OpenCV loop and pyvips, each in a process pool.

Run as a script on a manifest (JSON): ``python bench/loops.py opencv|vips MANIFEST``. It
starts a pool of N processes, warms every worker, then times the images through it and
prints a JSON line: wall seconds, per-task latencies, peak memory of the workers.

The OpenCV loop is what a user writes by hand: cv2.imread, cv2.resize(INTER_AREA),
cv2.GaussianBlur, slicing, cv2.imwrite, one image per task, one OpenCV thread per process.
The pyvips loop uses libvips' best calls for each job (thumbnail with shrink-on-load,
gaussblur), one thread per process.
"""

from __future__ import annotations

import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def opencv_image(task: dict) -> float:
    import cv2

    started = time.perf_counter()
    image = cv2.imread(task["input"], cv2.IMREAD_UNCHANGED)
    tiles = [("", image)]
    for name, value in task["operations"]:
        if name == "resize":
            tiles = [(s, cv2.resize(t, (max(1, round(t.shape[1] * value / 100)),
                                        max(1, round(t.shape[0] * value / 100))),
                                    interpolation=cv2.INTER_AREA)) for s, t in tiles]
        elif name == "blur":
            tiles = [(s, cv2.GaussianBlur(t, (value, value), 0)) for s, t in tiles]
        else:
            tiles = [(s + suffix, tile) for s, t in tiles for suffix, tile in _split(t)]
    output = Path(task["output"])
    for suffix, tile in tiles:
        cv2.imwrite(str(output.with_name(output.stem + suffix + output.suffix)), tile)
    return time.perf_counter() - started


def vips_image(task: dict) -> float:
    import pyvips

    started = time.perf_counter()
    operations = list(task["operations"])
    if operations and operations[0][0] == "resize":
        header = pyvips.Image.new_from_file(task["input"])
        percent = operations.pop(0)[1]
        width = max(1, round(header.width * percent / 100))
        height = max(1, round(header.height * percent / 100))
        image = pyvips.Image.thumbnail(task["input"], width, height=height, size="force")
    else:
        # Tiles are cropped from anywhere in the image: sequential access cannot serve them.
        access = "random" if any(n == "split" for n, _ in operations) else "sequential"
        image = pyvips.Image.new_from_file(task["input"], access=access)
    tiles = [("", image)]
    for name, value in operations:
        if name == "resize":
            tiles = [(s, t.resize(value / 100, kernel="linear")) for s, t in tiles]
        elif name == "blur":
            sigma = 0.3 * ((value - 1) * 0.5 - 1) + 0.8  # OpenCV's sigma for this kernel
            tiles = [(s, t.gaussblur(sigma)) for s, t in tiles]
        else:
            tiles = [(s + suffix, tile) for s, t in tiles for suffix, tile in _vips_split(t)]
    output = Path(task["output"])
    for suffix, tile in tiles:
        path = str(output.with_name(output.stem + suffix + output.suffix))
        if path.endswith(".png"):
            tile.write_to_file(path, compression=1)
        else:
            tile.write_to_file(path, Q=95)
    return time.perf_counter() - started


def _split(image):  # noqa: ANN001, ANN202
    height, width = image.shape[:2]
    left, top = width - width // 2, height - height // 2
    return [("_lt", image[:top, :left]), ("_rt", image[:top, left:]),
            ("_lb", image[top:, :left]), ("_rb", image[top:, left:])]


def _vips_split(image):  # noqa: ANN001, ANN202
    width, height = image.width, image.height
    left, top = width - width // 2, height - height // 2
    return [("_lt", image.crop(0, 0, left, top)), ("_rt", image.crop(left, 0, width - left, top)),
            ("_lb", image.crop(0, top, left, height - top)),
            ("_rb", image.crop(left, top, width - left, height - top))]


def _warm(kind: str) -> int:
    return os.getpid()


def _init(kind: str) -> None:
    """One thread per process for every contender, as in imgserver's workers: with as many
    processes as cores, more threads only fight over them (OpenCV's own default would make
    its large blurs a third slower here)."""
    if kind == "vips":
        import pyvips

        pyvips.cache_set_max(0)
    else:
        import cv2

        cv2.setNumThreads(1)


def peak_kib(pid: int) -> int:
    """The peak resident memory of process ``pid`` in KiB (0 if it is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def main() -> None:
    kind, manifest = sys.argv[1], json.loads(Path(sys.argv[2]).read_text())
    if kind == "vips":
        os.environ["VIPS_CONCURRENCY"] = "1"  # one thread per process, like the others
    function = vips_image if kind == "vips" else opencv_image
    with ProcessPoolExecutor(manifest["processes"], initializer=_init, initargs=(kind,)) as pool:
        pids = set(pool.map(_warm, [kind] * manifest["processes"] * 4))
        latencies: list[float] = []
        started = time.perf_counter()
        if manifest.get("sequential"):
            for task in manifest["tasks"]:
                latencies.append(pool.submit(function, task).result())
        else:
            latencies = list(pool.map(function, manifest["tasks"]))
        seconds = time.perf_counter() - started
        peak = sum(peak_kib(pid) for pid in pids)
    print(json.dumps({"seconds": seconds, "latencies": latencies, "peak_kib": peak}))


if __name__ == "__main__":
    main()
