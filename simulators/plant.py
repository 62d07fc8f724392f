"""A whole simulated plant as real processes: simulators, agent and bridges.

:class:`PlantRun` writes the configs for one scenario (free loopback ports, a shared scaled
clock), starts ``energy-agent simulate``, ``energy-agent run`` and one ``energy-agent bridge``
per InfluxDB-compatible store as separate processes, waits for the scenario to finish and
stops every process it started by its id. ``make demo`` and the end-to-end tests both use it,
so the tests exercise exactly what the demo shows.
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import yaml

from energy_agent import examples
from energy_agent.simulators.services import free_port, signal_group, stop_process

DEMO_CONFIG = examples.DEMO
DEMO_SCENARIO = Path(__file__).resolve().parent / "scenarios" / "demo.yaml"


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    offset: int = 0
    """Where this run's output begins in the log (a restarted process appends to it)."""
    stopped: bool = False
    """Stopped or killed on purpose: its exit is no failure of the run."""

    def output(self) -> str:
        with open(self.log, "rb") as fh:
            fh.seek(self.offset)
            return fh.read().decode(errors="replace")

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 15.0) -> int | None:
        self.stopped = True
        return stop_process(self.popen, timeout)


@dataclass
class PlantRun:
    workdir: Path
    mqtt_port: int
    stores: dict[str, dict]
    """Bridge name -> the ``influx`` config section it writes to."""
    scenario_path: Path = DEMO_SCENARIO
    lead_s: float = 6.0
    """Real seconds between start-up and the scenario's time zero (simulators and agent connect)."""
    overrides: dict = field(default_factory=dict)
    """Config sections merged into the agent's config, e.g. ``{"ledger": {"checkpoint_s": 1}}``."""
    procs: list[Proc] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.scenario = yaml.safe_load(self.scenario_path.read_text())
        self.speed = float(self.scenario["speed"])
        self.modbus_port = free_port()
        self.opcua_port = free_port()
        self.anchor = 0.0

    # ------------------------------------------------------------------ configs

    def agent_config(self, store: dict | None = None) -> dict:
        cfg = yaml.safe_load(DEMO_CONFIG.read_text())
        cfg["clock"] = {"speed": self.speed,
                        "anchor": datetime.fromtimestamp(self.anchor, timezone.utc).isoformat()}
        cfg["ledger"] = {"path": str(self.workdir / "ledger.db")}
        for m in cfg["meters"]:
            m["port"] = self.modbus_port
        for c in cfg["cncs"]:
            c["endpoint"] = f"opc.tcp://127.0.0.1:{self.opcua_port}"
        # Every bridge confirms what its store accepted; the agent waits for all of them.
        cfg["mqtt"] = {"host": "127.0.0.1", "port": self.mqtt_port, "confirm_by": sorted(self.stores)}
        if store is not None:
            cfg["influx"] = copy.deepcopy(store)
        for section, values in self.overrides.items():
            cfg[section] = {**cfg.get(section, {}), **values}
        return cfg

    def _write(self, name: str, data: dict) -> Path:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path

    # ------------------------------------------------------------------ processes

    def _spawn(self, name: str, *args: str, env: dict | None = None) -> Proc:
        log = self.workdir / f"{name}.log"
        fh = open(log, "ab")
        offset = fh.tell()
        popen = subprocess.Popen([sys.executable, "-m", "energy_agent", *args], stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, cwd=self.workdir, start_new_session=True,
                                 env={**os.environ, **(env or {})})
        fh.close()
        proc = Proc(name, popen, log, offset)
        self.procs.append(proc)
        return proc

    def _wait_log(self, proc: Proc, text: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in proc.output():
                return
            if not proc.alive():
                raise RuntimeError(f"{proc.name} exited ({proc.popen.returncode}):\n{proc.tail()}")
            time.sleep(0.05)
        raise RuntimeError(f"{proc.name}: no '{text}' within {timeout} s:\n{proc.tail()}")

    def start(self) -> None:
        """Start simulators, bridges and agent together; returns when all are up and every
        device has answered the agent, and fails if that took longer than the lead-in."""
        self.anchor = time.time() + self.lead_s
        anchor_iso = datetime.fromtimestamp(self.anchor, timezone.utc).isoformat()
        sim = self._spawn("simulate", "simulate", str(self.scenario_path), "--modbus-port", str(self.modbus_port),
                          "--opcua-port", str(self.opcua_port), "--anchor", anchor_iso)
        bridges = [self.start_bridge(name) for name in self.stores]
        agent = self.start_agent()
        self._wait_log(sim, "simulators ready", 30)
        for bridge in bridges:
            self._wait_log(bridge, "bridge running", 30)
        self._wait_log(agent, "all devices answering", 60)
        first_job = min(j["start_s"] for m in self.scenario["machines"] for j in m.get("jobs", []))
        if time.time() > self.anchor + first_job / self.speed:
            raise RuntimeError(f"start-up took longer than the scenario's lead-in ({self.lead_s:g} s + first job "
                               f"at {first_job:g} s): the agent would join a job already running")

    def start_bridge(self, name: str) -> Proc:
        """Start (or start again, after a stop or kill) the bridge to store ``name``."""
        # One MQTT session per bridge, and each confirms under its own name.
        store = {"client_id": f"energy-bridge-{name}", "confirm_as": name, **self.stores[name]}
        path = self._write(f"bridge-{name}.yaml", self.agent_config(store))
        env = {store["token_env"]: "demo-token"} if store.get("token_env") else None
        return self._spawn(f"bridge-{name}", "--log-level", "INFO", "bridge", "-c", str(path), env=env)

    def start_agent(self) -> Proc:
        """Start (or start again, on the same ledger) the agent."""
        agent_cfg = self._write("plant.yaml", self.agent_config(next(iter(self.stores.values()), None)))
        return self._spawn("agent", "--log-level", "INFO", "run", "-c", str(agent_cfg))

    def proc(self, name: str) -> Proc:
        """The latest process started under ``name``."""
        return next(p for p in reversed(self.procs) if p.name == name)

    def kill(self, name: str) -> None:
        """SIGKILL a process by its id: a crash, no clean shutdown."""
        proc = self.proc(name)
        proc.stopped = True
        signal_group(proc.popen.pid, signal.SIGKILL)
        proc.popen.wait(10)

    def wait_log(self, name: str, text: str, timeout: float) -> None:
        self._wait_log(self.proc(name), text, timeout)

    def profiles(self) -> dict[str, str]:
        """Machine id -> the profile name of its meter (for counter resolution)."""
        cfg = self.agent_config()
        meters = {m["id"]: m["profile"] for m in cfg["meters"]}
        return {m["id"]: meters[m["meter"]] for m in cfg["machines"]}

    @property
    def end_wall(self) -> float:
        """Real wall time at which the scenario is over."""
        return self.anchor + float(self.scenario["duration_s"]) / self.speed

    def check_alive(self) -> None:
        for p in self.procs:
            if p.stopped:
                continue  # stopped or killed on purpose
            if not p.alive():
                raise RuntimeError(f"{p.name} exited ({p.popen.returncode}):\n{p.tail()}")

    def wait_until(self, cond, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while True:
            self.check_alive()
            value = cond()
            if value:
                return value
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
            time.sleep(0.25)

    def truth(self) -> list[dict]:
        out = subprocess.run([sys.executable, "-m", "energy_agent", "simulate", str(self.scenario_path), "--truth"],
                             capture_output=True, text=True, check=True, cwd=self.workdir)
        import json

        return json.loads(out.stdout)

    def stop(self) -> dict[str, int | None]:
        """Stop every process started (latest first); the exit code of each name's latest run."""
        codes: dict[str, int | None] = {}
        for p in reversed(self.procs):
            on_purpose = p.stopped
            code = p.stop()
            if not on_purpose:
                codes[p.name] = code
        return codes

    def __enter__(self) -> PlantRun:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
