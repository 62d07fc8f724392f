"""Reading a YAML file strictly: the one way the agent reads its config (and the device data
files beside it).

What PyYAML's ``safe_load`` lets through and this does not:

- bytes that are not UTF-8 (the error names the byte and its offset, not a traceback);
- a key given twice in one mapping (``safe_load`` keeps the last value silently);
- a value the YAML constructor cannot build (``2026-02-30``, ``!!int x``), reported with its
  line and column;
- nesting deep enough to exhaust the parser's recursion.

Numbers like ``1e-3`` are floats (YAML 1.2), not the strings YAML 1.1 makes of them. Every
problem is a :class:`ConfigError` that starts with ``what`` and the path, e.g.
``config plant.yaml: line 12, column 3: duplicate key 'port' (first at line 9)``.
"""

from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml
from yaml.constructor import ConstructorError
from yaml.nodes import MappingNode, Node

from energy_agent.core.errors import ConfigError

MAX_BYTES = 16 * 1024 * 1024
"""A config or data file larger than this is not one (``-c /dev/zero`` ends here, not in swap)."""

_MERGE = "tag:yaml.org,2002:merge"
_FLOAT_1_2 = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")
"""Exponent notation without a dot or an exponent sign (``1e-3``, ``5E6``), a float in YAML 1.2."""


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys and locates constructor errors."""

    def construct_mapping(self, node: MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE:
                continue  # keys merged with <<: are defaults the mapping may override
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not None:
                raise ConstructorError(None, None, f"duplicate key {key!r} (first at line {first})",
                                       key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep)

    def construct_object(self, node: Node, deep: bool = False) -> Any:
        try:
            return super().construct_object(node, deep)
        except (ValueError, OverflowError) as exc:  # e.g. datetime.date(2026, 2, 30) in a timestamp
            raise ConstructorError(None, None, f"{node.value!r} cannot be read: {exc}"
                                   if isinstance(node.value, str) else str(exc), node.start_mark) from exc


_StrictLoader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_1_2, list("-+0123456789."))


def load_yaml(path: str | Path, what: str = "config") -> Any:
    """The data of the YAML file at ``path``; ConfigError naming ``what``, the file and where
    in it the problem is. An empty file gives None."""
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{what} {p}: cannot read: {exc.strerror or exc}") from exc
    except ValueError as exc:  # a NUL in the path
        raise ConfigError(f"{what} {p!r}: cannot read: {exc}") from exc
    if len(data) > MAX_BYTES:
        raise ConfigError(f"{what} {p}: larger than {MAX_BYTES // (1024 * 1024)} MiB: not a {what} file")
    return parse_yaml(data, f"{what} {p}")


def parse_yaml(data: bytes, where: str) -> Any:
    """The data of YAML document ``data``; ConfigError starting with ``where``."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{where}: not UTF-8 text: byte 0x{data[exc.start]:02x} at offset {exc.start} "
                          f"(line {line})") from exc
    try:
        return yaml.load(text, Loader=_StrictLoader)
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1
        raise ConfigError(f"{where}: line {line}: character {_char(exc.character)} is not allowed in YAML "
                          "(a binary file?)") from exc
    except yaml.MarkedYAMLError as exc:
        raise ConfigError(f"{where}: {_marked(exc)}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {exc}") from exc
    except RecursionError as exc:
        raise ConfigError(f"{where}: nested too deeply") from exc


def _char(c: Any) -> str:
    code = ord(c) if isinstance(c, str) else c
    return f"U+{code:04X}" if isinstance(code, int) else repr(c)


def _marked(exc: yaml.MarkedYAMLError) -> str:
    mark = exc.problem_mark or exc.context_mark
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = exc.problem or "not valid YAML"
    context = f" ({exc.context})" if exc.context and exc.problem_mark is not None else ""
    return f"{where}{problem}{context}"
