"""A job's files over HTTP: thumbnails made by a worker, the files themselves, only listed."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import request_body
from serving import Server, start_server


@pytest.fixture
def server(root: Path) -> Iterator[Server]:
    running = start_server(root, "--workers", "1", env={"IMGSERVER_TOKEN": "t"})
    yield running
    running.stop()


AUTH = {"Authorization": "Bearer t"}


def decoded(data: bytes) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)


def test_files_thumbnails_of_listed_files_only(server: Server, root: Path,
                                               make_image: Callable[..., Path]) -> None:
    make_image("big.jpg", 1200, 800)
    make_image("alpha.png", 300, 200, channels=4)
    make_image("other.png", 64, 48)
    body = request_body([("big.jpg", "out/big.png"), ("alpha.png", "out/alpha.png"),
                         ("missing.png", "out/m.png")], ["split"])
    job = server.request("POST", "/jobs?wait=true", body, headers=AUTH).json()
    base = f"/jobs/{job['id']}/images"
    reply = server.request("GET", f"{base}/0/thumbnail?output=1", headers=AUTH)
    assert reply.status == 200 and reply.headers["content-type"] == "image/jpeg"
    tile = decoded(reply.body)  # the right-top tile, 600 x 400: 256 x 171
    assert tile.shape == (171, 256, 3)
    reference = cv2.resize(cv2.imread(str(root / "out/big_rt.png")), (256, 171),
                           interpolation=cv2.INTER_AREA)
    assert np.abs(tile.astype(int) - reference.astype(int)).mean() < 3
    small = server.request("GET", f"{base}/0/thumbnail?size=100", headers=AUTH)  # the input
    assert decoded(small.body).shape == (67, 100, 3)
    alpha = server.request("GET", f"{base}/1/thumbnail?output=0&size=64", headers=AUTH)
    assert alpha.headers["content-type"] == "image/png" and decoded(alpha.body).shape[2] == 4
    full = server.request("GET", f"{base}/0/file?output=3", headers=AUTH)
    assert full.status == 200 and full.body == (root / "out/big_rb.png").read_bytes()
    assert full.headers["content-type"] == "image/png"
    for path, status in [(f"{base}/0/thumbnail?output=4", 404),  # only 4 tiles
                         (f"{base}/3/thumbnail", 404),           # only 3 images
                         (f"{base}/2/thumbnail", 404),           # its input does not exist
                         (f"{base}/2/thumbnail?output=0", 404),  # it wrote nothing
                         (f"{base}/0/thumbnail?size=2000", 422),
                         (f"{base}/0/thumbnail?size=8", 422),
                         (f"{base}/-1/thumbnail", 422),
                         ("/jobs/nope/images/0/thumbnail", 404)]:
        assert server.request("GET", path, headers=AUTH).status == status, path
    assert server.request("GET", f"{base}/0/thumbnail").status == 401
    assert server.request("GET", f"{base}/0/file").status == 401
    # Another job's output is not this job's: only what this job lists.
    other = server.request("POST", "/jobs?wait=true", request_body(
        [("other.png", "out/other.png")]), headers=AUTH).json()
    assert server.request("GET", f"/jobs/{other['id']}/images/0/thumbnail?output=1",
                          headers=AUTH).status == 404


def test_files_etag_answers_304_and_changes_with_the_file(
        server: Server, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png", 200, 100)
    job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "o.png")]),
                         headers=AUTH).json()
    path = f"/jobs/{job['id']}/images/0/thumbnail?output=0"
    first = server.request("GET", path, headers=AUTH)
    etag = first.headers["etag"]
    assert etag and "no-cache" in first.headers["cache-control"]
    again = server.request("GET", path, headers={**AUTH, "If-None-Match": etag})
    assert again.status == 304 and again.body == b""
    file_etag = server.request("GET", path.replace("thumbnail", "file"), headers=AUTH)
    assert file_etag.headers["etag"] != etag  # the file and its thumbnail differ
    server.request("POST", "/jobs?wait=true", json.dumps(  # the output is written again
        {"images": [{"input": "a.png", "output": "o.png"}], "operations": ["resize=50"]}
    ).encode(), headers=AUTH)
    changed = server.request("GET", path, headers={**AUTH, "If-None-Match": etag})
    assert changed.status == 200 and changed.headers["etag"] != etag
    assert decoded(changed.body).shape == (50, 100, 3)


def test_files_symlink_swapped_in_is_not_followed(
        server: Server, root: Path, make_image: Callable[..., Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    make_image("a.png", 64, 48)
    job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "out/o.png")]),
                         headers=AUTH).json()
    outside = tmp_path_factory.mktemp("outside")
    make_secret = outside / "o.png"
    cv2.imwrite(str(make_secret), np.zeros((10, 10, 3), np.uint8))
    (root / "out" / "o.png").unlink()
    (root / "out" / "o.png").symlink_to(make_secret)
    for kind in ("thumbnail", "file"):
        reply = server.request("GET", f"/jobs/{job['id']}/images/0/{kind}?output=0",
                               headers=AUTH)
        assert reply.status == 404, kind
