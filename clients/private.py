"""The ClientApp's private path: the node's privacy ledger across rounds, refusals, and DP-FedAvg's local step.

The ledger lives in the node's ``context.state`` (a ConfigRecord holding its
JSON), so it persists between the rounds of a run and can be checkpointed
with the rest of the node's state. Before any work a node checks that the
round's planned releases fit its budget; if not it refuses: the reply holds
no set or weights, only ``metrics`` with ``refused = 1`` and the ``privacy``
record saying why. Every reply carries the epsilon spent so far (with delta,
accountant and adjacency) and the whole ledger.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedistill.config import ExperimentConfig
from fedistill.data import ImageData
from fedistill.models import build_model
from fedistill.privacy import (
    ADJACENCY,
    PrivacyLedger,
    PrivacyPlan,
    PrivateData,
    charge_unrecorded_rounds,
    check_round,
    new_ledger,
    open_round,
    secret_generator,
)
from fedistill.privacy.dpsgd import dp_sgd
from fedistill.privacy_plan import plan_privacy
from wire.messages import PRIVACY_RECORD, REFUSED

log = logging.getLogger("fedistill.client")

LEDGER_KEY = "privacy-ledger"
"""Key of the node's ledger in ``context.state``."""

MOMENTUM = 0.9


def load_ledger(context: Context, plan: PrivacyPlan) -> PrivacyLedger:
    """The node's ledger from its state (its own, or the server's copy given back), or a new one."""
    record = context.state.config_records.get(LEDGER_KEY)
    if record is None:
        return new_ledger(plan)
    ledger = PrivacyLedger.from_json(str(record["json"]))
    if (ledger.delta, ledger.accountant) != (plan.delta, plan.accountant):
        raise ValueError(
            f"privacy: the node's ledger uses delta {ledger.delta:g} and {ledger.accountant}, "
            f"the experiment delta {plan.delta:g} and {plan.accountant}; one ledger cannot mix them"
        )
    return ledger


def save_ledger(context: Context, ledger: PrivacyLedger) -> None:
    context.state[LEDGER_KEY] = ConfigRecord({"json": ledger.to_json()})


def privacy_content(ledger: PrivacyLedger, refusal: str | None = None) -> tuple[dict[str, Any], ConfigRecord]:
    """Reply metrics (numbers) and the ``privacy`` ConfigRecord (terms, ledger, refusal) for a node's ledger."""
    spent = ledger.epsilon()
    metrics = {"epsilon": float(spent.value), "delta": float(ledger.delta), REFUSED: int(refusal is not None)}
    record = {
        "epsilon": float(spent.value),
        "delta": float(ledger.delta),
        "accountant": spent.accountant,
        "accountant-note": spent.note,
        "adjacency": ADJACENCY,
        "ledger": ledger.to_json(),
        "refusal": refusal or "",
    }
    # Flower cannot size a record holding an empty string, so empty values are left out.
    return metrics, ConfigRecord({key: value for key, value in record.items() if value != ""})


def train_private(
    msg: Message,
    context: Context,
    config: ExperimentConfig,
    data: ImageData,
    server_round: int,
    seed: int,
    run_task: Any,
    own_ledger: bool,
) -> Message:
    """Check the budget, open the round (noisy counts), let ``run_task(privacy)`` do the work, reply.

    ``run_task`` returns the reply's records (``set`` or ``arrays``) and its
    metrics; this adds the privacy metrics and record and saves the ledger.
    ``own_ledger`` is False when the node did not keep its ledger itself
    since its last round (a restart: none, or the server's copy given
    back); the rounds it cannot account for are then charged in full
    (``charge_unrecorded_rounds``).
    """
    plan = plan_privacy(config)
    ledger = load_ledger(context, plan)
    partition_id = int(context.node_config["partition-id"])
    if not own_ledger:
        charged = charge_unrecorded_rounds(plan, ledger, server_round)
        if charged:
            log.warning("privacy: no record of rounds %s on this node; each is charged as fully spent", charged)
            save_ledger(context, ledger)
    refusal = check_round(plan, ledger, server_round)
    if refusal is not None:
        metrics, record = privacy_content(ledger, refusal)
        reply = MetricRecord({**metrics, "partition-id": partition_id})
        content = RecordDict({"metrics": reply, PRIVACY_RECORD: record})
        return Message(content, reply_to=msg)
    try:
        privacy = open_round(
            plan,
            ledger,
            data.labels,
            data.info.num_classes,
            server_round,
            secret_generator(config.privacy, seed),
        )
        arrays, task_metrics = run_task(privacy)
    finally:
        # Saved even if the task fails half-way: releases already made stay counted.
        save_ledger(context, ledger)
    spent_in_round = sum(a.steps for a in ledger.accesses if a.round == server_round and a.mechanism == plan.mechanism)
    if spent_in_round > plan.steps_per_round:
        raise RuntimeError(f"privacy: {spent_in_round} releases this round, only {plan.steps_per_round} were planned")
    metrics, record = privacy_content(ledger)
    content = RecordDict(
        {
            **arrays,
            "metrics": MetricRecord({**task_metrics, **metrics, "partition-id": partition_id}),
            PRIVACY_RECORD: record,
        }
    )
    return Message(content, reply_to=msg)


def fit_private(
    config: ExperimentConfig,
    data: ImageData,
    global_state: dict[str, torch.Tensor],
    device: torch.device,
    privacy: PrivateData,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """DP-FedAvg's local step: DP-SGD from the global weights; ``num-examples`` is the released (noisy) count."""
    started = time.perf_counter()
    federation = config.federation
    images = data.normalized("cpu")
    labels = torch.from_numpy(data.labels)
    model = build_model(config.model.spec(), tuple(images.shape[1:]), data.info.num_classes)
    model.load_state_dict(global_state)
    model.to(device)
    dp_sgd(model, images, labels, privacy, federation.local_epochs, federation.local_lr, MOMENTUM)
    state = {key: value.detach().cpu().clone() for key, value in model.state_dict().items()}
    metrics = {"num-examples": max(1, int(privacy.counts.sum())), "seconds": time.perf_counter() - started}
    return state, metrics
