"""The Flower ServerApp: validates the run config, then runs the federation through the Grid."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedistill.config import from_run_config
from server.federation import run_one_shot

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the run config is the flat form of an experiment file."""
    run_one_shot(grid, from_run_config(context.run_config))
