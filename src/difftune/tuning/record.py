"""What a tuned model records about its tuning: the method, its settings, and the base it belongs to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TuningRecord:
    """The tuning applied to a loaded model (kept with it, and saved beside its adapter).

    Attributes:
        method: the name in :data:`difftune.tuning.TUNING_METHODS`.
        settings: the ``tuning`` config section it was prepared with (as a dict).
        base_fingerprint: :func:`~difftune.backbones.model_fingerprint` of the pre-trained weights,
            taken before the method touched them; an adapter refuses any other base.
        base: where the base came from (``source``, ``vae``, ``vae_subfolder``).
        adapter: the method's weights are saved as an adapter (apart from the base) rather than
            as a whole model.
    """

    method: str
    settings: dict[str, Any]
    base_fingerprint: str
    base: dict[str, Any] = field(default_factory=dict)
    adapter: bool = True
