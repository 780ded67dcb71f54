"""The gate: a request's Authorization header to its principal, its scopes and its rate."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from imgserver.access.gate import Gate
from imgserver.access.principal import Principal
from imgserver.access.tokens import Token, TokenFile, digest
from imgserver.errors import Forbidden, TooManyRequests, Unauthorized


@pytest.fixture
def tokens(tmp_path: Path) -> TokenFile:
    file = TokenFile(tmp_path / "tokens.json")
    file.add(Token("reader", digest("imgs_r"), scopes=("read",), folder="a"))
    file.add(Token("boss", digest("imgs_b"), scopes=("admin",), folder="a"))
    file.add(Token("quick", digest("imgs_q"), rate=2))
    return file


def test_gate_without_tokens_lets_everyone_do_everything() -> None:
    gate = Gate()
    principal = gate.principal(None)
    assert gate.open and principal.name is None and principal.view is None
    for scope in ("submit", "read", "cancel", "admin"):
        gate.admit(principal, scope)


def test_gate_finds_the_principal_of_each_secret(tokens: TokenFile) -> None:
    gate = Gate("imgs_env", tokens)
    everyone = gate.principal("Bearer imgs_env")
    assert everyone.name == "IMGSERVER_TOKEN" and everyone.view is None
    assert everyone.owner.name == "" and everyone.owner.folder == ""
    reader = gate.principal("bearer  imgs_r ")  # the scheme in any case, spaces around
    assert (reader.name, reader.folder, reader.view) == ("reader", "a", "a")
    assert reader.sees("a") and not reader.sees("") and not reader.sees("b")
    boss = gate.principal("Bearer imgs_b")
    assert boss.view is None and boss.sees("b") and boss.owner.folder == "a"
    for header in (None, "", "Bearer", "Basic imgs_r", "Bearer imgs_x", "Bearer imgs_r2"):
        with pytest.raises(Unauthorized):
            gate.principal(header)


def test_gate_forbids_a_missing_scope_naming_it(tokens: TokenFile) -> None:
    gate = Gate(None, tokens)
    reader = gate.principal("Bearer imgs_r")
    gate.admit(reader, "read")
    with pytest.raises(Forbidden, match="lacks the 'submit' scope") as refused:
        gate.admit(reader, "submit")
    assert refused.value.scope == "submit"
    gate.admit(gate.principal("Bearer imgs_b"), "cancel")  # admin has every scope


def test_gate_rate_is_a_bucket_of_bursts(tokens: TokenFile) -> None:
    gate = Gate(None, tokens)
    quick = gate.principal("Bearer imgs_q")
    gate.admit(quick, "read")
    gate.admit(quick, "read")  # a burst of 2
    with pytest.raises(TooManyRequests, match="over its rate of 2") as refused:
        gate.admit(quick, "read")
    assert refused.value.retry_after == 1
    time.sleep(0.55)  # half a second refills one of 2 a second
    gate.admit(quick, "read")


def test_gate_principal_of_a_token_keeps_its_limits() -> None:
    principal = Principal.of(Token("t", digest("s"), scopes=("submit",), folder="f", rate=3,
                                   max_queued=10))
    assert principal.owner.max_queued == 10 and principal.rate == 3
    assert principal.describe() == "token 't'" and "s" not in principal.describe()[7:]
