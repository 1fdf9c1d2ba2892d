"""Imports go one way: no module of the SDK or of the gateway is part of an import circle
(TYPE_CHECKING imports count: they are the same coupling, deferred)."""

from __future__ import annotations

import ast
from pathlib import Path

import intertie
import intertie_gateway

RUNTIME = Path(intertie.__file__).parent
GATEWAY = Path(intertie_gateway.__file__).parent


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, by name (``from a import b`` counts as ``a`` and ``a.b``)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    modules = {".".join((package, *p.relative_to(root).with_suffix("").parts)).removesuffix(".__init__"): p
               for p in root.rglob("*.py") if "v1" not in p.relative_to(root).parts}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            for target in targets:
                if target in modules and target not in (name, package):
                    edges.add(target)
        graph[name] = edges
    return graph


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_the_sdk_has_no_import_circles() -> None:
    graph = import_graph(RUNTIME, "intertie")
    assert "intertie.client" in graph and graph["intertie.futures"] <= {"intertie._submitter", "intertie.spec"}
    assert circles(graph) == []


def test_the_gateway_has_no_import_circles() -> None:
    graph = import_graph(GATEWAY, "intertie_gateway")
    assert "intertie_gateway.ports" in graph["intertie_gateway.federate"]  # the core sees the federation through ports
    assert not graph["intertie_gateway.ports"] & {"intertie_gateway.federate", "intertie_gateway.scheduler",
                                                   "intertie_gateway.peers", "intertie_gateway.membership"}
    assert circles(graph) == []


def test_the_circle_finder_finds_one() -> None:
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# The core's decisions: no I/O, no event loop, no wire types; they import only each other
# (and the gateway's configuration record).
PURE = {"lifecycle", "model", "estimates", "book", "placement", "admission", "dispatch", "federate", "ports",
        "tenancy", "fairshare", "merkle_tree"}
FORBIDDEN = ("grpc", "ray", "sqlite3", "asyncio", "intertie.v1", "pyarrow", "socket", "threading")
# Where wire messages are built or read: the servicers and what feeds them, the peer link and
# membership, the session streams, the checks of wire input, and the one conversion module.
WIRE = {"service", "intake", "queries", "sessions", "peers", "membership", "validate", "convert", "server",
        "ledger_service"}


def test_the_core_s_decisions_do_no_io_and_see_no_wire_types() -> None:
    for name in PURE:
        imported = imports_of(GATEWAY / f"{name}.py")
        bad = {m for m in imported if m.split(".")[0] in FORBIDDEN or m.startswith(FORBIDDEN)}
        assert not bad, f"{name} imports {sorted(bad)}"
        ours = {m.split(".")[1] for m in imported if m.startswith("intertie_gateway.")}
        assert ours <= PURE | {"config"}, f"{name} imports {sorted(ours - PURE - {'config'})}"


def test_only_the_edge_imports_the_generated_wire_code() -> None:
    speaking = {p.stem for p in GATEWAY.glob("*.py")
                if any(m.startswith("intertie.v1") for m in imports_of(p))}
    assert speaking <= WIRE, sorted(speaking - WIRE)


def test_test_modules_have_unique_names() -> None:
    """pytest imports test modules by basename (no packages under tests/): a name in both
    tests/unit and tests/integration stops the whole suite at collection."""
    tests = Path(__file__).resolve().parents[1]
    names = [p.name for p in tests.rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted({n for n in names if names.count(n) > 1})
