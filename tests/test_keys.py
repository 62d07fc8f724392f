"""The agent's identity key: base58btc, Multikey / did:key names, the key file (0600, refused
when wider), key documents and the keyring a verifier trusts."""

import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ec import SECP256R1, generate_private_key

from energy_agent.core.errors import ConfigError
from energy_agent.records.keys import (
    AgentKey,
    KeyDocument,
    Keyring,
    PublicKey,
    Revocation,
    b58decode,
    b58encode,
    create_key,
    load_key,
    parse_time,
)

VECTORS = Path(__file__).parent / "vectors" / "eddsa-jcs-2022"


# --------------------------------------------------------------------------- base58btc


@pytest.mark.parametrize("data, text", [
    # examples of draft-msporny-base58 (section 5) and the Bitcoin wiki
    (b"Hello World!", "2NEpo7TZRRrLZSi2U"),
    (b"The quick brown fox jumps over the lazy dog.", "USm3fpXnKG5EUBx2ndxBDMPVciP5hGey2Jh4NDv6gmeo1LkMeiKrLJUUBk6Z"),
    (bytes.fromhex("00000000287fb4cd"), "1111233QC4"),
    (b"", ""),
    (b"\0", "1"),
])
def test_base58btc_examples(data, text):
    assert b58encode(data) == text
    assert b58decode(text) == data


def test_base58btc_round_trips_leading_zeros_and_random_bytes():
    for n in range(0, 70):
        for data in (os.urandom(n), b"\0" * (n % 5) + os.urandom(n)):
            assert b58decode(b58encode(data)) == data


@pytest.mark.parametrize("bad", ["0", "O", "I", "l", "abc+", "z z"])
def test_base58btc_refuses_characters_outside_the_alphabet(bad):
    with pytest.raises(ValueError):
        b58decode(bad)


# --------------------------------------------------------------------------- names of a public key


def test_the_specification_key_pair_gives_its_multikey_and_did():
    pair = json.loads((VECTORS / "keyPair.json").read_text())
    secret = b58decode(pair["privateKeyMultibase"][1:])
    assert secret[:2] == b"\x80\x26"  # multicodec ed25519-priv
    key = AgentKey.from_seed(secret[2:])
    assert key.public.multibase == pair["publicKeyMultibase"]
    assert key.public.multibase.startswith("z6Mk")
    assert key.public.did == "did:key:" + pair["publicKeyMultibase"]
    signed = json.loads((VECTORS / "signedJCS.json").read_text())
    assert key.public.verification_method == signed["proof"]["verificationMethod"]


def test_public_key_parses_every_written_form():
    key = AgentKey.generate().public
    forms = [key.multibase, key.did, key.verification_method, key.raw.hex(), key.raw.hex().upper(),
             key.pem().decode(), key.pem(), f"  {key.multibase}\n"]
    for form in forms:
        assert PublicKey.parse(form) == key, form


@pytest.mark.parametrize("bad, says", [
    ("z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ", "Ed25519 Multikey"),  # one character short
    ("z0OIl", "base58btc"),
    ("did:key:z6MkrJVnaZkeFzdQyMZu1cgjg7k1pZZ6pvBQ7XJPt4swbTQ2#z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK",
     "another key"),
    ("ab" * 31, "not a multibase key"),
    ("-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n", "not a PEM"),
    ("uAe0B", "not a multibase key"),
])
def test_public_key_says_what_is_wrong(bad, says):
    with pytest.raises(ConfigError, match=says):
        PublicKey.parse(bad)


def test_a_pem_key_of_another_type_is_refused():
    pem = generate_private_key(SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        PublicKey.parse(pem)


def test_a_key_signs_and_its_public_key_verifies_only_its_own_signatures():
    key, other = AgentKey.generate(), AgentKey.generate()
    sig = key.sign(b"message")
    assert key.public.verify(sig, b"message")
    assert not key.public.verify(sig, b"messagf")
    assert not other.public.verify(sig, b"message")


def test_the_private_key_stays_out_of_repr_and_pickle():
    key = AgentKey.generate()
    assert repr(key) == f"AgentKey(public={key.public.multibase})"
    assert key.seed().hex() not in repr(key)
    import pickle
    with pytest.raises(TypeError):
        pickle.dumps(key)


# --------------------------------------------------------------------------- key file


def test_create_writes_pkcs8_pem_with_mode_0600_and_load_reads_it_back(tmp_path):
    path = tmp_path / "keys" / "agent.key"
    key = create_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert load_key(path).public == key.public


def test_the_key_file_is_0600_even_under_a_permissive_umask(tmp_path):
    old = os.umask(0)
    try:
        create_key(tmp_path / "agent.key")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "agent.key").stat().st_mode) == 0o600


def test_the_key_file_is_never_readable_by_others_while_it_is_written(tmp_path, monkeypatch):
    """The file is created with 0600 by os.open itself: no moment with wider permissions."""
    modes = []
    real_open = os.open

    def spy(path, flags, mode=0o777, *args, **kw):
        if flags & os.O_CREAT:
            modes.append((Path(path).name, mode & 0o777, flags & os.O_EXCL))
        return real_open(path, flags, mode, *args, **kw)

    monkeypatch.setattr(os, "open", spy)
    create_key(tmp_path / "agent.key")
    create_key(tmp_path / "agent.key", overwrite=True)
    assert modes and all(mode == 0o600 and excl for _, mode, excl in modes), modes


def test_an_existing_key_is_not_overwritten_unless_asked(tmp_path):
    path = tmp_path / "agent.key"
    first = create_key(path)
    with pytest.raises(ConfigError, match="already exists"):
        create_key(path)
    assert load_key(path).public == first.public
    second = create_key(path, overwrite=True)
    assert second.public != first.public
    assert load_key(path).public == second.public
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["agent.key"]


def test_a_missing_key_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path / 'nope.key'}: no key file")):
        load_key(tmp_path / "nope.key")


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o700, 0o660])
def test_a_key_file_with_wider_permissions_is_refused_with_the_fix(tmp_path, mode):
    path = tmp_path / "agent.key"
    create_key(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as err:
        load_key(path)
    assert str(path) in str(err.value) and f"{mode:04o}" in str(err.value)
    assert f"chmod 600 {path}" in str(err.value)


def test_a_key_file_with_narrower_permissions_is_accepted(tmp_path):
    path = tmp_path / "agent.key"
    key = create_key(path)
    path.chmod(0o400)
    assert load_key(path).public == key.public


def test_an_unreadable_key_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match=re.escape(f"{tmp_path}: the key file is not a regular file")):
        load_key(tmp_path)  # a folder: opened, but no key in it


@pytest.mark.parametrize("content, says", [
    (b"not a key at all\n", "not a PEM private key"),
    (b"", "not a PEM private key"),
])
def test_a_key_file_without_a_key_is_refused(tmp_path, content, says):
    path = tmp_path / "agent.key"
    path.write_bytes(content)
    path.chmod(0o600)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: {says}")):
        load_key(path)


def test_a_key_file_of_another_type_or_encrypted_is_refused(tmp_path):
    path = tmp_path / "agent.key"
    ec = generate_private_key(SECP256R1())
    path.write_bytes(ec.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption()))
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="not an Ed25519 key"):
        load_key(path)
    key = AgentKey.generate()
    path.write_bytes(key._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.BestAvailableEncryption(b"pw")))
    with pytest.raises(ConfigError, match="encrypted"):
        load_key(path)


def test_errors_and_logs_never_show_the_private_key(tmp_path, caplog):
    path = tmp_path / "agent.key"
    key = create_key(path)
    pem = path.read_text()
    secret_lines = [line for line in pem.splitlines() if not line.startswith("-----")]
    path.chmod(0o644)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigError) as err:
        load_key(path)
    shown = str(err.value) + repr(err.value) + caplog.text + repr(key)
    assert not any(line in shown for line in secret_lines)
    assert key.seed().hex() not in shown


# --------------------------------------------------------------------------- key documents and keyring


def test_a_key_document_round_trips_and_names_the_key_as_a_multikey(tmp_path):
    key = AgentKey.generate().public
    doc = KeyDocument(key, valid_from="2026-01-01T00:00:00Z", revoked=Revocation("2026-06-01T00:00:00Z", "stolen"))
    path = tmp_path / "agent.pub.json"
    doc.write(path)
    data = json.loads(path.read_text())
    assert data == {"id": key.verification_method, "type": "Multikey", "controller": key.did,
                    "publicKeyMultibase": key.multibase, "valid_from": "2026-01-01T00:00:00Z",
                    "revoked": {"time": "2026-06-01T00:00:00Z", "reason": "stolen"}}
    assert KeyDocument.read(path) == doc
    assert KeyDocument.from_json(KeyDocument(key).to_json()) == KeyDocument(key)


@pytest.mark.parametrize("change, says", [
    (lambda d: d.update(type="Ed25519VerificationKey2020"), "expected 'Multikey'"),
    (lambda d: d.update(controller="did:key:z6MkhaXgBZDvotDkL5257faiztiGiC2QtKLGpbnnEGta2doK"), "controller must be"),
    (lambda d: d.update(id=d["controller"]), "id must be"),
    (lambda d: d.pop("publicKeyMultibase"), "publicKeyMultibase is required"),
    (lambda d: d.update(publicKeyMultibase="z123"), "publicKeyMultibase"),
    (lambda d: d.update(valid_from="yesterday"), "valid_from"),
    (lambda d: d.update(revoked="2026-01-01T00:00:00Z"), "revoked must be"),
    (lambda d: d.update(revoked={"time": "soon", "reason": "x"}), "revoked.time"),
    (lambda d: d.update(expires="2030-01-01T00:00:00Z"), "unknown field 'expires'"),
])
def test_a_bad_key_document_is_refused_naming_the_field(tmp_path, change, says):
    data = KeyDocument(AgentKey.generate().public).to_json()
    change(data)
    path = tmp_path / "k.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=says) as err:
        KeyDocument.read(path)
    assert str(path) in str(err.value)


def test_a_bare_public_key_file_is_a_key_document_too(tmp_path):
    key = AgentKey.generate().public
    for name, content in (("k.pem", key.pem()), ("k.txt", key.did.encode() + b"\n")):
        (tmp_path / name).write_bytes(content)
        assert KeyDocument.read(tmp_path / name) == KeyDocument(key)
    (tmp_path / "junk").write_text("hello")
    with pytest.raises(ConfigError, match="neither a key document"):
        KeyDocument.read(tmp_path / "junk")


def test_a_key_document_that_is_not_json_is_named(tmp_path):
    path = tmp_path / "k.json"
    path.write_text("{")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not JSON")):
        KeyDocument.read(path)


def test_the_keyring_finds_keys_by_verification_method_and_refuses_contradictions():
    a, b = AgentKey.generate().public, AgentKey.generate().public
    ring = Keyring([a, KeyDocument(b, valid_from="2026-01-01T00:00:00Z"), a])
    assert len(ring) == 2
    assert ring.get(a.verification_method) == KeyDocument(a)
    assert ring.get(b.verification_method).valid_from == "2026-01-01T00:00:00Z"
    assert ring.get(a.did) is None
    with pytest.raises(ConfigError, match="given twice"):
        Keyring([KeyDocument(a), KeyDocument(a, revoked=Revocation("2026-01-01T00:00:00Z", "x"))])


@pytest.mark.parametrize("text, iso", [
    ("2023-02-24T23:36:38Z", "2023-02-24T23:36:38+00:00"),
    ("2026-01-31T12:00:00.123456Z", "2026-01-31T12:00:00.123456+00:00"),
    ("2026-01-31T12:00:00.1234567Z", "2026-01-31T12:00:00.123456+00:00"),
    ("2026-01-31T14:00:00+02:00", "2026-01-31T14:00:00+02:00"),
    ("2026-01-31T12:00:00", "2026-01-31T12:00:00+00:00"),
])
def test_times_are_xml_schema_date_times(text, iso):
    assert parse_time(text).isoformat() == iso


@pytest.mark.parametrize("bad", ["2026-01-31", "2026-13-01T00:00:00Z", "2026-01-31 12:00:00Z", "", "2026-01-31T25:00:00Z"])
def test_other_times_are_refused(bad):
    with pytest.raises(ValueError):
        parse_time(bad)
