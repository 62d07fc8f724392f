"""Record signatures and Merkle checkpoints: what evidence costs per record, on one core.

Records: ``--records`` job records built by ``tests/factories.build`` (realistic: every field of
schema 2 filled, ~1.6 kB of canonical JSON), hash-chained, signed by one agent key. Measured
per record, on one core (the process is pinned to the last CPU):

- ``sha256``: SHA-256 of the record's canonical bytes (the floor: what hashing it costs);
- ``sign``: ``proofs.sign_record`` (the record's JSON, its RFC 8785 canonical form through the
  ``rfc8785`` package, SHA-256 twice, Ed25519, base58);
- ``verify``: the standard path from stored bytes: ``json.loads`` then ``proofs.verify``
  (canonicalises the document again with ``rfc8785``);
- ``fast verify``: ``proofs.verify_canonical`` on the verbatim canonical bytes (checks they are
  canonical with the C ``json`` module and cuts the proof member out);
- ``ed25519 sign`` / ``ed25519 verify``: the signature alone over the 64-byte hashData.

Timing: ``--rounds`` rounds; in each, every measurement runs over all records back to back
(process CPU time, so time another process takes from the shared core does not count). Printed:
the median rate over the rounds and the median of each round's ratio to ``sha256``.

Checkpoint: a log of ``--leaves`` records (made-up record hashes): leaf hashes from the hex
hashes, a ``MerkleTree`` over them reading leaves back from a store (as from the ledger),
a ``CompactRange`` (what a checkpoint alone needs), the root, a signed checkpoint note, and
inclusion and consistency proofs (time and number of hashes) for spread-out leaves and sizes.

Run: .venv/bin/python benchmarks/bench_signing.py [--records 500] [--rounds 5] [--leaves 1000000]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import replace

import benchlib as bl
from energy_agent.core.record import GENESIS
from energy_agent.records import merkle, notes, proofs
from energy_agent.records.keys import AgentKey, Keyring, b58decode
from tests import factories


def records(n: int, key: AgentKey) -> list:
    out, prev = [], GENESIS
    for i in range(1, n + 1):
        rec = proofs.sign_record(factories.build(i, prev, key=f"J-{i}", kwh=0.5 + i / 37,
                                                 start_wall=factories.T0 + 400.0 * i), key)
        out.append(rec)
        prev = rec.hash
    return out


def rate(fn: Callable[[object], object], items: list) -> float:
    """Items per CPU second of ``fn`` over all items."""
    t0 = time.process_time()
    for item in items:
        fn(item)
    return len(items) / (time.process_time() - t0)


def bench_records(n: int, rounds: int) -> None:
    key = AgentKey.generate()
    ring = Keyring([key.public])
    recs = records(n, key)
    unsigned = [replace(r, proof=None) for r in recs]
    stored = [r.canonical() for r in recs]
    datas = []
    for r in recs:
        options = {k: v for k, v in r.to_json()["proof"].items() if k != "proofValue"}
        datas.append((proofs.hash_data(proofs.proof_config(options), proofs.transform(r.unsigned())),
                      b58decode(r.proof.proofValue[1:])))
    assert all(proofs.verify_canonical(b, ring).ok for b in stored)
    assert all(proofs.verify(json.loads(b), ring).ok for b in stored)

    cases: dict[str, tuple[Callable[[object], object], list]] = {
        "sha256": (lambda b: hashlib.sha256(b).digest(), stored),
        "sign": (lambda r: proofs.sign_record(r, key), unsigned),
        "verify": (lambda b: proofs.verify(json.loads(b), ring), stored),
        "fast verify": (lambda b: proofs.verify_canonical(b, ring), stored),
        "ed25519 sign": (lambda d: key.sign(d[0]), datas),
        "ed25519 verify": (lambda d: key.public.verify(d[1], d[0]), datas),
    }
    rates: dict[str, list[float]] = {name: [] for name in cases}
    for i in range(rounds):
        order = list(cases) if i % 2 == 0 else list(reversed(cases))
        for name in order:
            fn, items = cases[name]
            rates[name].append(rate(fn, items))
    print(f"records: {n} job records, canonical JSON {statistics.mean(map(len, stored)):.0f} bytes each, "
          f"{rounds} rounds, one core (CPU {sorted(os.sched_getaffinity(0))})")
    print(f"{'':16s} {'records/s':>12s} {'us/record':>10s} {'x sha256':>10s}")
    for name in cases:
        ratio = statistics.median(rates["sha256"][i] / rates[name][i] for i in range(rounds))
        r = statistics.median(rates[name])
        print(f"{name:16s} {r:12,.0f} {1e6 / r:10.1f} {ratio:10.1f}")


def bench_checkpoint(n: int) -> None:
    hex_hashes = [hashlib.sha256(i.to_bytes(4, "big")).hexdigest() for i in range(n)]
    t0 = time.process_time()
    leaves = [merkle.record_leaf(h) for h in hex_hashes]
    t_leaves = time.process_time() - t0
    store = b"".join(leaves)
    reads: list[int] = []

    def source(a: int, b: int) -> bytes:
        reads.append(b - a)
        return store[32 * a:32 * b]

    t0 = time.process_time()
    cr = merkle.CompactRange()
    for leaf in leaves:
        cr.append(leaf)
    root = cr.root()
    t_compact = time.process_time() - t0
    t0 = time.process_time()
    tree = merkle.MerkleTree(source)
    tree.extend(leaves)
    assert tree.root() == root
    t_tree = time.process_time() - t0
    signer = notes.Signer("energy-agent/bench/gw/m1", AgentKey.generate())
    t0 = time.process_time()
    note = notes.Checkpoint(signer.name, n, root).sign([signer])
    t_note = time.process_time() - t0
    notes.open_checkpoint(note, [signer.verifier], signer.name)

    indexes = [0, 1, 255, 256, n // 3, n // 2, n - 2, n - 1]
    t0 = time.process_time()
    incl = [tree.inclusion_proof(i) for i in indexes]
    t_incl = (time.process_time() - t0) / len(indexes)
    for i, p in zip(indexes, incl):
        merkle.verify_inclusion(i, n, leaves[i], p, root)
    olds = [1, 2, 255, 256, 257, n // 3, n // 2, n - 1]
    old_roots = [tree.root(m) for m in olds]
    reads.clear()
    t0 = time.process_time()
    cons = [tree.consistency_proof(m) for m in olds]
    t_cons = (time.process_time() - t0) / len(olds)
    for m, r, p in zip(olds, old_roots, cons):
        merkle.verify_consistency(m, n, r, root, p)
    print(f"\ncheckpoint of {n:,} records (CPU seconds, one core):")
    print(f"  leaf hashes from hex record hashes   {t_leaves:7.2f} s")
    print(f"  CompactRange (root only)             {t_compact:7.2f} s   state: {len(cr.hashes)} hashes")
    print(f"  MerkleTree (proofs)                  {t_tree:7.2f} s   cache: {tree.cached_bytes / 1024:.0f} kB "
          f"(the leaves stay in the store: {len(store) / 2**20:.0f} MB)")
    print(f"  signed checkpoint note               {t_note * 1e3:7.2f} ms  ({len(note)} bytes)")
    print(f"  inclusion proof                      {t_incl * 1e3:7.2f} ms  "
          f"{min(map(len, incl))}..{max(map(len, incl))} hashes ({max(map(len, incl)) * 32} bytes at most)")
    print(f"  consistency proof                    {t_cons * 1e3:7.2f} ms  "
          f"{min(map(len, cons))}..{max(map(len, cons))} hashes ({max(map(len, cons)) * 32} bytes at most)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--leaves", type=int, default=1_000_000)
    args = ap.parse_args()
    os.sched_setaffinity(0, {bl.cores()[-1]})
    bench_records(args.records, args.rounds)
    bench_checkpoint(args.leaves)


if __name__ == "__main__":
    main()
