"""The server's view of client privacy: refusals, each client's ledger per round, and the worst case.

A node that would exceed its budget replies with ``refused = 1`` and the
reason in its ``privacy`` record instead of a result; the server logs it as
refused (not malformed) and goes on with the others. Every accepted reply of
a private run must carry its ``privacy`` record; the server recomputes the
epsilon from the ledger it holds (Opacus, the run's accountant) rather than
trusting the number, and writes every client's ledger per round to
``privacy.json`` in the run directory. The worst case over clients is what
the run prints at the end.
"""

from __future__ import annotations

import logging
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Message
from rich.console import Console

from fedistill.config import ExperimentConfig
from fedistill.privacy import ADJACENCY, Epsilon, PrivacyLedger, PrivacyPlan
from fedistill.privacy_plan import plan_privacy
from fedistill.runs import write_json
from server.validation import InvalidReply
from wire.messages import PRIVACY_RECORD, REFUSED

log = logging.getLogger("fedistill.server")

MAX_LEDGER_CHARS = 1_000_000
"""A ledger is a few hundred bytes per round; anything far larger is not one."""


@dataclass(frozen=True)
class ClientPrivacy:
    """What one reply says about its node's privacy, with the epsilon the server recomputed from the ledger."""

    epsilon: Epsilon
    claimed_epsilon: float
    ledger: PrivacyLedger
    refusal: str


def _record(reply: Message) -> dict[str, Any] | None:
    if reply.has_error():
        return None
    record = reply.content.config_records.get(PRIVACY_RECORD)
    return None if record is None else dict(record)


def refusal_reason(reply: Message) -> str | None:
    """The node's reason if the reply refuses the round for its privacy budget, else None."""
    record = _record(reply)
    if record is None or "metrics" not in reply.content.metric_records:
        return None
    if reply.content.metric_records["metrics"].get(REFUSED) != 1:
        return None
    reason = record.get("refusal")
    return str(reason) if reason else "refused without a reason"


def read_privacy(reply: Message, plan: PrivacyPlan) -> ClientPrivacy:
    """Parse the reply's privacy record; InvalidReply if a private run's reply lacks it or it does not add up."""
    record = _record(reply)
    if record is None:
        raise InvalidReply(f"{PRIVACY_RECORD}: a private run's reply must carry its privacy record")
    text = record.get("ledger")
    if not isinstance(text, str) or len(text) > MAX_LEDGER_CHARS:
        raise InvalidReply(f"{PRIVACY_RECORD}.ledger: expected the ledger as JSON text of at most {MAX_LEDGER_CHARS}")
    try:
        ledger = PrivacyLedger.from_json(text)
    except ValueError as error:
        raise InvalidReply(f"{PRIVACY_RECORD}.ledger: {error}") from None
    if (ledger.delta, ledger.accountant) != (plan.delta, plan.accountant):
        raise InvalidReply(
            f"{PRIVACY_RECORD}.ledger: delta {ledger.delta:g} / {ledger.accountant}, "
            f"the run uses {plan.delta:g} / {plan.accountant}"
        )
    claimed = record.get("epsilon")
    if not isinstance(claimed, numbers.Real) or isinstance(claimed, bool) or math.isnan(claimed):
        raise InvalidReply(f"{PRIVACY_RECORD}.epsilon: expected a number, got {claimed!r}")
    try:
        epsilon = ledger.epsilon()
    except ValueError as error:
        raise InvalidReply(f"{PRIVACY_RECORD}.ledger: {error}") from None
    if not math.isclose(epsilon.value, float(claimed), rel_tol=1e-6, abs_tol=1e-9):
        log.warning("client claims epsilon %.6g, its ledger gives %.6g; the ledger's value is kept", claimed,
                    epsilon.value)
    return ClientPrivacy(epsilon, float(claimed), ledger, str(record.get("refusal") or ""))


class PrivacyRecorder:
    """Per round and client: epsilon (recomputed), refusals and ledgers; written to ``privacy.json``."""

    def __init__(self, plan: PrivacyPlan) -> None:
        self.plan = plan
        self.rounds: dict[int, dict[str, dict[str, Any]]] = {}
        self.latest: dict[str, ClientPrivacy] = {}

    @classmethod
    def start(cls, config: ExperimentConfig, console: Console) -> PrivacyRecorder | None:
        """A recorder for a private run (printing the planned per-client epsilon), None otherwise."""
        if not config.privacy.enabled:
            return None
        plan = plan_privacy(config)
        console.print(
            f"privacy: noise multiplier {plan.noise_multiplier:.4g} for {plan.steps_per_round} {plan.mechanism} "
            f"releases per round at sample rate {plan.sample_rate:g}, clip norm {plan.clip_norm:g}, over "
            f"{plan.rounds} round(s) plus one count release (noise {plan.count_noise_multiplier:g}); "
            f"planned per client: {plan.planned_epsilon().describe()}",
            markup=False,
            highlight=False,
        )
        planned = plan.planned_epsilon().value
        if planned > plan.target_epsilon:
            console.print(
                f"privacy: the planned run would spend epsilon {planned:.4g} > privacy.target_epsilon = "
                f"{plan.target_epsilon:g}; nodes will refuse the rounds their budget does not cover",
                markup=False,
                highlight=False,
            )
        return cls(plan)

    def observe(self, server_round: int, node: str, client: ClientPrivacy) -> None:
        self.latest[node] = client
        self.rounds.setdefault(server_round, {})[node] = {
            "epsilon": client.epsilon.value,
            "accountant": client.epsilon.accountant,
            "accountant_note": client.epsilon.note,
            "claimed_epsilon": client.claimed_epsilon,
            "refused": client.refusal or None,
            "ledger": client.ledger.to_dict(),
        }

    def to_state(self) -> dict[str, Any]:
        """What a checkpoint keeps: every round's per-client entries (JSON-safe)."""
        return {"rounds": {str(r): clients for r, clients in self.rounds.items()}}

    def load_state(self, state: dict[str, Any]) -> None:
        """Continue from ``to_state``'s output; each client's latest epsilon is recomputed from its ledger."""
        for server_round, clients in sorted(state.get("rounds", {}).items(), key=lambda item: int(item[0])):
            for client_key, entry in clients.items():
                ledger = PrivacyLedger.from_dict(entry["ledger"])
                client = ClientPrivacy(ledger.epsilon(), float(entry["claimed_epsilon"]), ledger, entry["refused"] or "")
                self.observe(int(server_round), client_key, client)

    def worst(self) -> Epsilon | None:
        """The largest epsilon over the clients heard from (their latest ledger)."""
        if not self.latest:
            return None
        return max((client.epsilon for client in self.latest.values()), key=lambda eps: eps.value)

    def round_line(self, server_round: int) -> str | None:
        clients = self.rounds.get(server_round)
        if not clients:
            return None
        worst = max((self.latest[node].epsilon for node in clients), key=lambda eps: eps.value)
        refused = sum(1 for entry in clients.values() if entry["refused"])
        return f"privacy after round {server_round}: worst client {worst.describe()}" + (
            f"; {refused} node(s) refused" if refused else ""
        )

    def summary(self) -> dict[str, Any]:
        worst = self.worst()
        return {
            "adjacency": ADJACENCY,
            "delta": self.plan.delta,
            "accountant": self.plan.accountant,
            "target_epsilon": self.plan.target_epsilon,
            "planned_epsilon": self.plan.planned_epsilon().value,
            "noise_multiplier": self.plan.noise_multiplier,
            "count_noise_multiplier": self.plan.count_noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "clip_norm": self.plan.clip_norm,
            "mechanism": self.plan.mechanism,
            "steps_per_round": self.plan.steps_per_round,
            "worst_epsilon": None if worst is None else worst.value,
            "worst_accountant": None if worst is None else worst.accountant,
            "per_client_epsilon": {node: client.epsilon.value for node, client in sorted(self.latest.items())},
        }

    def write(self, run_dir: Path) -> Path:
        """``privacy.json``: the plan, the worst case, and every client's ledger after each round it answered."""
        rounds = [{"round": r, "clients": clients} for r, clients in sorted(self.rounds.items())]
        return write_json(run_dir / "privacy.json", {**self.summary(), "rounds": rounds})

    def final_line(self) -> str:
        worst = self.worst()
        if worst is None:
            return "privacy: no client reported a ledger"
        return f"privacy: worst-case client {worst.describe()} (upper bound)"

