"""``energy-agent certs``: a self-signed OPC UA application certificate and its key.

OPC UA (OPC 10000-6, 6.2.2) identifies an application by the URI in its certificate's
subjectAltName; a server compares it with the ApplicationUri the client announces, so the
driver announces the URI it finds in the configured certificate. The certificate also carries
DNS names, the key usages OPC UA asks for (digital signature, non-repudiation, key and data
encipherment) and the client (or server) extended key usage. Certificates are DER or PEM after
the file suffix (``.der`` or ``.pem``), keys unencrypted PKCS#8 PEM (or DER), written with mode
0600; an existing file is never overwritten unless asked.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import os
import socket
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent.errors import ConfigError

KEY_BITS = 2048
"""Basic256Sha256 accepts 2048 to 4096 bit RSA keys (OPC 10000-7)."""


def application_uri(site: str, agent_id: str, device: str | None = None) -> str:
    """The URI the agent (or its connection to one device) identifies itself with."""
    return f"urn:energy-agent:{site}:{agent_id}" + (f":{device}" if device else "")


def make_certificate(common_name: str, uri: str, dns: list[str], *, server: bool = False, days: int = 730,
                     organization: str = "energy-agent") -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed RSA/SHA-256 application instance certificate for ``uri``."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=KEY_BITS)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, organization)])
    now = dt.datetime.now(dt.timezone.utc)
    alt = [x509.UniformResourceIdentifier(uri)] + [x509.DNSName(d) for d in dict.fromkeys(dns) if d]
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate a peer clock slightly behind
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alt), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True, key_encipherment=True,
                                     data_encipherment=True, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def thumbprint(cert: x509.Certificate) -> str:
    """The OPC UA thumbprint: SHA-1 of the DER encoding (OPC 10000-6, 6.2.3), hex."""
    return hashlib.sha1(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def load_certificate(path: Path) -> x509.Certificate:
    data = path.read_bytes()
    if data.lstrip().startswith(b"-----BEGIN"):
        return x509.load_pem_x509_certificate(data)
    return x509.load_der_x509_certificate(data)


def certificate_uri(cert: x509.Certificate) -> str | None:
    """The application URI in the certificate's subjectAltName, if any."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if uris else None


def _encoding(path: Path) -> serialization.Encoding:
    return serialization.Encoding.DER if path.suffix.lower() == ".der" else serialization.Encoding.PEM


def write(cert: x509.Certificate, key: rsa.RSAPrivateKey, cert_path: Path, key_path: Path, *,
          force: bool = False) -> None:
    """Write both files (the key readable by its owner only); ConfigError if one exists and not ``force``."""
    if cert_path == key_path:
        raise ConfigError(f"certs: certificate and key would both be written to {cert_path}")
    if not force:
        existing = [str(p) for p in (cert_path, key_path) if p.exists()]
        if existing:
            raise ConfigError(f"certs: {', '.join(existing)} already exist{'s' if len(existing) == 1 else ''} (use --force to replace)")
    for p in (cert_path, key_path):
        p.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(cert.public_bytes(_encoding(cert_path)))
    body = key.private_bytes(_encoding(key_path), serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(body)
    os.chmod(key_path, 0o600)


@dataclass(frozen=True)
class Target:
    name: str
    uri: str
    cert: Path
    key: Path


def _target(args: argparse.Namespace) -> Target:
    """Where to write and which URI, from the config (agent or one CNC) or the command line."""
    if args.config:
        from agent import config

        loaded = config.load(args.config)
        cfg, base = loaded.config, loaded.base
        out = Path(args.out) if args.out else base / "pki"
        if args.device:
            ids = [c.id for c in cfg.cncs]
            if args.device not in ids:
                raise ConfigError(f"certs: unknown cnc {args.device!r} (known: {', '.join(ids) or 'none'})")
            sec = loaded.security[args.device]
            name = args.device
            cert = sec.certificate or out / f"{args.device}.der"
            key = sec.private_key or out / f"{args.device}.key.pem"
        else:
            name = cfg.agent_id
            cert, key = out / f"{cfg.agent_id}.der", out / f"{cfg.agent_id}.key.pem"
        uri = args.uri or application_uri(cfg.site, cfg.agent_id, args.device)
    else:
        if not (args.uri and args.cert and args.key):
            raise ConfigError("certs: give -c CONFIG [--device CNC], or --uri, --cert and --key")
        name, uri, cert, key = args.name or "energy-agent", args.uri, Path(args.cert), Path(args.key)
    return Target(name, uri, Path(args.cert) if args.cert else cert, Path(args.key) if args.key else key)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", help="plant config: paths and URI from it")
    p.add_argument("--device", help="a CNC id: its security.certificate/private_key (default: the agent's own)")
    p.add_argument("--out", help="folder for files the config does not name (default: pki/ beside the config)")
    p.add_argument("--cert", help="certificate file (.der or .pem)")
    p.add_argument("--key", help="private key file (.pem or .der)")
    p.add_argument("--uri", help="application URI (default: urn:energy-agent:<site>:<agent_id>[:<device>])")
    p.add_argument("--name", help="common name (default: the agent or device id)")
    p.add_argument("--dns", action="append", default=[], help="DNS name for subjectAltName (repeatable; "
                                                              "default: this host's name and localhost)")
    p.add_argument("--days", type=int, default=730, help="validity in days (default 730)")
    p.add_argument("--force", action="store_true", help="replace existing files")


def run(args: argparse.Namespace) -> int:
    t = _target(args)
    if not 1 <= args.days <= 36500:
        raise ConfigError(f"certs: --days {args.days} must be 1 to 36500")
    dns = args.dns or [socket.gethostname(), "localhost"]
    cert, key = make_certificate(args.name or t.name, t.uri, dns, days=args.days)
    write(cert, key, t.cert, t.key, force=args.force)
    print(f"certificate: {t.cert}")
    print(f"private key: {t.key}")
    print(f"application URI: {t.uri}; DNS: {', '.join(dns)}; valid until "
          f"{cert.not_valid_after_utc.date().isoformat()}")
    print(f"thumbprint (SHA-1): {thumbprint(cert)}")
    print("the server must trust this certificate: copy it to the server's trusted certificates")
    return 0
