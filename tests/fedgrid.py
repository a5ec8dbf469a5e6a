"""An in-process Flower Grid for protocol tests: messages go straight to the ClientApp handlers (no Ray, no network).

Shared by the federation, baseline and reliability tests; ``fake_task_identity``
lets messages be built outside a Flower run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any
from uuid import uuid4

import pytest
from flwr.app import Context, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from clients.app import query as client_query
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
    """Delivers each message to the ClientApp's handlers with that node's lasting context.

    Replies are computed when a message is pushed and handed out by
    ``pull_messages``, as the SuperLink would. ``tamper[node]`` edits (or,
    returning None, drops) that node's reply; nodes in ``crash`` answer with an
    error reply, as a ClientApp that raised does under Flower; nodes in
    ``unavailable`` get the error the SuperLink sends for a node that stopped
    heartbeating; nodes in ``hang`` never answer. Contexts carry an empty run
    config, as in the in-process simulation: the experiment has to travel in
    the messages. ``first_node`` sets the node ids (101, 102, ... by default),
    so a "restarted" federation can get new ids for the same partitions;
    ``partitions`` gives the partition of each node in id order (default: the
    same order), as a launch that hands out node ids at random would.
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
        *,
        hang: Iterable[int] = (),
        unavailable: Iterable[int] = (),
        first_node: int = 101,
        partitions: Iterable[int] | None = None,
    ) -> None:
        self.nodes = list(range(first_node, first_node + num_nodes))
        order = list(range(num_nodes)) if partitions is None else list(partitions)
        assert sorted(order) == list(range(num_nodes)), "partitions must be a permutation of the partition ids"
        self.tamper = tamper or {}
        self.crash = set(crash)
        self.hang = set(hang)
        self.unavailable = set(unavailable)
        self.sent: list[Message] = []
        self.sent_config: list[dict[str, Any]] = []
        self.replies: dict[str, Message] = {}
        self.before_push: Callable[[list[Message]], None] | None = None
        self.contexts = {
            node: Context(
                run_id=1,
                node_id=node,
                node_config={"partition-id": partition, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config={},
            )
            for partition, node in zip(order, self.nodes, strict=True)
        }

    def get_node_ids(self) -> list[int]:
        return self.nodes

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        messages = list(messages)
        if self.before_push is not None:
            self.before_push(messages)
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            ids.append(message.metadata.message_id)
            reply = self._deliver(message)
            if reply is not None:
                self.replies[message.metadata.message_id] = reply
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(message_id) for message_id in list(message_ids) if message_id in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        ids = self.push_messages(messages)
        return self.pull_messages(ids)

    def _deliver(self, message: Message) -> Message | None:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.TRAIN:
            self.sent.append(message)
            self.sent_config.append(dict(message.content.config_records.get("config", {})))
        if node in self.hang:
            return None
        if node in self.unavailable:
            return Message(Error(ErrorCode.NODE_UNAVAILABLE, "node stopped heartbeating"), reply_to=message)
        if node in self.crash:
            return Message(Error(ErrorCode.CLIENT_APP_RAISED_EXCEPTION, "node crashed"), reply_to=message)
        handler = client_query if message.metadata.message_type == MessageType.QUERY else client_train
        reply = handler(message, self.contexts[node])
        if node in self.tamper and message.metadata.message_type == MessageType.TRAIN:
            reply = self.tamper[node](reply)
        return reply
