"""The ``[attack]`` section: which attacks a run suffers and its audit runs, and the server's defence.

Kept apart from ``fedistill.config`` so that the attack suite's many knobs do
not crowd the core sections, and free of imports from the library, so any
floor may read it; ``ExperimentConfig.attack`` is an ``AttackConfig``, and
the checks across sections (``check_attack``) live with ``ExperimentConfig``.
The names allowed here are the registries of ``attacks/``, which this floor
cannot import: each is written once, in a ``Literal`` below that both the
field and its name tuple come from, and a test keeps them in step. Lists default to ``None`` ("the defaults"): Flower's run config
holds only scalars, so a list key cannot be listed in ``pyproject.toml``; in a
TOML file or ``--set`` a list is written as a list, and under ``flwr run
--run-config`` as a comma-separated string (``"0,3"``).
"""

from __future__ import annotations

from typing import Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

EvasionName = Literal["fgsm", "pgd", "cw", "autoattack"]
TriggerName = Literal["patch", "blended"]
BackdoorName = Literal["none", "naive", "doorping"]
SetDefenseName = Literal["none", "spectral", "class-outliers", "client-outliers"]
"""Defences on synthetic sets (``attacks.defenses``), for the distillation protocols."""
ModelDefenseName = Literal["none", "krum", "fedmedian", "fedtrimmedavg"]
"""Flower's robust model aggregators, for the FedAvg baseline."""
Position = Literal["bottom-right", "bottom-left", "top-right", "top-left", "center"]

EVASION_ATTACKS: tuple[str, ...] = get_args(EvasionName)
TRIGGERS: tuple[str, ...] = get_args(TriggerName)
BACKDOOR_METHODS: tuple[str, ...] = get_args(BackdoorName)
SET_DEFENSES: tuple[str, ...] = get_args(SetDefenseName)
MODEL_DEFENSES: tuple[str, ...] = get_args(ModelDefenseName)
POSITIONS: tuple[str, ...] = get_args(Position)

DEFAULT_LINF = {
    "fashion-mnist": (0.1, 0.2, 0.3),
    "mnist": (0.1, 0.2, 0.3),
    "digits": (0.1, 0.2, 0.3),
    "cifar10": (2 / 255, 4 / 255, 8 / 255),
}
"""L-inf radii in [0, 1] pixel units per dataset (REFERENCE.md §6); other datasets use CIFAR's."""

DEFAULT_L2 = {"fashion-mnist": (1.0, 2.0, 3.0), "mnist": (1.0, 2.0, 3.0), "digits": (0.5, 1.0, 1.5)}
"""L2 radii at which CW's minimal perturbations are counted; other datasets use (0.25, 0.5, 1.0)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _comma_list(value: Any) -> Any:
    """``"0, 3"`` -> ``["0", "3"]`` (pydantic then converts the items); lists and None pass through."""
    if isinstance(value, str):
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class EvasionConfig(_Section):
    """Robust accuracy of the global model (and of references) under torchattacks, in [0, 1] pixel space."""

    enabled: bool = True
    attacks: list[EvasionName] | None = Field(
        default=None, description="default: fgsm, pgd, cw, autoattack"
    )
    epsilons: list[float] | None = Field(default=None, description="L-inf radii; default: the dataset's")
    l2_epsilons: list[float] | None = Field(default=None, description="L2 radii for CW; default: the dataset's")
    num_images: int = Field(default=1000, ge=1, description="test images attacked (the first N of a seeded shuffle)")
    batch_size: int = Field(default=256, ge=1)
    pgd_steps: int = Field(default=20, ge=1)
    cw_c: float = Field(default=1.0, gt=0)
    cw_steps: int = Field(default=50, ge=1)
    square_queries: int = Field(default=5000, ge=1, description="AutoAttack's Square budget (standard: 5000)")
    random_real: bool = Field(default=True, description="also attack a model trained on as many random real images")
    full_real: bool = Field(default=False, description="also attack a model trained on all clients' real data")
    full_real_epochs: int = Field(default=10, ge=1)

    split_lists = field_validator("attacks", "epsilons", "l2_epsilons", mode="before")(_comma_list)

    @field_validator("epsilons", "l2_epsilons")
    @classmethod
    def _positive(cls, value: list[float] | None) -> list[float] | None:
        if value is not None:
            if not value:
                raise ValueError("needs at least one radius")
            if any(not 0 < eps for eps in value):
                raise ValueError(f"radii must be > 0, got {value}")
        return value

    @field_validator("epsilons")
    @classmethod
    def _pixel_units(cls, value: list[float] | None) -> list[float] | None:
        if value is not None and any(eps > 1 for eps in value):
            raise ValueError(f"L-inf radii are in [0, 1] pixel units (8/255 = 0.031), got {value}")
        return value

    def attack_names(self) -> tuple[str, ...]:
        return tuple(self.attacks) if self.attacks else EVASION_ATTACKS

    def linf_radii(self, dataset: str) -> tuple[float, ...]:
        return tuple(self.epsilons) if self.epsilons else DEFAULT_LINF.get(dataset, DEFAULT_LINF["cifar10"])

    def l2_radii(self, dataset: str) -> tuple[float, ...]:
        return tuple(self.l2_epsilons) if self.l2_epsilons else DEFAULT_L2.get(dataset, (0.25, 0.5, 1.0))


class BackdoorConfig(_Section):
    """Malicious clients (by partition id) that poison their data; NAIVEATTACK or DOORPING (REFERENCE.md §6).

    ``rate`` is the share of a malicious client's images that are stamped and
    relabelled to ``target`` (taken from its non-target images). DOORPING
    updates the trigger every ``doorping_period`` distillation iterations with
    ``doorping_steps`` steps of lr ``doorping_lr``.
    """

    method: BackdoorName = "none"
    malicious_clients: list[int] | None = Field(default=None, description="partition ids of the malicious clients")
    target: int = Field(default=0, ge=0)
    rate: float = Field(default=0.1, gt=0, le=1)
    trigger: TriggerName = "patch"
    patch_size: int = Field(default=3, ge=1)
    position: Position = "bottom-right"
    blend_alpha: float = Field(default=0.2, gt=0, le=1)
    doorping_period: int = Field(default=10, ge=1)
    doorping_steps: int = Field(default=10, ge=1)
    doorping_lr: float = Field(default=0.05, gt=0)

    split_lists = field_validator("malicious_clients", mode="before")(_comma_list)

    @field_validator("malicious_clients")
    @classmethod
    def _distinct(cls, value: list[int] | None) -> list[int] | None:
        if value is not None:
            if any(pid < 0 for pid in value):
                raise ValueError(f"partition ids are >= 0, got {value}")
            if len(set(value)) != len(value):
                raise ValueError(f"partition ids repeat: {value}")
        return value

    def malicious(self) -> tuple[int, ...]:
        return tuple(self.malicious_clients or ()) if self.method != "none" else ()


class MembershipConfig(_Section):
    """Membership inference on the global model and the set; members: the clients' images, non-members: test images."""

    enabled: bool = True
    num_targets: int = Field(default=1000, ge=10, description="members, and as many non-members")
    shadow_models: int = Field(default=0, ge=0, description="offline LiRA shadow models; 0 skips LiRA")
    random_real: bool = Field(default=True, description="also attack a random real subset of the set's size")
    bootstrap: int = Field(default=200, ge=0, description="resamples for the 95% confidence intervals")


class CanaryConfig(_Section):
    """The one-run canary audit (``attacks.canary``): ``count`` test images, each put into client ``client``'s data
    with probability 1/2, its round-1 release run once more, and an empirical lower bound on epsilon from the
    guesses (``count = 0``: off)."""

    count: int = Field(default=0, ge=0, description="canary records; 0 turns the canary audit off, else >= 2")
    client: int = Field(default=0, ge=0, description="partition id of the client whose release is audited")
    significance: float = Field(default=0.05, gt=0, lt=1, description="the bound holds at 1 - significance")

    @field_validator("count")
    @classmethod
    def _enough(cls, value: int) -> int:
        if value == 1:
            raise ValueError("one canary cannot be audited; use 0 (off) or at least 2")
        return value


class DefenseConfig(_Section):
    """The server's defence: a filter on client sets (distillation) or a robust aggregator (FedAvg).

    ``threshold`` is the robust z-score (median and MAD) above which an image or
    a client's class is removed; the reference model whose features the set
    defences use is trained on the round's union for ``reference_epochs``.
    ``assumed_malicious`` is Krum's f; ``trim_beta`` FedTrimmedAvg's cut per side.
    """

    method: Literal[SetDefenseName, ModelDefenseName] = "none"
    threshold: float = Field(default=3.5, gt=0)
    reference_epochs: int = Field(default=50, ge=1)
    assumed_malicious: int = Field(default=1, ge=0)
    trim_beta: float = Field(default=0.2, ge=0, lt=0.5)


class AttackConfig(_Section):
    """``audit``: ``fedistill run`` audits the run when it ends (``fedistill audit RUN_DIR`` any time)."""

    audit: bool = False
    evasion: EvasionConfig = EvasionConfig()
    backdoor: BackdoorConfig = BackdoorConfig()
    membership: MembershipConfig = MembershipConfig()
    canary: CanaryConfig = CanaryConfig()
    defense: DefenseConfig = DefenseConfig()
