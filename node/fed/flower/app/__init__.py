"""Mirador as a Flower app (flwr 1.42.0, deployment engine): the member trainer as a ClientApp, the aggregator as
a ServerApp. `flwr run` bundles this folder (its `pyproject.toml` names the components and the run-config
defaults); the SuperLink and SuperNodes import the code from the installed `mirador` package, so every machine
runs the same trainer and privacy code as the P2P path. See `node.fed.flower.engine` for starting the processes.
"""

from pathlib import Path

APP_DIR = Path(__file__).resolve().parent  # what `flwr run` is given
