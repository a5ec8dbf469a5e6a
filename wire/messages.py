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

Every reply's metrics carry the node's ``partition-id``: node ids change when a
node restarts or a run resumes, partitions do not, so the server keys sets,
aggregation order and kept client state by partition.

Query messages (``identify``) ask a node which partition it holds; the server
sends one to a node it has not seen before when it has state to give back
(``restore.*`` records, see below).

Client state across restarts: a node keeps what it needs between rounds in
Flower's ``context.state``, which lives as long as the SuperNode process and
the run. The server keeps a copy, per partition, of what the node would need
to continue (its last accepted set, and any ``state.<key>`` records the reply
carried, see ``clients.app.KEPT_BY_SERVER``) in its checkpoint, and attaches
it as ``restore.<key>`` records to the train message of a node that starts
without it (a restarted node, or every node of a resumed run). The node copies
each one into ``context.state[<key>]`` unless it already holds that key.

In a private run every reply also holds a ``privacy`` ConfigRecord, and a
node whose budget would not cover the round replies with only ``metrics``
(``refused = 1``) and that record (``clients.private``, ``server.privacy``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

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

PARTITION_ID = "partition-id"
NUM_PARTITIONS = "num-partitions"
IDENTIFY = "identify"
"""Task of a query message: reply with ``partition-id`` and ``num-partitions`` in a ``metrics`` record."""

PREVIOUS_SET = "previous-set"
"""Key of the node's last set in ``context.state``; multi-round distillation continues from it."""

CONTINUED = "continued"
"""Reply metric: 1 if the node continued from its previous set, 0 if it started afresh."""

INIT_ROWS = "init-rows"
"""Reply metric of a non-private set started from real images: the rows of the node's training split it
started from (the membership audit's worst-case targets). The server sees those images in the set anyway."""

RESTORE_PREFIX = "restore."
"""Train-message records ``restore.<key>``: state the node should hold in ``context.state[<key>]``."""

STATE_PREFIX = "state."
"""Reply records ``state.<key>``: small records the node asks the server to keep for it (its checkpoint)."""


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


def identify_record() -> ConfigRecord:
    """The ``config`` record of an identify query."""
    return ConfigRecord({TASK: IDENTIFY})


def restore_into(content: RecordDict, state: RecordDict) -> list[str]:
    """Copy the ``restore.*`` records of a message into ``state`` where it lacks them; returns the keys copied.

    A key the node still holds is kept: a node's own state is never older
    than the copy the server kept of it (and a privacy ledger must never go
    back).
    """
    restored = []
    for name in list(content.keys()):
        if name.startswith(RESTORE_PREFIX):
            key = name[len(RESTORE_PREFIX) :]
            if key and key not in state:
                state[key] = content[name]
                restored.append(key)
    return restored
