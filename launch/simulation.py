"""Flower's simulation engine, in-process: the ServerApp in a thread, one Ray actor per busy virtual node.

``fedistill run`` uses this instead of ``flwr run``: no SuperLink, no FAB, and the
validated experiment object goes straight to the ServerApp. Flower's
``run_simulation`` hands the ServerApp an *empty* run config, so the ServerApp
is built bound to the experiment (``server.app.make_server_app``); clients
read the experiment from each train message (``wire.messages``), never
from their own run config.

Virtual node ``i`` gets ``partition-id = i`` and ``num-partitions`` = the node
count, which is why the node count must equal ``partition.num_clients``.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedistill.config import ExperimentConfig

if TYPE_CHECKING:
    from flwr.serverapp import ServerApp
    from rich.console import Console

OFFLINE_ENV = {
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_DEDUP_LOGS": "1",
}
"""Environment for runs without network: no update check, telemetry or dependency install, no Ray usage stats.

Applied with ``setdefault``, so a value the user exported wins.
"""

MAX_ACTORS_PER_GPU = 4
"""Concurrent client actors sharing one GPU; DM/DC on small ConvNets leave it mostly idle with fewer."""


def configure_offline_env() -> None:
    """Set ``OFFLINE_ENV`` (without overriding the user's values) and quieten Ray's start-up tips.

    Ray workers inherit the driver's environment, so this also reaches the actors.
    Flower reads ``FLWR_TELEMETRY_ENABLED`` once at import; if flwr was imported
    before this ran, its module flag is updated to match.
    """
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
    import sys

    telemetry = sys.modules.get("flwr.supercore.telemetry")
    if telemetry is not None:
        telemetry.FLWR_TELEMETRY_ENABLED = os.environ["FLWR_TELEMETRY_ENABLED"]  # type: ignore[attr-defined]
    # Ray's advice about a future default of RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO: the current
    # behaviour (actors without a GPU share see none) is the one we want, so only the tip goes.
    warnings.filterwarnings("ignore", message=r"Tip: In future versions of Ray", category=FutureWarning)


def client_resources(config: ExperimentConfig, num_supernodes: int) -> dict[str, float]:
    """One CPU per client actor (torch then runs one thread in it) and a GPU share when CUDA is usable.

    Ray runs at most ``cpus / num_cpus`` and ``gpus / num_gpus`` actors at
    once, so the GPU share sets how many clients distil on a GPU together.
    """
    import torch

    num_gpus = 0.0
    if config.device != "cpu" and torch.cuda.is_available():
        sharing = max(1, min(num_supernodes, os.cpu_count() or 1, MAX_ACTORS_PER_GPU))
        num_gpus = 1.0 / sharing
    return {"num_cpus": 1, "num_gpus": num_gpus}


def backend_config(config: ExperimentConfig, num_supernodes: int, verbose: bool = False) -> dict[str, Any]:
    """Flower's Ray backend config: client resources, and Ray's own logging down to errors unless ``verbose``."""
    return {
        "client_resources": client_resources(config, num_supernodes),
        "init_args": {
            "logging_level": "INFO" if verbose else "ERROR",
            "log_to_driver": verbose,
            "include_dashboard": False,
        },
    }


def simulate(
    config: ExperimentConfig,
    num_supernodes: int | None = None,
    server_app: ServerApp | None = None,
    *,
    verbose: bool = False,
) -> None:
    """Run ``config`` through Flower's simulation engine (Ray backend) in this process.

    ``server_app`` defaults to ``server.app.make_server_app(config)``; pass one
    to observe the run (e.g. with an ``on_done`` callback). ``num_supernodes``
    defaults to ``partition.num_clients`` and must equal it. An exception in the
    ServerApp (e.g. too few valid client sets) is re-raised here. With
    ``verbose``, Ray's and the client actors' output reach the console.
    """
    nodes = config.partition.num_clients if num_supernodes is None else num_supernodes
    if nodes != config.partition.num_clients:
        raise ValueError(
            f"num_supernodes = {nodes} but partition.num_clients = {config.partition.num_clients}: "
            "each simulated node holds partition i of num_supernodes, so set partition.num_clients instead"
        )
    configure_offline_env()
    from flwr.simulation import run_simulation

    from clients.app import app as client_app

    if server_app is None:
        from server.app import make_server_app

        server_app = make_server_app(config)
    flwr_logger = logging.getLogger("flwr")
    level = flwr_logger.level
    if not verbose:
        # run_simulation announces its own deprecation in favour of `flwr run` at WARNING;
        # for `fedistill run` users that is noise, errors still show.
        flwr_logger.setLevel(logging.ERROR)
    try:
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=nodes,
            backend_name="ray",
            backend_config=backend_config(config, nodes, verbose),  # type: ignore[arg-type]
            verbose_logging=verbose,
        )
    finally:
        flwr_logger.setLevel(level)


def simulate_run(
    config: ExperimentConfig, console: Console | None = None, *, verbose: bool = False, resume: Path | None = None
) -> Path:
    """Simulate ``config`` (or continue the run in ``resume``) and return its run directory.

    Ctrl-C (KeyboardInterrupt) asks the ServerApp to stop at its next wait and
    waits until it has written its run directory (the checkpoint of the last
    complete round stays as it was), then re-raises as ``SimulationInterrupted``
    naming the directory, which ``fedistill run --resume`` continues.
    """
    from flwr.serverapp import Grid, ServerApp

    from server.app import run_protocol
    from server.rounds import RunControl

    run_dirs: list[Path] = []
    started: list[Path] = []
    stop, finished = threading.Event(), threading.Event()
    control = RunControl(resume=resume, stop=stop, on_start=started.append)
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Any) -> None:
        try:
            run_dirs.append(run_protocol(grid, config, console, control))
        finally:
            finished.set()

    interrupted = threading.Event()

    def on_sigint(signum: int, frame: Any) -> None:
        # asyncio inside the simulation engine can swallow a KeyboardInterrupt; a flag cannot be lost.
        if interrupted.is_set():
            raise KeyboardInterrupt  # a second Ctrl-C: stop waiting
        interrupted.set()
        stop.set()

    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGINT, on_sigint) if in_main_thread else None
    try:
        simulate(config, server_app=server_app, verbose=verbose)
    except KeyboardInterrupt:
        stop.set()
        finished.wait()
        raise SimulationInterrupted(started[0] if started else None) from None
    except Exception:
        if not interrupted.is_set():
            raise
        # The ServerApp ended on the stop request by raising; Flower passes that on.
    finally:
        if in_main_thread:
            signal.signal(signal.SIGINT, previous)
    if interrupted.is_set():
        finished.wait()
        raise SimulationInterrupted(started[0] if started else None)
    if not run_dirs:
        raise RuntimeError("the simulation ended before the ServerApp finished its protocol; no run directory")
    return run_dirs[0]


class SimulationInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``simulate_run``; ``run_dir`` (None if none was created yet) is resumable."""

    def __init__(self, run_dir: Path | None) -> None:
        super().__init__(str(run_dir))
        self.run_dir = run_dir
