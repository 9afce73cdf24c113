"""End-to-end tests of difftune.training.loop.Trainer on tiny random-init models (CPU, seconds each)."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DiTTransformer2DModel, UNet2DModel
from PIL import Image
from safetensors.torch import load_file

from conftest import run_torchrun
from difftune.backbones import LatentCodec, load_pretrained
from difftune.bank import generate_bank, load_bank
from difftune.config.experiment import ExperimentConfig, load_config
from difftune.data.targets import load_target_images
from difftune.io.store import LatentStore
from difftune.testing.processes import torchrun_command
from difftune.training.build import RunParts
from difftune.training.loop import Trainer

TESTS = Path(__file__).resolve().parent
LR = 1e-4  # the default learning rate


def overrides(pretrained: Path, out: Path, bank: Path | None, *extra: str) -> list[str]:
    """The test recipe: 5 digit classes x 4 images, batch 10 (2 from the bank when ``bank`` is given)."""
    items = [
        f"model.pretrained={pretrained}",
        "data.source=digits",
        "data.classes=[5,6,7,8,9]",
        "data.per_class=4",
        f"train.output_dir={out}",
        "train.max_steps=4",
        "train.batch_size=10",
        "train.checkpoint_every=2",
        "train.log_every=1",
    ]
    if bank is None:
        items.append("objective.bank_share=0")
    else:
        items += [
            f"bank.path={bank}",
            "bank.num_samples=20",
            "bank.shard_size=8",
            "bank.sampling.steps=3",
            "objective.bank_share=0.2",
        ]
    return items + list(extra)


def make_cfg(pretrained: Path, out: Path, bank: Path | None, *extra: str) -> ExperimentConfig:
    return load_config(None, overrides(pretrained, out, bank, *extra))


def folder_cfg(root: Path, tmp_path: Path, dit_dir: Path, *extra: str) -> ExperimentConfig:
    """The test recipe on an image folder ``root`` (every class, every image) instead of the digits."""
    return make_cfg(
        dit_dir,
        tmp_path / "run",
        None,
        "data.source=folder",
        f"data.path={root}",
        "data.classes=null",
        "data.per_class=null",
        *extra,
    )


def weights(model_dir: Path, sub: str = "transformer") -> dict[str, torch.Tensor]:
    return load_file(str(model_dir / sub / "diffusion_pytorch_model.safetensors"))


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_same_training(
    a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float, steps: int
) -> None:
    """Weights of two runs that differ only in float summation order.

    Attention key biases are the exception: softmax is invariant to them, so their true gradient is
    zero and what remains is rounding noise, which Adam rescales into steps of up to ~lr. They can
    only be held to Adam's bound on the distance travelled.
    """
    assert a.keys() == b.keys()
    for key in a:
        if key.endswith("attn1.to_k.bias"):
            assert (a[key] - b[key]).abs().max() <= 2 * 2 * LR * steps, key
        else:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=atol, msg=key)


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture
def dit_bank(dit_dir: Path, tmp_path: Path) -> Path:
    """The knowledge bank of the tiny DiT, generated with the recipe's settings."""
    cfg = make_cfg(dit_dir, tmp_path / "unused", tmp_path / "bank")
    generate_bank(load_pretrained(str(dit_dir)), cfg.bank, progress=False)
    return tmp_path / "bank"


def loop_state(checkpoint: Path) -> dict:
    """The loop's saved state (step + stream positions), a JSON file beside accelerate's state."""
    return json.loads((checkpoint / "state" / "difftune_loop.json").read_text())


def test_exact_resume(dit_dir: Path, dit_bank: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    run_a, run_b = tmp_path / "a", tmp_path / "b"
    final_a = Trainer(
        make_cfg(dit_dir, run_a, dit_bank, "train.max_steps=6", "train.checkpoint_every=3")
    ).train()

    Trainer(make_cfg(dit_dir, run_b, dit_bank, "train.max_steps=3", "train.checkpoint_every=3")).train()
    steps_run: list[int] = []
    original = RunParts.batch

    def recording(self: RunParts, step: int, objective):
        steps_run.append(step)
        return original(self, step, objective)

    monkeypatch.setattr(RunParts, "batch", recording)
    resumed = Trainer(
        make_cfg(
            dit_dir, run_b, dit_bank, "train.max_steps=6", "train.checkpoint_every=3", "train.resume=latest"
        )
    )
    final_b = resumed.train()
    assert steps_run == [3, 4, 5]  # it continued from the checkpoint, it did not start again

    assert_all_equal(weights(final_a), weights(final_b))
    assert_all_equal(weights(final_a, "ema/transformer"), weights(final_b, "ema/transformer"))
    assert changed(weights(final_a), weights(dit_dir)) > 0
    # the logged history is the same too: resuming appends steps 4-6 with the same losses
    assert metrics(run_a) == metrics(run_b)
    assert [m["step"] for m in metrics(run_b)] == [1, 2, 3, 4, 5, 6]

    # 20 target images, 8 per step; 20 bank samples, 2 per step (streams seeded train.seed and +1)
    ckpt = run_b / "checkpoints"
    assert loop_state(ckpt / "checkpoint-0000003") == {
        "step": 3,
        "target": {"size": 20, "seed": 0, "epoch": 1, "offset": 4},
        "bank": {"size": 20, "seed": 1, "epoch": 0, "offset": 6},
    }
    expected_6 = {
        "step": 6,
        "target": {"size": 20, "seed": 0, "epoch": 2, "offset": 8},
        "bank": {"size": 20, "seed": 1, "epoch": 0, "offset": 12},
    }
    assert loop_state(ckpt / "checkpoint-0000006") == expected_6
    assert loop_state(run_a / "checkpoints" / "checkpoint-0000006") == expected_6
    assert resumed.state.step == 6


def test_checkpoints_rotate_and_load_in_diffusers(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(
        dit_dir, run, None, "train.checkpoint_every=1", "train.keep_checkpoints=2", "train.ema_decay=0.5"
    )
    final = Trainer(cfg).train()
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["checkpoint-0000003", "checkpoint-0000004"]
    for ckpt in ckpts.iterdir():
        for sub in ("model/transformer", "model/ema/transformer", "model/scheduler", "state"):
            assert (ckpt / sub).is_dir(), ckpt / sub
        # the run's config, with objective.power.axis: auto made concrete (index on this DDPM model)
        saved = load_config(ckpt / "config.yaml").to_dict()
        assert saved["objective"]["power"] == {"axis": "index"} and cfg.objective.power.axis == "auto"
        assert saved == {
            **cfg.to_dict(),
            "objective": {**cfg.to_dict()["objective"], "power": {"axis": "index"}},
        }
    assert final == run / "final"
    assert not (run / "final.tmp").exists()
    assert load_config(final / "config.yaml").to_dict() == saved

    stock = DiTTransformer2DModel.from_pretrained(final, subfolder="transformer")
    last = weights(ckpts / "checkpoint-0000004" / "model")
    assert_all_equal(stock.state_dict(), last)
    assert changed(last, weights(dit_dir)) > 0
    stock_ema = DiTTransformer2DModel.from_pretrained(final, subfolder="ema/transformer")
    # constant-decay EMA from the first step: ema_4 = d * ema_3 + (1 - d) * w_4, d = 0.5
    ema_3 = weights(ckpts / "checkpoint-0000003" / "model", "ema/transformer")
    for key, value in stock_ema.state_dict().items():
        torch.testing.assert_close(value, 0.5 * ema_3[key] + 0.5 * last[key], rtol=0, atol=1e-7, msg=key)
    assert not any(p.name.endswith(".tmp") for p in ckpts.iterdir())


def test_gradient_accumulation_matches_one_big_batch(dit_dir: Path, dit_bank: Path, tmp_path: Path) -> None:
    # 7 target + 3 bank samples: the two micro-batches hold 4 + 1 and 3 + 2, so normalising by the
    # micro-batch's own counts would weight samples differently (a uniform factor Adam would hide)
    common = ("train.max_steps=2", "train.checkpoint_every=0", "objective.bank_share=0.3")
    one = Trainer(make_cfg(dit_dir, tmp_path / "acc1", dit_bank, *common)).train()
    two = Trainer(
        make_cfg(dit_dir, tmp_path / "acc2", dit_bank, *common, "train.gradient_accumulation=2")
    ).train()
    assert_same_training(weights(one), weights(two), atol=1e-6, steps=2)
    torch.testing.assert_close(
        weights(one, "ema/transformer"), weights(two, "ema/transformer"), rtol=0, atol=1e-6
    )
    assert changed(weights(one), weights(dit_dir)) > 0
    # the logged losses are global means whatever the number of micro-steps
    for m1, m2 in zip(metrics(tmp_path / "acc1"), metrics(tmp_path / "acc2"), strict=True):
        assert m1.keys() == m2.keys()
        for key in m1:
            assert m1[key] == pytest.approx(m2[key], rel=1e-6), key


def test_plain_fine_tuning_without_bank(dit_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    cfg = make_cfg(dit_dir, run, None, "objective.target_schedule=uniform", "train.max_steps=3")
    assert cfg.bank.path == ""
    trainer = Trainer(cfg)
    assert trainer.n_bank == 0 and trainer.n_target == 10
    final = trainer.train()
    assert changed(weights(final), weights(dit_dir)) > 0

    history = metrics(run)
    assert [m["step"] for m in history] == [1, 2, 3]
    for m in history:
        assert "loss/bank" not in m
        assert m["loss/total"] == m["loss/target"] > 0
        quarters = [k for k in m if k.startswith("loss_by_t/")]
        assert quarters and all(k.startswith("loss_by_t/target_q") for k in quarters)
        assert all(np.isfinite(v) for v in m.values())

    events = sorted(run.rglob("events.out.tfevents.*"))
    assert events
    scalars = {}
    for event in events:
        acc = EventAccumulator(str(event))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            scalars[tag] = [(e.step, e.value) for e in acc.Scalars(tag)]
    assert [s for s, _ in scalars["loss/total"]] == [1, 2, 3]
    assert [v for _, v in scalars["loss/total"]] == pytest.approx(
        [m["loss/total"] for m in history], rel=1e-6
    )


def test_latent_space_run_caches_target_latents(
    latent_dit_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "run"
    cfg = make_cfg(latent_dit_dir, run, None, "data.resolution=16", "train.max_steps=2")
    final = Trainer(cfg).train()
    assert changed(weights(final), weights(latent_dit_dir)) > 0
    again = load_pretrained(str(final))
    assert again.codec.is_latent and again.vae_source == str(latent_dit_dir)

    cache = LatentStore(run / "target_cache").load()
    assert cache.keys() == {"samples", "std", "labels"}
    assert cache["samples"].shape == cache["std"].shape == (20, 4, 2, 2)
    assert (cache["std"] > 0).all()
    assert torch.equal(cache["labels"].bincount(), torch.full((5,), 4))  # 4 per class, re-indexed 0..4
    # the cache holds the VAE posterior of the digits resized to 16x16 and made RGB
    images = load_target_images(cfg.data, 16, 3).images
    assert images.shape == (20, 3, 16, 16)
    assert torch.equal(images[:, 0], images[:, 1]) and torch.equal(images[:, 0], images[:, 2])
    mean, std = load_pretrained(str(latent_dit_dir)).codec.encode(images)
    torch.testing.assert_close(cache["samples"], mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cache["std"], std, rtol=1e-5, atol=1e-6)

    # a second run with the same data reuses the cache: the encoder is never called
    def no_encode(self, images):
        raise AssertionError("the target cache should have been reused")

    with monkeypatch.context() as m:
        m.setattr(LatentCodec, "encode", no_encode)
        reused = Trainer(load_config(None, overrides(latent_dit_dir, run, None, "data.resolution=16")))
    target = reused.target
    assert_all_equal({"samples": target.samples[:], "std": target.std[:], **target.cond}, cache)

    # other data: the stale cache is replaced
    calls = []
    original = LatentCodec.encode

    def counting(self, images):
        calls.append(images.shape[0])
        return original(self, images)

    monkeypatch.setattr(LatentCodec, "encode", counting)
    fewer = Trainer(
        load_config(None, overrides(latent_dit_dir, run, None, "data.resolution=16", "data.per_class=3"))
    )
    assert sum(calls) == 15
    assert fewer.target.samples.shape == (15, 4, 2, 2)


def test_unet_backbone_trains_with_bank(unet_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(unet_dir, tmp_path / "run", tmp_path / "bank", "train.max_steps=2")
    generate_bank(load_pretrained(str(unet_dir)), cfg.bank, progress=False)
    final = Trainer(cfg).train()
    stock = UNet2DModel.from_pretrained(final, subfolder="unet")
    trained = stock.state_dict()
    assert_all_equal(trained, weights(final, "unet"))
    assert changed(trained, weights(unet_dir, "unet")) > 0
    history = metrics(tmp_path / "run")
    assert [m["step"] for m in history] == [1, 2]
    assert all(m["loss/total"] == pytest.approx(m["loss/target"] + 0.1 * m["loss/bank"]) for m in history)


def test_more_target_classes_than_source_refused(dit_dir: Path, tmp_path: Path) -> None:
    cfg = make_cfg(dit_dir, tmp_path / "run", None, "data.classes=[0,1,2,3,4,5,6,7,8,9]")
    with pytest.raises(ValueError, match=r"10 classes but the source model has only 5"):
        Trainer(cfg)


def _image_folder(root: Path) -> dict[str, int]:
    """Two classes x three constant-grey 8x8 PNGs; returns file -> grey value."""
    values = {"a/0.png": 0, "a/1.png": 64, "a/2.png": 128, "b/0.png": 191, "b/1.png": 255, "b/2.png": 100}
    for name, value in values.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), value, dtype=np.uint8), mode="L").save(root / name)
    return values


def test_image_folder_source(dit_dir: Path, tmp_path: Path) -> None:
    values = _image_folder(tmp_path / "images")
    run = tmp_path / "run"
    cfg = make_cfg(
        dit_dir,
        run,
        None,
        "data.source=folder",
        f"data.path={tmp_path / 'images'}",
        "data.classes=null",
        "data.per_class=null",
        "train.max_steps=1",
    )
    final = Trainer(cfg).train()
    assert changed(weights(final), weights(dit_dir)) > 0
    cache = LatentStore(run / "target_cache").load()
    assert torch.equal(cache["labels"], torch.tensor([0, 0, 0, 1, 1, 1]))
    expected = torch.tensor([v / 127.5 - 1.0 for v in values.values()]).view(6, 1, 1, 1).expand(6, 1, 8, 8)
    torch.testing.assert_close(cache["samples"], expected, rtol=0, atol=1e-6)
    assert torch.equal(cache["std"], torch.zeros(6, 1, 8, 8))


@pytest.mark.parametrize("corruption", ["random", "truncated"])
def test_corrupt_image_named_in_error(corruption: str, dit_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "images"
    _image_folder(root)
    bad = root / "b" / "bad.png"
    if corruption == "random":
        bad.write_bytes(os.urandom(200))
    else:
        Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64), dtype=np.uint8)).save(bad)
        bad.write_bytes(bad.read_bytes()[:120])
    cfg = folder_cfg(root, tmp_path, dit_dir)
    # the random bytes are refused from the header (all bad files named at once), the truncated file
    # when it is decoded
    with pytest.raises(ValueError, match=r"(b/bad\.png \(cannot identify|cannot read image .*bad\.png)"):
        Trainer(cfg)


def _torchrun(result_dir: Path, args: list[str]) -> list[str]:
    return torchrun_command(TESTS / "ddp_worker.py", str(result_dir), *args)


def test_ddp_two_cpu_processes_match_one(dit_dir: Path, tmp_path: Path) -> None:
    """Real gloo DDP with two processes: same bank, same weights as one process (docs/architecture.md, "Known traps")."""
    # 7 target + 3 bank samples: rank 0 gets 4 + 1, rank 1 gets 3 + 2 (see the accumulation test)
    extra = ("train.checkpoint_every=0", "objective.bank_share=0.3")
    ddp_args = overrides(dit_dir, tmp_path / "ddp_run", tmp_path / "ddp_bank", *extra)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    result_dir = tmp_path / "ranks"
    run_torchrun(_torchrun(result_dir, ddp_args), env, cwd=TESTS.parent)

    ranks = [json.loads((result_dir / f"rank-{i}.json").read_text()) for i in (0, 1)]
    assert [r["process_index"] for r in ranks] == [0, 1]
    assert all(r["num_processes"] == 2 for r in ranks)
    assert all(r["distributed_type"].endswith("MULTI_CPU") for r in ranks)
    # shard k is generated by rank k mod 2
    assert [r["bank_shards"] for r in ranks] == [[0, 2], [1]]

    single_cfg = make_cfg(dit_dir, tmp_path / "single_run", tmp_path / "single_bank", *extra)
    loaded = load_pretrained(str(dit_dir))
    generate_bank(loaded, single_cfg.bank, progress=False)
    ddp_bank, single_bank = (
        load_bank(tmp_path / "ddp_bank", loaded),
        load_bank(tmp_path / "single_bank", loaded),
    )
    assert_all_equal(ddp_bank, single_bank)  # same shards, same batches: bit-identical

    single = Trainer(single_cfg).train()
    ddp = tmp_path / "ddp_run" / "final"
    assert_same_training(weights(single), weights(ddp), atol=1e-5, steps=4)
    torch.testing.assert_close(
        weights(single, "ema/transformer"), weights(ddp, "ema/transformer"), rtol=0, atol=1e-5
    )
    assert changed(weights(ddp), weights(dit_dir)) > 0
    # logged losses are reduced over both processes: the global means of the single run
    ddp_history, single_history = metrics(tmp_path / "ddp_run"), metrics(tmp_path / "single_run")
    assert [m["step"] for m in ddp_history] == [1, 2, 3, 4]
    for m_ddp, m_one in zip(ddp_history, single_history, strict=True):
        assert m_ddp.keys() == m_one.keys()
        for key in m_ddp:
            assert m_ddp[key] == pytest.approx(m_one[key], rel=1e-5), key


@pytest.mark.parametrize("held_by", ["a live run", "an earlier run"])
def test_ddp_a_refused_folder_stops_every_rank_without_a_hang(
    held_by: str, dit_dir: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    run.mkdir()
    if held_by == "a live run":  # refused by every process before anything is written
        (run / "difftune.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
        message = "is in use by another run"
    else:  # refused by the process that takes the folder, and told to the other
        (run / "final").mkdir()
        message = "holds an earlier run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = overrides(dit_dir, run, tmp_path / "bank", "objective.bank_share=0.3")
    output = run_torchrun(_torchrun(tmp_path / "ranks", args), env, TESTS.parent, timeout=180, succeed=False)
    assert "[rank0]" in output and "[rank1]" in output and output.count(message) >= 2, output[-3000:]
    assert not (run / "checkpoints").exists()
    if held_by == "a live run":
        assert json.loads((run / "difftune.lock").read_text())["pid"] == os.getpid()  # the holder keeps it
    else:
        assert not (run / "difftune.lock").exists()  # released by the refusing run


def test_ddp_skip_policy_skips_a_step_that_went_bad_on_one_rank(dit_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "DIFFTUNE_TEST_NAN_ON_RANK_1": "2",
    }
    args = overrides(
        dit_dir,
        run,
        tmp_path / "bank",
        "objective.bank_share=0.3",
        "train.checkpoint_every=1",
        "train.keep_checkpoints=5",
        "train.on_non_finite=skip",
    )
    run_torchrun(_torchrun(tmp_path / "ranks", args), env, TESTS.parent)
    at = {s: weights(run / "checkpoints" / f"checkpoint-{s:07d}" / "model") for s in (1, 2, 3)}
    assert_all_equal(at[1], at[2])  # both replicas skipped step 2, although only rank 1 saw the NaN
    assert changed(at[3], at[2]) > 0
    assert all(torch.isfinite(t).all() for t in weights(run / "final").values())


def test_ddp_lora_with_distillation_matches_one_process(dit_dir: Path, tmp_path: Path) -> None:
    """The teacher switches the adapters off (peft clears and restores their trainable flags) inside
    the forward pass: DDP must still average the adapters' gradients."""
    extra = (
        "train.checkpoint_every=0",
        "objective.bank_share=0.3",
        "objective.kind=distillation",
        "tuning.method=lora",
        "train.learning_rate=1e-2",
    )
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    args = overrides(dit_dir, tmp_path / "ddp_run", tmp_path / "ddp_bank", *extra)
    run_torchrun(_torchrun(tmp_path / "ranks", args), env, cwd=TESTS.parent)
    single_cfg = make_cfg(dit_dir, tmp_path / "single_run", tmp_path / "single_bank", *extra)
    generate_bank(load_pretrained(str(dit_dir)), single_cfg.bank, progress=False)
    single = Trainer(single_cfg).train()
    adapter = "adapter/difftune_adapter.safetensors"
    a, b = load_file(str(single / adapter)), load_file(str(tmp_path / "ddp_run" / "final" / adapter))
    assert a.keys() == b.keys() and any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5, msg=key)
