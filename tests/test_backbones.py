"""Tests for difftune.backbones: loading every supported layout, the adapters, saving, the codec."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDPMScheduler, DiTTransformer2DModel, UNet2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.training_utils import EMAModel

from conftest import save_pipeline_dir, tiny_dit, tiny_unet, tiny_vae
from difftune.backbones import LatentCodec, load_pretrained, model_fingerprint, save_model
from difftune.backbones.noise_schedule import DEFAULT_NOISE_SCHEDULE, stated_keys
from difftune.tuning import trainable_parameters


def assert_state_equal(a: torch.nn.Module | dict, b: torch.nn.Module | dict) -> None:
    """Same keys and bit-identical tensors."""
    sa = a if isinstance(a, dict) else a.state_dict()
    sb = b if isinstance(b, dict) else b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


# fixture, model builder, (num_classes, learns_variance, sample_shape, is_latent)
LAYOUTS = {
    "dit_dir": (tiny_dit, (5, True, (1, 8, 8), False)),
    "unet_dir": (tiny_unet, (5, False, (1, 8, 8), False)),
    "latent_dit_dir": (lambda: tiny_dit(in_channels=4, sample_size=2), (5, True, (4, 2, 2), True)),
}


@pytest.mark.parametrize("fixture", sorted(LAYOUTS))
def test_load_pipeline_like_dir(fixture: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(fixture)
    build, (num_classes, learns_variance, shape, is_latent) = LAYOUTS[fixture]
    loaded = load_pretrained(str(path))
    bb = loaded.backbone
    assert bb.num_classes == num_classes
    assert bb.null_label == num_classes
    assert bb.learns_variance is learns_variance
    assert bb.sample_shape == shape
    assert loaded.codec.is_latent is is_latent
    assert loaded.source == str(path)
    assert_state_equal(bb.inner, build())  # the saved weights, not a fresh init
    assert loaded.scheduler_config["num_train_timesteps"] == 1000
    if is_latent:
        assert loaded.vae_source == str(path) and loaded.vae_subfolder == "vae"
        assert_state_equal(loaded.codec.vae, tiny_vae())
    else:
        assert loaded.vae_source is None
    # the adapter's output has the advertised channels
    x = torch.randn(2, *shape)
    out = bb(x, torch.tensor([3, 999]), bb.condition([0, bb.null_label]))
    assert out.shape == (2, shape[0] * (2 if learns_variance else 1), *shape[1:])


@pytest.mark.parametrize("build", [tiny_dit, tiny_unet], ids=["dit", "unet"])
def test_load_single_model_dir_uses_default_ddpm_schedule(build, tmp_path: Path) -> None:
    model = build()
    model.save_pretrained(tmp_path / "single")
    loaded = load_pretrained(str(tmp_path / "single"))
    assert_state_equal(loaded.backbone.inner, model)
    assert loaded.scheduler_config == DEFAULT_NOISE_SCHEDULE  # every key stated: one grid for every sampler
    stock = {k: v for k, v in DDPMScheduler().config.items() if not k.startswith("_")}
    assert {
        k: v for k, v in DDPMScheduler.from_config(loaded.scheduler_config).config.items() if k in stock
    } == stock
    assert not loaded.codec.is_latent
    assert loaded.backbone.num_classes == 5


def test_load_dir_with_model_index(tmp_path: Path) -> None:
    root = tmp_path / "pipe"
    dit, vae = tiny_dit(in_channels=4, sample_size=2), tiny_vae()
    dit.save_pretrained(root / "transformer")
    vae.save_pretrained(root / "vae")
    DDPMScheduler(num_train_timesteps=500, beta_schedule="squaredcos_cap_v2").save_pretrained(
        root / "scheduler"
    )
    (root / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "DiTPipeline",
                "_diffusers_version": "0.42.1",
                "id2label": {"0": "a"},
                "scheduler": ["diffusers", "DDPMScheduler"],
                "transformer": ["diffusers", "DiTTransformer2DModel"],
                "vae": ["diffusers", "AutoencoderKL"],
            }
        )
    )
    loaded = load_pretrained(str(root))
    assert loaded.backbone.sample_shape == (4, 2, 2)
    assert loaded.backbone.learns_variance
    assert loaded.codec.is_latent
    assert (loaded.vae_source, loaded.vae_subfolder) == (str(root), "vae")
    assert_state_equal(loaded.backbone.inner, dit)
    assert_state_equal(loaded.codec.vae, vae)
    # the pipeline's own schedule, not the default one
    assert loaded.scheduler_config["num_train_timesteps"] == 500
    assert loaded.scheduler_config["beta_schedule"] == "squaredcos_cap_v2"


def test_load_original_dit_class_name(tmp_path: Path) -> None:
    """Original DiT checkpoints name their class ``Transformer2DModel`` with its extra config keys."""
    model = tiny_dit()
    model.save_pretrained(tmp_path / "orig")
    config_path = tmp_path / "orig" / "config.json"
    config = json.loads(config_path.read_text())
    config.update(
        _class_name="Transformer2DModel",
        cross_attention_dim=None,
        num_vector_embeds=None,
        only_cross_attention=False,
        use_linear_projection=False,
    )
    config_path.write_text(json.dumps(config))
    loaded = load_pretrained(str(tmp_path / "orig"))
    assert isinstance(loaded.backbone.inner, DiTTransformer2DModel)
    assert (loaded.backbone.num_classes, loaded.backbone.null_label) == (5, 5)
    assert loaded.backbone.learns_variance
    assert_state_equal(loaded.backbone.inner, model)


def test_unsupported_class_lists_supported(tmp_path: Path) -> None:
    tiny_vae().save_pretrained(tmp_path / "vae_only")
    with pytest.raises(ValueError, match="AutoencoderKL.*DiTTransformer2DModel.*UNet2DModel"):
        load_pretrained(str(tmp_path / "vae_only"))


def test_dit_label_dropout_disabled(dit_dir: Path) -> None:
    stock = tiny_dit()
    backbone = load_pretrained(str(dit_dir)).backbone.train()
    drops = [m.dropout_prob for m in backbone.inner.modules() if isinstance(m, LabelEmbedding)]
    assert len(drops) == 2 and all(p == 0.0 for p in drops)  # one per block
    torch.manual_seed(0)
    x, t, y = torch.randn(32, 1, 8, 8), torch.randint(0, 1000, (32,)), torch.randint(0, 5, (32,))
    with torch.no_grad():
        cond = backbone.condition(y)
        first, second = backbone(x, t, cond), backbone(x, t, cond)
        # control: stock diffusers in train mode drops labels at random, so the check is sensitive
        stock.train()
        stock_a = stock(x, timestep=t, class_labels=y).sample
        stock_b = stock(x, timestep=t, class_labels=y).sample
    assert torch.equal(first, second)
    assert not torch.equal(stock_a, stock_b)
    # and the adapter in eval mode computes what stock diffusers computes in eval mode
    with torch.no_grad():
        assert torch.equal(backbone.eval()(x, t, cond), stock.eval()(x, timestep=t, class_labels=y).sample)


@pytest.mark.parametrize("fixture", ["dit_dir", "unet_dir"])
def test_check_target_classes(fixture: str, request: pytest.FixtureRequest) -> None:
    backbone = load_pretrained(str(request.getfixturevalue(fixture))).backbone
    backbone.check_target_classes(5)
    backbone.check_target_classes(2)
    with pytest.raises(ValueError, match=r"6 classes.*only 5"):
        backbone.check_target_classes(6)


@pytest.mark.parametrize("kwargs", [{"num_class_embeds": None}, {"class_embed_type": "timestep"}])
def test_unet_without_class_embeddings_is_refused(kwargs: dict, tmp_path: Path) -> None:
    model = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
        **kwargs,
    )
    save_pipeline_dir(tmp_path / "uncond", model, "unet")
    with pytest.raises(ValueError, match="not class-conditional.*num_class_embeds"):
        load_pretrained(str(tmp_path / "uncond"))


def test_missing_model_raises_file_not_found(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no model here")
    with pytest.raises(FileNotFoundError, match="no diffusers model"):
        load_pretrained(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(str(tmp_path / "nowhere" / "model"))


def _shifted_ema(model: torch.nn.Module, shift: float) -> EMAModel:
    """An EMA of the model's trainable parameters whose averages are the parameters + ``shift``."""
    ema = EMAModel(trainable_parameters(model), decay=0.9)
    ema.shadow_params = [p.detach() + shift for p in trainable_parameters(model)]
    return ema


@pytest.mark.parametrize(
    "fixture,model_cls,subfolder",
    [
        ("dit_dir", DiTTransformer2DModel, "transformer"),
        ("unet_dir", UNet2DModel, "unet"),
    ],
)
def test_save_model_loads_in_stock_diffusers(
    fixture: str, model_cls: type, subfolder: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    loaded = load_pretrained(str(request.getfixturevalue(fixture)))
    backbone = loaded.backbone
    with torch.no_grad():  # make the saved weights differ from the pre-trained ones
        for p in backbone.inner.parameters():
            p.mul_(0.5)
    before = {k: v.clone() for k, v in backbone.inner.state_dict().items()}
    ema = _shifted_ema(backbone.inner, 1.0)
    out = tmp_path / "saved"
    save_model(dataclasses.replace(loaded, source="the-source"), out, ema)

    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".saved")]  # no temporary sibling left
    assert_state_equal(backbone.inner, before)  # saving EMA weights must not touch the live ones
    stock = model_cls.from_pretrained(out, subfolder=subfolder)
    assert_state_equal(stock, before)
    stock_ema = model_cls.from_pretrained(out, subfolder=f"ema/{subfolder}")
    for saved, given in zip(stock_ema.parameters(), ema.shadow_params, strict=True):
        assert torch.equal(saved, given)
    # the schedule is written back with exactly the keys it stated
    assert stated_keys(DDPMScheduler.load_config(out, subfolder="scheduler")) == loaded.scheduler_config

    again = load_pretrained(str(out))
    assert_state_equal(again.backbone.inner, before)
    assert again.source == "the-source"  # provenance survives, for banks and later checkpoints
    assert again.scheduler_config == loaded.scheduler_config


def test_save_model_overwrites_and_keeps_vae_provenance(latent_dit_dir: Path, tmp_path: Path) -> None:
    loaded = load_pretrained(str(latent_dit_dir))
    out = tmp_path / "saved"
    out.mkdir()
    (out / "stale.txt").write_text("from an older save")
    save_model(loaded, out)
    assert not (out / "stale.txt").exists()
    assert not (out / "ema").exists()  # no EMA given, none written
    again = load_pretrained(str(out))
    assert again.codec.is_latent
    assert (again.vae_source, again.vae_subfolder) == (str(latent_dit_dir), "vae")
    assert_state_equal(again.codec.vae, loaded.codec.vae)


def test_model_fingerprint_tracks_values(dit_dir: Path) -> None:
    a = load_pretrained(str(dit_dir)).backbone.inner
    b = load_pretrained(str(dit_dir)).backbone.inner
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        next(b.parameters()).view(-1)[0] += 1e-6
    assert model_fingerprint(a) != model_fingerprint(b)


def test_latent_codec_shapes_and_scaling(latent_dit_dir: Path) -> None:
    codec = load_pretrained(str(latent_dit_dir)).codec
    vae: AutoencoderKL = codec.vae
    assert not any(p.requires_grad for p in vae.parameters()) and not vae.training
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    mean, std = codec.encode(images)
    assert mean.shape == std.shape == (3, 4, 2, 2)
    assert (std > 0).all()
    with torch.no_grad():
        dist = vae.encode(images).latent_dist
    scaling = vae.config.scaling_factor
    torch.testing.assert_close(mean, dist.mean * scaling)
    torch.testing.assert_close(std, dist.std * scaling)
    decoded = codec.decode(mean)
    assert decoded.shape == (3, 3, 16, 16)
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        expected = vae.decode(mean / scaling).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected)


def test_pixel_codec_is_identity() -> None:
    codec = LatentCodec(None)
    assert not codec.is_latent
    images = torch.rand(2, 1, 8, 8) * 2 - 1
    mean, std = codec.encode(images)
    assert torch.equal(mean, images)
    assert torch.equal(std, torch.zeros_like(images))
    assert torch.equal(codec.decode(images), images)
    assert torch.equal(codec.decode(images * 3), (images * 3).clamp(-1, 1))
