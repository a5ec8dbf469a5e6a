"""The per-client privacy ledger: every access to the client's private data, and what it has spent.

One ledger per client for a whole run (all rounds of a multi-round run): it
lives in the node's Flower ``context.state`` between rounds, as JSON, so it
can also be checkpointed with the rest of a node's state. Each ``Access`` is
one mechanism applied ``steps`` times with the same noise and sampling rate in
one round; epsilon is always recomputed by Opacus from the whole history (see
``accounting``), never added up by hand.

The ledger also keeps values that were released once and are reused later
(the noisy per-class counts): reusing a released value is post-processing and
costs nothing, whereas drawing fresh noise on the clean value again would be a
new release. ``released`` hands back the stored noisy value, so nothing is
noised twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from fedistill.privacy.accounting import ACCOUNTANTS, ADJACENCY, Epsilon, compute_epsilon

LEDGER_VERSION = 1


@dataclass(frozen=True)
class Access:
    """``steps`` releases of ``mechanism`` with noise multiplier ``noise_multiplier`` at ``sample_rate``.

    ``noise_multiplier`` is relative to the release's L2 sensitivity (the clip
    norm, or 1 for counts); ``sample_rate`` is the Poisson inclusion
    probability of every record (1.0 for a release over all records).
    """

    mechanism: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    round: int

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"{self.mechanism}: steps must be >= 1, got {self.steps}")
        if not 0 < self.sample_rate <= 1:
            raise ValueError(f"{self.mechanism}: sample rate must be in (0, 1], got {self.sample_rate}")
        if self.noise_multiplier < 0:
            raise ValueError(f"{self.mechanism}: noise multiplier must be >= 0, got {self.noise_multiplier}")

    def entry(self) -> tuple[float, float, int]:
        return (self.noise_multiplier, self.sample_rate, self.steps)


@dataclass
class PrivacyLedger:
    """Accesses to one client's data, the delta and accountant they are judged by, and released values."""

    delta: float
    accountant: str = "rdp"
    accesses: list[Access] = field(default_factory=list)
    released_values: dict[str, list[float]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.accountant not in ACCOUNTANTS:
            allowed = ", ".join(ACCOUNTANTS)
            raise ValueError(f"privacy.accountant: unknown value {self.accountant!r}; allowed: {allowed}")
        if not 0 < self.delta < 1:
            raise ValueError(f"privacy.delta must be in (0, 1), got {self.delta}")

    def record(self, access: Access) -> None:
        """Add one access; steps of the same mechanism, noise and rate in the same round are merged."""
        last = self.accesses[-1] if self.accesses else None
        if last is not None and (last.mechanism, last.noise_multiplier, last.sample_rate, last.round) == (
            access.mechanism,
            access.noise_multiplier,
            access.sample_rate,
            access.round,
        ):
            self.accesses[-1] = Access(last.mechanism, last.noise_multiplier, last.sample_rate,
                                       last.steps + access.steps, last.round)
        else:
            self.accesses.append(access)

    def steps(self, mechanism: str | None = None) -> int:
        """Releases recorded (of one mechanism, or all)."""
        return sum(a.steps for a in self.accesses if mechanism is None or a.mechanism == mechanism)

    def epsilon(self, planned: Sequence[Access] = ()) -> Epsilon:
        """Epsilon of everything recorded, plus ``planned`` accesses if given (what a round would bring it to)."""
        return compute_epsilon([a.entry() for a in [*self.accesses, *planned]], self.delta, self.accountant)

    def remember(self, name: str, values: Iterable[float]) -> None:
        """Keep a released (already noised) value for reuse; a value is released once."""
        if name in self.released_values:
            raise ValueError(f"{name} was already released; reuse the stored value instead of releasing again")
        self.released_values[name] = [float(v) for v in values]

    def released(self, name: str) -> list[float] | None:
        """The stored noisy value, or None if it was never released."""
        return self.released_values.get(name)

    def rounds(self) -> list[int]:
        return sorted({a.round for a in self.accesses})

    def by_round(self) -> list[dict[str, Any]]:
        """Per round: the accesses of that round and the cumulative epsilon after it."""
        out = []
        for server_round in self.rounds():
            so_far = [a for a in self.accesses if a.round <= server_round]
            eps = compute_epsilon([a.entry() for a in so_far], self.delta, self.accountant)
            out.append(
                {
                    "round": server_round,
                    "accesses": [asdict(a) for a in self.accesses if a.round == server_round],
                    "epsilon": eps.value,
                    "accountant": eps.accountant,
                    "note": eps.note,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": LEDGER_VERSION,
            "delta": self.delta,
            "accountant": self.accountant,
            "adjacency": ADJACENCY,
            "accesses": [asdict(a) for a in self.accesses],
            "released_values": {k: list(v) for k, v in self.released_values.items()},
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PrivacyLedger:
        if data.get("version") != LEDGER_VERSION:
            raise ValueError(f"privacy ledger: version {data.get('version')!r} is not {LEDGER_VERSION}")
        try:
            accesses = [Access(**entry) for entry in data["accesses"]]
            values = {str(k): [float(x) for x in v] for k, v in data["released_values"].items()}
            return cls(float(data["delta"]), str(data["accountant"]), accesses, values)
        except (KeyError, TypeError) as error:
            raise ValueError(f"privacy ledger: malformed ({error})") from None

    @classmethod
    def from_json(cls, text: str) -> PrivacyLedger:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"privacy ledger: not JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError("privacy ledger: expected a JSON object")
        return cls.from_dict(data)
