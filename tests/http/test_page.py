"""The status page in a real headless Chromium (Debian's chromium and chromium-driver,
driven by selenium): live updates, thumbnails, errors, Cancel, the token, no other host."""

from __future__ import annotations

import contextlib
import http.server
import json
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from conftest import request_body, wait_for
from serving import Server, shared_server, start_server, wait_state

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/test installs them)")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM  # type: ignore[assignment]
    # Without the background-networking flags Chromium calls Google's hosts at start.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic",
                 "--window-size=1280,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"performance": "ALL"})
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.implicitly_wait(0)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One server with one worker for this module's tests (each uses its own names)."""
    images = [("a.png", 320, 240), ("big.png", 2400, 1800)]
    yield from shared_server(tmp_path_factory.mktemp("page"), images, "--workers", "1")


def url(server: Server, path: str) -> str:
    return f"http://127.0.0.1:{server.port}{path}"


def script(browser: object, code: str) -> object:
    return browser.execute_script(code)  # type: ignore[attr-defined]


def requested_hosts(browser: object) -> set[str]:
    """Every host the page has asked for anything since the last call."""
    hosts = set()
    for entry in browser.get_log("performance"):  # type: ignore[attr-defined]
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            parts = urlsplit(message["params"]["request"]["url"])
            if parts.scheme not in ("data", "blob"):
                hosts.add(parts.netloc)
    return hosts


def test_page_lists_jobs_live_and_the_bar_moves(browser: object, server: Server) -> None:
    first = server.request("POST", "/jobs?wait=true", request_body([("a.png", "p/1.png")]))
    browser.get(url(server, "/"))  # type: ignore[attr-defined]
    assert browser.current_url.endswith("/ui")  # type: ignore[attr-defined]
    wait_for(lambda: script(browser, f"return !!document.querySelector("
                                     f"'tr[data-job=\"{first.json()['id']}\"]')"), timeout=15)
    script(browser, "window.notReloaded = true")
    (server.root / "inbox" / "dropped.json").write_bytes(request_body([("a.png", "p/d.png")]))
    running = server.request("POST", "/jobs", request_body(
        [("big.png", f"p/b{n}.png") for n in range(4)], ["blur=31"])).json()["id"]
    row = f"document.querySelector('tr[data-job=\"{running}\"]')"
    wait_for(lambda: script(browser, f"return !!{row}"), timeout=15)  # appeared by itself
    seen = set()

    def finished() -> bool:
        seen.add(script(browser, f"return {row}.querySelector('.bar').dataset.done"))
        return script(browser, f"return {row}.querySelector('.state').textContent") == "done"

    wait_for(finished, timeout=60)
    assert script(browser, f"return {row}.querySelector('.bar').dataset.done") == "4"
    assert script(browser, f"return {row}.querySelector('.bar > div').style.width") == "100%"
    assert len(seen) >= 2  # it moved in steps, not only at the end
    sources = script(browser, "return [...document.querySelectorAll('tr[data-job]')].map("
                              "r => r.dataset.job + ' ' + r.querySelector('.source')"
                              ".textContent.trim())")
    assert "dropped inbox" in sources and f"{first.json()['id']} http" in sources
    assert script(browser, "return window.notReloaded") is True
    script(browser, "document.getElementById('state').value = 'failed';"
                    "document.getElementById('state').dispatchEvent(new Event('change'))")
    wait_for(lambda: script(browser, "return location.search") == "?state=failed")
    wait_for(lambda: script(browser, "return document.querySelectorAll('tr[data-job]')"
                                     ".length") == 0)
    assert requested_hosts(browser) == {f"127.0.0.1:{server.port}"}


def test_page_more_shows_the_next_page_and_goes_at_the_end(
        browser: object, root: Path, make_image: Callable[..., Path]) -> None:
    from selenium.webdriver.common.by import By

    page = 50  # page.js's PAGE_SIZE
    make_image("a.png", 8, 8)
    server = start_server(root, "--workers", "2")
    try:
        for n in range(page + 10):
            reply = server.request("POST", "/jobs", request_body([("a.png", f"m/{n}.png")]))
            assert reply.status == 202
        jobs = wait_for(lambda: (lambda listed: listed if len(listed) == page + 10 and all(
            job["state"] == "done" for job in listed) else None)(
            server.request("GET", "/jobs?limit=1000").json()["jobs"]), timeout=60)
        ids = [job["id"] for job in jobs]  # newest first
        requested_hosts(browser)  # from here on
        browser.get(url(server, "/ui"))  # type: ignore[attr-defined]
        shown = "return [...document.querySelectorAll('tr[data-job]')].map(r => r.dataset.job)"
        wait_for(lambda: script(browser, shown) == ids[:page], timeout=15)  # one page
        more = browser.find_element(By.ID, "more")  # type: ignore[attr-defined]
        assert more.is_displayed()
        more.click()
        wait_for(lambda: script(browser, shown) == ids, timeout=15)  # and the next one
        wait_for(lambda: not more.is_displayed(), timeout=10)  # nothing more: the button goes
        assert script(browser, shown) == ids
        assert requested_hosts(browser) == {f"127.0.0.1:{server.port}"}
    finally:
        server.stop()


def test_page_job_shows_thumbnails_errors_and_cancels(browser: object, server: Server) -> None:
    job = server.request("POST", "/jobs?wait=true", request_body(
        [("a.png", "j/a.png"), ("missing.png", "j/m.png")], ["split"])).json()
    browser.get(url(server, f"/ui/jobs/{job['id']}"))  # type: ignore[attr-defined]
    thumbs = "[...document.querySelectorAll('.thumbs img')]"
    wait_for(lambda: script(browser, f"return {thumbs}.length === 4 && {thumbs}.every("
                                     f"i => i.complete && i.naturalWidth > 0)"), timeout=20)
    error = script(browser, "return document.querySelector('li[data-index=\"1\"] .error')"
                            ".textContent")
    assert "no such file" in error
    assert script(browser, "return document.getElementById('cancel').hidden") is True
    script(browser, f"{thumbs}[0].click()")  # the full image, in the page
    wait_for(lambda: script(browser, "const v = document.getElementById('viewer');"
                                     "return !v.hidden && v.querySelector('img').naturalWidth"
                                     ) == 160)  # the left-top tile of a 320-wide image
    slow = server.request("POST", "/jobs", request_body(
        [("big.png", f"c/{n}.png") for n in range(30)], ["blur=31"])).json()["id"]
    browser.get(url(server, f"/ui/jobs/{slow}"))  # type: ignore[attr-defined]
    wait_for(lambda: script(browser, "return !document.getElementById('cancel').hidden"))
    script(browser, "document.getElementById('cancel').click()")
    wait_for(lambda: script(browser, "return document.getElementById('state').textContent")
             == "cancelled", timeout=30)
    assert wait_state(server, slow, ("cancelled",))["error"].startswith("cancelled: ")
    assert script(browser, "return document.getElementById('cancel').hidden") is True
    assert requested_hosts(browser) == {f"127.0.0.1:{server.port}"}


def test_page_job_shows_the_input_beside_its_tiles_in_their_places(
        browser: object, server: Server) -> None:
    job = server.request("POST", "/jobs?wait=true", request_body(
        [("a.png", "g/a.png")], ["split", "split"])).json()
    outputs = job["images"][0]["outputs"]
    assert len(outputs) == 16
    browser.get(url(server, f"/ui/jobs/{job['id']}"))  # type: ignore[attr-defined]
    tiles = "[...document.querySelectorAll('.thumbs img')]"
    wait_for(lambda: script(browser, f"return {tiles}.length === 16 && {tiles}.every("
                                     f"i => i.complete && i.naturalWidth > 0)"), timeout=20)
    # The input, as a thumbnail of its own (256 px wide for a 320 x 240 image).
    wait_for(lambda: script(browser, "const i = document.querySelector('.source img');"
                                     "return i.complete && i.naturalWidth") == 256, timeout=20)
    boxes = script(browser, f"return {tiles}.map(i => {{const r = i.getBoundingClientRect();"
                            f"return [i.title, Math.round(r.left), Math.round(r.top)]}})")
    lefts = sorted({left for _, left, _ in boxes})
    tops = sorted({top for _, _, top in boxes})
    assert len(lefts) == 4 and len(tops) == 4  # a 4 x 4 grid, not one column
    quadrant = {"lt": (0, 0), "rt": (1, 0), "lb": (0, 1), "rb": (1, 1)}
    for title, left, top in boxes:
        outer, inner = Path(title).stem.split("_")[1:]
        column = 2 * quadrant[outer][0] + quadrant[inner][0]
        row = 2 * quadrant[outer][1] + quadrant[inner][1]
        assert (lefts.index(left), tops.index(top)) == (column, row), title
    source = script(browser, "return document.querySelector('.source img')"
                             ".getBoundingClientRect().right")
    assert source < lefts[0]  # the input stands beside (left of) its outputs


def test_page_with_a_token_shows_nothing_until_it_is_given(
        browser: object, root: Path, make_image: Callable[..., Path]) -> None:
    make_image("a.png")
    server = start_server(root, env={"IMGSERVER_TOKEN": "s3cret"})
    try:
        job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "t.png")]),
                             headers={"Authorization": "Bearer s3cret"}).json()
        browser.get(url(server, "/ui"))  # type: ignore[attr-defined]
        wait_for(lambda: script(browser, "return !!document.querySelector('form.token')"))
        assert job["id"] not in browser.page_source  # type: ignore[attr-defined]
        assert script(browser, "return document.getElementById('content').hidden") is True
        script(browser, "const f = document.querySelector('form.token');"
                        "f.elements.token.value = 'wrong'; f.requestSubmit()")
        wait_for(lambda: "refused" in script(
            browser, "const f = document.querySelector('form.token');"
                     "return f ? f.textContent : ''"))
        assert job["id"] not in browser.page_source  # type: ignore[attr-defined]
        script(browser, "const f = document.querySelector('form.token');"
                        "f.elements.token.value = 's3cret'; f.requestSubmit()")
        wait_for(lambda: script(browser, f"return !!document.querySelector("
                                         f"'tr[data-job=\"{job['id']}\"]')"), timeout=15)
        assert script(browser, "return sessionStorage.getItem('imgserver-token')") == "s3cret"
        assert script(browser, "return localStorage.length") == 0
        browser.get(url(server, f"/ui/jobs/{job['id']}"))  # type: ignore[attr-defined]
        wait_for(lambda: script(browser, "const i = document.querySelector('.thumbs img');"
                                         "return i && i.naturalWidth > 0"), timeout=15)
        assert "s3cret" not in server.output()  # never in a URL, so never in the log
        time.sleep(0.1)
    finally:
        script(browser, "sessionStorage.clear()")
        server.stop()


@contextlib.contextmanager
def other_site(pages: dict[str, str]) -> Iterator[str]:
    """A second web server on loopback (another origin: another port) serving ``pages``
    (path -> HTML); its address."""
    class Pages(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the name http.server calls)
            body = pages.get(self.path, "").encode()
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pages)
    thread = threading.Thread(target=site.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{site.server_port}"
    finally:
        site.shutdown()
        site.server_close()
        thread.join()


def browser_log(browser: object) -> list[str]:
    """The browser's console messages since the last call (CSP violations among them)."""
    return [entry["message"] for entry in browser.get_log("browser")]  # type: ignore[attr-defined]


def test_page_cannot_be_framed_by_another_site(browser: object, server: Server) -> None:
    from selenium.webdriver.common.by import By

    job = server.request("POST", "/jobs?wait=true", request_body([("a.png", "f/a.png")])).json()
    framed = {"page": url(server, "/ui"), "job": url(server, f"/ui/jobs/{job['id']}"),
              "docs": url(server, "/docs")}
    frames = "".join(f'<iframe id="{name}" src="{src}"></iframe>' for name, src in framed.items())
    with other_site({"/": f"<!doctype html><title>other</title>{frames}"
                          f'<iframe id="own" src="/own"></iframe>',
                     "/own": '<!doctype html><p id="mine">framed</p>'}) as site:
        browser_log(browser)
        browser.get(f"{site}/")  # type: ignore[attr-defined]

        def inside(name: str, code: str) -> object:
            browser.switch_to.frame(browser.find_element(By.ID, name))  # type: ignore[attr-defined]
            try:
                return script(browser, code)
            finally:
                browser.switch_to.default_content()  # type: ignore[attr-defined]

        # The site's own frame shows its page: frames work, and this one has loaded.
        wait_for(lambda: inside("own", "return !!document.getElementById('mine')"))
        for name in framed:
            where = wait_for(lambda name=name: (lambda href: href if href != "about:blank"
                                                else None)(inside(name, "return location.href")))
            assert where.startswith("chrome-error:"), (name, where)  # refused, not shown
            assert inside(name, "return document.querySelector('[data-page], .swagger-ui')"
                                " === null"), name
        refusals = []
        wait_for(lambda: refusals.extend(browser_log(browser)) or sum(
            "frame-ancestors 'none'" in message for message in refusals) == len(framed))
    assert requested_hosts(browser) >= {f"127.0.0.1:{server.port}"}


def test_page_and_docs_work_under_their_security_policy(browser: object, server: Server) -> None:
    from selenium.webdriver.common.by import By

    (server.root / "page.html").write_text("<script>document.title = 'ran'</script>")
    job = server.request("POST", "/jobs?wait=true", request_body(
        [("a.png", "w/a.png"), ("page.html", "w/p.png")], ["split"])).json()
    browser_log(browser)
    browser.get(url(server, "/ui"))  # type: ignore[attr-defined]
    wait_for(lambda: script(browser, f"return !!document.querySelector("
                                     f"'tr[data-job=\"{job['id']}\"]')"), timeout=15)
    browser.get(url(server, f"/ui/jobs/{job['id']}"))  # type: ignore[attr-defined]
    thumbs = "[...document.querySelectorAll('.thumbs img')]"
    wait_for(lambda: script(browser, f"return {thumbs}.length === 4 && {thumbs}.every("
                                     f"i => i.complete && i.naturalWidth > 0)"), timeout=20)
    browser.get(url(server, "/docs"))  # type: ignore[attr-defined]
    wait_for(lambda: len(browser.find_elements(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, ".opblock-summary")) >= 10, timeout=15)
    listing = browser.find_elements(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, ".opblock-get .opblock-summary")[0]
    listing.click()
    wait_for(lambda: browser.find_elements(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, ".opblock.is-open .try-out__btn"))[0].click()
    wait_for(lambda: browser.find_elements(  # type: ignore[attr-defined]
        By.CSS_SELECTOR, ".opblock.is-open .execute"))[0].click()
    wait_for(lambda: script(browser, "return [...document.querySelectorAll("
                                     "'.live-responses-table .response-col_status')]"
                                     ".map(e => e.textContent.trim())").count("200"),
             timeout=15)  # "Try it out" asked the server, from the docs page
    # A job's file holding HTML, opened as a page of this site, runs nothing.
    browser.get(url(server, f"/jobs/{job['id']}/images/1/file"))  # type: ignore[attr-defined]
    wait_for(lambda: script(browser, "return document.readyState") == "complete")
    assert script(browser, "return document.title") != "ran"
    violations = [m for m in browser_log(browser) if "Content Security Policy" in m]
    assert len(violations) == 1 and "inline script" in violations[0]  # that script, only
    assert requested_hosts(browser) == {f"127.0.0.1:{server.port}"}


def test_page_with_a_folder_token_shows_that_folders_jobs_only(
        browser: object, root: Path, make_image: Callable[..., Path],
        tmp_path_factory: pytest.TempPathFactory) -> None:
    tokens = tmp_path_factory.mktemp("tokens") / "tokens.json"
    secrets = {}
    for name in ("a", "b"):
        make_image(f"{name}/in.png")
        added = subprocess.run([sys.executable, "-m", "imgserver", "token", "add", name,
                                "--folder", name, "--tokens", str(tokens)],
                               capture_output=True, text=True, timeout=60)
        secrets[name] = added.stdout.strip()
    server = start_server(root, "--tokens", str(tokens))
    try:
        ids = {name: server.request("POST", "/jobs?wait=true", request_body(
            [("in.png", "out.png")]), headers={"Authorization": f"Bearer {secret}"}).json()["id"]
            for name, secret in secrets.items()}
        browser.get(url(server, "/ui"))  # type: ignore[attr-defined]
        wait_for(lambda: script(browser, "return !!document.querySelector('form.token')"))
        script(browser, "const f = document.querySelector('form.token');"
                        f"f.elements.token.value = '{secrets['a']}'; f.requestSubmit()")
        rows = "return [...document.querySelectorAll('tr[data-job]')].map(r => r.dataset.job)"
        wait_for(lambda: script(browser, rows) == [ids["a"]], timeout=15)
        browser.get(url(server, f"/ui/jobs/{ids['a']}"))  # type: ignore[attr-defined]
        wait_for(lambda: script(browser, "const i = document.querySelector('.thumbs img');"
                                         "return i && i.naturalWidth > 0"), timeout=15)
        browser.get(url(server, f"/ui/jobs/{ids['b']}"))  # type: ignore[attr-defined]
        wait_for(lambda: f"No job {ids['b']}" in script(
            browser, "return document.querySelector('main').textContent"), timeout=15)
        assert ids["b"] not in browser.page_source.replace(  # type: ignore[attr-defined]
            f"No job {ids['b']}", "")
    finally:
        script(browser, "sessionStorage.clear()")
        server.stop()
