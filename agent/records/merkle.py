"""RFC 9162 (Certificate Transparency 2.0) Merkle tree hashing over a machine's records.

A machine's log is the list of its records' hashes in ``seq`` order. Leaf ``i`` is the 32 raw
bytes of record ``i``'s ``hash`` (:func:`record_leaf`); with SHA-256::

    leaf hash   SHA-256(0x00 || leaf data)
    node hash   SHA-256(0x01 || left || right)
    MTH(D[n])   SHA-256() for n = 0, the leaf hash for n = 1, else
                node hash of MTH(D[0:k]) and MTH(D[k:n]), k the largest power of two < n

- :class:`CompactRange`: the right edge of a tree (the roots of its perfect subtrees, one per
  set bit of the size): O(log n) state that takes appends and gives the root. What a
  checkpoint needs, and small enough to keep per machine or store beside a checkpoint.
- :class:`MerkleTree`: inclusion proofs (§2.1.3.1) and consistency proofs (§2.1.4.1) for any
  leaf and sizes. It caches the hashes of the complete subtrees of ``2**block_bits`` leaves
  and larger (64 bytes per block: 250 kB for 10^6 leaves with the default 256-leaf blocks),
  and reads the leaves of one block back from a *leaf source* (the ledger keeps every record
  hash) when a proof needs a node below the cached levels: a proof costs O(log n) cached
  nodes and at most a block or two of leaves, never a pass over the log. A block read back is
  checked against the cached hash of that block.
- :func:`verify_inclusion` (§2.1.3.2) and :func:`verify_consistency` (§2.1.4.2): RecordError
  says what does not hold.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence

from energy_agent.core.errors import RecordError

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()
"""MTH of the empty tree."""

LeafSource = Callable[[int, int], bytes]
"""``source(start, end)``: the leaf hashes of leaves ``start .. end - 1``, concatenated."""

_sha256 = hashlib.sha256


def leaf_hash(data: bytes) -> bytes:
    return _sha256(b"\x00" + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    return _sha256(b"\x01" + left + right).digest()


def record_leaf(record_hash: str) -> bytes:
    """The leaf hash of a record: its ``hash`` (64 hex digits) as 32 raw bytes, hashed as a leaf."""
    try:
        raw = bytes.fromhex(record_hash)
    except ValueError as exc:
        raise RecordError(f"record hash {record_hash[:70]!r} is not hex") from exc
    if len(raw) != HASH_SIZE:
        raise RecordError(f"record hash {record_hash[:70]!r} is not 32 bytes")
    return leaf_hash(raw)


def root_of(leaf_hashes: Sequence[bytes]) -> bytes:
    """MTH of a list of leaf hashes, level by level (an odd last node moves up unchanged,
    which builds the same tree as the largest-power-of-two split)."""
    level = list(leaf_hashes)
    if not level:
        return EMPTY_ROOT
    while len(level) > 1:
        paired = [node_hash(level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            paired.append(level[-1])
        level = paired
    return level[0]


def _split(n: int) -> int:
    """The largest power of two smaller than n (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


def _fold(hashes: list[bytes]) -> bytes:
    """The root over perfect subtrees listed left to right, largest first."""
    root = hashes[-1]
    for h in reversed(hashes[:-1]):
        root = node_hash(h, root)
    return root


def _perfect_root(leaves: bytes) -> bytes:
    """MTH of 2**j concatenated leaf hashes."""
    level = [leaves[i:i + HASH_SIZE] for i in range(0, len(leaves), HASH_SIZE)]
    while len(level) > 1:
        level = [_sha256(b"\x01" + level[i] + level[i + 1]).digest() for i in range(0, len(level), 2)]
    return level[0]


def _check_hash(h: bytes, what: str) -> None:
    if not isinstance(h, (bytes, bytearray)) or len(h) != HASH_SIZE:
        raise RecordError(f"{what} is not a {HASH_SIZE}-byte hash")


# --------------------------------------------------------------------------- compact range


class CompactRange:
    """The tree [0, size) as the roots of its perfect subtrees, largest (leftmost) first."""

    __slots__ = ("_size", "_hashes")

    def __init__(self, size: int = 0, hashes: Iterable[bytes] = ()) -> None:
        self._size = size
        self._hashes = [bytes(h) for h in hashes]
        if size < 0 or len(self._hashes) != size.bit_count():
            raise RecordError(f"a compact range of size {size} has {size.bit_count()} hashes, not {len(self._hashes)}")
        for h in self._hashes:
            _check_hash(h, "compact range node")

    @property
    def size(self) -> int:
        return self._size

    @property
    def hashes(self) -> tuple[bytes, ...]:
        """What to store to resume the range later (``CompactRange(size, hashes)``)."""
        return tuple(self._hashes)

    def append(self, leaf: bytes) -> None:
        """Add the leaf hash of leaf number ``size``."""
        _check_hash(leaf, "leaf hash")
        h, s = bytes(leaf), self._size
        while s & 1:  # each trailing 1 bit is a perfect subtree of the same height to merge with
            h = node_hash(self._hashes.pop(), h)
            s >>= 1
        self._hashes.append(h)
        self._size += 1

    def root(self) -> bytes:
        return _fold(self._hashes) if self._hashes else EMPTY_ROOT


# --------------------------------------------------------------------------- tree with proofs


class MerkleTree:
    """A log's tree with proofs for any leaf and sizes.

    ``source`` reads leaf hashes back (e.g. from the ledger's record hashes, through
    :func:`record_leaf`); without one the tree keeps every leaf hash itself (32 bytes each).
    ``block_bits``: complete subtrees of ``2**block_bits`` leaves and larger are cached.
    """

    def __init__(self, source: LeafSource | None = None, *, block_bits: int = 8) -> None:
        if not 0 <= block_bits <= 20:
            raise ValueError("block_bits is 0..20")
        self._bits = block_bits
        self._source = source
        self._store = bytearray() if source is None else None
        self._n = 0
        self._tail = bytearray()  # leaf hashes of the last, incomplete block
        self._levels: list[bytearray] = []  # _levels[k]: complete subtrees of 2**(block_bits + k) leaves
        self._memo: tuple[int, bytes] | None = None  # the complete block read back last

    @classmethod
    def of(cls, leaf_hashes: Iterable[bytes], *, block_bits: int = 8) -> MerkleTree:
        """A tree holding these leaf hashes itself."""
        tree = cls(block_bits=block_bits)
        tree.extend(leaf_hashes)
        return tree

    @property
    def size(self) -> int:
        return self._n

    @property
    def cached_bytes(self) -> int:
        """Bytes of hashes held besides the leaves (cached subtrees and the last block)."""
        return sum(len(level) for level in self._levels) + len(self._tail)

    def append(self, leaf: bytes) -> None:
        """Add the leaf hash of leaf number ``size`` (the source must hold it from now on)."""
        _check_hash(leaf, "leaf hash")
        if self._store is not None:
            self._store += leaf
        self._tail += leaf
        self._n += 1
        if len(self._tail) == HASH_SIZE << self._bits:
            self._push(0, _perfect_root(bytes(self._tail)))
            self._tail = bytearray()

    def extend(self, leaves: Iterable[bytes]) -> None:
        for leaf in leaves:
            self.append(leaf)

    def _push(self, k: int, h: bytes) -> None:
        """Cache a complete subtree at cached level k, and the parents it completes."""
        while True:
            if k == len(self._levels):
                self._levels.append(bytearray())
            level = self._levels[k]
            level += h
            if (len(level) // HASH_SIZE) % 2:
                return
            h = node_hash(bytes(level[-2 * HASH_SIZE:-HASH_SIZE]), bytes(level[-HASH_SIZE:]))
            k += 1

    # -- hashes of ranges

    def root(self, size: int | None = None) -> bytes:
        """MTH of the first ``size`` leaves (default: all)."""
        size = self._n if size is None else size
        if not 0 <= size <= self._n:
            raise RecordError(f"tree size {size} is beyond the log's {self._n} leaves")
        return self._range(0, size) if size else EMPTY_ROOT

    def _range(self, start: int, end: int) -> bytes:
        """MTH of leaves [start, end): a node of the RFC 9162 tree, so ``start`` is a multiple
        of every perfect subtree the range splits into."""
        pieces = []
        p = start
        while p < end:
            j = (end - p).bit_length() - 1
            pieces.append(self._perfect(p, j))
            p += 1 << j
        return _fold(pieces)

    def _perfect(self, start: int, height: int) -> bytes:
        """The root of the perfect subtree of 2**height leaves from ``start``."""
        if height >= self._bits:
            i = (start >> height) * HASH_SIZE
            return bytes(self._levels[height - self._bits][i:i + HASH_SIZE])
        block = start >> self._bits
        leaves = self._block(block)
        offset = (start - (block << self._bits)) * HASH_SIZE
        return _perfect_root(leaves[offset:offset + (HASH_SIZE << height)])

    def _block(self, block: int) -> bytes:
        """The leaf hashes of one block: the tail, or a complete block read back and checked."""
        if block == self._n >> self._bits:
            return bytes(self._tail)
        if self._memo is not None and self._memo[0] == block:
            return self._memo[1]
        start, end = block << self._bits, (block + 1) << self._bits
        if self._store is not None:
            leaves = bytes(self._store[start * HASH_SIZE:end * HASH_SIZE])
        else:
            assert self._source is not None
            leaves = bytes(self._source(start, end))
            if len(leaves) != (end - start) * HASH_SIZE:
                raise RecordError(f"the leaf source gave {len(leaves)} bytes for leaves {start}..{end - 1}, "
                                  f"not {(end - start) * HASH_SIZE}")
            i = block * HASH_SIZE
            if _perfect_root(leaves) != self._levels[0][i:i + HASH_SIZE]:
                raise RecordError(f"leaves {start}..{end - 1} read back do not hash to the tree built from them")
        self._memo = (block, leaves)
        return leaves

    # -- proofs

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """The audit path of leaf ``index`` in the tree of the first ``size`` leaves (RFC 9162
        §2.1.3.1), nearest sibling first."""
        size = self._n if size is None else size
        if not 0 <= index < size <= self._n:
            raise RecordError(f"no leaf {index} in a tree of size {size} (the log has {self._n})")
        path = []
        lo, hi = 0, size
        while hi - lo > 1:
            k = _split(hi - lo)
            if index < lo + k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo += k
        path.reverse()
        return path

    def consistency_proof(self, old_size: int, size: int | None = None) -> list[bytes]:
        """The proof that the tree of ``old_size`` leaves is a prefix of the tree of ``size``
        leaves (RFC 9162 §2.1.4.1)."""
        size = self._n if size is None else size
        if not 0 < old_size <= size <= self._n:
            raise RecordError(f"no consistency proof from size {old_size} to {size} (the log has {self._n})")
        path = []
        lo, hi = 0, size
        whole = True  # [lo, hi) starts at 0: the old tree's root is then known to the verifier
        while old_size != hi:
            k = _split(hi - lo)
            if old_size - lo <= k:
                path.append(self._range(lo + k, hi))
                hi = lo + k
            else:
                path.append(self._range(lo, lo + k))
                lo += k
                whole = False
        if not whole:
            path.append(self._range(lo, hi))
        path.reverse()
        return path


# --------------------------------------------------------------------------- verification


def root_from_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes]) -> bytes:
    """The root an inclusion proof leads to (RFC 9162 §2.1.3.2 steps 1-4); RecordError when the
    proof cannot be one for this index and size."""
    if not 0 <= index < size:
        raise RecordError(f"inclusion proof: leaf {index} is not in a tree of size {size}")
    _check_hash(leaf, "inclusion proof: the leaf hash")
    fn, sn, r = index, size - 1, bytes(leaf)
    for p in proof:
        _check_hash(p, "inclusion proof: a node")
        if sn == 0:
            raise RecordError(f"inclusion proof: {len(proof)} nodes are too many for leaf {index} of {size}")
        if fn & 1 or fn == sn:
            r = node_hash(p, r)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            r = node_hash(r, p)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise RecordError(f"inclusion proof: {len(proof)} nodes are too few for leaf {index} of {size}")
    return r


def verify_inclusion(index: int, size: int, leaf: bytes, proof: Sequence[bytes], root: bytes) -> None:
    """RecordError unless ``proof`` shows leaf hash ``leaf`` at ``index`` in the tree of
    ``size`` leaves with root ``root``."""
    if root_from_inclusion(index, size, leaf, proof) != root:
        raise RecordError(f"inclusion proof: leaf {index} does not lead to the root of the tree of size {size}")


def verify_consistency(size1: int, size2: int, root1: bytes, root2: bytes, proof: Sequence[bytes]) -> None:
    """RecordError unless ``proof`` shows the tree of ``size1`` leaves with root ``root1`` is
    a prefix of the tree of ``size2`` leaves with root ``root2`` (RFC 9162 §2.1.4.2)."""
    if size2 < size1:
        raise RecordError(f"consistency proof: size {size2} is smaller than {size1}")
    if size1 == 0:
        raise RecordError("consistency proof: every tree extends the empty tree; there is nothing to prove")
    if size1 == size2:
        if proof:
            raise RecordError("consistency proof: trees of the same size need an empty proof")
        if root1 != root2:
            raise RecordError(f"consistency proof: two different roots for the same size {size1}")
        return
    if not proof:
        raise RecordError("consistency proof: empty")
    for p in proof:
        _check_hash(p, "consistency proof: a node")
    path = list(proof)
    if size1 & (size1 - 1) == 0:  # the old tree is a perfect subtree: its root is the first node
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    fr = sr = path[0]
    for c in path[1:]:
        if sn == 0:
            raise RecordError(f"consistency proof: {len(proof)} nodes are too many for sizes {size1} and {size2}")
        if fn & 1 or fn == sn:
            fr = node_hash(c, fr)
            sr = node_hash(c, sr)
            while not fn & 1 and fn:
                fn >>= 1
                sn >>= 1
        else:
            sr = node_hash(sr, c)
        fn >>= 1
        sn >>= 1
    if sn != 0:
        raise RecordError(f"consistency proof: {len(proof)} nodes are too few for sizes {size1} and {size2}")
    if fr != root1:
        raise RecordError(f"consistency proof: does not lead to the root of size {size1}")
    if sr != root2:
        raise RecordError(f"consistency proof: does not lead to the root of size {size2}")
