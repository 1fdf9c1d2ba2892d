"""Tenants' bearer tokens: the store a gateway checks them against, and the operator's command."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from intertie_gateway import tokens
from intertie_gateway.tokens import TokenError, TokenStore


def secret_of(token: str) -> str:
    return token[len("itk_0123456789ab_"):]  # (the secret may itself contain "_")


def test_a_token_names_its_tenant_and_only_its_hash_is_kept(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    record, token = store.create("acme")
    assert token.startswith(f"itk_{record.id}_") and store.check(token) == "acme"
    kept = (tmp_path / "tokens.json").read_text()
    secret = secret_of(token)
    assert secret not in kept and record.hash in kept
    assert stat.S_IMODE((tmp_path / "tokens.json").stat().st_mode) == 0o600
    other = store.create("acme")[1]
    assert other != token and TokenStore(tmp_path / "tokens.json").check(other) == "acme"  # read back


@pytest.mark.parametrize("bad", ["", "itk_", "Bearer itk_x", "itk_0123456789ab_" + "A" * 42,
                                 "itk_0123456789AB_" + "A" * 43, "x" * 10_000, "itk_0123456789ab_" + "é" * 43])
def test_malformed_and_oversize_tokens_are_refused_without_echoing_them(tmp_path: Path, bad: str) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    store.create("acme")
    with pytest.raises(TokenError) as err:
        store.check(bad)
    assert len(str(err.value)) < 100 and (len(bad) < 20 or bad not in str(err.value))


def test_an_unknown_secret_or_id_is_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    record, token = store.create("acme")
    forged = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(TokenError, match=f"unknown token {record.id}"):
        store.check(forged)
    with pytest.raises(TokenError, match="unknown token ffffffffffff"):
        store.check("itk_ffffffffffff_" + secret_of(token))


def test_a_revocation_reaches_a_running_gateway_s_store_within_seconds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tokens, "RELOAD_EVERY_S", 0.0)  # the gateway's store looks at the file on every check
    path = tmp_path / "tokens.json"
    gateway = TokenStore(path)
    record, token = TokenStore(path).create("acme")  # the operator's command: another store, same file
    assert gateway.check(token) == "acme"
    TokenStore(path).revoke(record.id)
    with pytest.raises(TokenError, match="revoked"):
        gateway.check(token)
    assert [r.revoked for r in gateway.records()] == [True]


def test_bad_tenant_names_and_unknown_ids_are_refused(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    for tenant in ("", "Acme", "a b", "-x", "x" * 64):
        with pytest.raises(ValueError, match="tenant"):
            store.create(tenant)
    with pytest.raises(TokenError, match="no token"):
        store.revoke("0123456789ab")


def gateway_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "intertie_gateway", *args], capture_output=True, text=True,
                          timeout=60)


def test_the_operator_makes_lists_and_revokes_tokens(tmp_path: Path) -> None:
    made = gateway_cli("token", "create", "--tenant", "acme", "--state-dir", str(tmp_path))
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]  # the last line: the token, shown once
    assert TokenStore(tmp_path / "tokens.json").check(token) == "acme"
    listed = gateway_cli("token", "list", "--state-dir", str(tmp_path))
    token_id = token.split("_")[1]
    assert listed.returncode == 0 and token_id in listed.stdout and "acme" in listed.stdout
    assert secret_of(token) not in listed.stdout + listed.stderr
    revoked = gateway_cli("token", "revoke", token, "--state-dir", str(tmp_path))  # the whole token works too
    assert revoked.returncode == 0 and f"revoked token {token_id}" in revoked.stdout
    assert "revoked" in gateway_cli("token", "list", "--state-dir", str(tmp_path)).stdout
    bad = gateway_cli("token", "create", "--tenant", "Not OK", "--state-dir", str(tmp_path))
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "Traceback" not in bad.stderr
    assert json.loads((tmp_path / "tokens.json").read_text())["tokens"][0]["tenant"] == "acme"


def test_a_corrupt_token_file_keeps_the_tokens_read_before(tmp_path: Path) -> None:
    store = TokenStore(tmp_path / "tokens.json")
    _, token = store.create("acme")
    reader = TokenStore(tmp_path / "tokens.json")
    assert reader.check(token) == "acme"
    (tmp_path / "tokens.json").write_text('{"tokens": [{"id": ')  # half a file, by hand
    reader._checked_at = -1e9  # as if a second had passed
    assert reader.check(token) == "acme"
