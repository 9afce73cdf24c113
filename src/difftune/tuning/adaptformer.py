"""AdaptFormer: a bottleneck adapter in parallel with every feed-forward block.

``ff(x) + s * up(relu(down(x)))`` with ``up`` zero at the start, so the model starts (and, switched
off, stays) exactly the pre-trained one. The adapter is a child of its feed-forward module, so it
is saved, loaded and moved with the model.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difftune.tuning.base import AdapterMethod
from difftune.tuning.switch import Switchable
from difftune.tuning.targets import feed_forward_modules, require


class ParallelAdapter(Switchable):
    """``s * up(relu(down(x)))``, added to its host module's output by a forward hook."""

    def __init__(self, width: int, bottleneck: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(width, bottleneck)
        self.up = nn.Linear(bottleneck, width)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(torch.relu(self.down(x))) * self.scale

    def attach(self, host: nn.Module) -> None:
        """Become ``host.adaptformer`` and add to ``host``'s output."""
        host.adaptformer = self
        host.register_forward_hook(_add_parallel)


def _add_parallel(host: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
    adapter = host.adaptformer
    return output + adapter(args[0]) if adapter.enabled else output


class AdaptFormerTuning(AdapterMethod):
    """A parallel adapter beside each feed-forward block trains; the model stays frozen."""

    def add(self, inner: nn.Module) -> None:
        for host in require(feed_forward_modules(inner), "adaptformer", "feed-forward blocks", inner):
            first = host.net[0].proj if hasattr(host.net[0], "proj") else host.net[0]
            adapter = ParallelAdapter(
                first.in_features, self.settings.adaptformer.dim, self.settings.adaptformer.scale
            )
            adapter.to(device=first.weight.device, dtype=first.weight.dtype).attach(host)
