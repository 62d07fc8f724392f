"""The agent's identity: an Ed25519 key pair, and the public key a verifier trusts.

The private key lives in one file, PKCS#8 PEM, mode 0600 (:func:`create_key`, :func:`load_key`);
it is never logged, printed or put in an error message. The public key is published as a W3C
Multikey (Controlled Identifiers v1.0):

- ``publicKeyMultibase``: ``z`` + base58btc(0xed 0x01 || 32-byte key), e.g. ``z6Mk...``;
- the DID: ``did:key:z6Mk...``;
- the verification method id a record's proof names: ``did:key:z6Mk...#z6Mk...``.

A **key document** (:class:`KeyDocument`, a small JSON file) is what a verifier is given
(``verify --key FILE``; a file holding just the public key, in any form :meth:`PublicKey.parse`
reads, will do too): the key as a Multikey verification method, optionally when it became
valid and whether (when, why) it was revoked::

    {"id": "did:key:z6Mk...#z6Mk...", "type": "Multikey", "controller": "did:key:z6Mk...",
     "publicKeyMultibase": "z6Mk...", "valid_from": "2026-01-01T00:00:00Z",
     "revoked": {"time": "2026-06-01T00:00:00Z", "reason": "gateway stolen"}}

A :class:`Keyring` holds the key documents a verifier trusts, by verification method id.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from energy_agent.core.errors import ConfigError

ED25519_PUB = b"\xed\x01"
"""Multicodec prefix of an Ed25519 public key (varint 0xed)."""
KEY_FILE_MODE = 0o600
MAX_KEY_FILE = 64 * 1024
MAX_KEY_DOCUMENT = 64 * 1024

# --------------------------------------------------------------------------- base58btc

B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(B58_ALPHABET)}


def b58encode(data: bytes) -> str:
    """Base58btc (the Bitcoin alphabet): each leading zero byte is a ``1``, the rest is the
    big-endian number in base 58."""
    zeros = len(data) - len(data.lstrip(b"\0"))
    n = int.from_bytes(data, "big")
    digits = []
    while n:
        n, r = divmod(n, 58)
        digits.append(B58_ALPHABET[r])
    return "1" * zeros + "".join(reversed(digits))


def b58decode(text: str) -> bytes:
    """The bytes of a base58btc string; ValueError for a character outside the alphabet."""
    n = 0
    for c in text:
        digit = _B58_INDEX.get(c)
        if digit is None:
            raise ValueError(f"{c!r} is not a base58btc character")
        n = n * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big") if n else b""
    return b"\0" * zeros + body


# --------------------------------------------------------------------------- times

_XSD_DATETIME = re.compile(
    r"^(-?\d{4,})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)?$")


def parse_time(text: str) -> datetime:
    """An XML Schema ``dateTime`` (what Data Integrity's ``created`` is) as an aware datetime;
    without a zone it is taken as UTC. ValueError when it is not one."""
    m = _XSD_DATETIME.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"{text!r} is not a date-time (YYYY-MM-DDThh:mm:ss[.s][Z|±hh:mm])")
    year, month, day, hour, minute, second, frac, zone = m.groups()
    tz = timezone.utc
    if zone and zone != "Z":
        sign = -1 if zone[0] == "-" else 1
        tz = timezone(sign * timedelta(hours=int(zone[1:3]), minutes=int(zone[4:6])))
    micro = int((frac or "0")[:6].ljust(6, "0"))
    return datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), micro, tzinfo=tz)


def utc_stamp(when: datetime | None = None) -> str:
    """UTC time with microseconds, ``2026-01-31T12:00:00.000000Z`` (a record's Stamp)."""
    when = when or datetime.now(timezone.utc)
    return when.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


# --------------------------------------------------------------------------- public key


@dataclass(frozen=True, slots=True)
class PublicKey:
    """An Ed25519 public key (32 bytes) and its Multikey / did:key names."""

    raw: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.raw, bytes) or len(self.raw) != 32:
            raise ConfigError("an Ed25519 public key is 32 bytes")

    @property
    def multibase(self) -> str:
        """``publicKeyMultibase``: ``z`` + base58btc(0xed 0x01 || key)."""
        return "z" + b58encode(ED25519_PUB + self.raw)

    @property
    def did(self) -> str:
        return "did:key:" + self.multibase

    @property
    def verification_method(self) -> str:
        """The id a proof's ``verificationMethod`` names: ``did:key:z6Mk...#z6Mk...``."""
        return f"{self.did}#{self.multibase}"

    def pem(self) -> bytes:
        """SubjectPublicKeyInfo PEM."""
        return self._key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)

    def verify(self, signature: bytes, message: bytes) -> bool:
        """Whether ``signature`` is this key's Ed25519 signature of ``message``."""
        try:
            self._key().verify(signature, message)
        except InvalidSignature:
            return False
        return True

    def _key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey.from_public_bytes(self.raw)

    def __str__(self) -> str:
        return self.multibase

    def __repr__(self) -> str:
        return f"PublicKey({self.multibase})"

    @classmethod
    def parse(cls, text: str | bytes) -> PublicKey:
        """A public key written any of these ways: ``z6Mk...`` (publicKeyMultibase),
        ``did:key:z6Mk...``, ``did:key:z6Mk...#z6Mk...`` (a verification method id), 64 hex
        digits (the raw key), or a PEM ``PUBLIC KEY``. ConfigError says what is wrong."""
        if isinstance(text, bytes):
            try:
                text = text.decode("ascii")
            except UnicodeDecodeError as exc:
                raise ConfigError("public key: not ASCII text") from exc
        text = text.strip()
        if text.startswith("-----BEGIN"):
            return cls._from_pem(text)
        if re.fullmatch(r"[0-9a-fA-F]{64}", text):
            return cls(bytes.fromhex(text))
        if text.startswith("did:key:"):
            did, _, fragment = text.partition("#")
            key = cls.from_multibase(did.removeprefix("did:key:"))
            if fragment and fragment != key.multibase:
                raise ConfigError(f"public key {text[:120]!r}: the fragment names another key than the DID")
            return key
        if text.startswith("z"):
            return cls.from_multibase(text)
        raise ConfigError(f"public key {text[:40]!r}...: not a multibase key (z6Mk...), did:key, 64 hex digits or PEM")

    @classmethod
    def from_multibase(cls, text: str) -> PublicKey:
        if not text.startswith("z"):
            raise ConfigError(f"public key {text[:60]!r}: a base58btc multibase value starts with 'z'")
        try:
            data = b58decode(text[1:])
        except ValueError as exc:
            raise ConfigError(f"public key {text[:60]!r}: {exc}") from exc
        if len(data) != 34 or not data.startswith(ED25519_PUB):
            raise ConfigError(f"public key {text[:60]!r}: not an Ed25519 Multikey (0xed01 + 32 bytes)")
        return cls(data[2:])

    @classmethod
    def _from_pem(cls, text: str) -> PublicKey:
        try:
            key = serialization.load_pem_public_key(text.encode("ascii"))
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError("public key: not a PEM public key") from exc
        if not isinstance(key, Ed25519PublicKey):
            raise ConfigError(f"public key: the PEM holds a {type(key).__name__}, not an Ed25519 key")
        return cls(key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw))


# --------------------------------------------------------------------------- private key


class AgentKey:
    """The agent's Ed25519 private key: signs, and names its public key. Its repr shows only
    the public key; the private bytes leave it only through :func:`create_key` (the key file)
    and :meth:`seed` (for the C2SP note signer key)."""

    __slots__ = ("_private", "public")

    def __init__(self, private: Ed25519PrivateKey) -> None:
        self._private = private
        raw = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        self.public = PublicKey(raw)

    @classmethod
    def generate(cls) -> AgentKey:
        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> AgentKey:
        """The key of a 32-byte RFC 8032 seed (the private key bytes)."""
        if len(seed) != 32:
            raise ConfigError("an Ed25519 private key seed is 32 bytes")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    def sign(self, message: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``message`` (deterministic, RFC 8032)."""
        return self._private.sign(message)

    def seed(self) -> bytes:
        """The 32 private bytes. Only for writing a signer key a person asked for."""
        return self._private.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw,
                                           serialization.NoEncryption())

    def __repr__(self) -> str:
        return f"AgentKey(public={self.public.multibase})"

    def __reduce__(self) -> NoReturn:  # a private key is not pickled by accident (e.g. into a process pool)
        raise TypeError("AgentKey is not picklable")


def create_key(path: Path, *, overwrite: bool = False) -> AgentKey:
    """A new key, written to ``path`` (PKCS#8 PEM, mode 0600 from the moment the file exists).

    An existing file is kept (ConfigError) unless ``overwrite``; then the new key replaces it
    atomically (a new file renamed over the old). Missing parent folders are made (0700)."""
    path = Path(path)
    exists = path.exists() or path.is_symlink()
    if exists and not overwrite:
        raise ConfigError(f"{path}: a key file already exists (it is the agent's identity: replacing it "
                          "means records signed from now on name another key); use overwrite to replace it")
    key = AgentKey.generate()
    pem = key._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption())
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        target = path.with_name(f".{path.name}.new") if exists else path
        if exists:
            target.unlink(missing_ok=True)  # left by an interrupted replacement
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, KEY_FILE_MODE)
        try:
            os.fchmod(fd, KEY_FILE_MODE)  # exactly 0600 whatever the umask
            os.write(fd, pem)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            target.unlink(missing_ok=True)
            raise
        os.close(fd)
        if exists:
            os.replace(target, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the key file: {exc.strerror or exc}") from exc
    return key


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_key(path: Path) -> AgentKey:
    """The key in ``path``. ConfigError names the path and what is wrong: missing, unreadable,
    not a regular file, readable by others than its owner (permissions wider than 0600), not
    a PEM private key, encrypted, or not Ed25519."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no key file (the agent's signing key must be created first)") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the key file: {exc.strerror or exc}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"{path}: the key file is not a regular file")
        mode = stat.S_IMODE(st.st_mode)
        if mode & ~KEY_FILE_MODE:
            raise ConfigError(f"{path}: permissions {mode:04o} are wider than 0600 (others than its owner may "
                              f"read or run the agent's private key); fix with: chmod 600 {path}")
        try:
            data = os.read(fd, MAX_KEY_FILE + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the key file: {exc.strerror or exc}") from exc
    finally:
        os.close(fd)
    if len(data) > MAX_KEY_FILE:
        raise ConfigError(f"{path}: too large for a key file")
    try:
        private = serialization.load_pem_private_key(data, password=None)
    except TypeError as exc:  # the PEM is encrypted
        raise ConfigError(f"{path}: the key is encrypted; the agent needs an unencrypted PKCS#8 key") from exc
    except (ValueError, UnsupportedAlgorithm) as exc:
        raise ConfigError(f"{path}: not a PEM private key") from exc
    if not isinstance(private, Ed25519PrivateKey):
        raise ConfigError(f"{path}: holds a {type(private).__name__}, not an Ed25519 key")
    return AgentKey(private)


# --------------------------------------------------------------------------- key document


@dataclass(frozen=True, slots=True)
class Revocation:
    time: str
    reason: str


@dataclass(frozen=True, slots=True)
class KeyDocument:
    """A public key as a verifier is given it: a Multikey verification method, with when it
    became valid (``valid_from``: proofs created before are refused) and whether it was
    revoked (every proof naming a revoked key is refused, whatever its ``created`` says: a
    stolen key can sign with any date)."""

    key: PublicKey
    valid_from: str | None = None
    revoked: Revocation | None = None

    def __post_init__(self) -> None:
        times = (("valid_from", self.valid_from), ("revoked.time", self.revoked.time if self.revoked else None))
        for field, value in times:
            if value is not None:
                try:
                    parse_time(value)
                except ValueError as exc:
                    raise ConfigError(f"key document field {field}: {exc}") from exc

    @property
    def id(self) -> str:
        return self.key.verification_method

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "type": "Multikey", "controller": self.key.did,
                               "publicKeyMultibase": self.key.multibase}
        if self.valid_from is not None:
            out["valid_from"] = self.valid_from
        if self.revoked is not None:
            out["revoked"] = {"time": self.revoked.time, "reason": self.revoked.reason}
        return out

    @classmethod
    def from_json(cls, data: Any, where: str = "key document") -> KeyDocument:
        """A key document from its JSON object; ConfigError names ``where`` and the field."""
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: not a JSON object")
        allowed = {"id", "type", "controller", "publicKeyMultibase", "valid_from", "revoked"}
        extra = sorted(set(data) - allowed)
        if extra:
            raise ConfigError(f"{where}: unknown field {extra[0]!r} (known: {', '.join(sorted(allowed))})")
        for name in ("id", "type", "controller", "publicKeyMultibase"):
            if not isinstance(data.get(name), str):
                raise ConfigError(f"{where}: field {name} is required (a string)")
        if data["type"] != "Multikey":
            raise ConfigError(f"{where}: type is {data['type']!r}, expected 'Multikey'")
        try:
            key = PublicKey.from_multibase(data["publicKeyMultibase"])
        except ConfigError as exc:
            raise ConfigError(f"{where}: publicKeyMultibase: {exc}") from exc
        if data["controller"] != key.did:
            raise ConfigError(f"{where}: controller must be {key.did} (the did:key of publicKeyMultibase)")
        if data["id"] != key.verification_method:
            raise ConfigError(f"{where}: id must be {key.verification_method}")
        valid_from = data.get("valid_from")
        if valid_from is not None and not isinstance(valid_from, str):
            raise ConfigError(f"{where}: valid_from must be a date-time string")
        revoked = data.get("revoked")
        if revoked is not None:
            if (not isinstance(revoked, dict) or set(revoked) != {"time", "reason"}
                    or not all(isinstance(v, str) for v in revoked.values())):
                raise ConfigError(f"{where}: revoked must be {{\"time\": date-time, \"reason\": text}}")
            revoked = Revocation(revoked["time"], revoked["reason"])
        try:
            return cls(key, valid_from, revoked)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc

    @classmethod
    def read(cls, path: Path) -> KeyDocument:
        """A key document from a file: its JSON form, or a bare public key in any form
        :meth:`PublicKey.parse` reads (then valid from always, not revoked)."""
        path = Path(path)
        try:
            with open(path, "rb") as f:
                data = f.read(MAX_KEY_DOCUMENT + 1)
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read the key document: {exc.strerror or exc}") from exc
        if len(data) > MAX_KEY_DOCUMENT:
            raise ConfigError(f"{path}: too large for a key document")
        if not data.lstrip().startswith(b"{"):
            try:
                return cls(PublicKey.parse(data))
            except ConfigError as exc:
                raise ConfigError(f"{path}: neither a key document (JSON) nor a public key: {exc}") from exc
        try:
            obj = json.loads(data)
        except ValueError as exc:
            raise ConfigError(f"{path}: not JSON: {exc}") from exc
        return cls.from_json(obj, str(path))

    def write(self, path: Path) -> None:
        """Write the document (public: an ordinary file)."""
        Path(path).write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")


class Keyring:
    """The keys a verifier trusts, looked up by the verification method id a proof names."""

    def __init__(self, keys: Iterable[PublicKey | KeyDocument] = ()) -> None:
        self._by_id: dict[str, KeyDocument] = {}
        for k in keys:
            doc = k if isinstance(k, KeyDocument) else KeyDocument(k)
            if doc.id in self._by_id and self._by_id[doc.id] != doc:
                raise ConfigError(f"key {doc.key.multibase} is given twice with different validity or revocation")
            self._by_id[doc.id] = doc

    def get(self, verification_method: str) -> KeyDocument | None:
        return self._by_id.get(verification_method)

    def __iter__(self) -> Iterator[KeyDocument]:
        return iter(self._by_id.values())

    def __len__(self) -> int:
        return len(self._by_id)
