"""Attaching to an existing Ray cluster: the probe of its head, what auth it wants, which
token is offered, and the one line said when something is missing (no Ray: the head's
answers are stood in for; the real cluster is tests/integration/test_ray_cluster.py)."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from intertie_gateway import ray_attach
from intertie_gateway.ray_attach import RayConnectError, find_token, prepare_attach, probe_gcs

ADDRESS = "10.0.0.5:6379"
TOKEN = "0123456789abcdef0123456789abcdef"


class Head:
    """A stand-in for the GCS: which token it accepts (None: no auth), or what it answers."""

    def __init__(self, token: str | None = None, answer: tuple[str, str] | None = None) -> None:
        self.token = token
        self.answer = answer
        self.offered: list[str | None] = []

    def __call__(self, address: str, token: str | None, timeout_s: float) -> tuple[str, str]:
        assert address == ADDRESS and 0 < timeout_s <= ray_attach.PROBE_TIMEOUT_S
        self.offered.append(token)
        if self.answer is not None:
            return self.answer
        if self.token is None or token == self.token:
            return "OK", ""
        return "UNAUTHENTICATED", "InvalidAuthToken: Authentication token is missing or incorrect"


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty home directory (no ~/.ray/auth_token) and none of Ray's auth variables."""
    monkeypatch.setenv("HOME", str(tmp_path))
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def attach(monkeypatch: pytest.MonkeyPatch, head: Head, token_file: str = "",
           environ: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    monkeypatch.setattr(ray_attach, "probe_gcs", head)
    env = dict(environ or {})
    return prepare_attach(ADDRESS, token_file, 15.0, env), env


def test_a_cluster_without_auth_is_attached_as_it_is(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    how, env = attach(monkeypatch, Head())
    assert how.startswith("no auth") and env == {}
    # RAY_AUTH_MODE=token without a token would make ray.init refuse to start: not needed here.
    _, env = attach(monkeypatch, Head(), environ={"RAY_AUTH_MODE": "token"})
    assert env == {"RAY_AUTH_MODE": "disabled"}


def test_token_auth_is_detected_and_the_configured_token_used(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    token_file = home / "cluster-token"
    token_file.write_text(TOKEN + "\n")
    head = Head(TOKEN)
    how, env = attach(monkeypatch, head, str(token_file), environ={"RAY_AUTH_TOKEN": "someone else's"})
    assert head.offered == [None, TOKEN]  # asked without a token first: that is how auth is detected
    assert how == f"token auth, token from --ray-token-file {token_file}"
    # Ray reads RAY_AUTH_TOKEN before the file: the configured file must win.
    assert env == {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file)}


def test_without_a_token_the_line_says_what_to_pass(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(RayConnectError) as error:
        attach(monkeypatch, Head(TOKEN))
    message = str(error.value)
    assert message.startswith(f"Ray at {ADDRESS} requires token auth") and "--ray-token-file FILE" in message
    assert "\n" not in message
    with pytest.raises(RayConnectError, match="RAY_AUTH_MODE=disabled is set here"):
        attach(monkeypatch, Head(TOKEN), environ={"RAY_AUTH_MODE": "disabled"})


def test_a_wrong_token_is_named_with_where_it_came_from(home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("the token of another cluster")
    with pytest.raises(RayConnectError, match=r"refused the token from ~/.ray/auth_token: it is not this cluster's"):
        attach(monkeypatch, Head(TOKEN))
    with pytest.raises(RayConnectError, match="--ray-token-file /no/such/file: cannot read it"):
        attach(monkeypatch, Head(TOKEN), "/no/such/file")


def test_tokens_are_found_where_ray_looks_in_its_order(home: Path) -> None:
    assert find_token("", {}) is None
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text(" default \n")
    assert find_token("", {}) == ("default", "~/.ray/auth_token")
    path = home / "elsewhere"
    path.write_text("from-path")
    assert find_token("", {"RAY_AUTH_TOKEN_PATH": str(path)}) == ("from-path", f"RAY_AUTH_TOKEN_PATH={path}")
    assert find_token("", {"RAY_AUTH_TOKEN": "from-env", "RAY_AUTH_TOKEN_PATH": str(path)}) == \
        ("from-env", "RAY_AUTH_TOKEN")
    empty = home / "empty"
    empty.write_text("")
    with pytest.raises(RayConnectError, match="is empty"):
        find_token(str(empty), {})


@pytest.mark.parametrize("answer, said", [
    (("UNAVAILABLE", "failed to connect to all addresses; last error: UNKNOWN: ipv4:10.0.0.5:6379: Failed to "
                     "connect to remote host: Connection refused"),
     "cannot reach Ray at 10.0.0.5:6379: connection refused (is the head running there? `ray start --head "
     "--port=6379` on 10.0.0.5)"),
    (("UNAVAILABLE", "errors resolving 10.0.0.5:6379: [...] Domain name not found]"), "unknown host '10.0.0.5'"),
    (("DEADLINE_EXCEEDED", "Deadline Exceeded"), "did not answer within 5 s"),
    (("UNIMPLEMENTED", "Received http2 header with status: 404"), "not as a Ray head's GCS port"),
])
def test_a_head_that_is_not_there_is_one_line(home: Path, monkeypatch: pytest.MonkeyPatch,
                                              answer: tuple[str, str], said: str) -> None:
    with pytest.raises(RayConnectError) as error:
        attach(monkeypatch, Head(answer=answer))
    assert said in str(error.value) and "\n" not in str(error.value)


def test_the_probe_of_a_closed_port_answers_at_once() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused
        started = time.monotonic()
        code, details = probe_gcs(f"127.0.0.1:{port}", None, 5.0)
    assert code == "UNAVAILABLE" and "refused" in details.lower()
    assert time.monotonic() - started < 2.0
