"""Example configurations, shipped as package data (``energy_agent.examples``):
``plant.example.yaml`` (a commented plant) and ``demo.yaml`` (what ``energy-agent demo`` runs)."""

from pathlib import Path

FOLDER = Path(__file__).resolve().parent
DEMO = FOLDER / "demo.yaml"
PLANT_EXAMPLE = FOLDER / "plant.example.yaml"
