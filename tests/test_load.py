"""Load against a real server: every accepted job finishes, none lost or run twice.

The short run is part of the suite; the 50-client, 30-second soak runs with
``scripts/soak`` (pytest -m soak) and prints the figures docs/operations.md quotes (Reliability).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import pytest

from conftest import photo
from load import LoadReport, run_load
from serving import start_server


def loaded(root: Path, clients: int, seconds: float, max_queue: int) -> LoadReport:
    """Run the load against a fresh server on ``root``; check it loses nothing."""
    cv2.imwrite(str(root / "small.jpg"), photo(240, 320))
    server = start_server(root, "--workers", "2", "--max-queue", str(max_queue))
    try:
        report = run_load(server, "small.jpg", clients=clients, seconds=seconds)
    finally:
        assert server.stop() == 0
    print("\nLOAD:", report.summary())
    assert report.accepted and not report.other
    assert not report.lost and not report.twice, report.summary()
    return report


def test_load_short_run_loses_nothing(root: Path) -> None:
    loaded(root, clients=10, seconds=4, max_queue=40)


@pytest.mark.soak
def test_load_soak_50_clients_30_seconds(root: Path) -> None:
    loaded(root, clients=50, seconds=30, max_queue=200)
