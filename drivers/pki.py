"""X.509 for OPC UA: application instance certificates, thumbprints, application URIs.

OPC UA (OPC 10000-6, 6.2.2) identifies an application by the URI in its certificate's
subjectAltName; a server compares it with the ApplicationUri the client announces, so the
driver announces the URI it finds in the configured certificate. The certificate also carries
DNS names, the key usages OPC UA asks for (digital signature, non-repudiation, key and data
encipherment) and the client (or server) extended key usage. Certificates are DER or PEM after
the file suffix (``.der`` or ``.pem``), keys unencrypted PKCS#8 PEM (or DER), written with mode
0600; an existing file is never overwritten unless asked.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from energy_agent.core.errors import ConfigError

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
