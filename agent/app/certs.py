"""``energy-agent certs``: a self-signed OPC UA application certificate and its key
(what it contains: ``energy_agent.drivers.pki``)."""

from __future__ import annotations

import argparse
import socket
from dataclasses import dataclass
from pathlib import Path

from energy_agent.core.errors import ConfigError
from energy_agent.drivers.pki import (
    application_uri,
    make_certificate,
    thumbprint,
    write,
)


@dataclass(frozen=True)
class Target:
    name: str
    uri: str
    cert: Path
    key: Path


def _target(args: argparse.Namespace) -> Target:
    """Where to write and which URI, from the config (agent or one CNC) or the command line."""
    if args.config:
        from energy_agent.app import config

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
