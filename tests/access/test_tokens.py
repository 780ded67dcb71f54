"""The tokens file and the ``imgserver token`` commands: secrets shown once and kept only
hashed, atomic 0600 writes, concurrent changes, and a running reader that follows them."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from imgserver.access.tokens import CHECK_INTERVAL, Token, TokenFile, check_folder, digest
from imgserver.errors import ConfigError


def token_command(tokens: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "imgserver", "token", *args,
                           "--tokens", str(tokens)], capture_output=True, text=True, timeout=60)


def test_tokens_add_prints_the_secret_once_and_keeps_only_its_hash(tmp_path: Path) -> None:
    tokens = tmp_path / "conf" / "tokens.json"
    added = token_command(tokens, "add", "shop", "--scopes", "submit,read", "--folder",
                          "clients/shop", "--rate", "5", "--max-queued", "100")
    assert added.returncode == 0, added.stderr
    secret = added.stdout.strip()
    assert added.stdout.count("\n") == 1 and secret.startswith("imgs_") and len(secret) > 40
    assert stat.S_IMODE(os.stat(tokens).st_mode) == 0o600
    text = tokens.read_text()
    assert secret not in text and secret[5:] not in text
    (kept,) = json.loads(text)["tokens"]
    assert kept["sha256"] == hashlib.sha256(secret.encode()).hexdigest()
    assert (kept["name"], kept["scopes"], kept["folder"], kept["rate"],
            kept["max_queued"]) == ("shop", ["submit", "read"], "clients/shop", 5.0, 100)
    listed = token_command(tokens, "list")
    assert listed.returncode == 0 and "shop" in listed.stdout and "clients/shop" in listed.stdout
    assert secret not in listed.stdout + listed.stderr
    assert "submit,read" in listed.stdout and "5/s" in listed.stdout


def test_tokens_refuse_what_is_wrong_and_say_what(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens.json"
    for args, message in [
        (("add", "bad name"), "token name"),
        (("add", "x", "--scopes", "read,write"), "'write'"),
        (("add", "x", "--folder", "../out"), "without '..'"),
        (("add", "x", "--folder", "/etc"), "relative to it"),
        (("add", "x", "--rate", "0"), "--rate must be greater than 0"),
        (("revoke", "nobody"), "no token named 'nobody'"),
    ]:
        result = token_command(tokens, *args)
        assert result.returncode == 2 and message in result.stderr, (args, result.stderr)
        assert result.stdout == ""
    assert token_command(tokens, "add", "x").returncode == 0
    again = token_command(tokens, "add", "x")
    assert again.returncode == 2 and "exists already" in again.stderr
    missing = subprocess.run([sys.executable, "-m", "imgserver", "token", "list"],
                             capture_output=True, text=True, timeout=60,
                             env={k: v for k, v in os.environ.items()
                                  if k != "IMGSERVER_TOKENS"})
    assert missing.returncode == 2 and "IMGSERVER_TOKENS" in missing.stderr


def test_tokens_concurrent_adds_lose_none_and_revoke_removes_one(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    with ThreadPoolExecutor(8) as pool:  # eight processes at once, through the command
        results = list(pool.map(lambda n: token_command(path, "add", f"t{n}"), range(16)))
    assert all(result.returncode == 0 for result in results)
    assert sorted(token.name for token in TokenFile(path).read()) == sorted(
        f"t{n}" for n in range(16))
    assert token_command(path, "revoke", "t3").returncode == 0
    assert "t3" not in {token.name for token in TokenFile(path).read()}
    assert not list(tmp_path.glob(".tokens.json.*"))  # no temporary file left


def test_tokens_a_running_reader_follows_additions_and_revocations(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    reader = TokenFile(path)
    assert reader.tokens() == {}
    TokenFile(path).add(Token("a", digest("secret-a")))
    deadline = time.monotonic() + 2.0  # the promise: within 2 s
    while digest("secret-a") not in reader.tokens():
        assert time.monotonic() < deadline, "the addition was not seen within 2 s"
        time.sleep(0.05)
    TokenFile(path).revoke("a")
    deadline = time.monotonic() + 2.0
    while digest("secret-a") in reader.tokens():
        assert time.monotonic() < deadline, "the revocation was not seen within 2 s"
        time.sleep(0.05)
    assert CHECK_INTERVAL <= 1.0


def test_tokens_a_broken_file_keeps_the_tokens_read_before(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "tokens.json"
    TokenFile(path).add(Token("a", digest("s")))
    reader = TokenFile(path)
    assert digest("s") in reader.tokens()
    path.write_text("{not json")
    reader._checked = -10.0  # look again now, not in a second
    assert digest("s") in reader.tokens()
    assert "is not valid" in caplog.text
    with pytest.raises(ConfigError, match="is not valid"):
        reader.read()


def test_tokens_folder_is_relative_and_normalised() -> None:
    assert check_folder("clients//shop/./") == "clients/shop"
    assert check_folder("") is None and check_folder(None) is None
    for wrong in ("..", "a/../../b", "/abs", "a\x00b"):
        with pytest.raises(ValueError):
            check_folder(wrong)
