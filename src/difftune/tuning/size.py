"""Is the adapter parameter-efficient? Checked once, when a run has applied its tuning method.

A LoRA rank above a layer's full rank, min(in, out), adds parameters and no capacity: above that of
every adapted layer it is refused, above that of some it is reported. An adapter that trains more
than :data:`MAX_ADAPTER_SHARE` of the base model's parameters is reported: it is not
parameter-efficient, and full fine-tuning trains the model itself for not much more.
"""

from __future__ import annotations

import logging

from torch import nn

from difftune.config.tuning import TuningConfig
from difftune.errors import UserError
from difftune.tuning.base import trainable_parameters

logger = logging.getLogger(__name__)

MAX_ADAPTER_SHARE = 0.5  # trainable parameters / the base model's, above which an adapter is reported
# the setting that sets each method's size (methods without one cannot outgrow their base)
SIZE_SETTINGS = {
    "lora": ("lora", "rank"),
    "loha": ("lora", "rank"),
    "lokr": ("lora", "rank"),
    "adaptformer": ("adaptformer", "dim"),
    "vpt": ("vpt", "tokens"),
}
RANKED = ("lora", "loha")  # their update's rank is at most tuning.lora.rank (LoKr's rank means another thing)


def full_ranks(model: nn.Module) -> list[int]:
    """min(out, in) of the weight under each peft adapter in ``model`` (a conv's in counts its kernel)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    ranks = []
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            weight = module.get_base_layer().weight
            ranks.append(min(weight.shape[0], weight[0].numel()))
    return ranks


def check_rank(method: str, rank: int, model: nn.Module) -> None:
    """Refuse a ``tuning.lora.rank`` above the full rank of every layer ``method`` adapted in ``model``;
    report one above that of some of them.

    Raises:
        UserError: no adapted layer can use the rank.
    """
    ranks = full_ranks(model) if method in RANKED else []
    over = [r for r in ranks if rank > r]
    if not over:
        return
    if len(over) == len(ranks):
        raise UserError(
            f"tuning.lora.rank={rank} is above the full rank min(in, out) of every layer tuning.method={method} "
            f"adapts (at most {max(ranks)}), so it adds parameters and no capacity; set tuning.lora.rank to at "
            f"most {max(ranks)}"
        )
    logger.warning(
        "tuning.lora.rank=%d is above the full rank min(in, out) of %d of the %d layers tuning.method=%s "
        "adapts (down to %d): there it adds parameters and no capacity",
        rank,
        len(over),
        len(ranks),
        method,
        min(over),
    )


def check_adapter_size(method: str, settings: TuningConfig, model: nn.Module) -> None:
    """Check that ``model``, prepared by the parameter-efficient ``method``, is worth its adapter.

    Refuses a pointless LoRA rank (:func:`check_rank`) and reports (one warning) trainable
    parameters above :data:`MAX_ADAPTER_SHARE` of the frozen base's. Nothing for other methods.

    Raises:
        UserError: the rank is above the full rank of every adapted layer.
    """
    if method not in SIZE_SETTINGS:
        return
    check_rank(method, settings.lora.rank, model)
    trainable = sum(p.numel() for p in trainable_parameters(model))
    base = sum(p.numel() for p in model.parameters()) - trainable
    if trainable > MAX_ADAPTER_SHARE * base:
        group, key = SIZE_SETTINGS[method]
        logger.warning(
            "tuning.method=%s trains %s parameters, %.0f%% of the base model's %s (which full fine-tuning, "
            "tuning.method=full, trains): not parameter-efficient; lower tuning.%s.%s (now %s) or train in full",
            method,
            f"{trainable:,}",
            100 * trainable / max(base, 1),
            f"{base:,}",
            group,
            key,
            getattr(getattr(settings, group), key),
        )
