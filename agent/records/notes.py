"""C2SP signed notes (c2sp.org/signed-note) and transparency log checkpoints
(c2sp.org/tlog-checkpoint), byte-compatible with Go's golang.org/x/mod/sumdb/note.

A signed note is a text (UTF-8, no control characters but newline, ending with a newline), a
blank line, and one or more signature lines ``— <key name> <base64(key hash || signature)>``
(em dash U+2014). With Ed25519 (algorithm byte 0x01) the key hash is the first 4 bytes of
SHA-256(name || 0x0A || 0x01 || 32-byte public key), big-endian, and the signature is over the
text. Keys are written as Go writes them::

    verifier key   <name>+<8 hex key hash>+<base64(0x01 || public key)>
    signer key     PRIVATE+KEY+<name>+<8 hex key hash>+<base64(0x01 || private seed)>

:func:`open_note` verifies a note against the verifiers one trusts: a signature by an unknown
key is kept as unverified (signed-note: verifiers MUST ignore them); a known key whose
signature fails makes the whole note fail (InvalidSignature names the key); a note no known
key signed fails (UnverifiedNote, which carries the parsed note).

A checkpoint (:class:`Checkpoint`) is a note whose text is ``<origin>\\n<tree size>\\n<base64
root hash>\\n`` and optional extension lines: the signed head of a machine's Merkle log.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from energy_agent.core.errors import RecordError
from energy_agent.records.keys import AgentKey, PublicKey

ALG_ED25519 = 0x01
MAX_SIGNATURES = 100
"""Signature lines read from one note (Go's limit; c2sp asks for at least 16)."""
SIG_PREFIX = "\u2014 "


class MalformedNote(RecordError):
    """The bytes are not a signed note (or a checkpoint): the message says what is wrong."""


class InvalidSignature(RecordError):
    """A trusted key's signature on the note does not verify."""

    def __init__(self, name: str, key_hash: int) -> None:
        super().__init__(f"invalid signature for key {name}+{key_hash:08x}")
        self.name, self.key_hash = name, key_hash


class UnverifiedNote(RecordError):
    """The note is well formed but no trusted key signed it; ``note`` is what was read."""

    def __init__(self, note: Note) -> None:
        names = ", ".join(f"{s.name}+{s.key_hash:08x}" for s in note.unverified) or "none"
        super().__init__(f"note has no verifiable signatures (signed by: {names})")
        self.note = note


def valid_name(name: str) -> bool:
    """A key name: non-empty, no Unicode space, no '+'."""
    return bool(name) and "+" not in name and not any(c.isspace() for c in name)


def key_hash(name: str, public: PublicKey) -> int:
    """The 32-bit key hash of an Ed25519 key: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([ALG_ED25519]) + public.raw).digest()
    return int.from_bytes(digest[:4], "big")


def _b64decode(text: str) -> bytes:
    """Standard base64 with padding; ValueError otherwise."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError(f"not base64: {exc}") from exc


def _split_key(text: str, parts: int, what: str) -> list[str]:
    fields = text.split("+", parts - 1)
    if len(fields) != parts:
        raise MalformedNote(f"malformed {what} (expected {parts} parts separated by '+')")
    return fields


def _key_fields(name: str, hash16: str, key64: str, what: str) -> tuple[int, bytes]:
    """The key hash and the key bytes (after the algorithm byte) of a verifier or signer key."""
    if not valid_name(name):
        raise MalformedNote(f"malformed {what}: invalid key name {name[:60]!r}")
    if not re.fullmatch(r"[0-9a-fA-F]{8}", hash16):
        raise MalformedNote(f"malformed {what}: the key hash is not 8 hex digits")
    try:
        key = _b64decode(key64)
    except ValueError as exc:
        raise MalformedNote(f"malformed {what}: {exc}") from exc
    if not key:
        raise MalformedNote(f"malformed {what}: no key")
    if key[0] != ALG_ED25519:
        raise MalformedNote(f"{what}: unknown algorithm {key[0]} (only Ed25519, 1, is known)")
    if len(key) != 33:
        raise MalformedNote(f"malformed {what}: an Ed25519 key is 32 bytes, not {len(key) - 1}")
    return int(hash16, 16), key[1:]


@dataclass(frozen=True, slots=True)
class Verifier:
    """A named public key that verifies note signatures."""

    name: str
    public: PublicKey

    def __post_init__(self) -> None:
        if not valid_name(self.name):
            raise MalformedNote(f"invalid key name {self.name[:60]!r} (non-empty, no spaces, no '+')")

    @property
    def key_hash(self) -> int:
        return key_hash(self.name, self.public)

    @property
    def vkey(self) -> str:
        """The verifier key string ``<name>+<hash>+<base64(0x01 || key)>``."""
        data = base64.b64encode(bytes([ALG_ED25519]) + self.public.raw).decode()
        return f"{self.name}+{self.key_hash:08x}+{data}"

    @classmethod
    def parse(cls, vkey: str) -> Verifier:
        name, hash16, key64 = _split_key(vkey, 3, "verifier key")
        want, raw = _key_fields(name, hash16, key64, "verifier key")
        verifier = cls(name, PublicKey(raw))
        if verifier.key_hash != want:
            raise MalformedNote(f"verifier key {name}+{hash16}: the key hash does not match the key")
        return verifier

    def verify(self, message: bytes, signature: bytes) -> bool:
        return len(signature) == 64 and self.public.verify(signature, message)


class Signer:
    """A named private key that signs notes. Its repr and the verifier it gives are public;
    :attr:`skey` is the secret signer key string."""

    __slots__ = ("name", "_key")

    def __init__(self, name: str, key: AgentKey) -> None:
        if not valid_name(name):
            raise MalformedNote(f"invalid key name {name[:60]!r} (non-empty, no spaces, no '+')")
        self.name, self._key = name, key

    @property
    def verifier(self) -> Verifier:
        return Verifier(self.name, self._key.public)

    @property
    def key_hash(self) -> int:
        return key_hash(self.name, self._key.public)

    @property
    def skey(self) -> str:
        """The secret signer key string ``PRIVATE+KEY+<name>+<hash>+<base64(0x01 || seed)>``."""
        data = base64.b64encode(bytes([ALG_ED25519]) + self._key.seed()).decode()
        return f"PRIVATE+KEY+{self.name}+{self.key_hash:08x}+{data}"

    @classmethod
    def parse(cls, skey: str) -> Signer:
        private, key, name, hash16, key64 = _split_key(skey, 5, "signer key")
        if (private, key) != ("PRIVATE", "KEY"):
            raise MalformedNote("malformed signer key (it starts with PRIVATE+KEY+)")
        want, seed = _key_fields(name, hash16, key64, "signer key")
        signer = cls(name, AgentKey.from_seed(seed))
        if signer.key_hash != want:
            raise MalformedNote(f"signer key {name}+{hash16}: the key hash does not match the key")
        return signer

    def sign(self, message: bytes) -> bytes:
        return self._key.sign(message)

    def __repr__(self) -> str:
        return f"Signer({self.verifier.vkey})"


@dataclass(frozen=True, slots=True)
class Signature:
    """One signature line: the key's name and hash, and the base64 of hash || signature."""

    name: str
    key_hash: int
    b64: str

    @property
    def line(self) -> str:
        return f"{SIG_PREFIX}{self.name} {self.b64}\n"


@dataclass(frozen=True, slots=True)
class Note:
    text: str
    sigs: tuple[Signature, ...] = ()
    """Signatures verified by a trusted key."""
    unverified: tuple[Signature, ...] = ()
    """Signatures by keys not trusted (not checked)."""


def _check_text(text: str) -> None:
    for c in text:
        if c < " " and c != "\n":
            raise MalformedNote(f"the note holds the control character {c!r}")


def sign_note(note: Note | str, signers: Sequence[Signer]) -> bytes:
    """The signed note: its text, a blank line, its existing signatures (those not by one of
    ``signers``), then one new signature per signer (as Go's note.Sign)."""
    if isinstance(note, str):
        note = Note(note)
    if not note.text.endswith("\n"):
        raise MalformedNote("a note's text ends with a newline")
    _check_text(note.text)
    message = note.text.encode("utf-8")
    new = []
    for s in signers:
        raw = s.key_hash.to_bytes(4, "big") + s.sign(message)
        new.append(Signature(s.name, s.key_hash, base64.b64encode(raw).decode()).line)
    replaced = {(s.name, s.key_hash) for s in signers}
    kept = []
    for sig in (*note.sigs, *note.unverified):
        if not valid_name(sig.name):
            raise MalformedNote(f"signature by an invalid key name {sig.name[:60]!r}")
        if (sig.name, sig.key_hash) in replaced:
            continue
        try:
            existing = _b64decode(sig.b64)
        except ValueError as exc:
            raise MalformedNote(f"the signature of {sig.name} is {exc}") from exc
        if len(existing) < 4 or int.from_bytes(existing[:4], "big") != sig.key_hash:
            raise MalformedNote(f"the signature of {sig.name} does not start with its key hash")
        kept.append(sig.line)
    return (note.text + "\n" + "".join(kept) + "".join(new)).encode("utf-8")


def open_note(message: bytes, verifiers: Iterable[Verifier]) -> Note:
    """Parse a signed note and verify its signatures by the trusted ``verifiers`` (as Go's
    note.Open). MalformedNote, InvalidSignature, UnverifiedNote say what failed."""
    known: dict[tuple[str, int], list[Verifier]] = {}
    for v in verifiers:
        known.setdefault((v.name, v.key_hash), []).append(v)
    try:
        text = message.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedNote("the note is not UTF-8") from exc
    _check_text(text)
    split = text.rfind("\n\n")
    if split < 0:
        raise MalformedNote("no blank line before the signatures")
    body, sig_block = text[:split + 1], text[split + 2:]
    if not sig_block.endswith("\n"):
        raise MalformedNote("the signature lines do not end with a newline")
    sigs: list[Signature] = []
    unverified: list[Signature] = []
    seen: set[tuple[str, int]] = set()
    seen_unverified: set[str] = set()
    lines = sig_block[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise MalformedNote(f"more than {MAX_SIGNATURES} signatures")
    data = body.encode("utf-8")
    for line in lines:
        if not line.startswith(SIG_PREFIX):
            raise MalformedNote(f"not a signature line: {line[:80]!r}")
        name, _, b64 = line[len(SIG_PREFIX):].partition(" ")
        try:
            raw = _b64decode(b64)
        except ValueError as exc:
            raise MalformedNote(f"signature of {name[:60]!r}: {exc}") from exc
        if not valid_name(name) or not b64 or len(raw) < 5:
            raise MalformedNote(f"malformed signature line: {line[:80]!r}")
        sig = Signature(name, int.from_bytes(raw[:4], "big"), b64)
        candidates = known.get((sig.name, sig.key_hash))
        if candidates is None:
            if line not in seen_unverified:
                seen_unverified.add(line)
                unverified.append(sig)
            continue
        if len(candidates) > 1:
            raise RecordError(f"ambiguous key {sig.name}+{sig.key_hash:08x} (given more than once)")
        if (sig.name, sig.key_hash) in seen:
            continue
        seen.add((sig.name, sig.key_hash))
        if not candidates[0].verify(data, raw[4:]):
            raise InvalidSignature(sig.name, sig.key_hash)
        sigs.append(sig)
    note = Note(body, tuple(sigs), tuple(unverified))
    if not sigs:
        raise UnverifiedNote(note)
    return note


# --------------------------------------------------------------------------- checkpoints


_SIZE = re.compile(r"0|[1-9][0-9]*")
MAX_SIZE = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A tlog checkpoint: the log's origin, its size and the root hash at that size, and
    optional extension lines (opaque, non-empty; c2sp does not recommend them)."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.origin or "\n" in self.origin:
            raise MalformedNote("a checkpoint's origin is one non-empty line")
        if not 0 <= self.size <= MAX_SIZE:
            raise MalformedNote(f"checkpoint size {self.size} is not a 64-bit tree size")
        if len(self.root) != 32:
            raise MalformedNote(f"checkpoint root hash is {len(self.root)} bytes, not 32 (SHA-256)")
        for line in self.extensions:
            if not line or "\n" in line:
                raise MalformedNote("a checkpoint's extension lines are non-empty single lines")
        _check_text(self.text)

    @property
    def text(self) -> str:
        """The note text (the body a signature covers)."""
        lines = [self.origin, str(self.size), base64.b64encode(self.root).decode(), *self.extensions]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> Checkpoint:
        """A checkpoint from a note's text; MalformedNote says what is wrong."""
        if not text.endswith("\n"):
            raise MalformedNote("a checkpoint's text ends with a newline")
        lines = text[:-1].split("\n")
        if len(lines) < 3:
            raise MalformedNote("a checkpoint has at least three lines: origin, tree size, root hash")
        origin, size, root, *extensions = lines
        if not _SIZE.fullmatch(size) or int(size) > MAX_SIZE:
            raise MalformedNote(f"checkpoint tree size {size[:30]!r} is not a decimal number without leading zeros")
        try:
            raw = _b64decode(root)
        except ValueError as exc:
            raise MalformedNote(f"checkpoint root hash: {exc}") from exc
        return cls(origin, int(size), raw, tuple(extensions))

    def sign(self, signers: Sequence[Signer]) -> bytes:
        return sign_note(self.text, signers)


def open_checkpoint(message: bytes, verifiers: Iterable[Verifier], origin: str | None = None) -> tuple[Checkpoint, Note]:
    """Verify a signed checkpoint (as :func:`open_note`) and read it; with ``origin``, the
    checkpoint must be of that log."""
    note = open_note(message, verifiers)
    checkpoint = Checkpoint.parse(note.text)
    if origin is not None and checkpoint.origin != origin:
        raise RecordError(f"the checkpoint is of log {checkpoint.origin!r}, not {origin!r}")
    return checkpoint, note
