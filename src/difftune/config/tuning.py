"""The ``tuning`` section of the experiment config: each parameter-efficient method's settings.

``model.tuning`` picks the method; the keys here that start with its name (``lora_*`` for
``lora``, ``loha`` and ``lokr``) configure it. A config that sets another method's keys is refused
(:func:`check_settings_used`): they would be ignored.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

from difftune.config.checks import ConfigError, _check, _check_fields

# the methods that read each group of settings; a setting's group is its name up to the first "_"
SETTING_USERS: dict[str, tuple[str, ...]] = {
    "lora": ("lora", "loha", "lokr"),
    "difffit": ("difffit",),
    "adaptformer": ("adaptformer",),
    "vpt": ("vpt",),
    "svdiff": ("svdiff",),
}


@dataclass
class TuningConfig:
    """Settings of the tuning methods (docs/method.md, "Parameter-efficient tuning").

    Attributes:
        lora_rank: rank r of the low-rank update (``lora``, ``loha``, ``lokr``).
        lora_alpha: scaling numerator: the update is multiplied by ``lora_alpha / lora_rank``.
        lora_dropout: dropout on the adapter's input during training.
        lora_targets: module names (or name suffixes, as peft matches them) that get an adapter;
            ``None``: the backbone's default (the attention projections).
        difffit_blocks: indices of the blocks whose attention and feed-forward branches get
            learnable scale factors; ``None``: the first half (the DiffFit authors' choice).
        adaptformer_dim: bottleneck width of the adapter beside each feed-forward block.
        adaptformer_scale: the adapter's output scale s (AdaptFormer's default 0.1).
        vpt_tokens: learned prompt tokens prepended to the input of every transformer block.
        svdiff_targets: module names (or suffixes) whose weights get spectral shifts; ``None``: the
            backbone's default (attention and feed-forward projections).
    """

    lora_rank: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    lora_targets: list[str] | None = None
    difffit_blocks: list[int] | None = None
    adaptformer_dim: int = 64
    adaptformer_scale: float = 0.1
    vpt_tokens: int = 8
    svdiff_targets: list[str] | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "tuning")
        _check(self.lora_rank > 0, f"tuning.lora_rank={self.lora_rank} must be > 0")
        _check(0.0 <= self.lora_dropout < 1.0, f"tuning.lora_dropout={self.lora_dropout} must be in [0, 1)")
        _check(self.adaptformer_dim > 0, f"tuning.adaptformer_dim={self.adaptformer_dim} must be > 0")
        _check(self.vpt_tokens > 0, f"tuning.vpt_tokens={self.vpt_tokens} must be > 0")
        for key in ("lora_targets", "svdiff_targets"):
            value = getattr(self, key)
            _check(
                value is None or len(value) > 0, f"tuning.{key}=[] selects nothing; give module names or null"
            )


def methods_using(key: str) -> tuple[str, ...]:
    """The ``model.tuning`` methods that read the ``tuning`` setting ``key``."""
    return SETTING_USERS[key.split("_")[0]]


def check_settings_used(method: str, settings: TuningConfig, given: Collection[str] = ()) -> None:
    """Refuse ``tuning`` settings that ``model.tuning=method`` does not read (they would be ignored).

    A setting counts when it differs from its default, or when it is in ``given`` (keys set
    explicitly, e.g. with ``--set``). A full config file written by difftune states every key at its
    default, so a key that is merely present does not count.

    Raises:
        ConfigError: the message names the settings, the methods that read them and the fix.
    """
    defaults = TuningConfig()
    ignored = [
        f.name
        for f in dataclasses.fields(settings)
        if method not in methods_using(f.name)
        and (f.name in given or getattr(settings, f.name) != getattr(defaults, f.name))
    ]
    if not ignored:
        return
    groups = sorted({methods_using(key) for key in ignored})
    shown = ", ".join(f"tuning.{key}={getattr(settings, key)!r}" for key in ignored)
    readers = " and ".join("/".join(group) for group in groups)
    if len(groups) == 1:
        first, *others = groups[0]
        fix = f"set model.tuning={first}" + (f" (or {', '.join(others)})" if others else "")
    else:
        fix = "set model.tuning to the method they are for"
    one = len(ignored) == 1
    raise ConfigError(
        f"{shown} {'is a setting' if one else 'are settings'} of model.tuning={readers}, but "
        f"model.tuning={method} ignores {'it' if one else 'them'}; {fix}, or remove "
        f"{'tuning.' + ignored[0] if one else 'them'}"
    )
