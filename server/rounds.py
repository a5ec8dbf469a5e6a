"""Round control shared by every protocol: waiting for nodes, one exchange of messages, and why a run stops.

A round asks the nodes connected at its start (``wait_for_nodes``), sends
them one message each and takes the replies as they arrive (``exchange``)
until everyone has answered, ``round_timeout_s`` has passed, or
``straggler_timeout_s`` after the quorum (``WaitPolicy``). ``identify`` asks
never-seen nodes which partition they hold. The errors here end a run:
``NotEnoughClients`` (too few valid replies), ``BudgetExhausted`` (nodes
refused for their privacy budget) and ``RunInterrupted`` (a stop request);
``RunControl`` is how a caller resumes or stops a run. The loop is plain code
over the Grid's calls, so tests drive it with an in-process grid.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from flwr.app import Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode

from fedistill.config import ExperimentConfig
from server.validation import InvalidReply, check_client_metrics
from wire.messages import NUM_PARTITIONS, PARTITION_ID, identify_record

log = logging.getLogger("fedistill.server")

POLL_S = 0.5
"""How often a waiting round asks the SuperLink for replies (Flower's own ``send_and_receive`` polls every 3 s)."""
UNAVAILABLE = (ErrorCode.NODE_UNAVAILABLE, ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.REPLY_MESSAGE_UNAVAILABLE)
"""Error codes the SuperLink itself sends for a node that stopped heartbeating or a message that expired:
the node is missing, not faulty."""


class GridLike(Protocol):
    """The part of ``flwr.serverapp.Grid`` the protocols use (Flower's strategies use ``send_and_receive``)."""

    def get_node_ids(self) -> Iterable[int]: ...

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]: ...

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]: ...

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]: ...


class NotEnoughClients(RuntimeError):
    """Fewer valid replies (or connected nodes) than the round's quorum."""


class BudgetExhausted(NotEnoughClients):
    """Too few replies because nodes refused for their privacy budget: the run ends with the last global model."""


class RunInterrupted(RuntimeError):
    """The caller asked the run to stop (Ctrl-C); the run directory holds the last complete round."""


@dataclass
class RunControl:
    """How a caller steers a server run.

    ``resume``: an existing run directory to continue from its checkpoint.
    ``stop``: set it to make the run stop at its next wait (raises RunInterrupted).
    ``on_start``: told the run directory as soon as it exists.
    """

    resume: Path | None = None
    stop: threading.Event | None = None
    on_start: Callable[[Path], None] | None = None


@dataclass(frozen=True)
class WaitPolicy:
    """When a round stops waiting, and how many valid replies it needs (``federation.*``)."""

    min_clients: int
    quorum: float
    round_timeout_s: float
    straggler_timeout_s: float

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> WaitPolicy:
        federation = config.federation
        return cls(federation.min_clients, federation.quorum, federation.round_timeout_s, federation.straggler_timeout_s)

    def needed(self, asked: int) -> int:
        """Valid replies a round with ``asked`` nodes needs: ``min_clients`` and the ``quorum`` share."""
        return max(self.min_clients, math.ceil(self.quorum * asked - 1e-9))


def check_stop(stop: threading.Event | None) -> None:
    if stop is not None and stop.is_set():
        raise RunInterrupted("stopped on request")


def wait_for_nodes(
    grid: GridLike, minimum: int, timeout_s: float, poll_s: float = 1.0, stop: threading.Event | None = None
) -> list[int]:
    """Node ids once at least ``minimum`` are connected; NotEnoughClients after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        check_stop(stop)
        nodes = sorted(int(node) for node in grid.get_node_ids())
        if len(nodes) >= minimum:
            return nodes
        if time.monotonic() >= deadline:
            raise NotEnoughClients(f"{len(nodes)} nodes connected after {timeout_s:g} s; need {minimum}")
        time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))


def exchange(
    grid: GridLike,
    messages: list[Message],
    policy: WaitPolicy,
    on_reply: Callable[[int, Message], bool],
    needed: int,
    stop: threading.Event | None = None,
) -> list[int]:
    """Send ``messages`` and hand each reply to ``on_reply(node, reply)`` as it arrives; return the silent nodes.

    ``on_reply`` returns True when the reply counts toward the quorum (it was
    valid). Waiting ends when every node has answered, ``round_timeout_s``
    after sending, or ``straggler_timeout_s`` after the ``needed``-th valid
    reply. The node of a reply is the destination of the message it answers
    (the SuperLink, not the node, signs "node unavailable" errors). Messages
    carry a TTL of ``round_timeout_s``, so a node that hung and recovers does
    not work on a round that is over.
    """
    destinations: dict[str, int] = {}
    for message in messages:
        message.metadata.ttl = max(1.0, policy.round_timeout_s)
    pushed = set(grid.push_messages(messages))
    silent = []
    for message in messages:
        message_id = message.metadata.message_id
        if message_id and message_id in pushed:
            destinations[message_id] = message.metadata.dst_node_id
        else:
            log.warning("could not send to node %s", message.metadata.dst_node_id)
            silent.append(message.metadata.dst_node_id)
    pending = set(destinations)
    counted = 0
    started = time.monotonic()
    quorum_at: float | None = None
    while pending:
        check_stop(stop)
        for reply in grid.pull_messages(set(pending)):
            message_id = reply.metadata.reply_to_message_id
            if message_id not in pending:
                continue
            pending.discard(message_id)
            if on_reply(destinations[message_id], reply):
                counted += 1
        now = time.monotonic()
        if quorum_at is None and counted >= needed:
            quorum_at = now
        if not pending:
            break
        deadlines = [started + policy.round_timeout_s]
        if quorum_at is not None:
            deadlines.append(quorum_at + policy.straggler_timeout_s)
        if now >= min(deadlines):
            break
        time.sleep(min(POLL_S, min(deadlines) - now))
    return sorted(silent + [destinations[message_id] for message_id in pending])


ProgressLine = Callable[[str], None]


def reporting_arrivals(
    on_reply: Callable[[int, Message], bool], asked: int, say: ProgressLine, label: str
) -> Callable[[int, Message], bool]:
    """``on_reply`` that also says how many replies are in, so a round of long client work shows it is moving.

    About ten lines per round whatever the number of nodes: every reply up to
    twenty nodes, else every tenth of them, and always the last.
    """
    every = 1 if asked <= 20 else math.ceil(asked / 10)
    started = time.monotonic()
    answered = valid = 0

    def report(node: int, reply: Message) -> bool:
        nonlocal answered, valid
        counted = on_reply(node, reply)
        answered += 1
        valid += int(counted)
        if answered % every == 0 or answered == asked:
            say(f"{label}: {answered}/{asked} replies in ({valid} valid) after {time.monotonic() - started:.0f} s")
        return counted

    return report


def reporting_epochs(
    say: ProgressLine, label: str, epochs: int, num_nets: int = 1, every_s: float = 60.0,
    clock: Callable[[], float] = time.monotonic,
) -> Callable[[int, int], None]:
    """``on_epoch(net, epochs_done)`` that says how far the server's training is, at most once every ``every_s``.

    Training the global model on the aggregate takes minutes on a CPU after the
    last reply is in; without these lines a run looks stuck.
    """
    started = last = clock()

    def report(net: int, done: int) -> None:
        nonlocal last
        now = clock()
        if now - last >= every_s:
            last = now
            nets = f" net {net + 1}/{num_nets}," if num_nets > 1 else ""
            say(f"{label}: training on the aggregate,{nets} epoch {done}/{epochs} after {now - started:.0f} s")

    return report


def partition_label(partition: int) -> str:
    """Client id of a partition's set: sorts in partition order, so aggregates do not depend on node ids."""
    return f"partition-{partition:04d}"


def identify(
    grid: GridLike,
    nodes: list[int],
    policy: WaitPolicy,
    num_partitions: int,
    stop: threading.Event | None,
    needed: int | None = None,
) -> dict[int, int]:
    """Ask ``nodes`` which partition each holds (one ``identify`` query each); nodes that do not say are left out.

    The wait ends when all have answered, or ``needed`` (default: all) valid
    answers and the straggler timeout later, or ``round_timeout_s`` after asking.
    """
    found: dict[int, int] = {}

    def on_reply(node: int, reply: Message) -> bool:
        try:
            if reply.has_error():
                raise InvalidReply(f"error {reply.error.code}: {reply.error.reason}")
            if reply.metadata.src_node_id != node or "metrics" not in reply.content.metric_records:
                raise InvalidReply("not an identify reply from the node asked")
            metrics = check_client_metrics(reply.content.metric_records["metrics"], num_partitions)
            if metrics.get(NUM_PARTITIONS) != num_partitions:
                raise InvalidReply(f"num-partitions: node says {metrics.get(NUM_PARTITIONS)!r}, run has {num_partitions}")
        except InvalidReply as reason:
            log.warning("node %s did not identify itself: %s", node, reason)
            return False
        found[node] = metrics[PARTITION_ID]
        return True

    messages = [
        Message(RecordDict({"config": identify_record()}), dst_node_id=node, message_type=MessageType.QUERY)
        for node in nodes
    ]
    exchange(grid, messages, policy, on_reply, needed=len(nodes) if needed is None else needed, stop=stop)
    return found
