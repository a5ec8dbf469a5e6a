"""Memory estimates of a run, checked before any work so that a config that cannot fit is refused, not crashed on.

A few config values multiply into memory: ``distill.ipc`` x classes x image size
is one client's set, times ``partition.num_clients`` at the server, which holds
every reply, its validated copy, the copy kept for resuming and the aggregate;
``model.width``/``depth`` and batch sizes set the activations of training. The
estimate counts those terms (model parameters and per-image activations come
from building the network on PyTorch's ``meta`` device, which allocates
nothing) and ignores constant overheads (the Python process, libraries, the
dataset itself). It is an order-of-magnitude guard against a typo such as
``ipc = 100000``, not a precise prediction.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
from torch import nn

from fedistill.config import ConfigError, ExperimentConfig
from fedistill.data import DatasetInfo
from fedistill.models import build_model

FLOAT_BYTES = 4
SERVER_SET_COPIES = 4
"""Copies of every client set a distillation server holds at once: reply, validated copy, kept copy, aggregate."""
REPLY_COPIES = 2
"""Copies of every model a FedAvg/FedProx server holds at once: reply and its decoded arrays."""
TRAINING_FACTOR = 2
"""Activations are kept for the backward pass and matched by gradients of the same size."""
REAL_CHUNK = 64
"""Real images per chunk in the distillers' no-grad passes."""


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated peak bytes of the server and of one client, with the terms behind them."""

    server_bytes: int
    client_bytes: int
    terms: dict[str, int] = field(default_factory=dict)
    explanation: dict[str, str] = field(default_factory=dict)


def network_footprint(config: ExperimentConfig, info: DatasetInfo) -> tuple[int, int]:
    """(parameter count, activation floats per image) of the configured network, measured on the meta device.

    A network that cannot run on the dataset's images at all (e.g. so deep
    that the feature maps shrink to one pixel before a norm layer) is a
    ConfigError too, found here before any work.
    """
    with torch.device("meta"):
        model = build_model(config.model.spec(), info.shape, info.num_classes)
    params = sum(parameter.numel() for parameter in model.parameters())
    activations = 0

    def count(module: nn.Module, inputs: object, output: torch.Tensor) -> None:
        nonlocal activations
        if isinstance(output, torch.Tensor) and not list(module.children()):
            activations += output[0].numel()

    handles = [module.register_forward_hook(count) for module in model.modules()]
    try:
        with torch.no_grad():
            model(torch.empty((1, *info.shape), device="meta"))
    except (ValueError, RuntimeError) as error:
        model_config = config.model
        raise ConfigError(
            f"model: a {model_config.arch} of depth {model_config.depth} cannot run on "
            f"{info.channels}x{info.height}x{info.width} images ({str(error).splitlines()[0]}); lower model.depth"
        ) from None
    finally:
        for handle in handles:
            handle.remove()
    return params, activations


def estimate_memory(config: ExperimentConfig, info: DatasetInfo) -> MemoryEstimate:
    """Peak memory of the server and of one client for ``config`` on a dataset shaped like ``info``."""
    federation, distill = config.federation, config.distill
    classes = info.num_classes
    image_bytes = info.channels * info.height * info.width * FLOAT_BYTES
    set_images = distill.ipc * classes
    set_bytes = set_images * (image_bytes + 8 + classes * FLOAT_BYTES) + classes * 8
    params, activations = network_footprint(config, info)
    model_bytes = params * FLOAT_BYTES
    act_bytes = activations * FLOAT_BYTES
    clients = config.partition.num_clients
    training = 4 * model_bytes + config.eval.batch_size * act_bytes * TRAINING_FACTOR
    terms = {"model": model_bytes, "set": set_bytes, "training": training}
    explanation = {
        "model": f"{params:,} parameters",
        "set": f"IPC {distill.ipc} x {classes} classes of {info.channels}x{info.height}x{info.width} float32",
        "training": f"eval.batch_size {config.eval.batch_size} x {activations:,} activations per image",
    }
    if federation.protocol in ("fedavg", "fedprox"):
        terms["replies"] = clients * model_bytes * REPLY_COPIES
        explanation["replies"] = f"{clients} clients x {model_bytes:,} bytes of model, {REPLY_COPIES} copies"
        local = 4 * model_bytes + federation.local_batch * act_bytes * TRAINING_FACTOR
        return MemoryEstimate(terms["replies"] + training, local, terms, explanation)
    terms["replies"] = clients * set_bytes * SERVER_SET_COPIES
    explanation["replies"] = (
        f"{clients} clients x {set_bytes:,} bytes of set ({explanation['set']}), {SERVER_SET_COPIES} copies"
    )
    distilling = set_bytes * 3 + (set_images + REAL_CHUNK) * act_bytes * TRAINING_FACTOR + 4 * model_bytes
    server = terms["replies"] + training
    if federation.aggregation == "redistill":
        server += clients * set_images * act_bytes * TRAINING_FACTOR
    return MemoryEstimate(server, distilling, terms, explanation)


def total_memory() -> int:
    """Physical memory of this machine in bytes (0 if the platform does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def check_memory(
    config: ExperimentConfig, info: DatasetInfo, clients_here: int = 0, available: int | None = None
) -> MemoryEstimate:
    """Refuse (ConfigError, with the estimate) a config that cannot fit this machine or its own reply limit.

    ``clients_here`` is how many clients run on this machine at once (the
    in-process simulation runs one per CPU); the server always runs here.
    """
    estimate = estimate_memory(config, info)
    limit = int(config.federation.max_reply_mb * 2**20)
    if config.federation.protocol in ("one-shot", "multi-round") and estimate.terms["set"] > limit:
        raise ConfigError(
            f"distill.ipc: one client's set would be {_size(estimate.terms['set'])} ({estimate.explanation['set']}), "
            f"above federation.max_reply_mb = {config.federation.max_reply_mb:g}, so every reply would be rejected; "
            "lower distill.ipc or raise federation.max_reply_mb"
        )
    available = total_memory() if available is None else available
    need = estimate.server_bytes + clients_here * estimate.client_bytes
    if available and need > available:
        largest = max(estimate.terms, key=lambda key: estimate.terms[key])
        here = f" and {clients_here} clients at {_size(estimate.client_bytes)} each" if clients_here else ""
        raise ConfigError(
            f"memory: this run needs about {_size(need)} (server {_size(estimate.server_bytes)}{here}) but this machine "
            f"has {_size(available)}; the largest term is {largest}: {_size(estimate.terms[largest])} "
            f"({estimate.explanation[largest]}); lower distill.ipc, partition.num_clients, model.width or the batch sizes"
        )
    return estimate


def _size(count: int) -> str:
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
        value /= 1024
    raise AssertionError("unreachable")
