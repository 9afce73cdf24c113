"""The ``tuning`` section of the experiment config: which parameters train, and each method's settings.

``tuning.method`` picks the method; each method's settings are a sub-section named after it
(``tuning.lora`` is read by ``lora``, ``loha`` and ``lokr``). A config that sets another method's
settings is refused (:func:`check_settings_used`): they would be ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from difftune.config.checks import ConfigError, _check, _check_fields
from difftune.config.names import TUNING_METHOD_NAMES
from difftune.config.renames import upgrade
from difftune.config.sections import build_section

# the methods that read each sub-section of settings
SETTING_USERS: dict[str, tuple[str, ...]] = {
    "lora": ("lora", "loha", "lokr"),
    "difffit": ("difffit",),
    "adaptformer": ("adaptformer",),
    "vpt": ("vpt",),
    "svdiff": ("svdiff",),
}


def _check_targets(section: str, targets: list[str] | None) -> None:
    _check(
        targets is None or len(targets) > 0,
        f"{section}.targets=[] selects nothing; give module names or null",
    )


@dataclass
class LoraSettings:
    """``tuning.lora``: the low-rank update of ``lora``, ``loha`` and ``lokr`` (peft).

    Attributes:
        rank: rank r of the low-rank update.
        alpha: scaling numerator: the update is multiplied by ``alpha / rank``.
        dropout: dropout on the adapter's input during training.
        targets: module names (or name suffixes, as peft matches them) that get an adapter;
            ``None``: the backbone's default (the attention projections).
    """

    rank: int = 8
    alpha: float = 8.0
    dropout: float = 0.0
    targets: list[str] | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "tuning.lora")
        _check(self.rank > 0, f"tuning.lora.rank={self.rank} must be > 0")
        _check(0.0 <= self.dropout < 1.0, f"tuning.lora.dropout={self.dropout} must be in [0, 1)")
        _check_targets("tuning.lora", self.targets)


@dataclass
class DiffFitSettings:
    """``tuning.difffit``.

    Attributes:
        blocks: indices of the blocks whose attention and feed-forward branches get learnable scale
            factors; ``None``: the first half (the DiffFit authors' choice).
    """

    blocks: list[int] | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "tuning.difffit")


@dataclass
class AdaptFormerSettings:
    """``tuning.adaptformer``.

    Attributes:
        dim: bottleneck width of the adapter beside each feed-forward block.
        scale: the adapter's output scale s (AdaptFormer's default 0.1).
    """

    dim: int = 64
    scale: float = 0.1

    def __post_init__(self) -> None:
        _check_fields(self, "tuning.adaptformer")
        _check(self.dim > 0, f"tuning.adaptformer.dim={self.dim} must be > 0")


@dataclass
class VPTSettings:
    """``tuning.vpt``.

    Attributes:
        tokens: learned prompt tokens prepended to the input of every transformer block.
    """

    tokens: int = 8

    def __post_init__(self) -> None:
        _check_fields(self, "tuning.vpt")
        _check(self.tokens > 0, f"tuning.vpt.tokens={self.tokens} must be > 0")


@dataclass
class SVDiffSettings:
    """``tuning.svdiff``.

    Attributes:
        targets: module names (or suffixes) whose weights get spectral shifts; ``None``: the
            backbone's default (attention and feed-forward projections).
    """

    targets: list[str] | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "tuning.svdiff")
        _check_targets("tuning.svdiff", self.targets)


@dataclass
class TuningConfig:
    """Which parameters train, and the settings of the tuning methods (docs/method.md, "Parameter-efficient tuning").

    Attributes:
        method: a name in :data:`difftune.config.names.TUNING_METHOD_NAMES` (``full`` trains every
            parameter) or a user's TuningMethod class as ``"package.module:Class"`` (built with this
            whole section).
        lora, difffit, adaptformer, vpt, svdiff: each method's settings (:data:`SETTING_USERS`: the
            methods that read each); ``bitfit`` and ``full`` have none.
    """

    method: str = "full"
    lora: LoraSettings = field(default_factory=LoraSettings)
    difffit: DiffFitSettings = field(default_factory=DiffFitSettings)
    adaptformer: AdaptFormerSettings = field(default_factory=AdaptFormerSettings)
    vpt: VPTSettings = field(default_factory=VPTSettings)
    svdiff: SVDiffSettings = field(default_factory=SVDiffSettings)

    def __post_init__(self) -> None:
        _check_fields(self, "tuning")
        _check(
            self.method in TUNING_METHOD_NAMES or ":" in self.method,
            f"tuning.method={self.method!r} is unknown; valid: {sorted(TUNING_METHOD_NAMES)}, "
            "or a TuningMethod class as 'package.module:Class'",
        )


def settings_from_record(method: str, settings: Mapping[str, Any]) -> TuningConfig:
    """The :class:`TuningConfig` an adapter's record holds: ``method`` with its saved ``settings``
    (a record written before the settings were nested, with ``lora_rank`` and the like, is upgraded
    without a deprecation line: the file is difftune's, not the user's).

    Raises:
        ConfigError: the settings are not valid.
    """
    raw = upgrade({"tuning": dict(settings)}, warn=False)["tuning"]
    return build_section(TuningConfig, {**raw, "method": method}, "tuning")[0]


def methods_using(group: str) -> tuple[str, ...]:
    """The ``tuning.method`` values that read the sub-section ``group`` (or a key of it: ``lora.rank``)."""
    return SETTING_USERS[group.split(".")[0]]


def check_settings_used(settings: TuningConfig, given: Collection[str] = ()) -> None:
    """Refuse settings of a method other than ``settings.method`` (they would be ignored).

    A setting counts when it differs from its default, or when it is in ``given`` (keys below
    ``tuning`` set explicitly, e.g. with ``--set``: ``lora.rank``, or a whole ``lora``). A full config
    file written by difftune states every key at its default, so a key that is merely present does
    not count.

    Raises:
        ConfigError: the message names the settings, the methods that read them and the fix.
    """
    method, defaults = settings.method, TuningConfig()
    ignored: list[tuple[str, object]] = []
    for group, users in SETTING_USERS.items():
        if method in users:
            continue
        values, default = getattr(settings, group), getattr(defaults, group)
        for f in dataclasses.fields(values):
            key, value = f"{group}.{f.name}", getattr(values, f.name)
            if key in given or group in given or value != getattr(default, f.name):
                ignored.append((key, value))
    if not ignored:
        return
    groups = sorted({methods_using(key) for key, _ in ignored})
    shown = ", ".join(f"tuning.{key}={value!r}" for key, value in ignored)
    readers = " and ".join("/".join(group) for group in groups)
    if len(groups) == 1:
        first, *others = groups[0]
        fix = f"set tuning.method={first}" + (f" (or {', '.join(others)})" if others else "")
    else:
        fix = "set tuning.method to the method they are for"
    one = len(ignored) == 1
    raise ConfigError(
        f"{shown} {'is a setting' if one else 'are settings'} of tuning.method={readers}, but "
        f"tuning.method={method} ignores {'it' if one else 'them'}; {fix}, or remove "
        f"{'tuning.' + ignored[0][0] if one else 'them'}"
    )
