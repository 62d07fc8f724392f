"""Shared by every configuration model: a frozen base that refuses unknown keys and non-finite
numbers, strict number types, checked host names, endpoints and paths, and pydantic's errors
turned into messages that name the field (``machines[2].meter: …``)."""

from __future__ import annotations

import ipaddress
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Strict, StringConstraints, ValidationError

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
"""Ids of sites, agents, devices and machines: they appear in topics, record ids and file names."""

ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]*$"
"""The name of an environment variable (that holds a secret)."""

MAX_TEXT = 4096
"""Longest free text a config field may hold; records carry some of them and take no more
(``energy_agent.core.record.MAX_TEXT``)."""


class Model(BaseModel):
    """Base of every config, profile and node-map model: frozen, unknown keys are errors, and a
    float field refuses ``.inf`` and ``.nan`` (records and JSON cannot carry them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Int = Annotated[int, Strict()]
"""An integer, and only an integer: not ``true``, ``2.0`` or ``"2"``."""
Float = Annotated[float, Strict()]
"""A number (an integer is one too), not ``true`` or ``"0.5"``; finite in a :class:`Model`."""
Bool = Annotated[bool, Strict()]
"""``true`` or ``false``, not ``"yes"`` or ``1``."""


def _no_number(value: Any) -> Any:
    if isinstance(value, (bool, int, float)):
        raise ValueError(f"Input should be a date like 2027-03-31, not {str(value).lower()}")
    return value


Date = Annotated[date, BeforeValidator(_no_number)]
"""A day (``2027-03-31``, quoted or not), not a number of seconds since 1970."""


def integer_only(value: Any) -> Any:
    """For a choice of integers (``Literal[1, 2]``), which would take ``true`` and ``1.0``."""
    if isinstance(value, (bool, float)):
        raise ValueError(f"Input should be an integer, not {str(value).lower()}")
    return value


Text = Annotated[str, StringConstraints(max_length=MAX_TEXT)]
"""Free text a record may carry."""
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT)]
"""Free text that must say something (an authority, a document, a profile)."""


# --------------------------------------------------------------------------- hosts and URLs

_LABEL = re.compile(r"^[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")


def check_host(host: str) -> str:
    """``host`` if it can be a host name or an IP address, else ValueError saying why."""
    if not host:
        raise ValueError("empty host name")
    if any(c.isspace() or ord(c) < 32 for c in host):
        raise ValueError(f"host {host!r} contains a space or a control character")
    if "://" in host:
        raise ValueError(f"host {host!r} is a URL: give the host name or address alone")
    if any(c in host for c in "/@?#[]"):
        raise ValueError(f"host {host!r} is not a host name or an IP address")
    if ":" in host:
        try:
            ipaddress.IPv6Address(host.split("%", 1)[0])
        except ValueError as exc:
            raise ValueError(f"host {host!r} is not an IPv6 address (a port goes in its own field)") from exc
        return host
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError as exc:
            raise ValueError(f"host {host!r} is not a valid IPv4 address") from exc
        return host
    if not host.isascii():
        raise ValueError(f"host {host!r}: give a non-ASCII name in its IDNA form (xn--...)")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253:
        raise ValueError(f"host name of {len(name)} characters (at most 253)")
    for label in name.split("."):
        if not label:
            raise ValueError(f"host {host!r} has an empty label (two dots, or a leading dot)")
        if len(label) > 63:
            raise ValueError(f"host {host!r}: label {label[:20]!r}... is longer than 63 characters")
        if not _LABEL.match(label):
            raise ValueError(f"host {host!r}: label {label!r} may hold only letters, digits and '-' "
                             "(not at its start or end)")
    return host


def check_url(url: str, schemes: tuple[str, ...], *, path: bool = True) -> str:
    """``url`` if it is ``scheme://host[:port][/path]`` with one of ``schemes``, a valid host and
    a port in 1-65535, else ValueError saying why. ``path``: whether a path may follow."""
    if any(c.isspace() or ord(c) < 32 for c in url):
        raise ValueError(f"{url!r} contains a space or a control character")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"{url!r}: {_url_problem(exc)}") from exc
    if parts.scheme.lower() not in schemes:
        raise ValueError(f"{url!r}: the scheme must be {' or '.join(s + '://' for s in schemes)}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"{url!r}: credentials do not belong in the URL")
    if not parts.hostname:
        raise ValueError(f"{url!r} has no host")
    if port == 0:
        raise ValueError(f"{url!r}: port 0 is not a port (1-65535)")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError(f"{url!r}: no query or fragment expected")
    if not path and parts.path not in ("", "/"):
        raise ValueError(f"{url!r}: no path expected")
    check_host(parts.hostname)
    return url


def _url_problem(exc: ValueError) -> str:
    text = str(exc)
    if "out of range" in text:
        return "port out of range (1-65535)"
    if "cast to integer" in text:
        return "the port is not a number"
    return text


def url_key(url: str, default_port: int) -> tuple[str, str, int, str]:
    """What identifies the server a checked URL points to: scheme, host, port, path (case and
    a default port do not make two servers)."""
    parts = urlsplit(url)
    host = (parts.hostname or "").rstrip(".").lower()
    return parts.scheme.lower(), host, parts.port or default_port, parts.path.rstrip("/")


Host = Annotated[str, AfterValidator(check_host)]
"""A host name (at most 253 characters, labels of letters, digits and '-') or an IP address."""


# --------------------------------------------------------------------------- paths

def _path(value: Any) -> Any:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("empty path")
        if "\0" in value:
            raise ValueError("a path cannot contain a NUL character")
    return value


FilePath = Annotated[Path, BeforeValidator(_path)]
"""A path that names something (not empty, no NUL); relative ones are taken from the config's folder."""


# --------------------------------------------------------------------------- messages

_SECRET_WORDS = ("password", "token", "secret", "key")
_SHOWN_TYPES = ("_type", "_parsing", "finite_number", "greater_than", "less_than", "literal_error",
                "string_pattern_mismatch", "string_too_long", "string_too_short", "enum", "multiple_of")


def format_validation(exc: ValidationError, *, show_input: bool = False) -> str:
    """pydantic errors as 'machines[2].meter: message' lines. ``show_input``: add the value that
    was refused, when it is a short scalar of a field that does not hold a secret."""
    lines = []
    for err in exc.errors():
        loc = ""
        for part in err["loc"]:
            loc += f"[{part}]" if isinstance(part, int) else (f".{part}" if loc else str(part))
        msg = err["msg"].removeprefix("Value error, ")
        if show_input and err["type"].endswith(_SHOWN_TYPES) and not any(w in loc.lower() for w in _SECRET_WORDS):
            msg += _shown(err.get("input"))
        if loc and re.match(r"^[A-Za-z_][\w.\[\]]*: ", msg):
            lines.append(f"{loc}.{msg}")  # a nested validator named a field below loc
        else:
            lines.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(lines)


def _shown(value: Any) -> str:
    if isinstance(value, bool):
        return f" (got {str(value).lower()})"
    if isinstance(value, (int, float)) or (isinstance(value, str) and len(value) <= 60):
        return f" (got {value!r})"
    if isinstance(value, str):
        return f" (got a text of {len(value)} characters)"
    if isinstance(value, (list, dict)):
        return f" (got a {'list' if isinstance(value, list) else 'mapping'})"
    return ""
