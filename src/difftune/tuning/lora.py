"""LoRA and its peft relatives (LoHa, LoKr), injected with peft into any diffusers model.

DiT and ``UNet2DModel`` have no ``add_adapter``; :func:`peft.inject_adapter_in_model` adds the
layers in place, with peft's own initialisation (the update is exactly zero at the start). Only
the adapters' parameters train.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from difftune.config.tuning import TuningConfig
from difftune.errors import UserError
from difftune.tuning.base import AdapterMethod
from difftune.tuning.targets import default_targets

ADAPTER_NAME = "default"


class PeftTuning(AdapterMethod):
    """One of peft's low-rank adapters (``kind``: ``lora``, ``loha`` or ``lokr``)."""

    def __init__(self, settings: TuningConfig, kind: str = "lora") -> None:
        super().__init__(settings)
        self.kind = kind

    def peft_config(self, model: nn.Module, defaults: dict[str, list[str]] | None = None) -> Any:
        """The peft config this method injects into ``model`` (``defaults``: the backbone's default targets;
        those it was prepared with when not given)."""
        import peft

        s = self.settings.lora
        defaults = self.defaults if defaults is None else defaults
        targets = s.targets or default_targets(model, defaults, "lora", "lora.targets")
        if self.kind == "lora":
            return peft.LoraConfig(
                r=s.rank, lora_alpha=s.alpha, lora_dropout=s.dropout, target_modules=targets
            )
        config = {"loha": peft.LoHaConfig, "lokr": peft.LoKrConfig}[self.kind]
        return config(r=s.rank, alpha=s.alpha, rank_dropout=s.dropout, target_modules=targets)

    def add(self, inner: nn.Module) -> None:
        """Inject the adapters into the diffusers model."""
        import peft

        config = self.peft_config(inner)
        try:
            peft.inject_adapter_in_model(config, inner, adapter_name=ADAPTER_NAME)
        except ValueError as err:  # no module matched the targets
            raise UserError(
                f"tuning.method={self.kind}: {str(err).splitlines()[0]}; set tuning.lora.targets to module names "
                f"of {type(inner).__name__}"
            ) from None
