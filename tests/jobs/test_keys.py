"""Idempotency keys: links in the outbox, 24 hours, atomic replacement."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from imgserver.errors import RequestError
from imgserver.jobs.keys import TTL, IdempotencyKeys, check_key


def test_keys_bind_lookup_replace_and_expire(tmp_path: Path) -> None:
    keys = IdempotencyKeys(tmp_path / ".keys")
    assert keys.lookup("order-1") is None
    keys.bind("order-1", "job-a")
    keys.bind("a/../../weird key?", "job-b")  # any visible characters: stored by hash
    assert keys.lookup("order-1") == "job-a"
    assert keys.lookup("a/../../weird key?") == "job-b"
    keys.bind("order-1", "job-c")
    assert keys.lookup("order-1") == "job-c"
    [link] = [p for p in (tmp_path / ".keys").iterdir() if os.readlink(p) == "job-c"]
    old = time.time() - TTL - 10
    os.utime(link, (old, old), follow_symlinks=False)
    assert keys.lookup("order-1") is None  # older than 24 hours: no longer counts
    assert keys.forget_expired() == 1
    assert keys.lookup("a/../../weird key?") == "job-b"
    assert len(list((tmp_path / ".keys").iterdir())) == 1


@pytest.mark.parametrize("key", ["", "x" * 256, "with space", "tab\t", "é", "\x7f"])
def test_keys_invalid_key_names_the_header(key: str) -> None:
    with pytest.raises(RequestError) as caught:
        check_key(key)
    assert caught.value.problems[0].field == "Idempotency-Key"


def test_keys_valid_keys_pass() -> None:
    assert check_key("x" * 255) == "x" * 255
    assert check_key("!~") == "!~"
