"""Typed experiment configuration: dataclasses validated on construction, YAML load/dump, overrides.

Every section validates itself in ``__post_init__`` and raises :class:`ConfigError` with a one-line,
actionable message. The resolved configuration is saved inside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import yaml

from difftune.config.checks import ConfigError, _check, _check_fields
from difftune.config.data import DataConfig
from difftune.config.files import parse_value, read_config_file, yaml_problem
from difftune.config.names import (
    FITTED_SCHEDULE_NAMES,
    OBJECTIVE_NAMES,
    SCHEDULE_AXES,
    TUNING_METHOD_NAMES,
    is_schedule_name,
    schedule_names,
)
from difftune.config.sampling import SamplingSpec
from difftune.config.train import TrainConfig
from difftune.config.tuning import TuningConfig, check_settings_used
from difftune.io.atomic import atomic_write_text

__all__ = [
    "BankConfig",
    "ConfigError",
    "DataConfig",
    "ExperimentConfig",
    "ModelConfig",
    "ObjectiveConfig",
    "TrainConfig",
    "TuningConfig",
    "apply_overrides",
    "config_from_dict",
    "load_config",
]


NEW_CONTROLNET_TRAINS_IN_FULL = (
    "a parameter-efficient method saves an adapter to load onto its base, and a new ControlNet "
    "(model.controlnet: from_unet) has random layers that are not saved: train it in full (model.tuning: full), "
    "or give an existing ControlNet as model.controlnet"
)


@dataclass
class ModelConfig:
    """Which pre-trained model to transfer.

    Attributes:
        pretrained: hub id or local directory of a diffusers pipeline (``model_index.json``) or of a
            single model (``config.json`` of a ``DiTTransformer2DModel`` or ``UNet2DModel``).
        subfolder: model subfolder inside a pipeline directory; ``None`` picks ``transformer`` or
            ``unet`` automatically.
        vae: optional hub id / directory of an ``AutoencoderKL`` for latent-space models; ``None``
            uses the pipeline's ``vae`` if there is one, else the model works in pixel space.
        revision: optional hub revision.
        tuning: which parameters train: a name in :data:`difftune.config.names.TUNING_METHOD_NAMES` (``full``
            trains every parameter) or a user's TuningMethod class as ``"package.module:Class"``; the method's
            settings are the ``tuning`` section.
        controlnet: train a ControlNet over the Stable Diffusion UNet of ``pretrained`` (which stays
            frozen): ``from_unet`` makes a new one from the UNet's weights, as ControlNet's training
            does; a hub id or directory continues an existing ControlNet; ``None``: no ControlNet.
    """

    pretrained: str = ""
    subfolder: str | None = None
    vae: str | None = None
    revision: str | None = None
    tuning: str = "full"
    controlnet: str | None = None

    def __post_init__(self) -> None:
        _check_fields(self, "model")
        _check(self.controlnet != "from_unet" or self.tuning == "full", NEW_CONTROLNET_TRAINS_IN_FULL)
        _check(
            bool(self.pretrained),
            "model.pretrained is empty: set it to a hub id or a local diffusers directory",
        )
        _check(
            self.tuning in TUNING_METHOD_NAMES or ":" in self.tuning,
            f"model.tuning={self.tuning!r} is unknown; valid: {sorted(TUNING_METHOD_NAMES)}, "
            "or a TuningMethod class as 'package.module:Class'",
        )


@dataclass
class ObjectiveConfig:
    """The Diff-Tuning objective (docs/method.md §2).

    ``loss = mean(target terms) + bank_weight * mean(bank terms)``; target timesteps follow
    ``target_schedule``, bank timesteps ``bank_schedule``. Plain fine-tuning is
    ``target_schedule: uniform, bank_share: 0``.

    Attributes:
        kind: the objective (a name in :data:`difftune.config.names.OBJECTIVE_NAMES`).
        target_schedule: schedule name for the target (reconsolidation) stream, e.g. ``"power_up"``
            (psi(t) grows with t), ``"uniform"``, or the weightings of other methods ``"min_snr"``
            (min-SNR-γ) and ``"inverse_snr"`` (x0 supervision), built from the model's noise levels,
            ``"logit_normal_up"`` (its pre-training density moved toward noise), or ``"data_driven"``: fitted from the pre-trained model's transfer gap before training
            (docs/method.md §10; needs a bank).
        bank_schedule: schedule name for the bank (retention) stream, e.g. ``"power_down"``,
            ``"logit_normal_down"`` or ``"data_driven"``.
        target_exponent: exponent s of the target power schedule (paper default 1).
        bank_exponent: exponent s of the bank power schedule (paper default 1).
        realisation: ``"sample"`` (importance-sample t, the authors' code) or ``"weight"`` (uniform
            t, loss multiplied by the schedule weight).
        bank_share: fraction r of the global batch taken from the bank; bank count = int(r * B).
        bank_weight: lambda, the weight of the retention loss (paper default 0.1).
        cfg_dropout: probability of replacing a target label by the null label (classifier-free
            guidance training), applied once per target sample.
        learn_variance: train the variance channels with the variational-bound term when the model
            predicts them (DiT); ``False`` leaves them out of the loss.
        retention_data: what the retention stream holds: ``"bank"`` (the knowledge bank) or
            ``"target"`` (target samples, with the null condition; no bank needed).
        snr_gamma: γ of the ``min_snr`` schedule (Hang et al. 2023 use 5).
        schedule_axis: the axis the power schedules (``power_up``, ``power_down``) act on:
            ``"index"`` (the paper's: a power law over the normalised index (t + 1) / T) or
            ``"log_snr"`` (the DDPM-linear power law carried over to the model's process by
            matching log-SNR; docs/method.md §12). ``uniform`` stays uniform over the index.
        target_offset: shift, in logit(σ_flow) = -log-SNR / 2 units, of ``logit_normal_up`` from the
            model's pre-training density toward noise (docs/method.md §12); must be >= 0.
        bank_offset: shift of ``logit_normal_down`` from the pre-training density toward data (it
            shifts by ``-bank_offset``); must be >= 0.
        teacher_dtype: ``kind: distillation`` with full fine-tuning keeps a frozen copy of the
            pre-trained model as its teacher, in ``float32`` or ``bfloat16`` (half the memory);
            parameter-efficient methods need no copy (their adapters are switched off instead).
        data_schedule_bins: bins of t a ``data_driven`` schedule is measured and tabulated over.
        data_schedule_draws: forward passes per bin and per set (target, bank) of its fit, each on
            up to ``train.batch_size // train.gradient_accumulation`` samples.
    """

    kind: str = "diff_tuning"
    target_schedule: str = "power_up"
    bank_schedule: str = "power_down"
    target_exponent: float = 1.0
    bank_exponent: float = 1.0
    realisation: str = "sample"
    bank_share: float = 0.2
    bank_weight: float = 0.1
    cfg_dropout: float = 0.1
    learn_variance: bool = True
    retention_data: str = "bank"
    teacher_dtype: str = "float32"
    snr_gamma: float = 5.0
    schedule_axis: str = "index"
    target_offset: float = 1.1
    bank_offset: float = 1.1
    data_schedule_bins: int = 20
    data_schedule_draws: int = 8

    def __post_init__(self) -> None:
        _check_fields(self, "objective")
        _check(
            self.kind in OBJECTIVE_NAMES,
            f"objective.kind={self.kind!r} is unknown; valid: {sorted(OBJECTIVE_NAMES)}",
        )
        _check(
            self.realisation in ("sample", "weight"),
            f"objective.realisation={self.realisation!r}: use 'sample' or 'weight'",
        )
        _check(0.0 <= self.bank_share < 1.0, f"objective.bank_share={self.bank_share} must be in [0, 1)")
        _check(self.bank_weight >= 0.0, f"objective.bank_weight={self.bank_weight} must be >= 0")
        _check(0.0 <= self.cfg_dropout < 1.0, f"objective.cfg_dropout={self.cfg_dropout} must be in [0, 1)")
        _check(self.target_exponent >= 0 and self.bank_exponent >= 0, "objective exponents must be >= 0")
        _check(self.snr_gamma > 0, f"objective.snr_gamma={self.snr_gamma} must be > 0")
        _check(
            self.schedule_axis in SCHEDULE_AXES,
            f"objective.schedule_axis={self.schedule_axis!r}: use one of {list(SCHEDULE_AXES)}",
        )
        _check(
            self.target_offset >= 0 and self.bank_offset >= 0,
            f"objective.target_offset={self.target_offset} and objective.bank_offset={self.bank_offset} "
            "must be >= 0 (logit_normal_down shifts by -bank_offset)",
        )
        for key in ("target_schedule", "bank_schedule"):
            name = getattr(self, key)
            _check(
                is_schedule_name(name),
                f"objective.{key}={name!r} is unknown; valid: {schedule_names()} or 'package.module:function'",
            )
        _check(
            self.data_schedule_bins >= 1 and self.data_schedule_draws >= 1,
            "objective.data_schedule_bins and objective.data_schedule_draws must be >= 1",
        )
        _check(
            self.retention_data in ("bank", "target"),
            f"objective.retention_data={self.retention_data!r}: use 'bank' or 'target'",
        )
        _check(
            self.teacher_dtype in ("float32", "bfloat16"),
            f"objective.teacher_dtype={self.teacher_dtype!r}: use 'float32' or 'bfloat16'",
        )
        _check(
            self.kind != "distillation" or self.bank_share > 0,
            "objective.kind=distillation distils on the retention share of each batch, and "
            "objective.bank_share=0 gives it none; set objective.bank_share > 0 (with "
            f"objective.retention_data={self.retention_data} that share is "
            f"{'target images, no bank needed' if self.retention_data == 'target' else 'bank samples'}), "
            "or use objective.kind=diff_tuning",
        )

    @property
    def fitted_schedules(self) -> list[str]:
        """The streams (``target_schedule``, ``bank_schedule``) whose schedule is fitted from data."""
        return [k for k in ("target_schedule", "bank_schedule") if getattr(self, k) in FITTED_SCHEDULE_NAMES]


@dataclass
class BankConfig:
    """The knowledge bank: samples of the frozen pre-trained model (docs/method.md §2).

    Attributes:
        path: directory of the bank (shards + ``manifest.json``); empty = no bank.
        num_samples: number of samples to generate.
        guidance_scale: classifier-free guidance scale used to generate (1 = no guidance).
        scheduler: diffusers scheduler class name used to generate.
        num_inference_steps: sampling steps.
        seed: base seed; sample i uses seed ``seed + i``.
        shard_size: samples per shard file.
        batch_size: generation batch size (does not change the result).
        prompts: a text-conditional model's bank prompts: a text file with one prompt per line;
            ``None`` uses the target set's captions. Sample i gets prompt ``i mod P``.
        condition: the condition bank samples are trained with: ``"null"`` (the unconditional
            form: the empty prompt; a ControlNet keeps each sample's control image) or ``"own"``
            (the condition each sample was generated with).
    """

    path: str = ""
    num_samples: int = 1000
    guidance_scale: float = SamplingSpec.guidance_scale
    scheduler: str = SamplingSpec.scheduler
    num_inference_steps: int = SamplingSpec.steps
    seed: int = 0
    shard_size: int = 256
    batch_size: int = 64
    prompts: str | None = None
    condition: str = "null"

    def __post_init__(self) -> None:
        _check_fields(self, "bank")
        _check(self.condition in ("null", "own"), f"bank.condition={self.condition!r}: use 'null' or 'own'")
        _check(self.num_samples > 0, f"bank.num_samples={self.num_samples} must be > 0")
        _check(self.shard_size > 0 and self.batch_size > 0, "bank.shard_size and bank.batch_size must be > 0")
        _check(self.num_inference_steps > 0, "bank.num_inference_steps must be > 0")
        _check(self.guidance_scale >= 1.0, f"bank.guidance_scale={self.guidance_scale} must be >= 1")

    @property
    def sampling(self) -> SamplingSpec:
        """How the bank is sampled (sample i has seed ``seed + i``)."""
        return SamplingSpec(self.scheduler, self.num_inference_steps, self.guidance_scale, self.seed)


@dataclass
class ExperimentConfig:
    """A whole Diff-Tuning experiment: model, target data, bank, objective and training loop.

    Attributes:
        unset: ``section.key`` of every setting that the config file and the overrides left out, so
            that its default applies (:func:`load_config` fills it; empty for a config built in code).
    """

    model: ModelConfig
    data: DataConfig
    bank: BankConfig = field(default_factory=BankConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tuning: TuningConfig = field(default_factory=TuningConfig)
    unset: frozenset[str] = field(default=frozenset(), repr=False, compare=False)

    def __post_init__(self) -> None:
        check_settings_used(self.model.tuning, self.tuning)
        _check(
            self.objective.bank_share == 0.0 or bool(self.bank.path) or not self.uses_bank,
            "objective.bank_share > 0 but bank.path is empty: set bank.path, objective.retention_data=target "
            "or objective.bank_share=0",
        )
        _check(
            self.objective.bank_share == 0.0 or self.bank_count > 0,
            f"objective.bank_share={self.objective.bank_share} of train.batch_size={self.train.batch_size} rounds "
            "to 0 bank samples per batch; raise one of them, or set objective.bank_share=0",
        )
        fitted = self.objective.fitted_schedules
        _check(
            not fitted or self.uses_bank,
            f"objective.{fitted[0] if fitted else ''}=data_driven compares the pre-trained model on the target "
            "data with its own samples and needs a bank: set bank.path, objective.bank_share > 0 and "
            "objective.retention_data=bank, or choose another schedule",
        )

    @property
    def uses_bank(self) -> bool:
        """The retention stream reads the knowledge bank (not the target set)."""
        return self.bank_count > 0 and self.objective.retention_data == "bank"

    @property
    def bank_count(self) -> int:
        """Bank samples per global batch, int(r * B) as in the authors' code."""
        return int(self.objective.bank_share * self.train.batch_size)

    @property
    def default_steps(self) -> bool:
        """``train.max_steps`` was left out of the config, so that its default applies."""
        return "train.max_steps" in self.unset

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict of the sections (YAML-serialisable)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name in _SECTIONS}

    def save(self, path: str | os.PathLike) -> None:
        """Write the resolved config as YAML (atomically)."""
        atomic_write_text(path, yaml.safe_dump(self.to_dict(), sort_keys=False))


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "bank": BankConfig,
    "objective": ObjectiveConfig,
    "train": TrainConfig,
    "tuning": TuningConfig,
}


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw config dict (returns a new dict)."""
    for name in _SECTIONS:
        if not isinstance(raw.get(name) or {}, dict):
            raise ConfigError(f"config section {name!r} must be a mapping of key: value")
    out = {
        **raw,
        **{name: dict(raw.get(name) or {}) for name in _SECTIONS},
    }  # unknown sections kept for the check
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f"override key {key!r} must be section.key with section in {sorted(_SECTIONS)}")
        section, name = parts
        valid = {f.name for f in dataclasses.fields(_SECTIONS[section])}
        if name not in valid:
            raise ConfigError(f"unknown key {key!r}; valid keys of {section!r}: {sorted(valid)}")
        try:
            out[section][name] = parse_value(value)
        except yaml.YAMLError as err:
            raise ConfigError(
                f"--set {item!r}: the value is not valid YAML ({yaml_problem(err)}); fix it (a list is "
                f"written [1, 2]), or quote it to give it as text: --set '{key}=\"{value}\"'"
            ) from None
    return out


def config_from_dict(raw: dict[str, Any], overridden: Collection[str] = ()) -> ExperimentConfig:
    """Build and validate an :class:`ExperimentConfig` from a nested dict.

    ``overridden``: the ``section.key`` names set explicitly (by ``--set``); a ``tuning`` key among
    them that ``model.tuning`` does not read is refused even at its default value.
    """
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)}; valid: {sorted(_SECTIONS)}")
    sections, unset = {}, set()
    for name, cls in _SECTIONS.items():
        values = raw.get(name) or {}
        valid = {f.name for f in dataclasses.fields(cls)}
        bad = set(values) - valid
        if bad:
            raise ConfigError(f"unknown key(s) {sorted(bad)} in section {name!r}; valid: {sorted(valid)}")
        try:
            sections[name] = cls(**values)
        except TypeError as err:
            raise ConfigError(f"section {name!r}: {err}") from None
        unset |= {f"{name}.{key}" for key in valid - set(values)}
    given = {key.split(".", 1)[1] for key in overridden if key.startswith("tuning.")}
    check_settings_used(sections["model"].tuning, sections["tuning"], given)
    return ExperimentConfig(**sections, unset=frozenset(unset))


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """Load a YAML config file (or start from defaults when ``path`` is None) and apply overrides."""
    raw = read_config_file(path) if path is not None else {}
    overrides = overrides or []
    overridden = [item.split("=", 1)[0].strip() for item in overrides]
    return config_from_dict(apply_overrides(raw, overrides), overridden)
