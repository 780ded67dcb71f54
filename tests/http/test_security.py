"""The security headers of a real ``imgserver serve``: every answer says nosniff, no framing
and no referrer; the pages say what they may load and run, and nothing else may run
anything."""

from __future__ import annotations

import base64
import hashlib
import re
import socket
from collections.abc import Iterator

import pytest

from conftest import request_body
from serving import Reply, Server, shared_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server whose root holds a.png and a page of HTML with a script in it."""
    root = tmp_path_factory.mktemp("security")
    (root / "page.html").write_text("<script>document.title = 'ran'</script>")
    yield from shared_server(root, [("a.png", 32, 24)], "--workers", "1",
                             "--read-timeout", "1", "--max-body-bytes", "4096")


def policy(reply: Reply) -> dict[str, list[str]]:
    """The answer's Content-Security-Policy, by directive."""
    directives = [part.split() for part in reply.headers["content-security-policy"].split(";")]
    return {words[0]: words[1:] for words in directives if words}


def raw_answer(server: Server, data: bytes) -> Reply:
    """The answer to ``data`` sent as it is, read until the server closes the connection."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(data)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {name.lower(): value.strip()
               for name, _, value in (line.partition(":") for line in lines[1:])}
    return Reply(int(lines[0].split()[1]), headers, body)


def test_security_every_answer_carries_nosniff_and_refuses_framing(server: Server) -> None:
    job = server.request("POST", "/jobs?wait=true",
                         request_body([("a.png", "s/a.png"), ("page.html", "s/p.png")])).json()
    tagged = server.request("GET", f"/jobs/{job['id']}/images/0/file")
    answers = {
        "/": server.request("GET", "/"),
        "/ui": server.request("GET", "/ui"),
        "/ui/jobs/<id>": server.request("GET", f"/ui/jobs/{job['id']}"),
        "/ui/static/page.js": server.request("GET", "/ui/static/page.js"),
        "GET /jobs": server.request("GET", "/jobs"),
        "POST /jobs": server.request("POST", "/jobs", request_body([("a.png", "s/b.png")])),
        "/jobs/<id>": server.request("GET", f"/jobs/{job['id']}"),
        "thumbnail": server.request("GET", f"/jobs/{job['id']}/images/0/thumbnail"),
        "file": tagged,
        "file, not modified": server.request("GET", f"/jobs/{job['id']}/images/0/file",
                                             headers={"If-None-Match": tagged.headers["etag"]}),
        "/healthz": server.request("GET", "/healthz"),
        "/metrics": server.request("GET", "/metrics"),
        "/docs": server.request("GET", "/docs"),
        "/docs-assets/swagger-ui.css": server.request("GET", "/docs-assets/swagger-ui.css"),
        "/openapi.json": server.request("GET", "/openapi.json"),
        "404 unknown job": server.request("GET", "/jobs/nope"),
        "404 unknown path": server.request("GET", "/nope"),
        "422 request": server.request("POST", "/jobs", b"{}"),
        "422 parameter": server.request("GET", "/jobs?limit=0"),
        "413": server.request("POST", "/jobs", b" " * 5000),
        # Answered by the connection itself, outside the application: a request that does
        # not arrive whole within --read-timeout, and one that is not HTTP.
        "408": raw_answer(server, b"POST /jobs HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n"),
        "400": raw_answer(server, b"NOT HTTP AT ALL\r\n\r\n"),
    }
    statuses = {name: reply.status for name, reply in answers.items()}
    assert statuses == {**{name: 200 for name in answers}, "/": 307, "POST /jobs": 202,
                        "file, not modified": 304, "404 unknown job": 404,
                        "404 unknown path": 404, "422 request": 422, "422 parameter": 422,
                        "413": 413, "408": 408, "400": 400}
    for name, reply in answers.items():
        assert reply.headers.get("x-content-type-options") == "nosniff", name
        assert reply.headers.get("x-frame-options") == "DENY", name
        assert reply.headers.get("referrer-policy") == "no-referrer", name
        assert policy(reply)["frame-ancestors"] == ["'none'"], name


def test_security_pages_run_only_what_the_server_serves(server: Server) -> None:
    job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "p/a.png")])).json()
    for path in ("/ui", f"/ui/jobs/{job['id']}"):
        page = policy(server.request("GET", path))
        assert page["default-src"] == page["script-src"] == page["style-src"] == ["'self'"]
        assert page["connect-src"] == ["'self'"] and page["object-src"] == ["'none'"]
        assert page["img-src"] == ["'self'", "blob:", "data:"]  # thumbnails come as blobs
        assert page["base-uri"] == ["'none'"]
    docs = server.request("GET", "/docs")
    inline = re.findall(r"<script>(.*?)</script>", docs.body.decode(), re.DOTALL)
    assert len(inline) == 1  # Swagger UI's start: allowed by its hash, nothing else inline
    digest = base64.b64encode(hashlib.sha256(inline[0].encode()).digest()).decode()
    rules = policy(docs)
    assert rules["script-src"] == ["'self'", f"'sha256-{digest}'"]
    assert rules["default-src"] == rules["connect-src"] == ["'self'"]
    for path in ("/jobs", "/openapi.json", "/healthz", "/nope"):  # not pages: nothing runs
        assert policy(server.request("GET", path))["default-src"] == ["'none'"], path


def test_security_a_job_file_holding_html_is_inert(server: Server) -> None:
    # An input may be any file under the root; served back it must not run as this site.
    job = server.request("POST", "/jobs?wait=true", request_body([("page.html", "h/p.png")]))
    served = server.request("GET", f"/jobs/{job.json()['id']}/images/0/file")
    assert served.status == 200 and served.headers["content-type"].startswith("text/html")
    assert b"<script>" in served.body
    rules = policy(served)
    assert rules["default-src"] == ["'none'"] and "script-src" not in rules
