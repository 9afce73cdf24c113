"""The ``tuning`` section of the experiment config: each parameter-efficient method's settings.

``model.tuning`` picks the method; the keys here that start with its name (``lora_*`` for
``lora``, ``loha`` and ``lokr``) configure it, and the others are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass

from difftune.config_checks import _check, _check_fields


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
