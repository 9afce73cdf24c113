"""Where a method goes in each backbone: default target modules, blocks and residual branches.

Methods find their places by module type (diffusers' ``Attention``, ``FeedForward`` and
``BasicTransformerBlock``), so any backbone built from those works; a backbone without the
pieces a method needs gets a one-line error that names the methods that do apply.
"""

from __future__ import annotations

from torch import nn

from difftune.errors import UserError

# diffusers class -> names (or suffixes) of the linear layers LoRA and SVDiff adapt by default
DEFAULT_TARGETS: dict[str, list[str]] = {
    "DiTTransformer2DModel": ["to_q", "to_k", "to_v", "to_out.0"],
    "UNet2DModel": ["to_q", "to_k", "to_v", "to_out.0"],
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0"],  # diffusers' SD LoRA training
    "ControlNetModel": ["to_q", "to_k", "to_v", "to_out.0"],
}
DEFAULT_SVDIFF_TARGETS: dict[str, list[str]] = {
    "DiTTransformer2DModel": ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"],
    "UNet2DModel": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    "UNet2DConditionModel": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
    "ControlNetModel": ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"],
}


def default_targets(model: nn.Module, table: dict[str, list[str]], key: str) -> list[str]:
    """The default target names of ``model``'s class, or an error that asks for ``tuning.<key>``."""
    name = type(model).__name__
    if name not in table:
        raise UserError(f"difftune has no default targets for {name}; set tuning.{key} to module names")
    return table[name]


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
            f"model.tuning={method} needs {what}, and {type(model).__name__} has none; use lora, bitfit, "
            "difffit or svdiff for it"
        )
    return found
