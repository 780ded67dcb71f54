"""Several clients on one server (SPEC §13), end to end: tokens with scopes and folders,
isolation between folders, revocation while serving, rate limits and quotas, fair share
between tokens, the audit lines, no secret anywhere, and the safe default."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import request_body, wait_for
from serving import SSE, start_server, stream_events, wait_state


def add_token(tokens: Path, name: str, *options: str) -> str:
    """A new token in ``tokens``, through the command; its secret."""
    added = subprocess.run([sys.executable, "-m", "imgserver", "token", "add", name, *options,
                            "--tokens", str(tokens)], capture_output=True, text=True,
                           timeout=60)
    assert added.returncode == 0, added.stderr
    return added.stdout.strip()


def bearer(secret: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {secret}"}


class Tenants:
    """A server with tokens: ``a`` and ``b`` each in its folder, ``root`` over the whole
    root, ``reader`` (read only, folder a) and ``admin``."""

    def __init__(self, root: Path, make_image: Callable[..., Path], tokens: Path,
                 *options: str) -> None:
        for folder in ("a", "b"):
            make_image(f"{folder}/in.png", 64, 48)
        make_image("top.png", 32, 24)
        self.tokens = tokens
        self.secrets = {
            "a": add_token(self.tokens, "a", "--folder", "a"),
            "b": add_token(self.tokens, "b", "--folder", "b"),
            "root": add_token(self.tokens, "root"),
            "reader": add_token(self.tokens, "reader", "--folder", "a", "--scopes", "read"),
            "admin": add_token(self.tokens, "admin", "--folder", "b", "--scopes", "admin"),
        }
        self.server = start_server(root, "--tokens", str(self.tokens), "--workers", "1",
                                   *options)

    def as_(self, who: str, method: str, path: str, body: bytes | None = None
            ) -> tuple[int, dict]:
        reply = self.server.request(method, path, body, headers=bearer(self.secrets[who]))
        try:
            return reply.status, reply.json()
        except ValueError:
            return reply.status, {}


@pytest.fixture
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where this test's tokens file goes: outside the root."""
    return tmp_path_factory.mktemp("tokens") / "tokens.json"


@pytest.fixture
def tenants(root: Path, make_image: Callable[..., Path], tokens: Path) -> Iterator[Tenants]:
    running = Tenants(root, make_image, tokens)
    yield running
    running.server.stop()


def test_tenants_folders_see_only_their_own_jobs(tenants: Tenants) -> None:
    status, job = tenants.as_("a", "POST", "/jobs?wait=true",
                              request_body([("in.png", "out/x.png")], ["split"]))
    assert status == 200 and job["state"] == "done", job
    # Its paths are relative to its folder; the files are in ROOT/a.
    assert job["images"][0]["input"] == "in.png"
    assert job["images"][0]["outputs"][0] == "out/x_lt.png"
    assert (tenants.server.root / "a" / "out" / "x_lt.png").exists()
    job_id = job["id"]
    other = tenants.secrets["b"]
    routes = [("GET", f"/jobs/{job_id}"), ("POST", f"/jobs/{job_id}/cancel"),
              ("GET", f"/jobs/{job_id}/events"),
              ("GET", f"/jobs/{job_id}/images/0/thumbnail"),
              ("GET", f"/jobs/{job_id}/images/0/thumbnail?output=1"),
              ("GET", f"/jobs/{job_id}/images/0/file"),
              ("GET", f"/jobs/{job_id}/images/0/file?output=0")]
    for method, path in routes:  # 404, never 403: the id's existence is not revealed
        reply = tenants.server.request(method, path, headers=bearer(other))
        assert reply.status == 404, (method, path, reply.status)
        assert job_id in reply.json()["detail"] or "no job" in reply.json()["detail"]
    nope = tenants.server.request("GET", "/jobs/nope", headers=bearer(other))
    assert nope.json()["detail"].replace("nope", job_id) == tenants.server.request(
        "GET", f"/jobs/{job_id}", headers=bearer(other)).json()["detail"]
    for method, path in routes:  # and the same routes answer its own folder, and the root
        for who in ("a", "root", "admin"):
            assert tenants.server.request(method, path, headers=bearer(
                tenants.secrets[who])).status in (200, 202, 409), (who, method, path)
    _, b_job = tenants.as_("b", "POST", "/jobs?wait=true", request_body([("in.png", "y.png")]))
    listed = {who: [j["id"] for j in tenants.as_(who, "GET", "/jobs")[1]["jobs"]]
              for who in ("a", "b", "root", "reader", "admin")}
    assert listed["a"] == listed["reader"] == [job_id]
    assert listed["b"] == [b_job["id"]]
    assert set(listed["root"]) == set(listed["admin"]) == {job_id, b_job["id"]}
    dropped = tenants.server.root / "inbox" / "dropped.json"
    dropped.write_bytes(request_body([("top.png", "top-out.png")]))
    wait_state(tenants.server, "dropped", headers=bearer(tenants.secrets["root"]))
    assert tenants.as_("a", "GET", "/jobs/dropped")[0] == 404  # the operator's job
    assert "dropped" not in [j["id"] for j in tenants.as_("a", "GET", "/jobs")[1]["jobs"]]


def test_tenants_event_streams_leave_other_folders_out(tenants: Tenants) -> None:
    seen: dict[str, list[SSE]] = {"a": [], "root": []}
    readers = [threading.Thread(target=stream_events, daemon=True, args=(
        tenants.server, "/events"), kwargs={
        "count": count, "timeout": 30, "into": seen[who],
        "headers": bearer(tenants.secrets[who])}) for who, count in (("a", 4), ("root", 8))]
    for reader in readers:
        reader.start()
    wait_for(lambda: tenants.server.request("GET", "/metrics").body.count(
        b"imgserver_event_streams 2.0"))
    tenants.as_("b", "POST", "/jobs?wait=true", request_body([("in.png", "b1.png")]))
    tenants.as_("a", "POST", "/jobs?wait=true", request_body([("in.png", "a1.png")]))
    for reader in readers:
        reader.join(30)
    jobs_seen = {who: {event.data.get("job") for event in events}
                 for who, events in seen.items()}
    a_jobs = {j["id"] for j in tenants.as_("a", "GET", "/jobs")[1]["jobs"]}
    assert jobs_seen["a"] == a_jobs  # only its own, never b's
    assert len(jobs_seen["root"]) == 2  # the root sees both


def test_tenants_paths_stay_inside_the_folder(tenants: Tenants) -> None:
    root = tenants.server.root
    (root / "a" / "escape").symlink_to(root / "b")
    (root / "b" / "secret.png").write_bytes((root / "b" / "in.png").read_bytes())
    for source, output in [("../b/in.png", "x.png"), (str(root / "b" / "in.png"), "x.png"),
                           ("escape/in.png", "x.png"), ("in.png", "../b/stolen.png"),
                           ("in.png", "escape/stolen.png"), ("in.png", str(root / "top2.png"))]:
        status, answer = tenants.as_("a", "POST", "/jobs", request_body([(source, output)]))
        assert status == 422 and "outside the root" in answer["detail"], (source, output)
    assert not (root / "b" / "stolen.png").exists() and not (root / "top2.png").exists()
    status, answer = tenants.as_("a", "POST", "/jobs", request_body(
        [("in.png", "x.png")], ["watermark=../b/secret.png"]))
    assert status == 422 and "operations[0]" in answer["detail"]


def test_tenants_scopes_tokens_and_refusals_with_their_reasons(tenants: Tenants) -> None:
    server = tenants.server
    assert server.request("GET", "/jobs").status == 401
    unknown = server.request("GET", "/jobs", headers=bearer("imgs_nope"))
    assert unknown.status == 401 and unknown.headers["www-authenticate"] == "Bearer"
    status, answer = tenants.as_("reader", "POST", "/jobs", request_body([("in.png", "r.png")]))
    assert status == 403 and answer["scope"] == "submit" and "'submit'" in answer["detail"]
    assert tenants.as_("reader", "GET", "/jobs")[0] == 200
    for open_path in ("/healthz", "/metrics", "/openapi.json", "/docs"):
        assert server.request("GET", open_path).status == 200, open_path
    output = server.output()
    assert "refused GET /jobs from 127.0.0.1" in output and "(no token)" in output
    assert "refused POST /jobs from 127.0.0.1" in output and "(token 'reader')" in output
    assert "lacks the 'submit' scope" in output
    assert '"GET /jobs" 200 token \'reader\'' in output  # the access line names the token


def test_tenants_added_and_revoked_while_serving(tenants: Tenants) -> None:
    secret = add_token(tenants.tokens, "late", "--folder", "a")
    started = time.monotonic()
    wait_for(lambda: tenants.server.request("GET", "/jobs", headers=bearer(secret)).status
             == 200, timeout=5, interval=0.1)
    assert time.monotonic() - started < 2.5
    revoked = subprocess.run([sys.executable, "-m", "imgserver", "token", "revoke", "late",
                              "--tokens", str(tenants.tokens)], capture_output=True, text=True,
                             timeout=60)
    assert revoked.returncode == 0
    started = time.monotonic()
    wait_for(lambda: tenants.server.request("GET", "/jobs", headers=bearer(secret)).status
             == 401, timeout=5, interval=0.1)
    assert time.monotonic() - started < 2.5


def test_tenants_rate_and_quota_are_429_and_write_nothing(
        root: Path, make_image: Callable[..., Path], tokens: Path) -> None:
    make_image("q/in.png", 3000, 2000)
    quick = add_token(tokens, "quick", "--rate", "2")
    small = add_token(tokens, "small", "--folder", "q", "--max-queued", "3")
    server = start_server(root, "--tokens", str(tokens), "--workers", "1")
    try:
        answers = [server.request("GET", "/jobs", headers=bearer(quick)) for _ in range(4)]
        assert [a.status for a in answers[:2]] == [200, 200]
        refused = answers[-1]
        assert refused.status == 429 and refused.headers["retry-after"] == "1"
        assert "over its rate of 2 requests a second" in refused.json()["detail"]
        slow = request_body([("in.png", f"s{n}.png") for n in range(3)], ["blur=151"])
        assert server.request("POST", "/jobs", slow, headers=bearer(small)).status == 202
        before = sorted(os.listdir(root / "outbox"))
        over = server.request("POST", "/jobs", request_body([("in.png", "one.png")]),
                              headers=bearer(small))
        assert over.status == 429 and "--max-queued" in over.json()["detail"]
        assert "its limit is 3" in over.json()["detail"] and over.headers["retry-after"]
        assert sorted(os.listdir(root / "outbox")) == before  # nothing written
        never = server.request("POST", "/jobs", request_body(
            [("in.png", f"n{n}.png") for n in range(4)]), headers=bearer(small))
        assert never.status == 422 and "more than the token 'small' may have queued" in \
            never.json()["detail"]
        assert "refused" in server.output() and "over its rate" in server.output()
    finally:
        server.stop()


def test_tenants_fair_share_between_tokens_by_images_finished(
        root: Path, make_image: Callable[..., Path], tokens: Path) -> None:
    make_image("a/in.png", 640, 480)
    make_image("b/in.png", 640, 480)
    flood, other = add_token(tokens, "flood", "--folder", "a"), add_token(tokens, "b",
                                                                           "--folder", "b")
    admin = add_token(tokens, "admin", "--scopes", "admin")
    server = start_server(root, "--tokens", str(tokens), "--workers", "1")
    events: list[SSE] = []
    try:
        listener = threading.Thread(target=stream_events, daemon=True, args=(server, "/events"),
                                    kwargs={"count": 1000, "timeout": 120, "into": events,
                                            "headers": bearer(admin)})
        listener.start()
        wait_for(lambda: b"imgserver_event_streams 1.0" in server.request(
            "GET", "/metrics").body)
        for job in range(8):  # the flood: 8 jobs of 12 images, first
            reply = server.request("POST", "/jobs", request_body(
                [("in.png", f"f{job}/{n}.png") for n in range(12)], ["blur=15"]),
                headers=bearer(flood))
            assert reply.status == 202
        mine = server.request("POST", "/jobs?wait=true", request_body(
            [("in.png", f"m/{n}.png") for n in range(12)], ["blur=15"]),
            headers=bearer(other)).json()
        assert mine["state"] == "done"
        wait_for(lambda: sum(e.event == "image" and e.data["job"] == mine["id"]
                             for e in list(events)) == 12)
        seen = list(events)
        accepted = next(n for n, e in enumerate(seen)
                        if e.event == "job" and e.data["job"] == mine["id"])
        finished = [e.data["job"] for e in seen[accepted:] if e.event == "image"]
        mine_at = [n for n, job in enumerate(finished) if job == mine["id"]]
        # Round-robin over the tokens: from its acceptance on, every other image finished
        # is b's (two flood images may be in the pool already: one running, one queued
        # ahead of it); were the flood's 8 jobs each a turn, b would get one image in nine.
        assert mine_at[-1] <= 2 * 12 + 1, mine_at
    finally:
        server.stop()


def test_tenants_no_secret_anywhere_after_a_session(tenants: Tenants) -> None:
    root = tenants.server.root
    for who in ("a", "b", "root", "admin"):
        tenants.as_(who, "POST", "/jobs?wait=true", request_body([("in.png", f"{who}.png")]))
        tenants.as_(who, "GET", "/jobs")
    tenants.as_("reader", "POST", "/jobs", request_body([("in.png", "no.png")]))  # 403
    tenants.server.request("GET", "/jobs", headers=bearer("imgs_wrong_secret"))
    metrics = tenants.server.request("GET", "/metrics").body.decode()
    tenants.server.stop()
    places = [tenants.server.log, tenants.tokens,
              *(p for p in root.rglob("*") if p.is_file() and p.suffix != ".png")]
    for secret in [*tenants.secrets.values(), "imgs_wrong_secret"]:
        assert secret not in metrics
        for place in places:
            assert secret.encode() not in place.read_bytes(), place


def test_tenants_serve_beyond_loopback_needs_a_token_or_says_so(root: Path) -> None:
    refused = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                              "--host", "0.0.0.0", "--port", "0"], capture_output=True,
                             text=True, timeout=60,
                             env={k: v for k, v in os.environ.items()
                                  if not k.startswith("IMGSERVER_")})
    assert refused.returncode == 2
    for named in ("--tokens", "IMGSERVER_TOKEN", "--allow-anonymous"):
        assert named in refused.stderr, named
    served = start_server(root, "--host", "0.0.0.0", "--allow-anonymous")
    try:
        assert served.request("GET", "/healthz").status == 200
    finally:
        served.stop()
    with_token = start_server(root, "--host", "0.0.0.0", env={"IMGSERVER_TOKEN": "imgs_t"})
    try:
        assert with_token.request("GET", "/jobs").status == 401
        assert with_token.request("GET", "/jobs", headers=bearer("imgs_t")).status == 200
    finally:
        with_token.stop()


def test_tenants_the_token_file_is_read_at_start_or_the_start_fails(root: Path,
                                                                    tokens: Path) -> None:
    broken = tokens
    broken.write_text(json.dumps({"tokens": [{"name": "x"}]}))
    result = subprocess.run([sys.executable, "-m", "imgserver", "serve", "--root", str(root),
                             "--port", "0", "--tokens", str(broken)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "is not valid" in result.stderr
