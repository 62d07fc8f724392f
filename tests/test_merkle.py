"""RFC 9162 Merkle trees: transparency-dev's reference tree and proof probes, every proof of
trees of 1..64 leaves against the RFC's recursive definitions, and a log of 10^6 records whose
proofs read at most a block or two of leaves back."""

import base64
import hashlib
import json
import re
from functools import cache
from pathlib import Path

import pytest

from energy_agent.core.errors import RecordError
from energy_agent.records.merkle import (
    EMPTY_ROOT,
    CompactRange,
    MerkleTree,
    leaf_hash,
    node_hash,
    record_leaf,
    root_from_inclusion,
    root_of,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).parent / "vectors" / "merkle"


def _go_hex_lists(name: str) -> list[list[bytes]]:
    """The hd("...") values of a function of transparency-dev's testonly/constants.go, one
    list per {...} group (a flat function gives one group)."""
    src = (VECTORS / "constants.go").read_text()
    body = src[src.index(f"func {name}()"):]
    body = body[:body.index("\n}\n")]
    groups = re.split(r"\},\s*\{", body)
    return [[bytes.fromhex(h) for h in re.findall(r'hd\("([0-9a-f]*)"\)', g)] for g in groups]


LEAVES = _go_hex_lists("LeafInputs")[0]
LEAF_HASHES = [leaf_hash(x) for x in LEAVES]


def test_the_reference_tree_roots_and_nodes():
    roots = _go_hex_lists("RootHashes")[0]  # sizes 1..8 (size 0 is EmptyRootHash())
    assert len(LEAVES) == 8 and len(roots) == 8
    assert root_of([]) == EMPTY_ROOT == bytes.fromhex(re.search(
        r'func EmptyRootHash\(\) \[\]byte \{\s*return hd\("([0-9a-f]+)"\)', (VECTORS / "constants.go").read_text()).group(1))
    tree = MerkleTree.of(LEAF_HASHES, block_bits=1)
    assert tree.root(0) == EMPTY_ROOT
    for size in range(1, 9):
        assert tree.root(size) == roots[size - 1] == root_of(LEAF_HASHES[:size])
    nodes = _go_hex_lists("NodeHashes")  # level, index: complete subtrees
    for level, hashes in enumerate(nodes):
        for i, h in enumerate(hashes):
            assert root_of(LEAF_HASHES[i << level:(i + 1) << level]) == h


def test_compact_ranges_hold_the_reference_trees_right_edges():
    src = (VECTORS / "constants.go").read_text()
    nodes = _go_hex_lists("NodeHashes")
    body = src[src.index("func CompactTrees()"):]
    body = body[body.index("return [][][]byte{"):body.index("\n}\n")]
    expected = [[nodes[int(a)][int(b)] for a, b in re.findall(r"nh\[(\d)\]\[(\d)\]", line)]
                for line in body.splitlines()[1:-1]]
    assert len(expected) == 9
    cr = CompactRange()
    assert list(cr.hashes) == expected[0] and cr.root() == EMPTY_ROOT
    for size in range(1, 9):
        cr.append(LEAF_HASHES[size - 1])
        assert cr.size == size and list(cr.hashes) == expected[size]
        assert cr.root() == root_of(LEAF_HASHES[:size])
        resumed = CompactRange(size, cr.hashes)
        assert resumed.root() == cr.root()
    with pytest.raises(RecordError, match="size 5 has 2 hashes"):
        CompactRange(5, expected[4])


def _probes(kind: str):
    for path in sorted((VECTORS / kind).rglob("*.json")):
        yield pytest.param(json.loads(path.read_text()), id=str(path.relative_to(VECTORS / kind)))


def _b64(text):
    return base64.b64decode(text) if text else b""


@pytest.mark.parametrize("probe", list(_probes("inclusion")))
def test_inclusion_probes(probe):
    proof = [_b64(p) for p in probe["proof"] or []]
    args = (probe["leafIdx"], probe["treeSize"], _b64(probe["leafHash"]), proof, _b64(probe["root"]))
    if probe["wantErr"]:
        with pytest.raises(RecordError):
            verify_inclusion(*args)
    else:
        verify_inclusion(*args)


@pytest.mark.parametrize("probe", list(_probes("consistency")))
def test_consistency_probes(probe):
    proof = [_b64(p) for p in probe["proof"] or []]
    args = (probe["size1"], probe["size2"], _b64(probe["root1"]), _b64(probe["root2"]), proof)
    if probe["wantErr"]:
        with pytest.raises(RecordError):
            verify_consistency(*args)
    else:
        verify_consistency(*args)


def test_the_happy_probes_are_the_proofs_this_tree_makes():
    """The probes' proofs come from the reference tree: this implementation makes the same ones."""
    tree = MerkleTree.of(LEAF_HASHES, block_bits=1)
    seen = 0
    for path in sorted(VECTORS.rglob("happy-path.json")):
        p = json.loads(path.read_text())
        proof = [_b64(x) for x in p["proof"] or []]
        if "leafIdx" in p:
            assert _b64(p["leafHash"]) == LEAF_HASHES[p["leafIdx"]]
            assert _b64(p["root"]) == tree.root(p["treeSize"])
            assert tree.inclusion_proof(p["leafIdx"], p["treeSize"]) == proof, path
        else:
            assert (_b64(p["root1"]), _b64(p["root2"])) == (tree.root(p["size1"]), tree.root(p["size2"]))
            assert tree.consistency_proof(p["size1"], p["size2"]) == proof, path
        seen += 1
    assert seen == 10


# --------------------------------------------------------------------------- against the RFC's definitions

DATA = [hashlib.sha256(b"record %d" % i).digest() for i in range(64)]
"""Leaf data: 32 raw bytes, like a record's hash."""


@cache
def mth(lo: int, hi: int) -> bytes:
    """MTH(D[lo:hi]) exactly as RFC 9162 §2.1.1 defines it."""
    if hi - lo == 1:
        return leaf_hash(DATA[lo])
    k = 1 << ((hi - lo - 1).bit_length() - 1)
    return node_hash(mth(lo, lo + k), mth(lo + k, hi))


def path(m: int, lo: int, hi: int) -> list[bytes]:
    """PATH(m, D[lo:hi]) of RFC 9162 §2.1.3.1."""
    if hi - lo == 1:
        return []
    k = 1 << ((hi - lo - 1).bit_length() - 1)
    if m < k:
        return path(m, lo, lo + k) + [mth(lo + k, hi)]
    return path(m - k, lo + k, hi) + [mth(lo, lo + k)]


def subproof(m: int, lo: int, hi: int, whole: bool) -> list[bytes]:
    """SUBPROOF(m, D[lo:hi], b) of RFC 9162 §2.1.4.1."""
    if m == hi - lo:
        return [] if whole else [mth(lo, hi)]
    k = 1 << ((hi - lo - 1).bit_length() - 1)
    if m <= k:
        return subproof(m, lo, lo + k, whole) + [mth(lo + k, hi)]
    return subproof(m - k, lo + k, hi, False) + [mth(lo, lo + k)]


@pytest.mark.parametrize("block_bits", [0, 2, 3, 8])
def test_every_proof_of_trees_of_1_to_64_leaves_is_the_rfcs(block_bits):
    leaves = [leaf_hash(d) for d in DATA]
    store = b"".join(leaves)
    tree = MerkleTree(lambda a, b: store[32 * a:32 * b], block_bits=block_bits)
    cr = CompactRange()
    for n in range(1, 65):
        tree.append(leaves[n - 1])
        cr.append(leaves[n - 1])
        assert tree.root() == cr.root() == mth(0, n)
    for size in range(1, 65):
        root = mth(0, size)
        assert tree.root(size) == root
        for i in range(size):
            proof = tree.inclusion_proof(i, size)
            assert proof == path(i, 0, size)
            verify_inclusion(i, size, leaves[i], proof, root)
        for old in range(1, size + 1):
            proof = tree.consistency_proof(old, size)
            assert proof == subproof(old, 0, size, True)
            verify_consistency(old, size, mth(0, old), root, proof)


def test_every_altered_proof_fails():
    leaves = [leaf_hash(d) for d in DATA]
    tree = MerkleTree.of(leaves)
    for size in range(1, 65):
        root = mth(0, size)
        for i in range(size):
            proof = tree.inclusion_proof(i, size)
            for j in range(len(proof)):
                bad = proof[:j] + [bytes([proof[j][0] ^ 1]) + proof[j][1:]] + proof[j + 1:]
                with pytest.raises(RecordError):
                    verify_inclusion(i, size, leaves[i], bad, root)
            if size > 1:
                with pytest.raises(RecordError):
                    verify_inclusion((i + 1) % size, size, leaves[i], proof, root)
            with pytest.raises(RecordError):
                verify_inclusion(i, size, leaves[(i + 1) % 64], proof, root)
            with pytest.raises(RecordError):
                verify_inclusion(i, size, leaves[i], proof + [root], root)
        for old in range(1, size):
            proof = tree.consistency_proof(old, size)
            for j in range(len(proof)):
                bad = proof[:j] + [bytes([proof[j][0] ^ 1]) + proof[j][1:]] + proof[j + 1:]
                with pytest.raises(RecordError):
                    verify_consistency(old, size, mth(0, old), root, bad)
            with pytest.raises(RecordError):
                verify_consistency(old, size, mth(0, old), mth(0, size - 1) if size > 1 else root, proof)
            if old > 1:
                with pytest.raises(RecordError):
                    verify_consistency(old, size, mth(0, old - 1), root, proof)
            with pytest.raises(RecordError):
                verify_consistency(old, size, mth(0, old), root, proof[:-1])


def test_a_record_leaf_is_its_hash_as_32_raw_bytes():
    h = "ab" * 32
    assert record_leaf(h) == hashlib.sha256(b"\x00" + bytes.fromhex(h)).digest()
    for bad in ("ab" * 31, "zz" * 32):
        with pytest.raises(RecordError, match="record hash"):
            record_leaf(bad)


def test_requests_outside_the_log_are_refused():
    tree = MerkleTree.of(LEAF_HASHES)
    with pytest.raises(RecordError, match="no leaf 8"):
        tree.inclusion_proof(8)
    with pytest.raises(RecordError, match="no leaf 3 in a tree of size 9"):
        tree.inclusion_proof(3, 9)
    with pytest.raises(RecordError, match="from size 0"):
        tree.consistency_proof(0, 4)
    with pytest.raises(RecordError, match="from size 5 to 4"):
        tree.consistency_proof(5, 4)
    with pytest.raises(RecordError, match="beyond"):
        tree.root(9)
    with pytest.raises(RecordError, match="32-byte"):
        tree.append(b"short")


def test_a_leaf_source_that_gives_other_leaves_is_caught():
    leaves = [leaf_hash(d) for d in DATA]
    store = bytearray(b"".join(leaves))
    tree = MerkleTree(lambda a, b: bytes(store[32 * a:32 * b]), block_bits=3)
    tree.extend(leaves)
    store[32 * 5] ^= 1  # the ledger's copy of leaf 5 changed after the tree took it
    with pytest.raises(RecordError, match="leaves 0..7 read back do not hash"):
        tree.inclusion_proof(4)
    short = MerkleTree(lambda a, b: bytes(store[32 * a:32 * b - 1]), block_bits=3)
    short.extend(leaves)
    with pytest.raises(RecordError, match="gave 255 bytes"):
        short.inclusion_proof(4)


# --------------------------------------------------------------------------- a million records


def test_a_log_of_a_million_records_gives_small_proofs_from_a_small_cache():
    n = 1_000_000
    # the ledger: every record hash (here the leaf hashes of made-up record hashes), read back by block
    store = b"".join(leaf_hash(hashlib.sha256(i.to_bytes(4, "big")).digest()) for i in range(n))
    reads = []

    def leaf(i: int) -> bytes:
        return store[32 * i:32 * i + 32]

    def source(a: int, b: int) -> bytes:
        reads.append(b - a)
        return store[32 * a:32 * b]

    tree = MerkleTree(source)
    tree.extend(leaf(i) for i in range(n))
    cr = CompactRange()
    for i in range(n):
        cr.append(leaf(i))
    root = tree.root()
    assert root == cr.root() and reads == []
    assert tree.cached_bytes <= 2 * 32 * (n >> 8) + 32 * 256  # ~64 bytes per 256 leaves, not 32 MB

    height = (n - 1).bit_length()  # 20 levels
    for index in (0, 1, 255, 256, 123_456, 524_287, 524_288, n - 2, n - 1):
        reads.clear()
        proof = tree.inclusion_proof(index)
        assert len(reads) <= 1 and sum(reads) <= 256  # one block of leaves at most, never the log
        assert len(proof) <= height
        verify_inclusion(index, n, leaf(index), proof, root)
    for old in (1, 2, 255, 256, 257, 65_536, 500_000, 999_999):
        reads.clear()
        old_root = tree.root(old)
        proof = tree.consistency_proof(old)
        assert len(reads) <= 2
        assert len(proof) <= 2 * height
        verify_consistency(old, n, old_root, root, proof)
    assert root_from_inclusion(7, n, leaf(7), tree.inclusion_proof(7)) == root
