"""Data Integrity proofs (eddsa-jcs-2022): the W3C specification's test vectors byte for byte,
records signed and verified, every kind of tampering refused, and the bulk path over verbatim
canonical bytes agreeing with the standard one (and refusing bytes that are not canonical)."""

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import pytest
import rfc8785

from energy_agent.core.errors import RecordError
from energy_agent.core.record import GENESIS, parse_record
from energy_agent.domain.spans import FinishedInterval
from energy_agent.records import proofs, record
from energy_agent.records.keys import AgentKey, KeyDocument, Keyring, Revocation, b58decode, b58encode
from energy_agent.records.proofs import canonical_value, sign_record, verify, verify_canonical, verify_record
from tests import factories

VECTORS = Path(__file__).parent / "vectors" / "eddsa-jcs-2022"


def _vector(name: str) -> bytes:
    return (VECTORS / name).read_bytes()


def _vector_key() -> AgentKey:
    secret = b58decode(json.loads(_vector("keyPair.json"))["privateKeyMultibase"][1:])
    return AgentKey.from_seed(secret[2:])


# --------------------------------------------------------------------------- specification vectors


def test_the_specification_vectors_are_reproduced_byte_for_byte():
    unsigned = json.loads(_vector("unsigned.json"))
    options = json.loads(_vector("proofConfigJCS.json"))
    document = proofs.transform(unsigned)
    assert document == _vector("canonDocJCS.txt")
    assert hashlib.sha256(document).hexdigest() == _vector("docHashJCS.txt").decode()
    config = proofs.proof_config(options)
    assert config == _vector("proofCanonJCS.txt")
    assert hashlib.sha256(config).hexdigest() == _vector("proofHashJCS.txt").decode()
    data = proofs.hash_data(config, document)
    assert data.hex() == _vector("combinedHashJCS.txt").decode()
    signature = _vector_key().sign(data)
    assert signature.hex() == _vector("sigHexJCS.txt").decode()
    assert "z" + b58encode(signature) == _vector("sigBTC58JCS.txt").decode()


def test_signing_the_specification_document_gives_the_signed_vector():
    unsigned = json.loads(_vector("unsigned.json"))
    signed = proofs.sign(unsigned, _vector_key(), created="2023-02-24T23:36:38Z")
    assert signed == json.loads(_vector("signedJCS.json"))


def test_the_signed_vector_verifies_by_both_paths():
    signed = json.loads(_vector("signedJCS.json"))
    ring = Keyring([_vector_key().public])
    assert verify(signed, ring).ok
    assert verify_canonical(rfc8785.dumps(signed), ring).ok
    changed = json.loads(_vector("signedJCS.json"))
    changed["credentialSubject"]["alumniOf"] = "The School of Counterexamples"
    assert not verify(changed, ring)
    assert not verify_canonical(rfc8785.dumps(changed), ring)


def test_a_proof_context_the_document_does_not_start_with_is_refused():
    signed = json.loads(_vector("signedJCS.json"))
    signed["@context"] = signed["@context"][::-1]
    verdict = verify(signed, Keyring([_vector_key().public]))
    assert not verdict.ok and "@context" in verdict.reason


# --------------------------------------------------------------------------- records


@pytest.fixture(scope="module")
def key():
    return AgentKey.generate()


@pytest.fixture(scope="module")
def ring(key):
    return Keyring([key.public])


def _interval(seq: int, prev_hash: str):
    job = factories.finished_job()
    iv = FinishedInterval(machine="m1", kind="unobserved", reason="cnc_unavailable", start=0.0,
                          start_wall=factories.T0, end=600.0, end_wall=factories.T0 + 600.0, parts=3,
                          energy=job.energy, samples=601, bad_samples=0, median_interval_s=1.0, flags=())
    return record.build(site="plant", agent="gw", seq=seq, prev_hash=prev_hash, span=iv,
                        factor=factories.FACTOR.as_factor("vn-2023"), meter=factories.METER.as_ref("eastron-sdm630"),
                        cnc=None, config_hash="c" * 64)


@pytest.fixture(scope="module")
def signed(key):
    return sign_record(factories.build(1, GENESIS), key)


def test_a_signed_record_names_its_key_and_survives_storage(signed, key, ring):
    assert signed.proof.verificationMethod == key.public.verification_method
    assert signed.proof.cryptosuite == "eddsa-jcs-2022"
    again = parse_record(signed.canonical())
    assert again == signed
    verdict = verify_record(again, ring)
    assert verdict.ok and verdict.key.key == key.public
    assert verify_canonical(signed.canonical(), ring).ok


def test_interval_records_are_signed_too(key, ring):
    rec = sign_record(_interval(2, "a" * 64), key)
    assert verify_record(rec, ring).ok and verify_canonical(rec.canonical(), ring).ok


def test_the_proof_covers_the_record_without_its_proof(signed, key):
    document = signed.unsigned()
    assert "proof" not in document and "hash" in document
    options = {k: v for k, v in signed.to_json()["proof"].items() if k != "proofValue"}
    data = proofs.hash_data(proofs.proof_config(options), proofs.transform(document))
    assert key.public.verify(b58decode(signed.proof.proofValue[1:]), data)


def test_signing_is_deterministic_for_the_same_time(key):
    rec = factories.build(1, GENESIS)
    a = sign_record(rec, key, created="2026-09-21T14:13:20.000000Z")
    b = sign_record(rec, key, created="2026-09-21T14:13:20.000000Z")
    assert a.proof == b.proof


def test_unsigned_and_schema_1_records_are_not_verified_or_signed(key, ring):
    rec = factories.build(1, GENESIS)
    assert verify_record(rec, ring).reason == "the record is not signed"
    assert "unsigned" in verify_canonical(rec.canonical(), ring).reason
    with pytest.raises(RecordError, match="UTC with microseconds"):
        sign_record(rec, key, created="2026-09-21T14:13:20Z")
    v1 = rec.to_json()
    v1["schema"] = "energy-agent.job-record/1"
    del v1["boundaries"], v1["energy"]["unknown_reason"], v1["job"]["order"], v1["job"]["assignment"]
    v1["job"]["serial"] = v1["job"].pop("serials")[0]
    with pytest.raises(RecordError, match="not signed"):
        sign_record(parse_record(v1), key)


def test_every_changed_byte_of_a_stored_record_fails(signed, ring):
    data = signed.canonical()
    for i in range(len(data)):
        for new in {data[i] ^ 0x01, ord("0") if data[i] != ord("0") else ord("1")}:
            tampered = data[:i] + bytes([new]) + data[i + 1:]
            assert not verify_canonical(tampered, ring).ok, (i, tampered[max(0, i - 20):i + 20])


def test_a_changed_field_fails_with_the_signature_reason(signed, ring):
    changed = factories.edited(signed, lambda d: d["energy"].update(kwh=0.5))
    for verdict in (verify_record(changed, ring), verify_canonical(changed.canonical(), ring)):
        assert not verdict.ok and "signature does not match" in verdict.reason


def test_a_record_signed_by_another_key_fails():
    other = AgentKey.generate()
    by_other = sign_record(factories.build(1, GENESIS), other)
    trusted = Keyring([AgentKey.generate().public])
    verdict = verify_record(by_other, trusted)
    assert not verdict.ok and "unknown key" in verdict.reason
    # the other key's signature presented as the trusted key's
    ring = Keyring([AgentKey.from_seed(bytes(range(32))).public])
    relabelled = replace(by_other, proof=replace(by_other.proof, verificationMethod=next(iter(ring)).id))
    for verdict in (verify_record(relabelled, ring), verify_canonical(relabelled.canonical(), ring)):
        assert not verdict.ok and "signature does not match" in verdict.reason


def test_a_revoked_key_fails_whatever_the_proof_claims(signed, key):
    ring = Keyring([KeyDocument(key.public, revoked=Revocation("2030-01-01T00:00:00Z", "gateway stolen"))])
    for verdict in (verify_record(signed, ring), verify_canonical(signed.canonical(), ring)):
        assert not verdict.ok
        assert "revoked at 2030-01-01T00:00:00Z: gateway stolen" in verdict.reason


def test_a_proof_created_before_the_key_became_valid_fails(key):
    rec = sign_record(factories.build(1, GENESIS), key, created="2026-01-01T00:00:00.000000Z")
    assert verify_record(rec, Keyring([KeyDocument(key.public, valid_from="2025-12-31T23:00:00Z")])).ok
    verdict = verify_record(rec, Keyring([KeyDocument(key.public, valid_from="2026-01-01T00:00:01Z")]))
    assert not verdict.ok and "before key" in verdict.reason


@pytest.mark.parametrize("change, says", [
    (lambda p: p.update(type="Ed25519Signature2020"), "proof type"),
    (lambda p: p.update(cryptosuite="eddsa-rdfc-2022"), "proof cryptosuite"),
    (lambda p: p.update(proofPurpose="authentication"), "proof proofPurpose"),
    (lambda p: p.update(proofValue=p["proofValue"][1:]), "base58btc multibase"),
    (lambda p: p.update(proofValue="u" + p["proofValue"][1:]), "base58btc multibase"),
    (lambda p: p.update(proofValue=p["proofValue"][:-1] + "0"), "not base58btc"),
    (lambda p: p.update(proofValue="z" + b58encode(b"\1" * 63)), "holds 63 bytes"),
    (lambda p: p.update(proofValue="z" + b58encode(b"\1" * 65)), "holds 65 bytes"),
    (lambda p: p.update(proofValue="z" + "2" * 100_000), "100001 characters"),
    (lambda p: p.update(created="2026-09-21T14:13:21.000000Z"), "signature does not match"),
    (lambda p: p.update(created="yesterday"), "proof created"),
    (lambda p: p.update(domain="example.com"), "signature does not match"),
    (lambda p: p.pop("verificationMethod"), "verificationMethod is missing"),
])
def test_changed_proof_options_fail_with_a_reason(key, ring, change, says):
    secured = sign_record(factories.build(1, GENESIS), key, created="2026-09-21T14:13:20.000000Z").to_json()
    change(secured["proof"])
    for verdict in (verify(secured, ring), verify_canonical(rfc8785.dumps(secured), ring)):
        assert not verdict.ok and says in verdict.reason, verdict.reason


def test_a_proof_set_or_a_missing_proof_is_refused(signed, ring):
    secured = signed.to_json()
    assert "proof set" in verify({**secured, "proof": [secured["proof"]]}, ring).reason
    assert "not a JSON object" in verify({**secured, "proof": "z123"}, ring).reason
    assert "not a JSON object" in verify([secured], ring).reason
    assert "unsigned" in verify(signed.unsigned(), ring).reason


def test_a_record_that_already_has_a_proof_is_not_signed_again(signed, key):
    with pytest.raises(RecordError, match="already has a proof"):
        proofs.create_proof(signed.to_json(), key)


# --------------------------------------------------------------------------- verbatim canonical bytes


def _without_space(value) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("mangle, says", [
    (lambda d: d.replace(b'{"agent"', b'{ "agent"', 1), "canonical form"),
    (lambda d: d + b"\n", "canonical form"),
    (lambda d: b"\xef\xbb\xbf" + d, "not JSON"),
    (lambda d: d.replace(b'"duration_s":300', b'"duration_s":300.0', 1), "300.0 is not in canonical form"),
    (lambda d: d.replace(b'"duration_s":300', b'"duration_s":3e2', 1), "3e2 is not in canonical form"),
    (lambda d: d.replace(b'"duration_s":300', b'"duration_s":-0', 1), "-0"),
    (lambda d: d.replace(b'"duration_s":300', b'"duration_s":NaN', 1), "NaN is not JSON"),
    (lambda d: d.replace(b'"value":0.6592', b'"value":0.65920', 1), "0.65920 is not in canonical form"),
    (lambda d: d.replace(b'"region":"VN"', b'"region":"\\u0056N"', 1), "canonical form"),
    (lambda d: d.replace(b'"agent":"gw","allocation":"direct"', b'"allocation":"direct","agent":"gw"', 1),
     "canonical form"),
    (lambda d: d.replace(b'"agent":"gw"', b'"agent":"gw","agent":"gw"', 1), "canonical form"),
    (lambda d: d.replace(b'"gw"', b'"g\xffw"', 1), "not JSON"),
    (lambda d: d.replace(b'"seq":1', b'"seq":9007199254740993', 1), "canonical form"),
])
def test_bytes_that_are_not_canonical_are_refused_with_that_reason(signed, ring, mangle, says):
    data = signed.canonical()
    mangled = mangle(data)
    assert mangled != data
    verdict = verify_canonical(mangled, ring)
    assert not verdict.ok and says in verdict.reason, verdict.reason


def _signed_with(key, change):
    """A signed record whose JSON form ``change`` edited before it was hashed and signed."""
    rec = factories.edited(factories.build(1, GENESIS), change).with_hash()
    return sign_record(rec, key)


@pytest.mark.parametrize("change", [
    # numbers Python writes otherwise than ECMAScript (1e-05 / 0.00001, 1e+16 / 10000000000000000)
    lambda d: d["energy"].update(kwh=0.00001, estimated_kwh=0.0),
    lambda d: d["quality"].update(longest_gap_s=1e16),
    lambda d: d["quality"].update(median_interval_s=2.5e-7),
    # text beyond the Basic Multilingual Plane (JCS orders keys by UTF-16 code units)
    lambda d: d["job"].update(product="Spindel \U0001F527 Gehäuse"),
    # escapes: control characters, quotes and backslashes
    lambda d: d["job"].update(product='a "quoted" \\ back\tslash \x01 \x7f \u2028'),
    # Vietnamese text
    lambda d: d["job"].update(product="Trục chính"),
])
def test_canonical_records_of_every_shape_verify_by_the_bulk_path(key, ring, change):
    rec = _signed_with(key, change)
    data = rec.canonical()
    assert verify_record(rec, ring).ok
    verdict = verify_canonical(data, ring)
    assert verdict.ok, verdict.reason
    value, exact = canonical_value(data)
    assert value == json.loads(data)


def test_the_bulk_path_reads_plain_records_without_the_rfc8785_package(signed, monkeypatch, ring):
    """For an ordinary record the check needs only the json module (rfc8785 is what is slow)."""
    def fail(value):
        raise AssertionError("rfc8785 called")
    monkeypatch.setattr(proofs, "canonical_json", fail)
    assert canonical_value(signed.canonical())[1] is True
    assert verify_canonical(signed.canonical(), ring).ok


def test_a_duplicated_proof_member_is_judged_like_the_standard_path(signed, ring):
    secured = signed.to_json()
    secured["cnc"] = {"proof": secured["proof"]}  # the proof's text now occurs twice
    data = rfc8785.dumps(secured)
    assert data.count(b'"proof":' + _without_space(dict(sorted(secured["proof"].items())))) == 2
    assert verify_canonical(data, ring) == verify(secured, ring)
    assert not verify_canonical(data, ring).ok


def test_the_bulk_path_agrees_with_the_standard_path_on_many_records(key, ring):
    prev = GENESIS
    for i in range(1, 40):
        rec = sign_record(factories.build(i, prev, key=f"J-{i}", kwh=i / 7, duration_s=60.0 + i * 13.1), key)
        prev = rec.hash
        assert verify_canonical(rec.canonical(), ring) == verify_record(rec, ring)
        tampered = factories.edited(rec, lambda d, i=i: d["quality"].update(samples=i + 1000))
        assert verify_canonical(tampered.canonical(), ring) == verify_record(tampered, ring)
        assert not verify_record(tampered, ring).ok
