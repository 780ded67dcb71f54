"""The systemd unit: it verifies, it is hardened, and its ExecStart runs a real command."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "scripts" / "imgserver.service"
INSTALL = REPO / "scripts" / "install-service"
needs_systemd = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze is not installed")


def rendered(tmp_path: Path, root: Path) -> Path:
    """The unit as install-service writes it for this checkout's virtual environment."""
    venv = Path(sys.executable).parent.parent
    text = subprocess.run([str(INSTALL), "--print", "--venv", str(venv), "--root", str(root)],
                          capture_output=True, text=True, check=True).stdout
    unit = tmp_path / "imgserver.service"
    unit.write_text(text)
    return unit


def directives(unit: Path) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        match = re.match(r"^(\w+)=(.*)$", line)
        if match:
            found.setdefault(match.group(1), []).append(match.group(2))
    return found


def test_service_execstart_runs_an_existing_command(tmp_path: Path) -> None:
    unit = rendered(tmp_path, tmp_path / "root")
    command, *args = directives(unit)["ExecStart"][0].split()
    assert Path(command).is_file() and args == ["serve"]
    result = subprocess.run([command, *args, "--help"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0 and "--max-queue" in result.stdout


def test_service_runs_as_user_restarts_and_stops_gently() -> None:
    found = directives(UNIT)
    assert found["User"] == ["imgserver"] and found["Restart"] == ["on-failure"]
    assert found["KillSignal"] == ["SIGTERM"] and found["KillMode"] == ["mixed"]
    assert found["NoNewPrivileges"] == ["yes"] and found["ProtectSystem"] == ["strict"]
    assert found["PrivateTmp"] == ["yes"]
    assert "/var/lib/imgserver" in found["ReadWritePaths"]
    assert "IMGSERVER_HOST=127.0.0.1" in found["Environment"]


def test_service_rendered_for_another_root(tmp_path: Path) -> None:
    found = directives(rendered(tmp_path, Path("/srv/images")))
    assert found["ReadWritePaths"] == ["/srv/images"]
    assert found["WorkingDirectory"] == ["/srv/images"] and "StateDirectory" not in found
    assert "IMGSERVER_ROOT=/srv/images" in found["Environment"]


@needs_systemd
def test_service_unit_verifies(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "verify", str(rendered(tmp_path, tmp_path))],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@needs_systemd
def test_service_exposure_is_at_most_2(tmp_path: Path) -> None:
    result = subprocess.run(["systemd-analyze", "security", "--offline=yes", str(UNIT)],
                            capture_output=True, text=True, timeout=60)
    score = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert score, result.stdout + result.stderr
    assert float(score.group(1)) <= 2.0


def test_service_keeps_a_venv_under_home_reachable(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    text = subprocess.run([str(INSTALL), "--print", "--venv", "/home/me/venv"],
                          capture_output=True, text=True, check=True).stdout
    assert "ProtectHome=read-only" in text and f"{venv}" not in text
