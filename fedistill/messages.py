"""What travels between the ServerApp and the ClientApps, in one place.

The server is the single source of the experiment: every train message carries
the validated experiment as flat ``section.key`` entries of its ``config``
record, beside the control keys below. Clients therefore work the same under
``flwr run`` (where the run config reaches the server), under the in-process
simulation (whose run config is empty) and on the Deployment Engine.

Train messages ask for one of two tasks:

- ``distill``: reply with the node's synthetic set (``set`` arrays) and ``metrics``.
  An optional ``global`` array record holds the global model's weights
  (multi-round protocols match under it).
- ``fit``: the FedAvg/FedProx baselines; ``arrays`` holds the global weights,
  the reply holds the locally trained weights (``arrays``) and ``metrics`` with
  ``num-examples``. Flower's strategies add ``proximal-mu`` for FedProx.

In a private run every reply also holds a ``privacy`` ConfigRecord, and a
node whose budget would not cover the round replies with only ``metrics``
(``refused = 1``) and that record (``clients.private``, ``server.privacy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord

from fedistill.config import ExperimentConfig, from_run_config, to_run_config

TASK = "task"
ROUND = "server-round"
PROXIMAL_MU = "proximal-mu"
TASKS = ("distill", "fit")

PRIVACY_RECORD = "privacy"
"""Reply ConfigRecord of a private run: epsilon so far, delta, accountant, adjacency, the node's ledger, a refusal."""
REFUSED = "refused"
"""Reply metric: 1 when the node refused the round because it would exceed its privacy budget (no result then)."""
CONTROL_KEYS = (TASK, ROUND, PROXIMAL_MU)


def experiment_record(config: ExperimentConfig, task: str, server_round: int | None = None) -> ConfigRecord:
    """The ``config`` record of a train message: the experiment plus the task (and round, if the caller sets it)."""
    if task not in TASKS:
        raise ValueError(f"task: unknown value {task!r}; allowed: {', '.join(TASKS)}")
    record: dict[str, Any] = {**to_run_config(config), TASK: task}
    if server_round is not None:
        record[ROUND] = server_round
    return ConfigRecord(record)


def read_experiment(record: Mapping[str, Any]) -> tuple[ExperimentConfig, dict[str, Any]]:
    """Split a message's ``config`` record into the experiment and the control entries; validates both."""
    control = {key: record[key] for key in CONTROL_KEYS if key in record}
    task = control.get(TASK)
    if task not in TASKS:
        raise ValueError(f"message config '{TASK}': unknown value {task!r}; allowed: {', '.join(TASKS)}")
    experiment = {key: value for key, value in record.items() if key not in CONTROL_KEYS}
    return from_run_config(experiment), control


def state_to_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A model's ``state_dict`` as an ArrayRecord (host copies, contiguous)."""
    return ArrayRecord({key: Array(np.ascontiguousarray(value.detach().cpu().numpy())) for key, value in state.items()})


def record_to_state(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The inverse of ``state_to_record``: tensors on the host, ready for ``load_state_dict``."""
    return {key: torch.from_numpy(np.array(array.numpy())) for key, array in record.items()}
