"""Stable Diffusion text-to-image and ControlNet Diff-Tuning end to end, on tiny random-init models.

Nothing is downloaded: the pipeline, its CLIP text encoder and a character-level tokenizer are built
from configs (:func:`difftune.testing.models.save_sd_pipeline`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from difftune.backbones import Conditioning, load_pretrained, load_trained
from difftune.backbones.controlnet import CONTROL, ControlNetBackbone
from difftune.backbones.stable_diffusion import PROMPTS
from difftune.bank import generate_bank, load_bank
from difftune.bank.conditions import prepare_bank_conditions
from difftune.cli import main
from difftune.config.data import DataConfig
from difftune.config.experiment import config_from_dict
from difftune.control import build_annotator, read_fidelity
from difftune.data.targets import load_target_images, prepare_target
from difftune.errors import UserError
from difftune.process import build_process
from difftune.testing.models import save_sd_pipeline
from difftune.training.loop import train_model

CAPTIONS = ["a red circle", "a blue circle", "a red square", "a blue square"]


def _caption_folder(root: Path, n: int = 8, control_column: bool = False) -> Path:
    """``n`` 32x32 drawings of circles and squares with a metadata.jsonl of captions (and edge maps)."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        img = Image.new("RGB", (32, 32), "black")
        draw = ImageDraw.Draw(img)
        caption = CAPTIONS[i % 4]
        colour = caption.split()[1]
        box = (4 + i % 5, 5, 25, 26 - i % 3)
        (draw.ellipse if "circle" in caption else draw.rectangle)(box, outline=colour, width=3)
        img.save(root / f"{i}.png")
        row = {"file_name": f"{i}.png", "text": caption}
        if control_column:
            edges = build_annotator("canny")(
                torch.from_numpy(np.array(img)).permute(2, 0, 1)[None] / 127.5 - 1
            )
            Image.fromarray((edges[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(
                root / f"c{i}.png"
            )
            row["conditioning_image"] = f"c{i}.png"
        rows.append(row)
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_sd_pipeline(tmp_path_factory.mktemp("sd") / "pipe")


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _caption_folder(tmp_path_factory.mktemp("data") / "shapes")


def _config(sd_dir: Path, images: Path, out: Path, **sections: dict) -> object:
    raw = {
        "model": {"pretrained": str(sd_dir)},
        "data": {"source": "captions", "path": str(images)},
        "bank": {"path": str(out / "bank"), "num_samples": 6, "sampling": {"steps": 2}, "batch_size": 4},
        "objective": {"bank_share": 0.25},
        "train": {
            "output_dir": str(out / "run"),
            "batch_size": 4,
            "max_steps": 2,
            "checkpoint_every": 0,
            "log_every": 1,
            "sampling": {"steps": 2},
        },
    }
    for name, values in sections.items():
        raw[name] = {**raw.get(name, {}), **values}
    return config_from_dict(raw)


def test_caption_folder_gives_captions_and_refuses_a_bad_listing(captions: Path, tmp_path: Path) -> None:
    data = DataConfig(source="captions", path=str(captions))
    images = load_target_images(data, 32, 3)
    assert images.captions == [CAPTIONS[i % 4] for i in range(8)]
    assert images.images.shape == (8, 3, 32, 32)
    bad = _caption_folder(tmp_path / "bad", n=2)
    (bad / "metadata.jsonl").write_text('{"file_name": "0.png"}\n')
    data.path = str(bad)
    with pytest.raises(UserError, match=r"line 1 has no \['text'\]"):
        load_target_images(data, 32, 3)
    (bad / "metadata.jsonl").write_text('{"file_name": "gone.png", "text": "x"}\n')
    with pytest.raises(UserError, match=r"gone.png \(missing\)"):
        load_target_images(data, 32, 3)


@pytest.mark.parametrize(
    "lines,message",
    [
        (['{"file_name": "0.png", "text": "x"}'] * 2, r"lists '0\.png' twice \(lines 1 and 2\)"),
        (
            [
                '{"file_name": "0.png", "text": "x"}',
                '{"file_name": "1.png", "text": "y"}',
                '{"file_name": "./0.png", "text": "z"}',
            ],
            r"lists '\./0\.png' twice \(lines 1 and 3\)",
        ),
    ],
    ids=["identical lines", "one image under two names"],
)
def test_metadata_listing_an_image_twice_is_refused(lines: list[str], message: str, tmp_path: Path) -> None:
    data = _caption_folder(tmp_path / "set", n=2)
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=rf"metadata\.jsonl {message}.*keep one line per image"):
        load_target_images(DataConfig(source="captions", path=str(data)), 32, 3)


@pytest.mark.parametrize("escape", ["parent", "absolute", "down and out", "control"])
def test_metadata_naming_a_file_outside_the_data_folder_is_refused(escape: str, tmp_path: Path) -> None:
    data = _caption_folder(tmp_path / "set", n=1, control_column=True)
    Image.new("RGB", (32, 32)).save(tmp_path / "outside.png")  # a readable image: only where it lies is wrong
    name = {
        "parent": "../outside.png",
        "absolute": str(tmp_path / "outside.png"),
        "down and out": "sub/../../outside.png",
    }.get(escape, "0.png")
    control = "../outside.png" if escape == "control" else "c0.png"
    row = {"file_name": name, "text": "x", "conditioning_image": control}
    (data / "metadata.jsonl").write_text(json.dumps(row) + "\n")
    column = "conditioning_image" if escape == "control" else "file_name"
    cfg = DataConfig(source="captions", path=str(data), control_column="conditioning_image")
    with pytest.raises(
        UserError, match=rf"line 1: {column}='.*' lies outside the data folder .*name a file inside"
    ):
        load_target_images(cfg, 32, 3)


def test_a_link_inside_the_data_folder_is_the_users_choice_and_is_read(tmp_path: Path) -> None:
    """Data folders made of links into a shared store are common: a listed link is followed."""
    data = _caption_folder(tmp_path / "set", n=1)
    Image.new("RGB", (32, 32), (255, 0, 0)).save(tmp_path / "store.png")
    (data / "link.png").symlink_to(tmp_path / "store.png")
    (data / "metadata.jsonl").write_text(json.dumps({"file_name": "link.png", "text": "red"}) + "\n")
    target = load_target_images(DataConfig(source="captions", path=str(data)), 32, 3)
    assert len(target) == 1


def test_captions_the_text_encoder_truncates_are_counted_in_one_warning(
    sd_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = _caption_folder(tmp_path / "set", n=4)
    rows = [json.loads(line) for line in (data / "metadata.jsonl").read_text().splitlines()]
    for row in rows[:3]:
        row["text"] = "a red circle on black"  # 19 tokens with the start and end tokens
    (data / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = load_pretrained(str(sd_dir))
    assert loaded.parts.prompts.max_length == 16
    cfg = DataConfig(source="captions", path=str(data), hflip=True)  # each chunk's captions encoded twice
    with caplog.at_level("WARNING"):
        prepare_target(cfg, loaded, tmp_path / "cache")
    warned = [r.getMessage() for r in caplog.records if "truncated" in r.getMessage()]
    assert warned == ["3 of 4 captions are longer than the text encoder's 16 tokens and are truncated"]


def test_class_folders_get_template_captions() -> None:
    data = DataConfig(source="digits", classes=[3, 7], per_class=2, caption_template="a digit {}")
    images = load_target_images(data, 32, 3)
    digits = [images.class_names[int(label)] for label in images.labels]
    assert sorted(digits) == ["3", "3", "7", "7"]
    assert images.caption_list(data.caption_template) == [f"a digit {d}" for d in digits]


def test_text_to_image_diff_tuning_run_loads_in_the_stock_pipeline(
    sd_dir: Path, captions: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionPipeline

    cfg = _config(sd_dir, captions, tmp_path, bank={"guidance_scale": 2.0}, train={"sample_every": 2})
    loaded = load_pretrained(str(sd_dir))
    prepare_bank_conditions(loaded, cfg)
    generate_bank(loaded, cfg.bank, progress=False)
    bank = load_bank(cfg.bank.path, loaded)
    # sample i was generated from caption i mod 8 (the bank's prompts are the data's captions)
    expected = loaded.parts.prompts.encode([CAPTIONS[i % 8 % 4] for i in range(6)]).half()
    assert torch.equal(bank[PROMPTS], expected)

    final = train_model(cfg)
    grid = Image.open(
        tmp_path / "run" / "samples" / "step-0000002.png"
    )  # 8 captions spread over the set, 8 each
    assert grid.size[0] == grid.size[1]
    cache = json.loads((tmp_path / "run" / "target_cache" / "manifest.json").read_text())
    assert cache["conditions"].startswith("prompts:")
    pipe = StableDiffusionPipeline.from_pretrained(str(final))
    out = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    # the stock pipeline runs exactly the weights difftune trained
    ours = load_trained(str(final), use_ema=False)
    assert torch.equal(
        pipe.unet.state_dict()["conv_in.weight"], ours.backbone.inner.state_dict()["conv_in.weight"]
    )
    assert not torch.equal(ours.backbone.inner.conv_in.weight, loaded.backbone.inner.conv_in.weight)


def test_controlnet_diff_tuning_run_logs_fidelity_and_loads_in_the_stock_pipeline(
    sd_dir: Path, captions: Path, tmp_path: Path
) -> None:
    from diffusers import StableDiffusionControlNetPipeline

    cfg = _config(
        sd_dir,
        captions,
        tmp_path,
        model={"controlnet": "from_unet"},
        data={"annotator": "canny"},
        objective={"bank_share": 0.25, "cfg_dropout": 0.5},
        train={"validation_every": 1, "validation_samples": 2, "learning_rate": 1e-3},
    )
    loaded = load_pretrained(str(sd_dir), controlnet="from_unet")
    assert isinstance(loaded.backbone, ControlNetBackbone)
    prepare_bank_conditions(loaded, cfg)
    generate_bank(loaded, cfg.bank, progress=False)
    bank = load_bank(cfg.bank.path, loaded)
    # each bank sample's control image is the annotator's edge map of the frozen SD's decoded sample
    images = loaded.codec.decode(bank["samples"][:2])
    edges = build_annotator("canny")(images)
    assert bank[CONTROL].dtype == torch.uint8
    assert torch.equal(bank[CONTROL][:2], (edges * 255).round().to(torch.uint8))
    sd_only = load_pretrained(str(sd_dir))
    assert (
        load_bank(cfg.bank.path, sd_only)["samples"].shape[0] == 6
    )  # the bank is the SD's: same fingerprint

    final = train_model(cfg)
    log = read_fidelity(tmp_path / "run")
    assert [row["step"] for row in log] == [0, 1, 2]
    assert all(0 <= row["edge_f1"] <= 1 and row["mse"] >= 0 for row in log)
    pipe = StableDiffusionControlNetPipeline.from_pretrained(str(final))
    control = Image.open(captions / "0.png")
    out = pipe(
        "a red circle",
        image=control,
        height=32,
        width=32,
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()
    trained = load_trained(str(final), use_ema=False).backbone
    assert isinstance(trained, ControlNetBackbone)
    # the ControlNet trained (its zero convolutions moved), the UNet did not
    assert trained.inner.controlnet_mid_block.weight.abs().sum() > 0
    assert torch.equal(trained.unet.conv_in.weight, sd_only.backbone.inner.conv_in.weight)
    assert main(["convergence", str(tmp_path / "run")]) == 0


def test_controlnet_with_precomputed_controls_reads_the_control_column(sd_dir: Path, tmp_path: Path) -> None:
    data = _caption_folder(tmp_path / "edges", n=4, control_column=True)
    cfg = _config(
        sd_dir,
        data,
        tmp_path,
        model={"controlnet": "from_unet"},
        data={"control_column": "conditioning_image", "hflip": True},
        objective={"bank_share": 0.0},
    )
    from difftune.training.loop import Trainer

    trainer = Trainer(cfg)
    cond = trainer.target.cond
    assert cond.batch_size == 8  # with its mirror images
    first = np.array(Image.open(data / "c0.png").convert("RGB")).transpose(2, 0, 1)
    assert torch.equal(cond[CONTROL][0], torch.from_numpy(first))
    # the mirrored copies follow the originals (of a chunk); each control image is flipped with its image
    assert torch.equal(cond[CONTROL][4], torch.from_numpy(first).flip(-1))


def test_controlnet_drop_empties_the_prompt_and_keeps_the_control(sd_dir: Path) -> None:
    backbone = load_pretrained(str(sd_dir), controlnet="from_unet").backbone
    embeds = torch.randn(3, 16, 32)
    control = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    dropped = backbone.drop(
        Conditioning({PROMPTS: embeds, CONTROL: control}), torch.tensor([True, False, True])
    )
    assert torch.equal(dropped[CONTROL], control)
    assert torch.equal(dropped[PROMPTS][1], embeds[1])
    assert torch.equal(dropped[PROMPTS][0], backbone.null_prompt[0])


@pytest.mark.parametrize("condition", ["null", "own"])
def test_bank_rows_train_with_the_configured_condition(
    condition: str, sd_dir: Path, captions: Path, tmp_path: Path
) -> None:
    from difftune.objectives import build_objective
    from difftune.training.loop import Trainer

    cfg = _config(sd_dir, captions, tmp_path, bank={"condition": condition}, objective={"bank_share": 0.5})
    loaded = load_pretrained(str(sd_dir))
    prepare_bank_conditions(loaded, cfg)
    generate_bank(loaded, cfg.bank, progress=False)
    trainer = Trainer(cfg)
    objective = build_objective(cfg.objective, trainer.process, trainer.backbone)
    _, cond, is_bank, _ = trainer.parts.batch(0, objective)
    bank_rows = cond[PROMPTS][is_bank].float()
    null = trainer.backbone.null_prompt.expand_as(bank_rows)
    assert torch.equal(bank_rows, null) is (condition == "null")


def test_a_mixed_batch_keeps_each_samples_weight_with_its_sample_under_shuffling(sd_dir: Path) -> None:

    from difftune.config.experiment import ObjectiveConfig
    from difftune.objectives import build_objective

    loaded = load_pretrained(str(sd_dir))
    backbone = loaded.backbone.eval()
    objective = build_objective(
        ObjectiveConfig(realisation="weight", bank_share=0.5),
        build_process(loaded.scheduler_config),
        backbone,
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 4, 4, generator=g)
    cond = Conditioning({PROMPTS: torch.randn(6, 16, 32, generator=g)})
    is_bank = torch.tensor([False, False, False, True, True, True])
    draw = objective.draw(3, 3, (4, 4, 4), g)
    with torch.no_grad():
        terms = objective(backbone, x0, cond, is_bank, draw)
        perm = torch.tensor([4, 0, 5, 2, 1, 3])
        shuffled = objective(backbone, x0[perm], cond.select(perm), is_bank[perm], draw[perm])
    torch.testing.assert_close(shuffled.loss, terms.loss[perm])
    assert torch.equal(shuffled.is_bank, is_bank[perm])
    # the weights differ between the streams, so the check is not vacuous
    assert not torch.allclose(
        objective.schedules[0].loss_weight(draw.t), objective.schedules[1].loss_weight(draw.t)
    )


def test_sample_command_takes_prompts_and_refuses_a_controlnet_without_control(
    sd_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    assert main(["sample", "--model", str(sd_dir), "--prompt", "a red circle", "--per-label", "2",
                 "--steps", "2", "--out", str(tmp_path / "s")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "s").glob("0*.png")) == [
        "00000_prompt0_seed0.png",
        "00001_prompt0_seed1.png",
    ]
    cn = save_sd_pipeline(tmp_path / "cn", controlnet=True)
    assert (
        main(["sample", "--model", str(cn), "--prompt", "x", "--steps", "2", "--out", str(tmp_path / "c")])
        == 2
    )
    assert "needs --control-image" in capsys.readouterr().err


def test_a_saved_controlnet_reloads_over_the_unet_it_was_trained_with(sd_dir: Path, tmp_path: Path) -> None:
    from difftune.backbones import save_model
    from difftune.testing.models import tiny_cond_unet

    # a fine-tuned UNet kept in a sub-folder of another directory (as a difftune run keeps ema/unet)
    other = tmp_path / "finetuned"
    tiny_cond_unet(seed=1).save_pretrained(other / "ema" / "unet")
    (other / "difftune_source.json").write_text(json.dumps({"source": str(sd_dir), "pipeline": str(sd_dir)}))
    loaded = load_pretrained(str(other), subfolder="ema/unet", controlnet="from_unet")
    save_model(loaded, tmp_path / "saved")
    again = load_trained(str(tmp_path / "saved"), use_ema=False).backbone
    assert isinstance(again, ControlNetBackbone)
    assert torch.equal(again.unet.conv_in.weight, tiny_cond_unet(seed=1).conv_in.weight)
    assert not torch.equal(
        again.unet.conv_in.weight, load_pretrained(str(sd_dir)).backbone.inner.conv_in.weight
    )


def test_a_saved_dataset_gives_captions_and_control_images(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    colours = ["red", "blue", "green"]
    images = [Image.new("RGB", (32, 32), c) for c in colours]
    edges = [Image.new("RGB", (32, 32), "white") for _ in colours]
    table = {"image": images, "text": [f"a {c} square" for c in colours], "edges": edges}
    saved = datasets.Dataset.from_dict(table).cast_column("image", datasets.Image())
    saved.cast_column("edges", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    data = DataConfig(source="hf_dataset", path=str(tmp_path / "ds"), control_column="edges")
    target = load_target_images(data, 16, 3)
    assert target.captions == ["a red square", "a blue square", "a green square"]
    assert torch.allclose(target.images[0, :, 0, 0], torch.tensor([1.0, -1.0, -1.0]))  # red in [-1, 1]
    assert torch.equal(target.controls(torch.arange(3), 16), torch.ones(3, 3, 16, 16))
    data.caption_column = "caption"
    with pytest.raises(UserError, match=r"no column\(s\) \['caption'\]"):
        load_target_images(data, 16, 3)


def test_a_v_prediction_pipeline_trains_on_the_velocity(tmp_path: Path, captions: Path) -> None:
    from diffusers import DDPMScheduler

    from difftune.config.experiment import ObjectiveConfig
    from difftune.objectives import build_objective

    sd = save_sd_pipeline(tmp_path / "sd2")
    DDPMScheduler(num_train_timesteps=1000, prediction_type="v_prediction").save_pretrained(sd / "scheduler")
    loaded = load_pretrained(str(sd))
    scheduler = DDPMScheduler.from_config(loaded.scheduler_config)  # diffusers' own formulas: the reference
    objective = build_objective(
        ObjectiveConfig(bank_share=0.0, cfg_dropout=0.0),
        build_process(loaded.scheduler_config),
        loaded.backbone,
    )
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 4, 4, generator=g)
    cond = Conditioning({PROMPTS: loaded.parts.prompts.encode(["a red circle", "a blue square"])})
    draw = objective.draw(2, 0, (4, 4, 4), g)
    with torch.no_grad():
        terms = objective(loaded.backbone, x0, cond, torch.zeros(2, dtype=torch.bool), draw)
        x_t = scheduler.add_noise(x0, draw.noise, draw.t)
        velocity = scheduler.get_velocity(x0, draw.noise, draw.t)
        out = loaded.backbone(x_t, draw.t, cond)
    torch.testing.assert_close(terms.terms["mse"], (out - velocity).square().mean(dim=(1, 2, 3)))
    # a short run saves a model whose stock pipeline keeps the v-prediction schedule
    from diffusers import StableDiffusionPipeline

    final = train_model(_config(sd, captions, tmp_path / "v", objective={"bank_share": 0.0}))
    assert (
        StableDiffusionPipeline.from_pretrained(str(final)).scheduler.config.prediction_type == "v_prediction"
    )


def test_gradient_checkpointing_trains_to_the_same_weights(
    sd_dir: Path, captions: Path, tmp_path: Path
) -> None:
    from safetensors.torch import load_file

    weights = {}
    for flag in (False, True):
        out = tmp_path / str(flag)
        cfg = _config(
            sd_dir, captions, out, objective={"bank_share": 0.0}, train={"gradient_checkpointing": flag}
        )
        final = train_model(cfg)
        weights[flag] = load_file(final / "unet" / "diffusion_pytorch_model.safetensors")
    assert weights[True].keys() == weights[False].keys()
    for name, value in weights[False].items():
        torch.testing.assert_close(weights[True][name], value, rtol=1e-5, atol=1e-6)
    moved = load_pretrained(str(sd_dir)).backbone.inner.state_dict()
    assert any(not torch.equal(moved[k], v) for k, v in weights[True].items())  # training changed the weights


def test_lora_on_an_existing_controlnet_reloads_onto_its_base(captions: Path, tmp_path: Path) -> None:
    pipe = save_sd_pipeline(tmp_path / "cn", controlnet=True)
    cfg = _config(
        pipe,
        captions,
        tmp_path,
        model={"controlnet": str(pipe / "controlnet")},
        tuning={"method": "lora"},
        data={"annotator": "canny"},
        objective={"bank_share": 0.0},
        train={"learning_rate": 1e-2, "ema_decay": 0.0},
    )
    final = train_model(cfg)
    assert (final / "adapter" / "adapter_config.json").is_file()
    trained = load_trained(str(final)).backbone.eval()
    base = load_pretrained(str(pipe), controlnet=str(pipe / "controlnet")).backbone.eval()
    assert isinstance(trained, ControlNetBackbone)
    x, t = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 900])
    cond = Conditioning(
        {
            PROMPTS: base.null_prompt.expand(2, -1, -1),
            CONTROL: torch.full((2, 3, 32, 32), 255, dtype=torch.uint8),
        }
    )
    with torch.no_grad():
        assert not torch.allclose(trained(x, t, cond), base(x, t, cond))  # the adapter is on
        from difftune.tuning import adapters_off

        with adapters_off(trained):
            torch.testing.assert_close(trained(x, t, cond), base(x, t, cond))  # over exactly that base


def test_a_new_controlnet_refuses_an_adapter_method_at_config_time() -> None:
    with pytest.raises(UserError, match="train it in full"):
        config_from_dict(
            {
                "model": {"pretrained": "x", "controlnet": "from_unet"},
                "tuning": {"method": "lora"},
                "data": {"source": "digits"},
                "objective": {"bank_share": 0},
            }
        )


def test_a_controlnet_diff_tuning_run_resumes_exactly(sd_dir: Path, captions: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    def config(out: Path, steps: int, *extra: str) -> object:
        cfg = _config(
            sd_dir,
            captions,
            tmp_path,
            model={"controlnet": "from_unet"},
            data={"annotator": "canny", "cache_dir": str(tmp_path / "cache")},
            objective={"bank_share": 0.25, "cfg_dropout": 0.5},
            train={
                "output_dir": str(out),
                "max_steps": steps,
                "checkpoint_every": 2,
                "learning_rate": 1e-3,
                "validation_every": 2,
                "validation_samples": 2,
                **dict(item.split("=") for item in extra),
            },
        )
        return cfg

    loaded = load_pretrained(str(sd_dir), controlnet="from_unet")
    prepare_bank_conditions(loaded, config(tmp_path / "x", 4))
    generate_bank(loaded, config(tmp_path / "x", 4).bank, progress=False)
    whole = train_model(config(tmp_path / "whole", 4))
    train_model(config(tmp_path / "parts", 2))
    resumed = train_model(config(tmp_path / "parts", 4, "resume=latest"))
    for sub in ("controlnet", "ema/controlnet"):
        a = load_file(whole / sub / "diffusion_pytorch_model.safetensors")
        b = load_file(resumed / sub / "diffusion_pytorch_model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    # the fidelity log of the resumed run holds every validation step once, with the same scores
    assert read_fidelity(tmp_path / "parts") == read_fidelity(tmp_path / "whole")
    assert [row["step"] for row in read_fidelity(tmp_path / "whole")] == [0, 2, 4]
