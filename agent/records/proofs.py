"""W3C Data Integrity proofs, cryptosuite ``eddsa-jcs-2022`` ("Data Integrity EdDSA Cryptosuites
v1.0", W3C Recommendation, May 2025): the signature a record carries in ``proof``.

Creating a proof (spec §3.3.1) over an unsecured document (a record's ``unsigned()`` JSON)::

    proof options   type DataIntegrityProof, cryptosuite eddsa-jcs-2022, created,
                    verificationMethod (did:key:z6Mk...#z6Mk...), proofPurpose assertionMethod,
                    and the document's @context when it has one
    hashData        SHA-256(JCS(proof options)) || SHA-256(JCS(document))
    proofValue      "z" + base58btc(Ed25519-sign(hashData))

Verifying (§3.3.2) recomputes hashData from the secured document without ``proof`` and from
the proof without ``proofValue``, and checks the signature with a key the verifier trusts
(:class:`~energy_agent.records.keys.Keyring`): the proof's ``verificationMethod`` must name
one of them, not revoked, valid when the proof was created. A :class:`Verdict` says whether it
holds and, when not, why.

:func:`verify_canonical` is the bulk path for stored records: it takes the record's verbatim
canonical JSON bytes, checks cheaply that they *are* RFC 8785 canonical (the C ``json``
module parses them, every number literal is checked to be in ECMAScript form, and the
``json`` serialisation with sorted keys must give back the same bytes; anything it cannot
vouch for is checked by the ``rfc8785`` package itself), then cuts the ``"proof":{...}``
member out of the bytes: removing a member from canonical JSON leaves the canonical JSON of
the rest. Bytes that are not canonical fail with that reason.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from energy_agent.core.errors import RecordError
from energy_agent.core.record import IntervalRecord, JobRecord, Proof, Record, canonical_json
from energy_agent.records.keys import AgentKey, KeyDocument, Keyring, b58decode, b58encode, parse_time, utc_stamp

TYPE = "DataIntegrityProof"
CRYPTOSUITE = "eddsa-jcs-2022"
PURPOSE = "assertionMethod"
SIGNATURE_BYTES = 64
MAX_PROOF_VALUE = 1 + 88
"""'z' and the longest base58btc of 64 bytes (longer text is refused before it is decoded)."""
_STAMP = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


@dataclass(frozen=True, slots=True)
class Verdict:
    """Whether a proof holds; ``reason`` says why not; ``key`` is the trusted key that signed."""

    ok: bool
    reason: str = ""
    key: KeyDocument | None = None

    def __bool__(self) -> bool:
        return self.ok


class _Reject(Exception):
    """A proof fails; the message is the Verdict's reason."""


# --------------------------------------------------------------------------- the algorithm


def transform(document: Mapping[str, Any]) -> bytes:
    """The transformed document: JCS (RFC 8785) of the unsecured document."""
    return canonical_json(dict(document))


def proof_config(options: Mapping[str, Any]) -> bytes:
    """The canonical proof configuration (JCS of the proof options). RecordError when the
    options are not ``DataIntegrityProof`` / ``eddsa-jcs-2022`` or ``created`` is not a
    date-time."""
    if options.get("type") != TYPE or options.get("cryptosuite") != CRYPTOSUITE:
        raise RecordError(f"proof options must have type {TYPE} and cryptosuite {CRYPTOSUITE}")
    if "created" in options:
        try:
            parse_time(options["created"])
        except ValueError as exc:
            raise RecordError(f"proof created: {exc}") from exc
    return canonical_json(dict(options))


def hash_data(config: bytes, document: bytes) -> bytes:
    """SHA-256(canonical proof config) || SHA-256(transformed document): what is signed."""
    return hashlib.sha256(config).digest() + hashlib.sha256(document).digest()


def create_proof(document: Mapping[str, Any], key: AgentKey, *, created: str | None = None) -> dict[str, Any]:
    """The proof (a dict ending with ``proofValue``) of ``key`` over the unsecured document.
    ``created`` defaults to now (UTC, microseconds, a record's Stamp)."""
    if "proof" in document:
        raise RecordError("the document already has a proof (proof sets and chains are not supported)")
    proof: dict[str, Any] = {"type": TYPE, "cryptosuite": CRYPTOSUITE, "created": created or utc_stamp(),
                             "verificationMethod": key.public.verification_method, "proofPurpose": PURPOSE}
    if "@context" in document:
        proof["@context"] = document["@context"]
    data = hash_data(proof_config(proof), transform(document))
    proof["proofValue"] = "z" + b58encode(key.sign(data))
    return proof


def sign(document: Mapping[str, Any], key: AgentKey, *, created: str | None = None) -> dict[str, Any]:
    """The secured document: a copy of ``document`` with its ``proof``."""
    return {**document, "proof": create_proof(document, key, created=created)}


def sign_record(rec: Record, key: AgentKey, *, created: str | None = None) -> JobRecord | IntervalRecord:
    """The record with its ``proof`` (the record's ``hash`` must already be set: the proof
    covers it). Records of schema 1 are never signed."""
    if not isinstance(rec, (JobRecord, IntervalRecord)):
        raise RecordError(f"{rec.schema} records are not signed")
    if created is not None and not _STAMP.match(created):
        raise RecordError(f"proof created {created!r}: a record's times are UTC with microseconds, "
                          "2026-01-31T12:00:00.000000Z")
    proof = create_proof(rec.unsigned(), key, created=created)
    return replace(rec, proof=Proof(**proof))


# --------------------------------------------------------------------------- verification


def verify(secured: Mapping[str, Any], keys: Keyring) -> Verdict:
    """Verify the proof of a secured document (a dict, e.g. ``record.to_json()``)."""
    try:
        proof, signature, doc_key = _check_proof(secured, keys)
        options = {k: v for k, v in proof.items() if k != "proofValue"}
        config = _canonical(options, "the proof options")
        document = _canonical(_unsecured(secured, options), "the document")
    except _Reject as exc:
        return Verdict(False, str(exc))
    return _signature_verdict(doc_key, signature, hash_data(config, document))


def verify_record(rec: Record, keys: Keyring) -> Verdict:
    if getattr(rec, "proof", None) is None:
        return Verdict(False, "the record is not signed")
    return verify(rec.to_json(), keys)


def verify_canonical(data: bytes, keys: Keyring) -> Verdict:
    """Verify the proof of a document given as its verbatim canonical JSON bytes (a stored or
    published record), without canonicalising it again. Bytes that are not RFC 8785
    canonical JSON fail: what was signed must be exactly what is read."""
    try:
        secured, exact = canonical_value(data)
        proof, signature, doc_key = _check_proof(secured, keys)
        options = {k: v for k, v in proof.items() if k != "proofValue"}
        document = _cut_proof(data, proof) if exact and _own_context(secured, options) else None
        if document is None:  # what the bytes cannot give directly is canonicalised
            config = _canonical(options, "the proof options")
            document = _canonical(_unsecured(secured, options), "the document")
        else:
            config = _dumps(options).encode()
    except _Reject as exc:
        return Verdict(False, str(exc))
    return _signature_verdict(doc_key, signature, hash_data(config, document))


def _check_proof(secured: Any, keys: Keyring) -> tuple[dict[str, Any], bytes, KeyDocument]:
    """The proof, its signature bytes and the trusted key it names; _Reject says what is wrong."""
    if not isinstance(secured, Mapping):
        raise _Reject("the document is not a JSON object")
    proof = secured.get("proof")
    if proof is None:
        raise _Reject("the document has no proof (unsigned)")
    if isinstance(proof, list):
        raise _Reject("a proof set (a list of proofs) is not supported: one proof expected")
    if not isinstance(proof, Mapping):
        raise _Reject("proof is not a JSON object")
    for name, want in (("type", TYPE), ("cryptosuite", CRYPTOSUITE), ("proofPurpose", PURPOSE)):
        if proof.get(name) != want:
            raise _Reject(f"proof {name} is {_show(proof.get(name))}, expected {want!r}")
    created = proof.get("created")
    when = None
    if created is not None:
        try:
            when = parse_time(created)
        except ValueError as exc:
            raise _Reject(f"proof created: {exc}") from exc
    value = proof.get("proofValue")
    if not isinstance(value, str) or not value.startswith("z"):
        raise _Reject("proofValue is not a base58btc multibase value ('z...')")
    if len(value) > MAX_PROOF_VALUE:
        raise _Reject(f"proofValue has {len(value)} characters; an Ed25519 signature takes at most {MAX_PROOF_VALUE}")
    try:
        signature = b58decode(value[1:])
    except ValueError as exc:
        raise _Reject(f"proofValue is not base58btc: {exc}") from exc
    if len(signature) != SIGNATURE_BYTES:
        raise _Reject(f"proofValue holds {len(signature)} bytes; an Ed25519 signature is {SIGNATURE_BYTES}")
    method = proof.get("verificationMethod")
    if not isinstance(method, str):
        raise _Reject("proof verificationMethod is missing")
    doc_key = keys.get(method)
    if doc_key is None:
        raise _Reject(f"signed by an unknown key {_show(method)} (not among the {len(keys)} trusted)")
    if doc_key.revoked is not None:
        raise _Reject(f"signed by key {doc_key.key.multibase}, revoked at {doc_key.revoked.time}: "
                      f"{doc_key.revoked.reason}")
    if doc_key.valid_from is not None:
        if when is None:
            raise _Reject("the proof has no created time to compare with the key's valid_from")
        if when < parse_time(doc_key.valid_from):
            raise _Reject(f"proof created {created}, before key {doc_key.key.multibase} became valid "
                          f"({doc_key.valid_from})")
    return dict(proof), signature, doc_key


def _unsecured(secured: Mapping[str, Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The document without its proof; with the proof's @context when it has one (§3.3.2 step 4)."""
    unsecured = {k: v for k, v in secured.items() if k != "proof"}
    if "@context" in options:
        want, have = _contexts(options["@context"]), _contexts(secured.get("@context"))
        if have[:len(want)] != want:
            raise _Reject("the document's @context does not start with the proof's @context")
        unsecured["@context"] = options["@context"]
    return unsecured


def _own_context(secured: Mapping[str, Any], options: Mapping[str, Any]) -> bool:
    """Whether the unsecured document is the secured one minus its proof, byte for byte."""
    return "@context" not in options or options["@context"] == secured.get("@context")


def _contexts(value: Any) -> list[Any]:
    return [] if value is None else list(value) if isinstance(value, list) else [value]


def _signature_verdict(doc_key: KeyDocument, signature: bytes, data: bytes) -> Verdict:
    if not doc_key.key.verify(signature, data):
        return Verdict(False, f"the signature does not match (the document or its proof was changed, "
                              f"or key {doc_key.key.multibase} did not sign it)")
    return Verdict(True, "", doc_key)


def _canonical(value: dict[str, Any], what: str) -> bytes:
    try:
        return canonical_json(value)
    except RecordError as exc:
        raise _Reject(f"{what}: {exc}") from exc


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


# --------------------------------------------------------------------------- canonical bytes

MAX_SAFE_INTEGER = 2**53 - 1
_ASTRAL = re.compile(rb"[\xf0-\xf4]")
"""A UTF-8 lead byte of a character beyond U+FFFF: JCS sorts keys by UTF-16 code units, Python
by code points; the two orders differ only when such characters occur."""


def _dumps(value: Any) -> str:
    """Python's JSON with sorted keys and no spaces: RFC 8785 for the values canonical_value vouched for."""
    return json.dumps(value, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


def es_number(x: float) -> str:
    """A finite double as ECMAScript's Number.prototype.toString writes it (RFC 8785 §3.2.2.3):
    the shortest round-tripping digits, fixed notation for 1e-6 <= |x| < 1e21."""
    if x == 0:
        return "0"
    mantissa, _, exp = repr(abs(x)).partition("e")  # repr: the shortest digits that round-trip
    whole, _, frac = mantissa.partition(".")
    digits = (whole + frac).lstrip("0")
    point = len(whole) + int(exp or 0) - (len(whole + frac) - len(digits))  # digits[:point] is the integer part
    digits = digits.rstrip("0")
    k, sign = len(digits), "-" if x < 0 else ""
    if k <= point <= 21:
        return sign + digits + "0" * (point - k)
    if 0 < point <= 21:
        return sign + digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return sign + "0." + "0" * -point + digits
    e = point - 1
    return sign + digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))


class _NotCanonical(ValueError):
    pass


def _float_literal(text: str) -> float:
    x = float(text)
    r = repr(x)
    if r == text and "e" not in r and not r.endswith(".0"):  # the common case: Python's form is ES's
        return x
    if x != x or x in (float("inf"), float("-inf")) or es_number(x) != text:
        raise _NotCanonical(f"the number {text[:40]} is not in canonical form")
    return x


def _int_literal(text: str) -> int | float:
    n = int(text)
    if -MAX_SAFE_INTEGER <= n <= MAX_SAFE_INTEGER:
        if text == "-0":
            raise _NotCanonical("-0 is written 0 in canonical form")
        return n
    try:  # beyond 2**53 a JSON number is a double: canonical only in ECMAScript's form
        x = float(n)
    except OverflowError as exc:
        raise _NotCanonical(f"the number {text[:40]}... is too large") from exc
    if es_number(x) != text:
        raise _NotCanonical(f"the number {text[:40]} is not in canonical form")
    return x


def _constant(text: str) -> Any:
    raise _NotCanonical(f"{text} is not JSON")


def canonical_value(data: bytes) -> tuple[Any, bool]:
    """The JSON value of bytes that must be RFC 8785 canonical JSON, and whether Python's
    ``json`` writes it back byte for byte (then every member's canonical text is its
    ``json.dumps`` with sorted keys, and parts can be cut or rebuilt without ``rfc8785``).
    _Reject (a failed Verdict) when the bytes are not canonical."""
    try:
        text = data.decode("utf-8")
        value = json.loads(text, parse_float=_float_literal, parse_int=_int_literal, parse_constant=_constant)
    except _NotCanonical as exc:
        raise _Reject(f"not in canonical form (RFC 8785): {exc}") from exc
    except ValueError as exc:  # UnicodeDecodeError, JSONDecodeError
        raise _Reject(f"not JSON: {exc}") from exc
    try:
        exact = (data.isascii() or not _ASTRAL.search(data)) and _dumps(value) == text
    except ValueError:
        exact = False
    if not exact:
        try:
            canonical = canonical_json(value)
        except RecordError as exc:
            raise _Reject(f"not in canonical form (RFC 8785): {exc}") from exc
        if canonical != data:
            raise _Reject("not in canonical form (RFC 8785): the bytes differ from the canonical JSON of their value")
    return value, exact


def _cut_proof(data: bytes, proof: Mapping[str, Any]) -> bytes | None:
    """``data`` (canonical, as :func:`canonical_value` vouched with exact=True) without its
    top-level ``proof`` member; None when the member's text occurs more than once (then which
    one is top-level is not known from the bytes alone)."""
    member = b'"proof":' + _dumps(proof).encode()
    if data.count(member) != 1:
        return None
    i = data.index(member)
    j = i + len(member)
    if data[i - 1:i] == b",":
        return data[:i - 1] + data[j:]
    if data[j:j + 1] == b",":
        return data[:i] + data[j + 1:]
    return data[:i] + data[j:]
