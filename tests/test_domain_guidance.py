"""Domain guidance: the pre-trained model, unconditional, as the guidance branch of a fine-tuned one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import save_pipeline_dir, tiny_dit
from difftune.backbones import Backbone, Conditioning, load_pretrained
from difftune.cli import main
from difftune.sampling.generate import build_scheduler, generate


class _DomainGuided(Backbone):
    """The guided prediction written out: guide(x, ∅) + w * (model(x, c) - guide(x, ∅))."""

    def __init__(self, model: Backbone, guide: Backbone, scale: float) -> None:
        super().__init__()
        self.model, self.guide, self.scale = model, guide, scale
        self.sample_shape, self.learns_variance = model.sample_shape, False

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        C = self.sample_shape[0]
        uncond = self.guide(x_t, t, self.guide.unconditional(x_t.shape[0]))[:, :C]
        return uncond + self.scale * (self.model(x_t, t, cond)[:, :C] - uncond)


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """A 'fine-tuned' and a 'pre-trained' tiny DiT: same shapes, different weights."""
    return (
        save_pipeline_dir(tmp_path / "finetuned", tiny_dit(seed=1), "transformer"),
        save_pipeline_dir(tmp_path / "pretrained", tiny_dit(seed=2), "transformer"),
    )


def read_folder(root: Path) -> torch.Tensor:
    """Every PNG under ``root`` (sorted) as uint8 (N, H, W, C)."""
    return torch.stack([torch.from_numpy(np.array(Image.open(p))) for p in sorted(root.glob("*.png"))])


def _generate(
    backbone: Backbone, scheduler_config: dict, scale: float, guide: Backbone | None = None
) -> torch.Tensor:
    cond = Conditioning({"labels": torch.tensor([0, 1, 2, 3])})
    scheduler = build_scheduler("DDIMScheduler", scheduler_config)
    return generate(backbone, scheduler, cond, [0, 1, 2, 3], scale, 4, guide=guide)


def test_domain_guidance_is_the_guided_prediction_at_every_step(models: tuple[Path, Path]) -> None:
    finetuned, pretrained = (load_pretrained(str(p)) for p in models)
    ft, pre = finetuned.backbone.eval(), pretrained.backbone.eval()
    guided = _generate(ft, finetuned.scheduler_config, 3.0, guide=pre)
    written_out = _generate(_DomainGuided(ft, pre, 3.0), finetuned.scheduler_config, 1.0)
    torch.testing.assert_close(guided, written_out)
    # it is not classifier-free guidance under another name
    assert not torch.allclose(guided, _generate(ft, finetuned.scheduler_config, 3.0))


def test_guiding_with_the_model_itself_is_classifier_free_guidance(models: tuple[Path, Path]) -> None:
    loaded = load_pretrained(str(models[0]))
    backbone = loaded.backbone.eval()
    cfg = _generate(backbone, loaded.scheduler_config, 2.5)
    torch.testing.assert_close(_generate(backbone, loaded.scheduler_config, 2.5, guide=backbone), cfg)
    # at scale 1 the guide has no effect
    plain = _generate(backbone, loaded.scheduler_config, 1.0)
    torch.testing.assert_close(_generate(backbone, loaded.scheduler_config, 1.0, guide=backbone), plain)


def test_sample_command_with_domain_guidance(models: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    from difftune.commands.sample import sample_to_folder
    from difftune.config.sampling import SamplingSpec

    finetuned, pretrained = models
    args = ["sample", "--model", str(finetuned), "--labels", "0,1", "--per-label", "2", "--steps", "3"]
    args += ["--scheduler", "DDIMScheduler", "--guidance-scale", "2", "--domain-guidance", str(pretrained)]
    assert main([*args, "--out", str(tmp_path / "cli")]) == 0
    manifest = json.loads((tmp_path / "cli" / "difftune_samples.json").read_text())
    assert manifest["domain_guidance"] is True
    spec = SamplingSpec("DDIMScheduler", 3, 2.0)
    guide = load_pretrained(str(pretrained)).backbone
    sample_to_folder(load_pretrained(str(finetuned)), [0, 1], 2, tmp_path / "api", spec, guide=guide)
    for folder in ("cli", "api"):
        (tmp_path / folder / "grid.png").unlink()
    torch.testing.assert_close(read_folder(tmp_path / "cli"), read_folder(tmp_path / "api"))
    unguided = tmp_path / "unguided"
    sample_to_folder(load_pretrained(str(finetuned)), [0, 1], 2, unguided, spec)
    (unguided / "grid.png").unlink()
    assert not torch.equal(read_folder(unguided), read_folder(tmp_path / "api"))


def test_domain_guidance_refusals(models: tuple[Path, Path], tmp_path: Path, capsys) -> None:
    finetuned, pretrained = models
    args = ["sample", "--model", str(finetuned), "--steps", "2", "--out", str(tmp_path / "o")]
    assert main([*args, "--guidance-scale", "1", "--domain-guidance", str(pretrained)]) == 2
    assert "needs --guidance-scale > 1" in capsys.readouterr().err
    other = save_pipeline_dir(tmp_path / "other", tiny_dit(sample_size=4), "transformer")
    assert main([*args, "--guidance-scale", "2", "--domain-guidance", str(other)]) == 2
    assert "makes samples of shape (1, 4, 4), the model (1, 8, 8)" in capsys.readouterr().err
    assert main([*args, "--guidance-scale", "2", "--domain-guidance", str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_a_guide_whose_schedule_names_another_class_of_the_same_process_is_accepted(tmp_path: Path) -> None:
    """A final/ saved before schedules kept their class names DDPMScheduler for a PNDM base: same schedule."""
    from difftune.sampling.generate import load_guide

    base = save_pipeline_dir(tmp_path / "base", tiny_dit(), "transformer")
    config = base / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "_class_name": "PNDMScheduler"}))
    fine = save_pipeline_dir(tmp_path / "fine", tiny_dit(seed=1), "transformer")  # DDPMScheduler, same values
    assert load_guide(str(base), load_pretrained(str(fine))) is not None
