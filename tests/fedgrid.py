"""An in-process Flower Grid for protocol tests: messages go straight to ``clients.app.train`` (no Ray, no network).

Shared by the federation tests; ``fake_task_identity`` lets messages be built
outside a Flower run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from clients.app import train as client_train
from fedistill.config import ExperimentConfig

Tamper = Callable[[Message], Message | None]


def fake_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Outside a Flower run, messages need the run identity that the ServerApp runtime would set."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class LocalGrid:
    """Delivers each message to ``clients.app.train`` with that node's lasting context.

    ``tamper[node]`` edits (or, returning None, drops) that node's reply;
    nodes in ``crash`` answer with an error reply, as a ClientApp that raised
    does under Flower. Contexts carry an empty run config, as in the
    in-process simulation: the experiment has to travel in the messages.
    ``sent`` keeps every message, ``sent_config`` a copy of each message's
    config record as it was when sent (Flower's strategies reuse and mutate
    one record across messages and rounds).
    """

    def __init__(
        self,
        config: ExperimentConfig,
        num_nodes: int,
        tamper: dict[int, Tamper] | None = None,
        crash: Iterable[int] = (),
    ) -> None:
        self.nodes = list(range(101, 101 + num_nodes))
        self.tamper = tamper or {}
        self.crash = set(crash)
        self.sent: list[Message] = []
        self.sent_config: list[dict[str, Any]] = []
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": index, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for index, node in enumerate(self.nodes)
        }

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            self.sent_config.append(dict(message.content.config_records.get("config", {})))
            node = message.metadata.dst_node_id
            if node in self.crash:
                replies.append(Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "node crashed"), reply_to=message))
                continue
            reply = client_train(message, self.contexts[node])
            if node in self.tamper:
                reply = self.tamper[node](reply)
            if reply is not None:
                replies.append(reply)
        return replies
