"""Condition fidelity during ControlNet training: fixed (prompt, control) pairs, generated and scored.

At step 0 and every ``train.validation_every`` steps the run generates one image per pair (fixed
seeds 0..N-1, the run's sampling settings), annotates each again and scores the re-extracted
control against the input one; the scores go to ``fidelity.jsonl``, which ``difftune convergence``
reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from difftune.backbones.base import Backbone
from difftune.backbones.codec import LatentCodec
from difftune.backbones.conditioning import Conditioning
from difftune.config.sampling import SamplingSpec
from difftune.control.annotators import Annotator
from difftune.control.fidelity import condition_fidelity
from difftune.control.log import append_fidelity
from difftune.errors import UserError
from difftune.sampling.shares import generate_shared


def check_validation(validation_every: int, backbone: Backbone, annotator: str | None) -> None:
    """Refuse ``train.validation_every`` where fidelity cannot be measured (a model that follows no control
    images, or no annotator)."""
    if validation_every and (not backbone.family.has_control() or not annotator):
        raise UserError(
            "train.validation_every measures how well images follow their control image, re-extracted by "
            "data.annotator: it needs a ControlNet and data.annotator (or set train.validation_every=0)"
        )


def validation_pairs(cond: Conditioning, count: int) -> Conditioning:
    """``count`` conditions spread evenly over the target set (the same ones in every run on it)."""
    return cond.spread(count)


class FidelityValidation:
    """Generates from fixed pairs and logs how faithfully the images follow their control.

    Args:
        pairs: the (prompt embeddings, control image) conditions to generate from.
        annotator: what made the control images; it re-extracts them from generated images.
        codec: decodes generated samples to pixels.
        scheduler_config: the model's noise schedule.
        spec: sampler, steps and guidance (seeds 0..N-1).
        run_dir: where ``fidelity.jsonl`` is written.
        edge_tolerance: pixels an edge may be off in edge F1.
    """

    def __init__(
        self,
        pairs: Conditioning,
        annotator: Annotator,
        codec: LatentCodec,
        scheduler_config: dict[str, Any],
        spec: SamplingSpec,
        run_dir: Path,
        edge_tolerance: int = 1,
    ) -> None:
        self.pairs = pairs
        self.edge_tolerance = edge_tolerance
        self.annotator = annotator
        self.codec = codec
        self.scheduler_config = scheduler_config
        self.spec = SamplingSpec(spec.scheduler, spec.steps, spec.guidance_scale, seed=0)
        self.run_dir = run_dir

    @torch.no_grad()
    def scores(
        self, backbone: Backbone, device: torch.device | str, shared: Any | None = None
    ) -> dict[str, float] | None:
        """Fidelity of ``backbone``'s images to their controls (mse, ssim, dssim, edge_f1).

        ``shared``: the accelerator of a sharded run, whose processes share the work; call it on every
        process then (a sharded model's forward pass needs all of them): each generates and decodes its
        share of the pairs (pair ``i`` keeps seed ``i``), and the main process gathers and scores them
        all; the others get ``None``.
        """
        was_training = backbone.training
        backbone.eval()
        try:
            decode = self.codec.to(device).decode
            images = generate_shared(
                backbone, self.scheduler_config, self.spec, self.pairs, decode, device, shared
            )
        finally:
            backbone.train(was_training)
        if shared is not None and not shared.is_main_process:
            return None
        generated = self.annotator(images.float().cpu())
        controls = backbone.family.control_images(self.pairs)
        return condition_fidelity(generated, controls, self.edge_tolerance)

    def log(
        self, backbone: Backbone, step: int, device: torch.device | str, shared: Any | None = None
    ) -> dict[str, float] | None:
        """Score ``backbone`` and append the scores for ``step`` to the run's ``fidelity.jsonl`` (as
        :meth:`scores`: under sharding on every process, the main one scoring and writing)."""
        scores = self.scores(backbone, device, shared)
        if scores is not None:
            append_fidelity(self.run_dir, step, scores)
        return scores
