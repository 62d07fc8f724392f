"""C2SP signed notes and tlog checkpoints: Go's sumdb/note test vectors byte for byte, the C2SP
examples, a real sum.golang.org checkpoint, and what an opener does with unknown keys, bad
signatures and malformed notes."""

import json
from pathlib import Path

import pytest

from energy_agent.core.errors import RecordError
from energy_agent.records.keys import AgentKey
from energy_agent.records.merkle import MerkleTree, leaf_hash
from energy_agent.records.notes import (
    Checkpoint,
    InvalidSignature,
    MalformedNote,
    Note,
    Signature,
    Signer,
    UnverifiedNote,
    Verifier,
    open_checkpoint,
    open_note,
    sign_note,
)

VECTORS = Path(__file__).parent / "vectors" / "signed-note"
GO = json.loads((VECTORS / "sumdb-note.json").read_text())
OTHERS = json.loads((VECTORS / "c2sp-and-checkpoints.json").read_text())
PETER = Verifier.parse(GO["peter"]["vkey"])
ENOCH = Verifier.parse(GO["enoch"]["vkey"])
TEXT = GO["text"]
PETER_SIG = Signature("PeterNeumann", 0xC74F20A3, GO["peter_sig_line"].split()[2])
ENOCH_SIG = Signature("EnochRoot", 0xAF0CFE78, GO["enoch_sig_line"].split()[2])


# --------------------------------------------------------------------------- Go's vectors


def test_go_keys_parse_and_are_written_back_identically():
    signer = Signer.parse(GO["peter"]["skey"])
    assert signer.skey == GO["peter"]["skey"]
    assert signer.verifier.vkey == GO["peter"]["vkey"] == PETER.vkey
    assert (signer.name, signer.key_hash) == ("PeterNeumann", 0xC74F20A3)
    enoch = Signer("EnochRoot", AgentKey.from_seed(bytes.fromhex(GO["enoch"]["seed_hex"])))
    assert enoch.verifier.vkey == GO["enoch"]["vkey"]
    assert GO["peter"]["skey"].split("+")[-1] not in repr(signer)


def test_signing_reproduces_go_byte_for_byte():
    signed = sign_note(TEXT, [Signer.parse(GO["peter"]["skey"])])
    assert signed == GO["signed_by_peter"].encode()
    # an existing signature by the same key is replaced (Go's TestSign)
    again = sign_note(Note(TEXT, (Signature("PeterNeumann", 0xC74F20A3, "BADSIGN="),)), [Signer.parse(GO["peter"]["skey"])])
    assert again == signed


def test_adding_a_signature_reproduces_go_byte_for_byte():
    note = open_note(GO["signed_by_peter"].encode(), [PETER])
    enoch = Signer("EnochRoot", AgentKey.from_seed(bytes.fromhex(GO["enoch"]["seed_hex"])))
    assert sign_note(note, [enoch]) == GO["signed_by_peter_and_enoch"].encode()


def test_opening_go_notes_sorts_verified_from_unverified():
    msg = GO["signed_by_peter_and_enoch"].encode()
    note = open_note(msg, [PETER])
    assert note.text == TEXT and note.sigs == (PETER_SIG,) and note.unverified == (ENOCH_SIG,)
    note = open_note(msg, [PETER, ENOCH])
    assert note.sigs == (PETER_SIG, ENOCH_SIG) and note.unverified == ()
    with pytest.raises(UnverifiedNote, match="no verifiable signatures") as err:
        open_note(msg, [])
    assert err.value.note.sigs == () and err.value.note.unverified == (PETER_SIG, ENOCH_SIG)
    assert "PeterNeumann+c74f20a3" in str(err.value)


def test_duplicated_keys_and_signatures_are_handled_as_go_does():
    enoch_line, peter_line = GO["enoch_sig_line"], GO["peter_sig_line"]
    with pytest.raises(RecordError, match="ambiguous key EnochRoot\\+af0cfe78"):
        open_note((TEXT + "\n" + enoch_line).encode(), [ENOCH, PETER, ENOCH])
    open_note((TEXT + "\n" + peter_line).encode(), [ENOCH, PETER, ENOCH])  # the ambiguous key is not used
    enoch_abcd = enoch_line[:60] + "ABCD" + enoch_line[60:]
    note = open_note((TEXT + "\n" + peter_line + peter_line + enoch_line + enoch_line + enoch_abcd).encode(), [PETER])
    assert note.sigs == (PETER_SIG,)
    assert [s.name for s in note.unverified] == ["EnochRoot", "EnochRoot"]
    with pytest.raises(MalformedNote, match="more than 100"):
        open_note((TEXT + "\n" + peter_line * 101).encode(), [PETER])


def test_a_bad_signature_by_a_trusted_key_fails_the_note_naming_the_key():
    peter_line = GO["peter_sig_line"]
    with pytest.raises(InvalidSignature, match="invalid signature for key PeterNeumann\\+c74f20a3") as err:
        open_note((TEXT + "\n" + peter_line[:60] + "ABCD" + peter_line[60:]).encode(), [PETER])
    assert (err.value.name, err.value.key_hash) == ("PeterNeumann", 0xC74F20A3)
    with pytest.raises(InvalidSignature):
        open_note(("X" + TEXT + "\n" + peter_line).encode(), [PETER])  # the text changed


@pytest.mark.parametrize("msg", [
    TEXT,
    TEXT + "\n",
    TEXT + "\n" + GO["peter_sig_line"][:-1],
    "\x01" + TEXT + "\n" + GO["peter_sig_line"],
    TEXT + "\n" + "— Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=",
    TEXT + "\n" + GO["peter_sig_line"] + "Unexpected line.\n",
])
def test_go_malformed_notes_are_refused(msg):
    with pytest.raises(MalformedNote):
        open_note(msg.encode(), [PETER])


def test_invalid_utf8_is_refused():
    with pytest.raises(MalformedNote, match="UTF-8"):
        open_note(b"\xff" + (TEXT + "\n" + GO["peter_sig_line"]).encode(), [PETER])


def test_go_key_manglings_are_refused():
    """Go's TestNewVerifier and TestNewSigner: every proper substring and every single-byte
    increment of a key string is refused."""
    for text, parse in ((GO["peter"]["vkey"], Verifier.parse), (GO["peter"]["skey"], Signer.parse)):
        parse(text)
        for i in range(len(text) + 1):
            for j in range(i + 1, len(text) + 1):
                if (i, j) != (0, len(text)):
                    with pytest.raises(RecordError):
                        parse(text[i:j])
        for i in range(len(text)):
            with pytest.raises(RecordError):
                parse(text[:i] + chr(ord(text[i]) + 1) + text[i + 1:])
    # wrong key length and unknown algorithm, each with a matching key hash
    with pytest.raises(MalformedNote, match="32 bytes"):
        Verifier.parse("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(MalformedNote, match="unknown algorithm"):
        Verifier.parse("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_signing_refuses_texts_a_verifier_would_refuse():
    signer = Signer.parse(GO["peter"]["skey"])
    with pytest.raises(MalformedNote, match="ends with a newline"):
        sign_note("abc", [signer])
    with pytest.raises(MalformedNote, match="control character"):
        sign_note("a\tb\n", [signer])
    with pytest.raises(MalformedNote, match="invalid key name"):
        Signer("a+b", AgentKey.generate())
    with pytest.raises(MalformedNote, match="key hash"):
        sign_note(Note(TEXT, (Signature("PeterNeumann", 0xC74F20A3, "BADHASH="),)), [])


# --------------------------------------------------------------------------- C2SP and real checkpoints


def test_the_c2sp_signed_note_example_verifies():
    example = OTHERS["signed_note_example"]
    note = open_note(example["note"].encode(), [Verifier.parse(example["vkey"])])
    assert note.text == "This is an example message.\n"
    assert [s.name for s in note.sigs] == ["example.com/foo"]


def test_notes_without_a_published_key_are_read_but_unverified():
    with pytest.raises(UnverifiedNote) as err:
        open_note(OTHERS["signed_note_unverifiable_example"]["note"].encode(), [PETER])
    assert err.value.note.text.endswith("ed è subito sera.\n")  # the text holds a blank line
    with pytest.raises(UnverifiedNote) as err:
        open_note(OTHERS["tlog_checkpoint_example"]["note"].encode(), [PETER])
    checkpoint = Checkpoint.parse(err.value.note.text)
    assert (checkpoint.origin, checkpoint.size) == ("example.com/behind-the-sofa", 20852163)


def test_a_real_sum_golang_org_checkpoint_verifies():
    example = OTHERS["sumdb_checkpoint"]
    checkpoint, note = open_checkpoint(example["note"].encode(), [Verifier.parse(example["vkey"])], example["origin"])
    assert (checkpoint.origin, checkpoint.size) == (example["origin"], example["size"])
    assert checkpoint.text == note.text
    with pytest.raises(RecordError, match="not 'another log'"):
        open_checkpoint(example["note"].encode(), [Verifier.parse(example["vkey"])], "another log")


def test_checkpoints_signed_by_several_keys_as_transparency_dev_formats_does():
    keys = OTHERS["formats_keys"]
    signers = {k: Signer.parse(keys[k]["skey"]) for k in ("log", "known1", "known2", "unknown")}
    for k, s in signers.items():
        assert s.verifier.vkey == keys[k]["vkey"]
    trusted = [Verifier.parse(keys[k]["vkey"]) for k in ("log", "known1", "known2")]
    root = MerkleTree.of([leaf_hash(b"a"), leaf_hash(b"b")]).root()
    checkpoint = Checkpoint("TestParseCheckpoint", 42, root)
    msg = checkpoint.sign([signers["log"], signers["known1"], signers["known2"], signers["unknown"]])
    got, note = open_checkpoint(msg, trusted, "TestParseCheckpoint")
    assert got == checkpoint
    assert [s.name for s in note.sigs] == ["Log", "Known", "KnownAgain"]
    assert [s.name for s in note.unverified] == ["Unknown"]
    with pytest.raises(UnverifiedNote):
        open_checkpoint(checkpoint.sign([signers["unknown"]]), trusted)


@pytest.mark.parametrize("text, says", [
    # transparency-dev/formats log/checkpoint_test.go TestUnmarshalLogState, invalid cases
    ("Head\n9944\n", "at least three lines"),
    ("\n9944\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n", "origin"),
    ("Log\n123\nYmFuYW5hcw==", "ends with a newline"),
    ("Log\nbananas\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n", "tree size"),
    ("Log\n-34\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n", "tree size"),
    ("Log\n3438945738945739845734895735\ndGhlIHZpZXcgZnJvbSB0aGUgdHJlZSB0b3BzIGlzIGdyZWF0IQ==\n", "tree size"),
    ("Log\n123\nThisIsn'tBase64\n", "base64"),
    # c2sp.org/tlog-checkpoint: no leading zeros, non-empty extension lines; ours: SHA-256 roots
    ("Log\n0123\n" + "A" * 43 + "=\n", "leading zeros"),
    ("Log\n123\n" + "A" * 43 + "=\n\n", "extension lines"),
    ("Log\n123\nYmFuYW5hcw==\n", "not 32"),
])
def test_malformed_checkpoints_are_refused(text, says):
    with pytest.raises(MalformedNote, match=says):
        Checkpoint.parse(text)


def test_a_checkpoint_text_is_the_c2sp_body_with_its_extensions():
    root = bytes(range(32))
    cp = Checkpoint("energy-agent/plant/gw/m1", 1000, root, ("ext one",))
    assert cp.text == "energy-agent/plant/gw/m1\n1000\nAAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8=\next one\n"
    assert Checkpoint.parse(cp.text) == cp
    assert Checkpoint.parse("Log\n0\n" + "A" * 43 + "=\n").size == 0
