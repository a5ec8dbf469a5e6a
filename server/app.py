"""The Flower ServerApp: validates the experiment, then runs its protocol through the Grid.

``app`` is what ``flwr run`` loads; it reads the experiment from the run config.
``make_server_app(config)`` binds an already validated experiment instead, for
the in-process simulation (``fedistill run``), whose run config is empty.

``flwr run`` can also continue a stopped run: ``--run-config "resume='RUN_DIR'"``
(an absolute path on the server's machine) makes the ServerApp read the
experiment from ``RUN_DIR/config.toml`` and go on after its checkpoint; the
other run-config keys are then ignored.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from rich.console import Console

from fedistill.config import ExperimentConfig, from_run_config, load_config
from server.baselines import run_baseline
from server.distillation import run_distillation
from server.rounds import GridLike, RunControl

APP_KEYS = {"resume": ""}
"""Run-config keys of the app itself, beside the experiment's (``[tool.flwr.app.config]`` lists them too)."""


def run_protocol(
    grid: GridLike, config: ExperimentConfig, console: Console | None = None, control: RunControl | None = None
) -> Path:
    """Run (or, with ``control.resume``, continue) the experiment's federation protocol; returns its run directory."""
    if config.federation.protocol in ("fedavg", "fedprox"):
        return run_baseline(grid, config, console, control)
    return run_distillation(grid, config, console, control)


def make_server_app(
    config: ExperimentConfig,
    console: Console | None = None,
    on_done: Callable[[Path], None] | None = None,
    control: RunControl | None = None,
) -> ServerApp:
    """A ServerApp bound to ``config``; ``on_done(run_dir)`` is called when the protocol finishes."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_dir = run_protocol(grid, config, console, control)
        if on_done is not None:
            on_done(run_dir)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point of ``flwr run``: the run config is the flat form of an experiment file (plus ``APP_KEYS``)."""
    values = dict(context.run_config)
    resume = str(values.pop("resume", APP_KEYS["resume"]))
    if resume:
        config = load_config(Path(resume) / "config.toml")
        run_dir = run_protocol(grid, config, control=RunControl(resume=Path(resume)))
    else:
        config = from_run_config(values)
        run_dir = run_protocol(grid, config)
    if config.attack.audit:
        from attacks.audit import run_audit

        run_audit(run_dir)
