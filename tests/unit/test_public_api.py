"""The public surface is pinned: changing it is a decision, not an accident."""

from __future__ import annotations

import ast
from pathlib import Path

import intertie

EXPECTED = [
    "AuthenticationError", "DatasetNotFoundError", "DatasetRef", "Federation", "FederationExecutor", "IntertieError", "InvalidRequestError",
    "LedgerVerificationError",
    "PayloadTooLargeError", "PermissionDeniedError", "QuotaExceededError", "PlacementError", "RemoteFunction", "RemoteTaskError",
    "Resources", "SerializationError", "SiteFailureError", "SiteStatus", "SiteUnavailableError",
    "TaskCancelledError", "TaskFuture", "TaskInfo", "TaskNotFoundError", "TaskOptions", "TaskTimeoutError",
    "__version__", "connect", "remote",
]
RUNTIME = Path(intertie.__file__).parent


def test_all_is_pinned() -> None:
    assert sorted(intertie.__all__) == sorted(EXPECTED)
    for name in intertie.__all__:
        assert hasattr(intertie, name), name


def _imports(path: Path) -> list[str]:
    names: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names]
    return names


def test_sdk_never_imports_the_gateway() -> None:
    for path in RUNTIME.rglob("*.py"):
        assert not any(n.split(".")[0] == "intertie_gateway" for n in _imports(path)), path


def test_protobuf_stays_at_the_transport() -> None:
    # Users and the scheduler see dataclasses; only these modules build or read wire messages.
    allowed = {"_wire.py", "_rpc.py", "_session.py", "client.py", "spec.py", "usage.py"}
    for path in RUNTIME.glob("*.py"):
        if any("_pb2" in n for n in _imports(path)):
            assert path.name in allowed, f"{path.name} imports generated protobuf code"
