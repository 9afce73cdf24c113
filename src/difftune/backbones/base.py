"""The one interface every backbone adapter implements (k-diffusion ``external.py`` style).

An adapter wraps one diffusers model class and owns its conditioning: what a condition bundle holds,
its unconditional form and the classifier-free-guidance drop. The objective, the sampler, the bank
and the trainer pass :class:`~difftune.backbones.conditioning.Conditioning` through untouched.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from difftune.backbones.conditioning import Conditioning
from difftune.errors import UserError


class Backbone(nn.Module):
    """A conditional denoiser: ``forward(x_t, t, cond) -> raw model output``.

    Attributes:
        inner: the wrapped diffusers model (what ``save_pretrained`` writes).
        subfolder: the sub-folder the model is saved in (``transformer`` or ``unet``).
        learns_variance: the output has ``2 * C`` channels (epsilon-like prediction + variance
            interpolation values in [-1, 1], as DiT / improved DDPM); the objective adds the
            variational-bound term for them.
        sample_shape: (C, H, W) of the space the diffusion runs in (latents or pixels).
        pipeline_class: the stock diffusers pipeline that can run a saved model of this kind (with
            a VAE), or ``None``.
        pipeline_processes: the forward processes (:func:`difftune.process.process_name`) that
            pipeline samples: a saved model of another process gets no stock pipeline index.
        condition_names: the names of the tensors a condition bundle holds.
        family: the model family this adapter belongs to
            (:class:`~difftune.backbones.family.ModelFamily`; set by the family's module).
        size_buckets: it trains and samples at other sizes than ``sample_shape`` with the same
            conditions, so ``data.buckets`` may give its batches other aspect ratios.
        shard_units: classes of :attr:`inner` that FSDP must shard as units of their own besides its
            repeated blocks: modules the model calls from outside their block's forward.
    """

    inner: nn.Module
    pipeline_class: str | None = None
    pipeline_processes: tuple[str, ...] = ("ddpm",)
    condition_names: tuple[str, ...] = ()
    family: Any = None
    size_buckets: bool = False
    shard_units: tuple[str, ...] = ()
    learns_variance: bool
    sample_shape: tuple[int, int, int]
    subfolder: str

    def backpropagated_models(self) -> list[nn.Module]:
        """The diffusers models the training loss backpropagates through: :attr:`inner`, and a frozen
        model that the trained one feeds (a ControlNet's UNet); gradient checkpointing covers them all."""
        return [self.inner]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Predict from ``x_t`` (N, C, H, W), integer timesteps ``t`` (N,) and a bundle of N conditions.

        Returns:
            (N, C, H, W), or (N, 2C, H, W) when :attr:`learns_variance`.
        """
        raise NotImplementedError

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        """The unconditional form of the condition, for ``n`` samples (guidance's second branch)."""
        raise NotImplementedError

    def drop(self, cond: Conditioning, mask: torch.Tensor) -> Conditioning:
        """Classifier-free-guidance drop: rows where ``mask`` (N,) is True become unconditional.

        The default replaces every tensor of the bundle; a model whose condition has parts that
        guidance keeps (a ControlNet's control image) overrides this.
        """
        return cond.where(mask, self.unconditional(cond.batch_size, cond.device))

    def check_condition(self, cond: Conditioning) -> None:
        """Refuse a condition bundle this model cannot consume (ValueError with the fix)."""

    @property
    def adapter_targets(self) -> dict[str, list[str]]:
        """Method (``lora``, ``svdiff``) -> the modules of :attr:`inner` it adapts by default (the family's)."""
        return {key: list(names) for key, names in self.family.adapter_targets.items()}

    @property
    def source_model(self) -> nn.Module:
        """The module whose weights are the pre-trained model (what banks record): :attr:`inner`, or
        the frozen model a trained add-on (a ControlNet) steers."""
        return self.inner

    def bank_generator(self) -> Backbone:
        """The denoiser that generates the knowledge bank: the pre-trained model itself."""
        return self

    def bank_extras(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Conditions computed from a bank's decoded samples ``images`` in [-1, 1] (a ControlNet's
        control images); none by default."""
        return {}

    def bank_condition(self, indices: torch.Tensor) -> Conditioning:
        """The condition knowledge-bank sample ``i`` is generated with, for each ``i`` in ``indices`` (N,)."""
        raise NotImplementedError

    def bank_record(self) -> dict[str, Any]:
        """What the bank's manifest records about :meth:`bank_condition` (JSON-serialisable)."""
        return {}

    def sized_condition(self, cond: Conditioning, size: tuple[int, int]) -> Conditioning:
        """``cond`` for samples that decode to ``size`` = (height, width) pixels instead of the model's own
        size (a bank's bucket, ``data.buckets``): the same, unless the model reads its samples' size
        (SDXL's ``time_ids``)."""
        return cond

    def bucket_problem(self, shape: tuple[int, int, int]) -> str | None:
        """Why the model cannot take samples of ``shape`` = (C, H, W), a bucket's (``data.buckets``), in a
        few words; ``None``: it can."""
        return None


class ClassConditionalBackbone(Backbone):
    """A backbone conditioned on class labels: ``cond = {"labels": (N,) int64}``.

    Attributes:
        num_classes: number of source classes K; label ``K`` is the null (unconditional) label.
    """

    num_classes: int
    condition_names = ("labels",)

    @property
    def null_label(self) -> int:
        """Label id of the unconditional branch."""
        return self.num_classes

    @staticmethod
    def condition(labels: torch.Tensor | list[int]) -> Conditioning:
        """The condition bundle of class labels (N,)."""
        return Conditioning({"labels": torch.as_tensor(labels, dtype=torch.long)})

    def unconditional(self, n: int, device: torch.device | str = "cpu") -> Conditioning:
        return self.condition(torch.full((n,), self.null_label, dtype=torch.long, device=device))

    def check_condition(self, cond: Conditioning) -> None:
        if "labels" not in cond:
            raise UserError(
                f"a class-conditional model needs class labels, got a condition with {list(cond)}"
            )
        if cond.batch_size:
            self.check_target_classes(int(cond["labels"].max()) + 1)

    def check_target_classes(self, num_target_classes: int) -> None:
        """Refuse a target label set that does not fit in the source's label rows 0..K-1."""
        if num_target_classes > self.num_classes:
            raise UserError(
                f"target dataset has {num_target_classes} classes but the source model has only "
                f"{self.num_classes} label rows; use a source model with at least as many classes"
            )

    def bank_condition(self, indices: torch.Tensor) -> Conditioning:
        """Classes uniform over the source label set: sample ``i`` has label ``i mod K``."""
        return self.condition(indices % self.num_classes)

    def bank_record(self) -> dict[str, Any]:
        return {"num_classes": self.num_classes, "label_rule": "i mod num_classes"}


def enable_gradient_checkpointing(backbone: Backbone) -> None:
    """Turn on gradient checkpointing (``train.gradient_checkpointing``) in every diffusers model the
    loss backpropagates through (:meth:`Backbone.backpropagated_models`), as diffusers' ControlNet script
    does for its frozen UNet too.

    Raises:
        UserError: the trained model does not support it.
    """
    trained, *frozen = backbone.backpropagated_models()
    if not getattr(trained, "_supports_gradient_checkpointing", False):
        raise UserError(
            f"{type(trained).__name__} does not support gradient checkpointing; set train.gradient_checkpointing=false"
        )
    for model in (trained, *frozen):
        if getattr(model, "_supports_gradient_checkpointing", False):
            model.enable_gradient_checkpointing()
