"""Where a method goes in each backbone: target modules, blocks and residual branches.

Methods find their places by module type (diffusers' ``Attention``, ``FeedForward`` and
``BasicTransformerBlock``), so any backbone built from those works; a backbone without the
pieces a method needs gets a one-line error that names the methods that do apply. The modules LoRA
and SVDiff adapt by default are the model family's (``Backbone.adapter_targets``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from torch import nn

from difftune.errors import UserError


def default_targets(
    model: nn.Module, defaults: Mapping[str, Sequence[str]] | None, key: str, setting: str
) -> list[str]:
    """The default target names of method ``key`` (``lora``, ``svdiff``) in ``defaults`` (the model family's,
    ``Backbone.adapter_targets``), or an error that asks for the setting ``tuning.<setting>``."""
    if not defaults or key not in defaults:
        raise UserError(
            f"difftune has no default targets for {type(model).__name__}; set tuning.{setting} to module names"
        )
    return list(defaults[key])


def matches(name: str, targets: list[str]) -> bool:
    """peft's rule: a module matches a target that equals its name or ends it after a dot."""
    return any(name == t or name.endswith("." + t) for t in targets)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def feed_forward_modules(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import FeedForward

    return [m for m in model.modules() if isinstance(m, FeedForward)]


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention import BasicTransformerBlock

    return [m for m in model.modules() if isinstance(m, BasicTransformerBlock)]


def require(found: list[nn.Module], method: str, what: str, model: nn.Module) -> list[nn.Module]:
    """``found``, or a one-line error: ``method`` needs ``what`` and the model has none."""
    if not found:
        raise UserError(
            f"tuning.method={method} needs {what}, and {type(model).__name__} has none; use lora, bitfit, "
            "difffit or svdiff for it"
        )
    return found
