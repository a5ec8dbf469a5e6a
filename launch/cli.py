"""The ``fedistill`` command line.

Every command flag is sugar for a dotted config key (``--ipc 50`` is
``--set distill.ipc=50``), so a run is always described by one validated
``ExperimentConfig`` that lands in the run directory. Mistakes a user can fix
(bad config, missing data) end in one red ``error: ...`` line and exit code 2;
tracebacks are left for bugs. Torch and the library are imported inside the
commands so that ``fedistill --help`` answers at once.
"""

from __future__ import annotations

import datetime as dt
import os
import tomllib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    name="fedistill",
    help="Federated and privacy-aware dataset distillation.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Download and inspect datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

USER_ERROR_EXIT = 2
INTERRUPTED_EXIT = 130
"""What a shell reports for a command ended by Ctrl-C (128 + SIGINT)."""
DP_VIOLATION_EXIT = 3


@contextmanager
def _user_errors() -> Iterator[None]:
    """Turn configuration, data and privacy-budget problems into one red line on stderr and exit code 2."""
    from fedistill.config import ConfigError
    from fedistill.data import DataError
    from fedistill.privacy import BudgetTooSmall

    try:
        yield
    except (ConfigError, DataError, BudgetTooSmall) as error:
        err_console.print(f"error: {error}", style="red", markup=False, highlight=False)
        raise typer.Exit(USER_ERROR_EXIT) from None


def parse_value(raw: str) -> Any:
    """Read an override value as a TOML scalar or array (``3``, ``0.5``, ``true``, ``[1, 2]``), else as a string.

    Dates and times stay strings: no config key holds one, and ``2024-01-01``
    meant as a name must not turn into a date.
    """
    try:
        value = tomllib.loads(f"value = {raw}")["value"]
    except tomllib.TOMLDecodeError:
        return raw
    if isinstance(value, dt.date | dt.time):
        return raw
    return value


def parse_sets(entries: list[str]) -> dict[str, Any]:
    """``["distill.ipc=50", ...]`` -> ``{"distill.ipc": 50, ...}``, rejecting entries without a key."""
    from fedistill.config import ConfigError

    overrides: dict[str, Any] = {}
    for entry in entries:
        key, sep, raw = entry.partition("=")
        key = key.strip()
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"--set {entry!r}: expected key.path=value, e.g. distill.ipc=10")
        overrides[key] = parse_value(raw.strip())
    return overrides


@app.command()
def distill(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML file; defaults apply without one.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set distill.lr_images=0.5 (repeatable)."),
    ] = None,
    method: Annotated[str | None, typer.Option(help="distill.method")] = None,
    ipc: Annotated[int | None, typer.Option(help="distill.ipc: synthetic images per class.")] = None,
    iterations: Annotated[int | None, typer.Option(help="distill.iterations")] = None,
    dataset: Annotated[str | None, typer.Option(help="data.name")] = None,
    eval_epochs: Annotated[int | None, typer.Option(help="eval.epochs")] = None,
    num_nets: Annotated[int | None, typer.Option(help="eval.num_nets: networks trained to evaluate the set.")] = None,
    device: Annotated[str | None, typer.Option(help="device: auto, cpu or cuda.")] = None,
    output: Annotated[Path | None, typer.Option(help="output_dir: where the run directory is created.")] = None,
) -> None:
    """Distil a dataset centrally, evaluate the set and write a run directory.

    CONFIG is an experiment TOML file (without one the defaults apply). --set
    entries apply over it first, then the named flags.
    """
    with _user_errors():
        from fedistill.central import run_central
        from fedistill.config import apply_overrides, load_config, parse_config

        overrides = parse_sets(set_ or [])
        flags = {
            "distill.method": method,
            "distill.ipc": ipc,
            "distill.iterations": iterations,
            "data.name": dataset,
            "eval.epochs": eval_epochs,
            "eval.num_nets": num_nets,
            "device": device,
            "output_dir": None if output is None else str(output),
        }
        overrides.update({key: value for key, value in flags.items() if value is not None})
        cfg = load_config(config, overrides) if config is not None else parse_config(apply_overrides({}, overrides))
        run_central(cfg, console)


@app.command()
def run(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML file (see configs/).")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set partition.alpha=0.1 (repeatable)."),
    ] = None,
    against: Annotated[
        list[str] | None,
        typer.Option(help="Also run this baseline (fedavg, fedprox) on the same partitions at the same upload."),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue this stopped run directory after its last complete round (instead of CONFIG)."),
    ] = None,
) -> None:
    """Run a federated experiment in Flower's simulation engine and write its run directory.

    The protocol (one-shot, multi-round, fedavg, fedprox) comes from
    federation.protocol; partition.num_clients simulated nodes take part.
    With eval.references (the default) a distillation run is followed by its
    references, the same run at zero iterations and with random real images,
    and the gain in points is printed and saved as references.json. With
    --against, each named baseline runs next, for as many rounds as fit
    in the first run's upload bytes, and a comparison table is printed and
    saved as comparison.json in the first run's directory.

    Every round is checkpointed. --resume RUN_DIR continues a run that was
    stopped (Ctrl-C, a crash, too few clients) from its config.toml and
    checkpoint; with the same config it ends exactly as the uninterrupted run
    would have. Only operational keys (device, timeouts, quorum, min_clients,
    max_reply_mb) may be changed with --set when resuming.
    """
    with _user_errors():
        from fedistill.budget import check_memory
        from fedistill.checkpoint import CheckpointError
        from fedistill.config import OPERATIONAL_KEYS, ConfigError, load_config
        from fedistill.data import dataset_info
        from fedistill.privacy_plan import plan_privacy
        from fedistill.runs import write_json
        from launch.simulation import SimulationInterrupted, simulate_run
        from server.compare import (
            BASELINES,
            baseline_config,
            comparison_rows,
            comparison_table,
            read_metrics,
            reference_configs,
            reference_rows,
            reference_table,
        )
        from server.rounds import NotEnoughClients

        overrides = parse_sets(set_ or [])
        if (config is None) == (resume is None):
            raise ConfigError("run: give either an experiment file (CONFIG) or --resume RUN_DIR, not both")
        if resume is not None:
            if against:
                raise ConfigError("--against: not available with --resume; run the baselines on their own")
            fixed = [key for key in overrides if key not in OPERATIONAL_KEYS]
            if fixed:
                raise ConfigError(
                    f"--set {fixed[0]}: cannot change when resuming (the run must compute what it started); "
                    f"allowed: {', '.join(OPERATIONAL_KEYS)}"
                )
            if not (resume / "config.toml").is_file():
                raise ConfigError(f"--resume {resume}: not a run directory (no config.toml)")
            cfg = load_config(resume / "config.toml", overrides)
        else:
            assert config is not None
            cfg = load_config(config, overrides)
        unknown = [name for name in against or [] if name not in BASELINES]
        if unknown:
            raise ConfigError(f"--against: unknown baseline {unknown[0]!r}; allowed: {', '.join(BASELINES)}")
        if cfg.privacy.enabled:
            plan_privacy(cfg)  # a target no noise can meet ends here, before any node is asked
        info = dataset_info(cfg.data.name, cfg.data.path)
        check_memory(cfg, info, clients_here=min(cfg.partition.num_clients, os.cpu_count() or 1))
        try:
            run_dirs = [simulate_run(cfg, console, resume=resume)]
        except SimulationInterrupted as stopped:
            where = stopped.run_dir
            hint = f"; continue with: fedistill run --resume {where}" if where is not None else ""
            err_console.print(f"interrupted{hint}", style="red", markup=False, highlight=False)
            raise typer.Exit(INTERRUPTED_EXIT) from None
        except CheckpointError as error:
            raise ConfigError(str(error)) from None
        except NotEnoughClients as error:
            err_console.print(f"error: {error}", style="red", markup=False, highlight=False)
            raise typer.Exit(1) from None
        if cfg.eval.references:
            references = {name: simulate_run(reference, console)
                          for name, reference in reference_configs(cfg).items()}
            if references:
                summary = reference_rows(run_dirs[0], references, private=cfg.privacy.enabled)
                console.print(reference_table(summary))
                console.print(summary["describe"], markup=False, highlight=False)
                write_json(run_dirs[0] / "references.json", summary)
        upload = read_metrics(run_dirs[0])["upload_bytes"]
        for name in against or []:
            run_dirs.append(simulate_run(baseline_config(cfg, name, upload), console))
        if len(run_dirs) > 1:
            rows = comparison_rows(run_dirs)
            console.print(comparison_table(rows))
            write_json(run_dirs[0] / "comparison.json", rows)
        if cfg.attack.audit:
            from attacks.audit import run_audit
            from clients.app import canary_release

            run_audit(run_dirs[0], console=console, canary_release=canary_release)


@app.command()
def audit(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (from fedistill run or flwr run).")],
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override an attack key, e.g. --set attack.evasion.num_images=200 (repeatable)."),
    ] = None,
) -> None:
    """Run the configured attacks on a finished run: evasion, backdoor CTA/ASR, membership inference, DP bound.

    Reads the run's [attack] section (with --set attack.* overrides) and writes
    audit.json and audit/*.png into RUN_DIR; see docs/attacks.md. With
    attack.canary.count > 0 it also re-runs one client's release with canaries
    (the one-run canary audit). Exits with code 3 when a membership attack or
    the canary audit beats the run's differential-privacy bound.
    """
    with _user_errors():
        from attacks.audit import dp_violated, run_audit
        from clients.app import canary_release

        result = run_audit(run_dir, parse_sets(set_ or []), console=console, canary_release=canary_release)
    if dp_violated(result):
        raise typer.Exit(DP_VIOLATION_EXIT)


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="Dataset: fashion-mnist, mnist or cifar10.")],
    dest: Annotated[Path | None, typer.Option(help="Directory to download into (default: the user cache).")] = None,
) -> None:
    """Download a dataset's files, checking their digests; files already present are kept."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TransferSpeedColumn

    with _user_errors():
        from fedistill.data import fetch_dataset

        columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(f"fetch {name}", total=None)
            directory = fetch_dataset(
                name, dest, progress=lambda done, total: bar.update(task, completed=done, total=total)
            )
        console.print(f"{name}: files in {directory}", markup=False, highlight=False)


@data_app.command("info")
def data_info(
    name: Annotated[str, typer.Argument(help="Dataset: fashion-mnist, mnist, cifar10, digits or npz.")],
    root: Annotated[Path | None, typer.Option(help="Directory to search first for the dataset's files.")] = None,
    path: Annotated[Path | None, typer.Option(help="The .npz file (dataset npz) or the exact directory.")] = None,
) -> None:
    """Print image shape, split sizes and per-class counts of a dataset's train and test splits."""
    with _user_errors():
        from fedistill.data import load_dataset

        train = load_dataset(name, "train", root=root, path=path)
        test = load_dataset(name, "test", root=root, path=path)
        info = train.info
        train_counts, test_counts = train.class_counts(), test.class_counts()
        table = Table(title=f"{info.name}: {len(train)} train / {len(test)} test images, shape {info.shape}")
        table.add_column("class", justify="right")
        table.add_column("name")
        table.add_column("train", justify="right")
        table.add_column("test", justify="right")
        for index, class_name in enumerate(info.class_names):
            table.add_row(str(index), class_name, str(train_counts[index]), str(test_counts[index]))
        table.add_row("", "total", str(len(train)), str(len(test)), style="bold")
        console.print(table)


# Beyond this many clients the terminal table is cut short; the JSON file has them all.
_PARTITION_TABLE_ROWS = 200


@data_app.command("partitions")
def data_partitions(
    config: Annotated[Path | None, typer.Argument(help="Experiment TOML file; defaults apply without one.")] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a config key, e.g. --set partition.alpha=0.1 (repeatable)."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="Directory for partition_counts.png and .json (default: current directory).")
    ] = None,
) -> None:
    """Split the training set of data.* among clients as partition.* says and show images per client and class.

    The partition is the one a federated run with the same config and seed
    uses. Writes a heatmap (partition_counts.png) and the counts matrix with
    the scheme and its parameters (partition_counts.json) to --output.
    """
    with _user_errors():

        from fedistill.config import ConfigError, apply_overrides, load_config, parse_config
        from fedistill.data import PartitionError, load_dataset, partition_dataset, plot_partition_counts
        from fedistill.runs import write_json

        overrides = parse_sets(set_ or [])
        cfg = load_config(config, overrides) if config is not None else parse_config(apply_overrides({}, overrides))
        train = cfg.data.private_train(load_dataset(cfg.data.name, "train", root=cfg.data.root, path=cfg.data.path))
        info, part = train.info, cfg.partition
        try:
            partitioning = partition_dataset(
                train.labels,
                info.num_classes,
                part.scheme,
                part.num_clients,
                alpha=part.alpha,
                classes_per_client=part.classes_per_client,
                shards_per_client=part.shards_per_client,
                min_partition_size=part.min_partition_size,
                seed=cfg.seed,
            )
        except PartitionError as error:
            raise ConfigError(str(error)) from None
        counts = partitioning.counts(train.labels)

        # No vertical rules and one space between columns: ten classes of
        # four-digit counts then fit an 80-column terminal without "…".
        table = Table(
            title=f"{info.name}: {len(train)} training images over {part.num_clients} clients ({part.scheme})",
            caption="classes: " + ", ".join(f"{index} {name}" for index, name in enumerate(info.class_names)),
            box=box.SIMPLE_HEAD,
            padding=(0, 0, 0, 1),
        )
        table.add_column("client", justify="right", overflow="fold")
        for index in range(info.num_classes):
            table.add_column(str(index), justify="right", overflow="fold")
        table.add_column("total", justify="right", style="bold", overflow="fold")
        for client, row in enumerate(counts[:_PARTITION_TABLE_ROWS]):
            table.add_row(str(client), *(str(int(value)) for value in row), str(int(row.sum())))
        if part.num_clients > _PARTITION_TABLE_ROWS:
            table.add_row(f"... {part.num_clients - _PARTITION_TABLE_ROWS} more clients (see the JSON file)")
        table.add_row("total", *(str(int(value)) for value in counts.sum(axis=0)), str(int(counts.sum())), style="bold")
        console.print(table)
        if int(counts.sum()) != len(train):
            console.print(
                f"{len(train) - int(counts.sum())} of {len(train)} images are held by no client ({part.scheme})",
                markup=False,
                highlight=False,
            )

        directory = output if output is not None else Path.cwd()
        try:
            directory.mkdir(parents=True, exist_ok=True)
            png = plot_partition_counts(counts, info.class_names, directory / "partition_counts.png")
            record = {
                "dataset": info.name,
                "train_images": len(train),
                "seed": cfg.seed,
                "partition": part.model_dump(mode="json"),
                "class_names": list(info.class_names),
                "counts": counts.tolist(),
            }
            json_path = write_json(directory / "partition_counts.json", record)
        except OSError as error:
            raise ConfigError(f"--output {directory}: {error.strerror or error}") from None
        console.print(f"wrote {png} and {json_path}", markup=False, highlight=False)
