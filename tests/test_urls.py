"""Notify URLs against --notify-allow prefixes: matched on the URL's own boundaries."""

from __future__ import annotations

import base64
from pathlib import Path
from urllib.parse import unquote, urljoin, urlsplit

import httpx2
import pytest
from hypothesis import given
from hypothesis import strategies as st

from imgserver.errors import ConfigError
from imgserver.settings import Settings
from imgserver.urls import allowed, check_allowed, check_prefix, check_url, redacted

SECRET = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


@pytest.mark.parametrize("prefix, url, expected", [
    # The SPEC's own cases (section 9).
    ("https://hooks.example.com", "https://hooks.example.com/x", True),
    ("https://hooks.example.com", "https://hooks.example.com.evil.net/", False),
    ("https://hooks.example.com", "https://hooks.example.com:8443/x", False),
    ("https://hooks.example.com", "https://user:pw@hooks.example.com/x", False),
    ("http://h/hooks/", "http://h/hooks/../admin", False),
    ("http://h/hooks", "http://h/hooks-evil/", False),
    ("http://h/hooks", "http://h/hooks-evil/x", False),
    # Hosts: a prefix's host is not a string prefix of the URL's.
    ("http://localhost", "http://localhost.evil.example/", False),
    ("http://localhost", "http://localhostevil/", False),
    ("http://localhost:8080", "http://localhost:80801/", False),
    ("http://127.0.0.1:900/hooks", "http://127.0.0.1:9000/hooks", False),
    # Scheme and host in any case; the same origin with its default port written or not.
    ("https://hooks.example.com", "HTTPS://HOOKS.Example.COM/x", True),
    ("HTTPS://Hooks.Example.com/", "https://hooks.example.com/x", True),
    ("https://hooks.example.com", "https://hooks.example.com:443/x", True),
    ("https://hooks.example.com:443", "https://hooks.example.com/x", True),
    ("http://h", "http://h:80/x", True),
    ("http://h:80/", "http://h/x", True),
    ("http://h", "http://h:443/x", False),
    ("https://h", "https://h:80/x", False),
    ("http://h:8080", "http://h/x", False),
    ("http://h", "https://h/x", False),
    ("https://h", "http://h:443/x", False),
    # IPv6 literals, compared as addresses.
    ("http://[::1]:8080/hooks", "http://[::1]:8080/hooks/x", True),
    ("http://[::1]:8080/hooks", "http://[0:0::0:1]:8080/hooks/x", True),
    ("http://[::1]:8080/hooks", "http://[::1]/hooks/x", False),
    ("http://[::1]:8080/hooks", "http://[::2]:8080/hooks/x", False),
    ("http://[::1]/", "http://[fe80::1%25eth0]/", False),
    ("http://[::1]/", "http://127.0.0.1/", False),
    # Credentials, whatever host they are read as.
    ("https://hooks.example.com", "https://hooks.example.com@evil.net/", False),
    ("https://hooks.example.com", "https://user:pw@hooks.example.com/", False),
    ("https://hooks.example.com", "https://user@hooks.example.com/", False),
    ("https://hooks.example.com", "https://@hooks.example.com/", False),
    ("https://hooks.example.com", "https://hooks.example.com:443@evil.net/", False),
    # Paths by whole segments; a trailing "/" in the prefix is the same boundary.
    ("http://h/hooks", "http://h/hooks", True),
    ("http://h/hooks", "http://h/hooks/", True),
    ("http://h/hooks", "http://h/hooks/x/y", True),
    ("http://h/hooks/", "http://h/hooks", True),
    ("http://h/hooks/", "http://h/hooks/x", True),
    ("http://h/hooks/", "http://h/hooksx", False),
    ("http://h/hooks/", "http://h/Hooks/x", False),
    ("http://h/hooks", "http://h/hooks;x", False),
    ("http://h/hooks", "http://h/hooks?x=1", True),
    ("http://h/hooks", "http://h/hooks#x", True),
    ("http://h/hooks", "http://h/?/hooks", False),
    ("http://h/hooks", "http://h/hook%73", False),  # percent-encodings other than %2e: as written
    # Dot segments, resolved in the URL and in the prefix; %2e is a dot.
    ("http://h/hooks/", "http://h/hooks/./x", True),
    ("http://h/hooks/", "http://h/hooks/a/../b", True),
    ("http://h/hooks/", "http://h/hooks/a/..", True),
    ("http://h/hooks/", "http://h/hooks/..", False),
    ("http://h/hooks/", "http://h/hooks/x/../../admin", False),
    ("http://h/hooks/", "http://h/hooks/%2e%2e/admin", False),
    ("http://h/hooks/", "http://h/hooks/%2E%2E/admin", False),
    ("http://h/hooks/", "http://h/hooks/.%2e/admin", False),
    ("http://h/hooks/", "http://h/hooks/%2e/x", True),
    ("http://h/hooks/", "http://h/../hooks/x", True),  # ".." above the root stays at it
    ("http://h/a/../hooks/", "http://h/hooks/x", True),
    ("http://h/hooks/./", "http://h/hooks/x", True),
    ("http://h/hooks/x/..", "http://h/hooks/y", True),
    ("http://h/hooks/x/..", "http://h/admin", False),
    # What receivers read differently is refused: backslashes, encoded separators, "..;".
    ("http://h/hooks/", "http://h/hooks/..\\admin", False),
    ("http://h/hooks/", "http://h/hooks/x\\..\\..\\admin", False),
    ("http://h/hooks/", "http://h\\@evil.net/hooks/", False),
    ("http://h/hooks/", "http://h/hooks/..%2fadmin", False),
    ("http://h/hooks/", "http://h/hooks/..%2Fadmin", False),
    ("http://h/hooks/", "http://h/hooks/..%5cadmin", False),
    ("http://h/hooks/", "http://h/hooks/x%2fy", False),
    ("http://h/hooks/", "http://h/hooks/..;/admin", False),
    ("http://h/hooks/", "http://h/hooks/.;x/y", False),
    ("http://h/hooks/", "http://h/hooks/%2e%2e;x/admin", False),
    # A trailing dot names another host; so does a percent-encoded or non-ASCII one.
    ("https://hooks.example.com", "https://hooks.example.com./x", False),
    ("https://hooks.example.com.", "https://hooks.example.com./x", True),
    ("https://hooks.example.com.", "https://hooks.example.com/x", False),
    ("https://hooks.example.com", "https://hooks%2eexample.com/x", False),
    ("https://hooks.example.com", "https://hoo\u212as.example.com/x", False),  # Kelvin sign
    ("https://xn--strae-oqa.de", "https://stra\u00dfe.de/x", False),
    ("https://xn--strae-oqa.de", "https://xn--strae-oqa.de/x", True),
    # An empty path is "/": under a host's prefix, not under a path's.
    ("https://h", "https://h", True),
    ("https://h/", "https://h", True),
    ("https://h", "https://h?x=1", True),
    ("https://h/hooks", "https://h", False),
    ("https://h/hooks", "https://h?/hooks", False),
])
def test_urls_prefix_matches_on_boundaries(prefix: str, url: str, expected: bool) -> None:
    assert allowed(url, [prefix]) is expected


def test_urls_any_of_several_prefixes_and_none() -> None:
    prefixes = ["https://a.example/hooks", "http://127.0.0.1:9000/"]
    assert allowed("https://a.example/hooks/x", prefixes)
    assert allowed("http://127.0.0.1:9000/anything", prefixes)
    assert not allowed("https://a.example/other", prefixes)
    assert not allowed("https://a.example/hooks/x", [])


@pytest.mark.parametrize("url, checked", [
    ("http://h/hooks/x", "http://h/hooks/x"),
    ("http://h/hooks/a/../b?q=/../x#f", "http://h/hooks/b?q=/../x#f"),
    ("http://h/hooks/a/..", "http://h/hooks/"),
    ("http://h/hooks/./x/.", "http://h/hooks/x/"),
    ("http://h/hooks/a%2eb/%2E/c", "http://h/hooks/a.b/c"),
    ("HTTP://H:8080/hooks/x", "http://h:8080/hooks/x"),
    ("http://h:/hooks/x", "http://h/hooks/x"),
    ("http://[::1]:8080/hooks/x", "http://[::1]:8080/hooks/x"),
])
def test_urls_check_allowed_gives_the_url_as_checked(url: str, checked: str) -> None:
    prefixes = ["http://h/hooks", "http://h:8080/hooks", "http://[::1]:8080/hooks"]
    assert check_allowed(url, prefixes) == checked
    assert check_allowed(checked, prefixes) == checked  # stable


@pytest.mark.parametrize("url", [
    "http://h/hooks/x", "http://h/hooks/a/../b", "http://h/hooks/%2e/x/.", "HTTP://H/hooks/x",
    "http://h:80/hooks/", "http://[::1]:8080/hooks/x?y=/../z", "http://h/hooks/a%20b/c d"])
def test_urls_the_webhook_client_sends_to_the_url_as_checked(url: str) -> None:
    # httpx2 (the notifier's client) resolves literal dot segments itself and leaves %2e
    # alone: from the URL as checked it makes nothing else.
    checked = check_allowed(url, ["http://h/hooks", "http://[::1]:8080/hooks"])
    sent = httpx2.URL(checked)
    parts = urlsplit(checked)
    assert (sent.scheme, sent.host, sent.port or {"http": 80}[sent.scheme]) == (
        parts.scheme, parts.hostname, parts.port or 80)
    assert unquote(sent.raw_path.decode()) == unquote(
        (parts.path or "/") + (f"?{parts.query}" if parts.query else ""))


@pytest.mark.parametrize("url, prefixes, message", [
    ("http://h/hooks/../admin", ["http://h/hooks/"],
     "'http://h/hooks/../admin' resolves to 'http://h/admin', which does not start with an "
     "allowed prefix"),
    ("http://h/other", ["http://h/hooks/"], "'http://h/other' does not start with an allowed "
                                           "prefix"),
    ("https://user:pw@h/hooks/", ["https://h/"],
     "'https://h/hooks/' carries a user name or password"),
    ("https://h@evil.net/", ["https://h/"], "'https://evil.net/' carries a user name or password"),
    ("http://h/hooks\\..\\admin", ["http://h/"], "has a backslash"),
    ("http://h/hooks/..%2Fadmin", ["http://h/"], "has an encoded '/' or '\\' (%2F, %5C)"),
    ("http://h/hooks/..;/admin", ["http://h/"], "has a segment '..;' or '.;'"),
    ("https://stra\u00dfe.de/", ["https://xn--strae-oqa.de/"], "is not plain ASCII"),
    ("ftp://h/", ["http://h/"], "'ftp://h/' is not an http or https URL"),
])
def test_urls_refusal_says_why(url: str, prefixes: list[str], message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_allowed(url, prefixes)
    assert message in str(info.value)
    assert "pw" not in str(info.value)


@pytest.mark.parametrize("prefix, message", [
    ("https://user:pw@hooks.example.com/", "carries a user name or password"),
    ("https://hooks.example.com@evil.net/", "carries a user name or password"),
    ("https://hooks.example.com/?x=1", "has a query or a fragment"),
    ("https://hooks.example.com/?", "has a query or a fragment"),
    ("https://hooks.example.com/#x", "has a query or a fragment"),
    ("https://stra\u00dfe.de/", "is not plain ASCII"),
    ("https://hooks%2eexample.com/", "the host must be an ASCII name"),
    ("https://hooks.example.com\\hooks/", "has a backslash"),
    ("http://[fe80::1%25eth0]/", "without a zone"),
    ("https://h/a%2fb/", "has an encoded '/'"),
    ("ftp://hooks.example.com/", "is not an http or https URL"),
])
def test_urls_prefix_refused(prefix: str, message: str) -> None:
    with pytest.raises(ValueError) as info:
        check_prefix(prefix)
    assert message in str(info.value) and "pw" not in str(info.value)
    assert not allowed("https://hooks.example.com/", [prefix])  # never matches either


@pytest.mark.parametrize("prefix", [
    "https://hooks.example.com", "https://hooks.example.com/", "HTTPS://Hooks.Example.COM:443/x",
    "http://127.0.0.1:9000/hooks/", "http://[::1]:8080/", "http://h/a/../hooks/",
    "https://hooks.example.com./", "http://my_host/"])
def test_urls_prefix_accepted(prefix: str) -> None:
    assert check_prefix(prefix) == prefix


def test_urls_settings_refuse_a_prefix_with_credentials_or_a_query(root: Path) -> None:
    def build(allow: str) -> Settings:
        return Settings.build({"root": str(root)}, environ={
            "IMGSERVER_NOTIFY_ALLOW": allow, "IMGSERVER_NOTIFY_SECRET": SECRET})

    assert build("https://a.example/hooks, http://127.0.0.1:9000/").notify_allow == (
        "https://a.example/hooks", "http://127.0.0.1:9000/")
    for allow, message in [("https://a.example/, https://u:pw@b.example/", "user name or "
                                                                           "password"),
                           ("https://a.example/hooks?x=1", "has a query or a fragment")]:
        with pytest.raises(ConfigError) as info:
            build(allow)
        assert "IMGSERVER_NOTIFY_ALLOW" in str(info.value) and message in str(info.value)


def test_urls_check_url_and_redacted_unchanged() -> None:
    assert check_url("https://u:p@h/x") == "https://u:p@h/x"
    assert redacted("https://u:p@h:8443/x?y") == "https://h:8443/x?y"
    with pytest.raises(ValueError, match="is not an http or https URL"):
        check_url("ftp://h/")


# -- properties -------------------------------------------------------------------------------

_SAFE = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-._~!$&'()*+,=:@"
_segment = st.text(st.sampled_from(_SAFE), min_size=1, max_size=8).filter(
    lambda text: text.partition(";")[0] not in (".", ".."))
_label = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-"), min_size=1,
                 max_size=8)
_host = st.lists(_label, min_size=1, max_size=3).map(".".join)
_scheme = st.sampled_from(["http", "https"])
_port = st.none() | st.integers(1, 65535)


@st.composite
def _prefixes(draw: st.DrawFn) -> tuple[str, str, str, int | None, list[str]]:
    scheme, host, port = draw(_scheme), draw(_host), draw(_port)
    segments = draw(st.lists(_segment, max_size=3))
    # "https://h", "https://h/", "https://h/a", "https://h/a/"
    path = ("/" + "/".join(segments) if segments or draw(st.booleans()) else "") + (
        "/" if segments and draw(st.booleans()) else "")
    netloc = host + ("" if port is None else f":{port}")
    return f"{scheme}://{netloc}{path}", scheme, host, port, segments


def _default(scheme: str) -> int:
    return {"http": 80, "https": 443}[scheme]


@given(_prefixes(), st.lists(_segment, max_size=4), st.booleans(), st.booleans(),
       st.sampled_from(["", "/", "?q=1", "/?q=/../x", "#f"]))
def test_urls_property_a_url_under_the_prefix_is_allowed(
        prefix: tuple[str, str, str, int | None, list[str]], more: list[str], shout: bool,
        explicit_port: bool, tail: str) -> None:
    text, scheme, host, port, segments = prefix
    if shout:
        scheme, host = scheme.upper(), host.upper()
    if port is None and explicit_port:
        port = _default(scheme.lower())
    netloc = host + ("" if port is None else f":{port}")
    url = f"{scheme}://{netloc}/" + "/".join(segments + more) + tail
    checked = check_allowed(url, [text])
    sent = httpx2.URL(checked)  # what the notifier's client posts to
    sent_segments = sent.raw_path.decode().split("?")[0].split("/")[1:len(segments) + 1]
    assert [unquote(segment) for segment in sent_segments] == segments


@given(_prefixes(), st.lists(_segment, max_size=4),
       st.sampled_from(["scheme", "host", "port", "suffix", "subdomain"]), _host)
def test_urls_property_another_scheme_host_or_port_never_is(
        prefix: tuple[str, str, str, int | None, list[str]], more: list[str], change: str,
        other: str) -> None:
    text, scheme, host, port, segments = prefix
    effective = port or _default(scheme)
    if change == "scheme":
        scheme = "https" if scheme == "http" else "http"
        port = effective  # the same port, written: only the scheme differs
    elif change == "host":
        if other == host:
            other += "x"
        host = other
    elif change == "port":
        port = effective % 65535 + 1
    elif change == "suffix":
        host = f"{host}.{other}"
    else:
        host = f"{other}.{host}"
    netloc = host + ("" if port is None else f":{port}")
    url = f"{scheme}://{netloc}/" + "/".join(segments + more)
    origin = "/".join(text.split("/")[:3])  # the prefix without its path: "http://h:8080"
    assert not allowed(url, [text]) and not allowed(url, [origin])


_piece = st.sampled_from(["hooks", "admin", "x", ".", "..", "%2e", "%2E", "%2e%2e", ".%2e",
                          "/", "/", "/", "//", ";", "..;", "\\", "%2f", "%5C", "%25", "-evil"])


@given(st.lists(_piece, max_size=12), st.sampled_from(["/hooks", "/hooks/", "/hooks/x/.."]))
def test_urls_property_an_allowed_url_stays_under_the_prefix_as_receivers_read_it(
        pieces: list[str], prefix_path: str) -> None:
    # A receiver that decodes every escape, reads "\" as "/", drops ";" parameters and then
    # resolves dot segments still finds the path under /hooks.
    url = "http://h/hooks" + "".join(pieces)  # a string prefix test would allow them all
    try:
        checked = check_allowed(url, ["http://h" + prefix_path])
    except ValueError:
        return
    for path in (urlsplit(checked).path, httpx2.URL(checked).raw_path.decode()):
        read = unquote(path).replace("\\", "/")
        read = "/".join(segment.partition(";")[0] for segment in read.split("/"))
        resolved = urlsplit(urljoin("http://h/", "/." + (read or "/"))).path
        assert resolved == "/hooks" or resolved.startswith("/hooks/"), (url, checked, resolved)
