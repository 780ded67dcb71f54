"""The hand-written contenders: a naive OpenCV loop and pyvips, each in a process pool.

Run as a script on a manifest (JSON): ``python bench/loops.py opencv|vips MANIFEST``. It
starts a pool of N processes, warms every worker, then times the images through it and
prints a JSON line: wall seconds, per-task latencies, peak memory of the workers.

The OpenCV loop is what a user writes by hand: cv2.imread, cv2.resize(INTER_AREA),
cv2.GaussianBlur, slicing, cv2.imwrite, one image per task, one OpenCV thread per process;
fit and fill as SPEC §12 defines them (the smart window by its Sobel formula), from the
image decoded in full. The pyvips loop uses libvips' best calls for each job (thumbnail
with shrink-on-load, for fit and fill too, its `attention` crop for smart; gaussblur), one
worker thread per process (VIPS_CONCURRENCY=1; libvips still loads and saves on threads of
their own, so that a process may keep more than one core busy for a while).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def loop_ops(operations: list[str]) -> list[tuple[str, object]]:
    """The operations as the loops take them: resize's percent, blur's kernel, fit's box
    (an open side None), fill's box and gravity."""
    parsed: list[tuple[str, object]] = []
    for text in operations:
        name, _, value = text.partition("=")
        if name in ("fit", "fill"):
            size, _, gravity = value.partition(",")
            width, height = (int(side) if side else None for side in size.split("x"))
            parsed.append((name, [width, height] if name == "fit"
                           else [width, height, gravity or "centre"]))
        else:
            parsed.append((name, float(value) if name == "resize" else
                           int(value) if name == "blur" else None))
    return parsed


def opencv_image(task: dict) -> float:
    import cv2  # here, not at the top: the pyvips workers do without OpenCV

    started = time.perf_counter()
    image = cv2.imread(task["input"], cv2.IMREAD_UNCHANGED)
    tiles = [("", image)]
    for name, value in task["operations"]:
        if name == "resize":
            tiles = [(s, cv2.resize(t, (max(1, round(t.shape[1] * value / 100)),
                                        max(1, round(t.shape[0] * value / 100))),
                                    interpolation=cv2.INTER_AREA)) for s, t in tiles]
        elif name == "fit":
            tiles = [(s, _fit(t, *value)) for s, t in tiles]
        elif name == "fill":
            tiles = [(s, _fill(t, *value)) for s, t in tiles]
        elif name == "blur":
            tiles = [(s, cv2.GaussianBlur(t, (value, value), 0)) for s, t in tiles]
        else:
            tiles = [(s + suffix, tile) for s, t in tiles for suffix, tile in _split(t)]
    output = Path(task["output"])
    for suffix, tile in tiles:
        cv2.imwrite(str(output.with_name(output.stem + suffix + output.suffix)), tile)
    return time.perf_counter() - started


def _fit(image, width, height):  # noqa: ANN001, ANN202
    import cv2

    rows, columns = image.shape[:2]
    factor = min(side / length for side, length in ((width, columns), (height, rows)) if side)
    if factor >= 1:
        return image
    size = (max(1, round(columns * factor)), max(1, round(rows * factor)))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA)


def _fill(image, width, height, gravity):  # noqa: ANN001, ANN202
    import cv2
    import numpy as np

    rows, columns = image.shape[:2]
    factor = max(width / columns, height / rows)
    size = (max(width, round(columns * factor)), max(height, round(rows * factor)))
    if size != (columns, rows):
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if factor < 1
                           else cv2.INTER_CUBIC)
    excess_x, excess_y = size[0] - width, size[1] - height
    if gravity == "smart" and (excess_x or excess_y):
        grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY).astype(np.float32)
        detail = (np.abs(cv2.Sobel(grey, cv2.CV_32F, 1, 0))
                  + np.abs(cv2.Sobel(grey, cv2.CV_32F, 0, 1)))
        lines = detail.sum(axis=0 if excess_x else 1, dtype=np.float64)
        sums = np.concatenate([[0.0], np.cumsum(lines)])
        span = width if excess_x else height
        windows = sums[span:] - sums[:-span]
        candidates = np.flatnonzero(windows == windows.max())
        excess = excess_x or excess_y
        start = int(candidates[np.argmin(np.abs(2 * candidates - excess))])
        left, top = (start, 0) if excess_x else (0, start)
    else:
        left, top = excess_x // 2, excess_y // 2
    return image[top:top + height, left:left + width]


def vips_image(task: dict) -> float:
    import pyvips

    started = time.perf_counter()
    operations = list(task["operations"])
    if operations and operations[0][0] in ("fit", "fill"):
        name, value = operations.pop(0)
        if name == "fit":  # shrink only; libvips takes an open side as "any size"
            width, height = (side or 10_000_000 for side in value[:2])
            image = pyvips.Image.thumbnail(task["input"], width, height=height, size="down")
        else:
            image = pyvips.Image.thumbnail(task["input"], value[0], height=value[1],
                                           crop="attention" if value[2] == "smart"
                                           else "centre")
    elif operations and operations[0][0] == "resize":
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


def cpu_seconds(pids: list[int], *, reaped: bool = False) -> float:
    """The CPU time (user and system) processes ``pids`` have used so far (0 for any gone);
    with ``reaped``, that of the children each has reaped too: read with the pids of the
    moment, the whole of a tree whose workers come and go (imgserver replaces a worker after
    --max-tasks-per-child images, and its forkserver reaps the old one)."""
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        # utime, stime (fields 14 and 15), then cutime, cstime: the reaped children's
        total += sum(int(value) for value in fields[11:15 if reaped else 13])
    return total / os.sysconf("SC_CLK_TCK")


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
        list(pool.map(_warm, [kind] * manifest["processes"] * 4))
        # Every worker, also one the warm-up tasks did not reach (they are quick).
        pids = [child.pid for child in multiprocessing.active_children() if child.pid]
        latencies: list[float] = []
        cpu = cpu_seconds(pids)
        started = time.perf_counter()
        if manifest.get("sequential"):
            for task in manifest["tasks"]:
                latencies.append(pool.submit(function, task).result())
        else:
            latencies = list(pool.map(function, manifest["tasks"]))
        seconds = time.perf_counter() - started
        cpu = cpu_seconds(pids) - cpu
        peak = sum(peak_kib(pid) for pid in pids)
    print(json.dumps({"seconds": seconds, "latencies": latencies, "peak_kib": peak,
                      "cpu_seconds": cpu}))


if __name__ == "__main__":
    main()
