"""The Merkle-tree math of the usage ledger: the client's verifier (intertie.merkle) against the
RFC 6962/9162 test vectors of transparency-dev/merkle (testdata/merkle, see its README), and the
site's incremental tree (intertie_gateway.merkle_tree) against the verifier and the plain MTH."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from intertie.merkle import (
    EMPTY_ROOT,
    ProofError,
    leaf_hash,
    node_hash,
    root_from_leaf_hashes,
    verify_consistency,
    verify_inclusion,
)
from intertie_gateway.merkle_tree import MemoryNodes, MerkleTree, Node

VECTORS = Path(__file__).parent / "testdata" / "merkle"
INCLUSION = sorted((VECTORS / "inclusion").rglob("*.json"))
CONSISTENCY = sorted((VECTORS / "consistency").rglob("*.json"))
# The leaves the vectors' valid proofs are about (RFC 6962's test leaves).
RFC_LEAVES = [
    bytes.fromhex(h)
    for h in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
FEW = settings(max_examples=150, deadline=None, database=None)


def load(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text())
    for key in ("root", "root1", "root2", "leafHash"):
        if key in case:
            case[key] = base64.b64decode(case[key])
    case["proof"] = [base64.b64decode(h) for h in case["proof"] or []]
    return case


def check_inclusion(case: dict[str, Any]) -> None:
    verify_inclusion(case["leafHash"], case["leafIdx"], case["treeSize"], case["proof"], case["root"])


def check_consistency(case: dict[str, Any]) -> None:
    verify_consistency(case["size1"], case["size2"], case["root1"], case["root2"], case["proof"])


def name(path: Path) -> str:
    return str(path.relative_to(VECTORS))


def test_all_the_vectors_are_there() -> None:
    assert (len(INCLUSION), len(CONSISTENCY)) == (98, 98)


@pytest.mark.parametrize("path", INCLUSION, ids=name)
def test_inclusion_vectors(path: Path) -> None:
    case = load(path)
    if case["wantErr"]:
        with pytest.raises(ProofError):
            check_inclusion(case)
    else:
        check_inclusion(case)


@pytest.mark.parametrize("path", CONSISTENCY, ids=name)
def test_consistency_vectors(path: Path) -> None:
    case = load(path)
    if case["wantErr"]:
        with pytest.raises(ProofError):
            check_consistency(case)
    else:
        check_consistency(case)


def tree_of(hashes: list[bytes], batches: list[int] | None = None) -> MerkleTree:
    tree = MerkleTree(MemoryNodes())
    done = 0
    for n in batches or [len(hashes)]:
        tree.append_leaf_hashes(hashes[done : done + n])
        done += n
    tree.append_leaf_hashes(hashes[done:])
    return tree


# One tree of LEAVES for the property tests, and the plain MTH of each of its prefixes.
LEAVES = [leaf_hash(i.to_bytes(4, "big")) for i in range(300)]
TREE = tree_of(LEAVES)
PREFIX_ROOTS = [root_from_leaf_hashes(LEAVES[:n]) for n in range(len(LEAVES) + 1)]
sizes = st.integers(1, len(LEAVES))


def test_the_tree_makes_the_vectors_valid_proofs() -> None:
    tree = tree_of([leaf_hash(data) for data in RFC_LEAVES])
    for path in INCLUSION:
        case = load(path)
        if path.name == "happy-path.json":
            assert tree.root(case["treeSize"]) == case["root"]
            assert tree.inclusion_proof(case["leafIdx"], case["treeSize"]) == case["proof"], name(path)
    for path in CONSISTENCY:
        case = load(path)
        if path.name == "happy-path.json":
            assert (tree.root(case["size1"]), tree.root(case["size2"])) == (case["root1"], case["root2"])
            assert tree.consistency_proof(case["size1"], case["size2"]) == case["proof"], name(path)


def test_hashing_and_the_empty_tree() -> None:
    assert leaf_hash(b"") == bytes.fromhex("6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d")
    assert EMPTY_ROOT == bytes.fromhex("e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855")
    assert root_from_leaf_hashes([]) == EMPTY_ROOT == tree_of([]).root()
    one = leaf_hash(b"a")
    assert root_from_leaf_hashes([one]) == one
    assert root_from_leaf_hashes([one] * 3) == node_hash(node_hash(one, one), one)


def test_size_zero_and_equal_sizes() -> None:
    tree = tree_of(LEAVES[:5])
    root = tree.root()
    for proof in ([], [root]):
        with pytest.raises(ProofError, match="empty tree"):
            verify_consistency(0, 5, EMPTY_ROOT, root, proof)
    with pytest.raises(ProofError):
        verify_consistency(0, 0, EMPTY_ROOT, EMPTY_ROOT, [])
    verify_consistency(5, 5, root, root, [])
    with pytest.raises(ProofError):
        verify_consistency(5, 5, root, root, [root])
    with pytest.raises(ProofError):
        verify_consistency(5, 5, root, tree.root(4), [])
    assert tree.consistency_proof(5, 5) == []
    for bad in [(0, 5), (6, 5), (3, 6), (-1, 2)]:
        with pytest.raises(ValueError):
            tree.consistency_proof(*bad)


def test_malformed_input_is_a_proof_error() -> None:
    tree = tree_of(LEAVES[:7])
    proof, root = tree.inclusion_proof(3), tree.root()
    for args in [
        (LEAVES[3][:31], 3, 7, proof, root),
        (LEAVES[3], 3, 7, proof, root + b"\x00"),
        (LEAVES[3], 3, 7, [*proof[:-1], proof[-1][:16]], root),
        (LEAVES[3], -1, 7, proof, root),
        (LEAVES[3], 7, 7, proof, root),
        (LEAVES[3], 0, 0, [], EMPTY_ROOT),
    ]:
        with pytest.raises(ProofError):
            verify_inclusion(*args)
    cproof, old = tree.consistency_proof(3), tree.root(3)
    for cargs in [
        (3, 7, old[:-1], root, cproof),
        (3, 7, old, root[1:], cproof),
        (3, 7, old, root, [b""] * 3),
        (3, 2, old, root, cproof),
        (3, 7, old, root, cproof * 8),
    ]:
        with pytest.raises(ProofError):
            verify_consistency(*cargs)


def flips(proof: list[bytes], data: st.DataObject) -> tuple[int, list[bytes]]:
    """Flips one bit of one byte of one proof hash; returns which hash, and the new proof."""
    i = data.draw(st.integers(0, len(proof) - 1))
    at, bit = data.draw(st.integers(0, 31)), data.draw(st.integers(0, 7))
    h = bytearray(proof[i])
    h[at] ^= 1 << bit
    return i, [*proof[:i], bytes(h), *proof[i + 1 :]]


def flipped(h: bytes, data: st.DataObject) -> bytes:
    return flips([h], data)[1][0]


@FEW
@given(batches=st.lists(st.integers(0, 40), max_size=12))
def test_every_root_is_the_mth_of_its_prefix(batches: list[int]) -> None:
    tree = tree_of(LEAVES, batches)
    assert tree.size == len(LEAVES)
    assert [tree.root(n) for n in range(len(LEAVES) + 1)] == PREFIX_ROOTS
    assert tree.root() == PREFIX_ROOTS[-1]


@FEW
@given(size=sizes, data=st.data())
def test_inclusion_proofs_verify_and_nothing_else_does(size: int, data: st.DataObject) -> None:
    index = data.draw(st.integers(0, size - 1))
    proof, root = TREE.inclusion_proof(index, size), PREFIX_ROOTS[size]
    verify_inclusion(LEAVES[index], index, size, proof, root)
    assert tree_of(LEAVES[:size]).inclusion_proof(index) == proof
    with pytest.raises(ProofError):
        verify_inclusion(flipped(LEAVES[index], data), index, size, proof, root)
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[index], index, size, proof, flipped(root, data))
    if proof:
        with pytest.raises(ProofError):
            verify_inclusion(LEAVES[index], index, size, flips(proof, data)[1], root)
    other = data.draw(st.integers(-1, size).filter(lambda i: i != index))
    with pytest.raises(ProofError):
        verify_inclusion(LEAVES[index], other, size, proof, root)
    size2 = data.draw(st.integers(0, len(LEAVES)).filter(lambda n: n != size))
    with pytest.raises(ProofError):  # a proof for one checkpoint does not hold for another
        verify_inclusion(LEAVES[index], index, size2, proof, PREFIX_ROOTS[size2])


@FEW
@given(size2=sizes, data=st.data())
def test_consistency_proofs_verify_and_nothing_else_does(size2: int, data: st.DataObject) -> None:
    size1 = data.draw(st.integers(1, size2))
    proof, root1, root2 = TREE.consistency_proof(size1, size2), PREFIX_ROOTS[size1], PREFIX_ROOTS[size2]
    verify_consistency(size1, size2, root1, root2, proof)
    assert tree_of(LEAVES[:size2]).consistency_proof(size1) == proof
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, flipped(root1, data), root2, proof)
    with pytest.raises(ProofError):
        verify_consistency(size1, size2, root1, flipped(root2, data), proof)
    if proof:
        with pytest.raises(ProofError):
            verify_consistency(size1, size2, root1, root2, flips(proof, data)[1])
    other1 = data.draw(st.integers(1, len(LEAVES)).filter(lambda n: n != size1))
    with pytest.raises(ProofError):
        verify_consistency(other1, size2, PREFIX_ROOTS[other1], root2, proof)
    other2 = data.draw(st.integers(1, len(LEAVES)).filter(lambda n: n != size2))
    with pytest.raises(ProofError):
        verify_consistency(size1, other2, root1, PREFIX_ROOTS[other2], proof)


class CountingNodes(MemoryNodes):
    def __init__(self) -> None:
        super().__init__()
        self.gets = self.writes = 0

    def get(self, level: int, index: int) -> bytes:
        self.gets += 1
        return super().get(level, index)

    def put_many(self, nodes: Any) -> None:
        self.writes += 1
        super().put_many(nodes)


def test_a_batch_is_one_store_write_and_stores_under_two_nodes_an_entry() -> None:
    store = CountingNodes()
    tree = MerkleTree(store)
    new: list[Node] = tree.append_leaf_hashes(LEAVES[:100])
    assert store.writes == 1 and store.gets == 0 and len(new) == len(store) == 2 * 100 - bin(100).count("1")
    assert all(store.get(level, index) == h for level, index, h in new)
    tree.append_leaf_hashes(LEAVES[100:])
    assert store.writes == 2 and len(store) == 2 * 300 - bin(300).count("1")


def test_proofs_take_logarithmically_many_lookups() -> None:
    store = CountingNodes()
    tree = MerkleTree(store)
    tree.append_leaf_hashes(LEAVES)
    for size in range(1, len(LEAVES) + 1):
        bound = 2 * size.bit_length()
        for index in (0, size // 3, size - 1):
            store.gets = 0
            tree.inclusion_proof(index, size)
            assert store.gets <= bound, (index, size)
        store.gets = 0
        tree.consistency_proof(max(1, size // 2), size)
        tree.root(size)
        assert store.gets <= 2 * bound, size


def test_a_tree_rebuilt_from_its_store_is_the_same_tree() -> None:
    store = MemoryNodes()
    tree = MerkleTree(store)
    tree.append_leaf_hashes(LEAVES[:200])
    again = MerkleTree(store, 200)
    assert again.size == 200 and again.root() == tree.root()
    for n in (1, 77, 128, 200):
        assert again.root(n) == tree.root(n)
        assert again.inclusion_proof(n - 1, n) == tree.inclusion_proof(n - 1, n)
        assert again.consistency_proof(max(1, n // 3), n) == tree.consistency_proof(max(1, n // 3), n)
    earlier = MerkleTree(store, 150)
    assert earlier.root() == PREFIX_ROOTS[150] and earlier.inclusion_proof(3) == tree.inclusion_proof(3, 150)
    again.append_leaf_hashes(LEAVES[200:])  # a restarted site goes on where it stopped
    assert again.root() == TREE.root() and again.inclusion_proof(5) == TREE.inclusion_proof(5)
    with pytest.raises(KeyError):
        MerkleTree(store, 301)


def test_the_tree_refuses_what_it_cannot_answer() -> None:
    tree = tree_of(LEAVES[:10])
    for call in (
        lambda: tree.root(11),
        lambda: tree.inclusion_proof(10),
        lambda: tree.inclusion_proof(0, 0),
        lambda: tree.inclusion_proof(-1),
        lambda: tree.consistency_proof(1, 11),
        lambda: MerkleTree(MemoryNodes(), -1),
    ):
        with pytest.raises(ValueError):
            call()
    with pytest.raises(ValueError):
        tree.append_leaf_hashes([LEAVES[0], b"short"])
    assert tree.size == 10 and tree.root() == PREFIX_ROOTS[10]  # a refused batch appends nothing
    with pytest.raises(ValueError):
        MemoryNodes().put_many([(0, 1, LEAVES[0])])  # out of order: a gap
