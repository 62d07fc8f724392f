"""``energy-agent probe``: read one device once and show what the agent would see.

For a meter: every point of its profile, read in the same coalesced requests the agent uses,
with the request that read it, the raw registers, the decoded value and unit, and plausibility
warnings (a value out of range that would be plausible with the other word or byte order is
named as such). A coalesced request the meter refuses (exception 2 or 3: it will not read
across registers it does not map) is split as the agent splits it; ``notes`` say which spans
had to be read separately and why, and the rows show the requests that were used. For a CNC:
every node of its node map with its status and SourceTimestamp, and the operating state and
job key the agent would derive. Exit status 0 when the device answered and nothing is
implausible, 1 otherwise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from energy_agent.app.config import Loaded
from energy_agent.core.errors import ConfigError, DeviceError
from energy_agent.drivers import codec
from energy_agent.drivers.profile import METER_QUANTITIES, MeterProfile

RANGES = {
    "voltage": (50.0, 1000.0),
    "current": (-20000.0, 20000.0),
    "frequency_hz": (45.0, 65.0),
    "power_factor": (-1.0, 1.0),
    "energy": (0.0, 1e10),
}


@dataclass
class ProbeResult:
    device: str
    rows: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    """What the probe learned about the device (requests it refused and how they were read)."""
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and not self.warnings


def _range(q: str, profile: MeterProfile) -> tuple[float, float]:
    if q == "power_w":
        limit = profile.max_power_w or 1e7
        return (-limit, limit)
    for prefix, rng in RANGES.items():
        if q.startswith(prefix):
            return rng
    return (-math.inf, math.inf)


def plausible(q: str, v: float, profile: MeterProfile) -> bool:
    lo, hi = _range(q, profile)
    if q.startswith("voltage") and v == 0.0:
        return True  # an unconnected phase
    return math.isfinite(v) and lo <= v <= hi


def check_point(q: str, regs: list[int], profile: MeterProfile) -> tuple[float, str | None]:
    """Decoded value and, if implausible, a warning that names a likely cause."""
    p = profile.points[q]
    wo, bo = profile.order(q)
    value = codec.decode(regs, p.type, wo, bo) * p.scale + p.offset
    if plausible(q, value, profile):
        return value, None
    lo, hi = _range(q, profile)
    hint = ""
    other = {"big": "little", "little": "big"}
    for label, w, b in (("word order", other[wo], bo), ("byte order", wo, other[bo]), ("word and byte order", other[wo], other[bo])):
        if codec.width(p.type) == 1 and "word" in label:
            continue
        alt = codec.decode(regs, p.type, w, b) * p.scale + p.offset
        if plausible(q, alt, profile) and alt != 0.0:
            hint = f"; {label} likely swapped (would read {alt:.6g})"
            break
    return value, f"{q} = {value:.6g} {METER_QUANTITIES[q]} is outside {lo:g}..{hi:g}{hint}"


def note(split, profile: MeterProfile) -> str:
    """What a refused request (a ``energy_agent.drivers.modbus.Split``) says about the meter."""
    text = f"{split}; the agent reads this meter the same way"
    if split.refused.gaps:
        text += (f" (profile {profile.name} lets a request span {profile.max_gap} unmapped registers "
                 "(max_gap); this meter reads none)")
    return text


async def probe_meter(loaded: Loaded, device_id: str) -> ProbeResult:
    from energy_agent.core.clock import Clock
    from energy_agent.drivers.modbus import MeterDriver, ModbusBus

    dev = loaded.config.meter(device_id)
    profile = loaded.profiles[device_id]
    res = ProbeResult(device_id)
    bus = ModbusBus.for_meter(dev)
    driver = MeterDriver(device_id, dev.unit_id, profile, bus, Clock(), timeout_s=dev.timeout_s,
                         retries=dev.retries, pause_s=dev.pause_s, quantities=tuple(profile.points))
    try:
        blocks = await driver.read()
    except DeviceError as exc:
        res.error = str(exc)
        return res
    finally:
        res.notes = [note(split, profile) for split in driver.learned]
        await bus.close()
    split_from = {part.span: split for split in reversed(driver.learned) for part in split.parts}
    for block, regs in blocks:
        request = f"{block.function} {block.start}+{block.count}"
        if block.span in split_from:
            split = split_from[block.span]
            request += f" (split: {split.refused.span} refused, exception {split.code})"
        for q, off, p in block.members:
            raw = regs[off : off + codec.width(p.type)]
            value, warning = check_point(q, raw, profile)
            res.rows.append({"quantity": q, "value": f"{value:.6g}", "unit": METER_QUANTITIES[q],
                             "register": f"{p.function} {p.address}", "type": p.type, "request": request,
                             "raw": " ".join(f"{r:04x}" for r in raw)})
            if warning:
                res.warnings.append(warning)
    return res


async def probe_cnc(loaded: Loaded, device_id: str) -> ProbeResult:
    from asyncua import Client, ua

    from energy_agent.drivers.opcua import configure_security, resolve_node_id

    dev = loaded.config.cnc(device_id)
    nodemap = loaded.nodemaps[device_id]
    res = ProbeResult(device_id)
    values = {}
    client = Client(dev.endpoint, timeout=dev.timeout_s)
    try:
        await configure_security(client, device_id, dev.endpoint, loaded.security[device_id])
        async with client:
            for q, text in loaded.node_ids[device_id].items():
                row = {"point": q, "value": "", "status": "", "source time": "", "node": text}
                try:
                    node = client.get_node(await resolve_node_id(client, text))
                    dv = await node.read_data_value(raise_on_bad_status=False)
                except (DeviceError, ua.UaError) as exc:
                    row["status"] = str(exc)
                    if not nodemap.points[q].optional:
                        res.warnings.append(f"{q} ({text}): {exc}")
                else:
                    good = dv.StatusCode is None or dv.StatusCode.is_good()
                    shown = dv.Value.Value if dv.Value is not None else None
                    row.update({"value": repr(shown), "status": "Good" if good else dv.StatusCode.name,
                                "source time": dv.SourceTimestamp.isoformat() if dv.SourceTimestamp else ""})
                    if good:
                        values[q] = shown
                    elif not nodemap.points[q].optional:
                        res.warnings.append(f"{q} ({text}): status {row['status']}")
                res.rows.append(row)
    except (OSError, TimeoutError, ua.UaError) as exc:
        res.error = f"{dev.endpoint}: {type(exc).__name__}: {exc}"
        return res
    except DeviceError as exc:  # untrusted server, missing certificate or password
        res.error = str(exc)
        return res
    state = nodemap.state_of(values)
    key = next((str(values[k]) for k in nodemap.job.key if values.get(k)), None)
    res.rows.append({"point": "(state)", "value": state, "status": "", "source time": "", "node": "node map rules"})
    res.rows.append({"point": "(job key)", "value": key or "-", "status": "", "source time": "", "node": "job.key"})
    return res


async def probe(loaded: Loaded, device_id: str) -> ProbeResult:
    cfg = loaded.config
    if any(m.id == device_id for m in cfg.meters):
        return await probe_meter(loaded, device_id)
    if any(c.id == device_id for c in cfg.cncs):
        return await probe_cnc(loaded, device_id)
    known = ", ".join(sorted([m.id for m in cfg.meters] + [c.id for c in cfg.cncs])) or "none"
    raise ConfigError(f"probe: unknown device {device_id!r} (known: {known})")


