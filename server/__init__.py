"""The Flower ServerApp: the protocols that drive the nodes round by round, and what they keep.

``app`` is the entry Flower loads; ``distillation`` (one-shot, multi-round)
and ``baselines`` (FedAvg, FedProx, with ``harness`` around Flower's
strategies) are one protocol each. They share ``rounds`` (waiting, exchanging
messages, why a run stops), ``replies`` and ``validation`` (untrusted replies
checked before use), ``state`` (checkpoint and resume), ``privacy`` (the
clients' ledgers) and ``history`` (per-round records); ``compare`` lines runs
up against each other. The aggregation rules themselves are library code
(``fedistill.aggregation``).
"""
