"""CNC node maps: a CNC's OPC UA nodes as a data file (``drivers/nodemaps/NAME.yaml``),
validated on load, with the rules that turn their values into operating states and jobs.

Points are addressed by node id (``ns=``/``nsu=``) or by browse path, with ``{param}``
placeholders a device fills. The format is documented in drivers/nodemaps/README.md.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from energy_agent.core.states import JobRule, MachineRules, StateRule
from energy_agent.core.validation import Model
from energy_agent.drivers.datafile import load_model

NODEMAP_DIR = Path(__file__).parent / "nodemaps"

ROOTS = {"Root": "i=84", "Objects": "i=85", "Types": "i=86", "Views": "i=87"}
"""Standard folders a browse path may start from by name (OPC 10000-5, 8.2)."""


@dataclass(frozen=True, slots=True)
class BrowsePath:
    """A node addressed by browse names from a start node, resolved at connect.

    ``start`` is a node id text (``i=84``, ``ns=…``, ``nsu=URI;…``); each element is
    (namespace, name) where the namespace is an index (int) or a namespace URI (str), the form
    that survives a server restart.
    """

    start: str
    elements: tuple[tuple[int | str, str], ...]

    def __str__(self) -> str:
        root = next((k for k, v in ROOTS.items() if v == self.start), self.start)
        parts = [f"{ns}:{name}" if isinstance(ns, int) else f"nsu={ns};{name}" for ns, name in self.elements]
        return "/".join([root, *parts])


NodeRef = str | BrowsePath
"""What a point resolves to: a node id text or a browse path."""

_INDEXED = re.compile(r"^(\d+):(.+)$")
_ALIASED = re.compile(r"^([A-Za-z_][\w-]*):(.+)$")


def _element(text: str, namespaces: dict[str, str]) -> tuple[int | str, str]:
    """'2:Name' (index), 'alias:Name' (a URI from the map's namespaces), 'nsu=URI;Name' or
    'Name' (namespace 0) as (namespace, name)."""
    if text.startswith("nsu="):
        uri, sep, name = text[4:].partition(";")
        if not sep or not uri or not name:
            raise ValueError(f"element {text!r}: expected 'nsu=URI;Name'")
        return uri, name
    if m := _INDEXED.match(text):
        return int(m.group(1)), m.group(2)
    if (m := _ALIASED.match(text)) and m.group(1) in namespaces:
        return namespaces[m.group(1)], m.group(2)
    if m:
        raise ValueError(f"element {text!r}: unknown namespace alias {m.group(1)!r} "
                         f"(the map's namespaces: {', '.join(namespaces) or 'none'})")
    if not text:
        raise ValueError("empty path element")
    return 0, text


class NodePoint(Model):
    node: str | None = Field(None, description="node id: 'ns=2;s=…', 'ns=2;i=…' or 'nsu=URI;s=…'; {param} placeholders allowed")
    path: str | list[str] | None = Field(None, description=(
        "browse path instead of a node id: 'Objects/ma:Machines/dev:{machine}/mt:Production/…' (elements "
        "'idx:Name', 'alias:Name' with an alias from namespaces, or 'Name' for namespace 0), or a list "
        "of elements (which may also be 'nsu=URI;Name'); from the Root folder, or from 'start'"))
    start: str | None = Field(None, description="node id the path starts from (default: the Root folder)")
    optional: bool = Field(False, description="missing on the server is not an error")

    @model_validator(mode="after")
    def _one(self) -> NodePoint:
        if (self.node is None) == (self.path is None):
            raise ValueError("node: give node or path (one of them)")
        if self.start is not None and self.path is None:
            raise ValueError("start: only a path takes a start node")
        if self.path is not None and not self.path:
            raise ValueError("path: empty")
        return self

    def ref(self, params: dict[str, str], namespaces: dict[str, str]) -> NodeRef:
        """This point's node id or browse path with placeholders filled (KeyError: a missing param)."""
        if self.node is not None:
            return self.node.format_map(params)
        parts = self.path.split("/") if isinstance(self.path, str) else list(self.path)
        start = self.start.format_map(params) if self.start else None
        if start is None and isinstance(self.path, str) and parts[0] in ROOTS:
            start = ROOTS[parts.pop(0)]
        spaces = {k: v.format_map(params) for k, v in namespaces.items()}
        elements = tuple(_element(p.format_map(params), spaces) for p in parts)
        if not elements:
            raise ValueError("no element after the start node")
        return BrowsePath(start or ROOTS["Root"], elements)


class NodeMap(Model):
    name: str
    spec: str = ""
    description: str = ""
    params: dict[str, str] = Field(default_factory=dict, description="placeholders a device must set, with their meaning")
    namespaces: dict[str, str] = Field(default_factory=dict, description=(
        "aliases for browse path elements: alias -> namespace URI ({param} placeholders allowed)"))
    points: dict[str, NodePoint]
    states: list[StateRule]
    job: JobRule = Field(default_factory=JobRule)

    @model_validator(mode="after")
    def _consistent(self) -> NodeMap:
        for i, rule in enumerate(self.states):
            for name in rule.when:
                if name not in self.points:
                    raise ValueError(f"states[{i}].when names unknown point {name!r}")
        if not self.states or self.states[-1].when:
            raise ValueError("the last state rule must have no 'when' (the default state)")
        for k in self.job.key:
            if k not in self.points:
                raise ValueError(f"job.key names unknown point {k!r}")
        for q, p in self.points.items():
            if p.path is not None:
                try:
                    p.ref(_Echo(), self.namespaces)
                except ValueError as exc:
                    raise ValueError(f"points.{q}.path: {exc}") from exc
        return self

    def resolve(self, params: dict[str, str]) -> dict[str, NodeRef]:
        """Node id strings (or browse paths) with placeholders filled from a device's params."""
        missing = sorted(set(self.params) - set(params))
        if missing:
            raise ValueError(f"node map {self.name!r} needs params {missing}")
        out = {}
        for q, p in self.points.items():
            try:
                out[q] = p.ref(params, self.namespaces)
            except KeyError as exc:
                raise ValueError(f"point {q!r}: no param {exc.args[0]!r}") from exc
            except ValueError as exc:
                raise ValueError(f"point {q!r}: {exc}") from exc
        return out

    @property
    def rules(self) -> MachineRules:
        """The state and job rules, for the machine tracker."""
        return MachineRules(states=self.states, job=self.job)

    def state_of(self, values: dict[str, Any]) -> str:
        return self.rules.state_of(values)


class _Echo(dict):
    """Params that fill every placeholder with its own name (to check a map without a device)."""

    def __missing__(self, key: str) -> str:
        return key


def load_nodemap(ref: str, base: Path | None = None) -> NodeMap:
    """A built-in node map by name, or a node-map file (relative to ``base``)."""
    return load_model("node map", NODEMAP_DIR, ref, base, NodeMap)
