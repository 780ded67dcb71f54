"""``imgserver run`` as a user runs it: a real process, exit codes, status file, progress."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from imgserver.settings import OPTIONS, Settings

from conftest import request_body


def run(root: Path, *args: str, stderr: int | None = subprocess.PIPE,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgserver", "run", *args, "--workers", "2"],
                          cwd=root, capture_output=stderr is subprocess.PIPE,
                          stderr=None if stderr is subprocess.PIPE else stderr,
                          text=True, timeout=120, env={**os.environ, **(env or {})})


def test_cli_run_all_done_exits_0(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("photos/a.jpg", 64, 48)
    (root / "job.json").write_bytes(request_body([("photos/a.jpg", "thumbs/a.png")],
                                                 ["resize=50", "split"]))
    result = run(root, "job.json", "--root", str(root))
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["id"] == "job" and document["source"] == "cli"
    assert document["state"] == "done"
    tiles = [f"thumbs/a_{tile}.png" for tile in ("lt", "rt", "lb", "rb")]
    assert document["images"][0]["outputs"] == tiles
    assert json.loads((root / "outbox" / "job.status.json").read_text()) == document
    assert "1/1 photos/a.jpg -> thumbs/a.png: done" in result.stderr


def test_cli_run_some_image_failed_exits_1(root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "job.json").write_bytes(request_body([("a.png", "a.jpg"), ("gone.png", "b.jpg")]))
    result = run(root, "job.json", env={"IMGSERVER_ROOT": str(root)})
    assert result.returncode == 1, result.stderr
    document = json.loads(result.stdout)
    assert document["state"] == "failed" and document["error"] == "1 of 2 images failed"
    assert "failed: cannot open input: no such file" in result.stderr


def test_cli_run_invalid_request_exits_2_and_writes_nothing(root: Path) -> None:
    (root / "outbox").rmdir()
    (root / "job.json").write_bytes(request_body([("a.png", "../x.png")], ["resize=500"]))
    before = sorted(root.rglob("*"))
    result = run(root, "job.json", "--root", str(root))
    assert result.returncode == 2
    assert "images[0].output: '../x.png' is outside the root" in result.stderr
    assert "operations[0]: resize=500: scaling factor must be in (0.05, 100]" in result.stderr
    assert result.stdout == ""
    assert sorted(root.rglob("*")) == before


def test_cli_run_name_over_255_bytes_exits_2_and_writes_nothing(
        root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    name = "ß" * 126 + ".png"  # 256 bytes
    (root / "job.json").write_bytes(request_body([("a.png", f"out/{name}")]))
    before = sorted(root.rglob("*"))
    result = run(root, "job.json", "--root", str(root))
    assert result.returncode == 2, result.stderr
    assert "images[0].output: 'out/ßß" in result.stderr
    assert "is 256 bytes in UTF-8, more than the 255 a file or folder name may have" \
        in result.stderr
    assert result.stdout == "" and sorted(root.rglob("*")) == before


def test_cli_run_missing_request_file_exits_2(root: Path) -> None:
    result = run(root, "nope.json", "--root", str(root))
    assert result.returncode == 2 and "cannot read 'nope.json'" in result.stderr


def test_cli_bad_setting_exits_2(root: Path) -> None:
    result = run(root, "x.json", "--root", str(root / "missing"))
    assert result.returncode == 2 and "is not a directory" in result.stderr
    result = run(root, "x.json", env={"IMGSERVER_MAX_PIXELS": "lots"})
    assert result.returncode == 2 and "IMGSERVER_MAX_PIXELS='lots'" in result.stderr


def test_cli_run_draws_progress_bar_on_a_terminal(root: Path,
                                                  make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    (root / "job.json").write_bytes(request_body([("a.png", "1.png"), ("a.png", "2.png")]))
    leader, follower = pty.openpty()
    try:
        result = run(root, "job.json", "--root", str(root), stderr=follower)
        os.close(follower)
        follower = -1
        output = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(leader)
        if follower != -1:
            os.close(follower)
    assert result.returncode == 0
    assert b"] 2/2 images" in output and b"\r[" in output


def test_cli_every_option_has_flag_env_and_default_in_help() -> None:
    for command in ("serve", "run"):
        result = subprocess.run([sys.executable, "-m", "imgserver", command, "--help"],
                                capture_output=True, text=True, timeout=60)
        text = " ".join(result.stdout.split())
        for option in OPTIONS:
            if command in option.commands:
                assert option.flag in text and option.env in text, (command, option.name)
                if not option.switch:  # a switch is off unless given
                    assert f"default: {option.shown or option.default}" in text, (
                        command, option.name)


def test_cli_python_dash_m_shows_help() -> None:
    result = subprocess.run([sys.executable, "-m", "imgserver", "--help"], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0 and "serve" in result.stdout and "run" in result.stdout


def test_cli_defaults_and_variables_are_the_contracts() -> None:
    defaults = Settings.build({}, environ={})
    assert (defaults.max_pixels, defaults.max_file_bytes, defaults.max_body_bytes,
            defaults.max_images, defaults.max_queue, defaults.image_timeout,
            defaults.read_timeout, defaults.keep_finished) == (
        200000000, 536870912, 1048576, 1000, 10000, 300, 10, 30 * 86400)
    for text, seconds in [("30d", 30 * 86400), ("12h", 43200), ("15m", 900), ("90s", 90),
                          ("0", 0)]:
        assert Settings.build({}, environ={"IMGSERVER_KEEP_FINISHED": text}).keep_finished \
            == seconds, text
    chosen = Settings.build({}, environ={
        "IMGSERVER_MAX_PIXELS": "5", "IMGSERVER_MAX_FILE_BYTES": "6",
        "IMGSERVER_MAX_BODY_BYTES": "7", "IMGSERVER_MAX_IMAGES": "8",
        "IMGSERVER_MAX_QUEUE": "9", "IMGSERVER_IMAGE_TIMEOUT": "1.5",
        "IMGSERVER_READ_TIMEOUT": "2.5"})
    assert (chosen.max_pixels, chosen.max_file_bytes, chosen.max_body_bytes, chosen.max_images,
            chosen.max_queue, chosen.image_timeout, chosen.read_timeout) == (
        5, 6, 7, 8, 9, 1.5, 2.5)
