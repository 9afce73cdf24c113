"""Sharded training (FSDP2 through accelerate) on 2 CPU processes over gloo (tests/fsdp_worker.py).

The processes run with the FSDP settings of the shipped configs/accelerate/fsdp2.yaml. What it shows:
every parameter and EMA average is a shard (each process holds half the elements); the weights equal
a one-process run's up to float summation order, for each family, with distillation too; the saved
model stays stock; the checkpoint holds accelerate's per-process shards; and resuming from it gives
the uninterrupted run's weights exactly (on one process: up to float summation order).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiTTransformer2DModel
from safetensors.torch import load_file

from conftest import run_torchrun
from difftune.backbones import load_pretrained
from difftune.backbones.adapters import ADAPTER, ADAPTER_WEIGHTS
from difftune.bank import generate_bank
from difftune.config.experiment import load_config
from difftune.testing.processes import torchrun_command
from difftune.testing.sharding import fsdp_launch_env
from difftune.training.loop import Trainer
from test_training import TESTS, assert_same_training, make_cfg, overrides, weights


def test_the_shipped_config_is_fsdp2_and_lets_difftune_choose_the_units(dit_dir: Path, monkeypatch) -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    from difftune.training.sharding import check_parallelism, choose_wrap_units

    for key, value in fsdp_launch_env().items():
        monkeypatch.setenv(key, value)
    plugin = FullyShardedDataParallelPlugin()
    assert plugin.fsdp_version == 2 and plugin.transformer_cls_names_to_wrap is None
    launch = SimpleNamespace(
        distributed_type=DistributedType.FSDP, is_fsdp2=True, state=SimpleNamespace(fsdp_plugin=plugin)
    )
    check_parallelism(launch, make_cfg(dit_dir, dit_dir / "unused", None))
    units = choose_wrap_units(launch, load_pretrained(str(dit_dir)).backbone)
    assert units == ["BasicTransformerBlock", "CombinedTimestepLabelEmbeddings"]
    assert plugin.transformer_cls_names_to_wrap == units


@pytest.mark.parametrize("processes", [1, 2, 3, 4])
def test_sampling_work_is_shared_evenly_and_gathers_back_in_order(processes: int) -> None:
    from types import SimpleNamespace

    from difftune.sampling.shares import gather_rows, share_of_rows

    for n in range(1, 10):
        shares = [
            share_of_rows(SimpleNamespace(num_processes=processes, process_index=r), n)
            for r in range(processes)
        ]
        # every process runs the model on as many rows; a share starts at its first row's index
        assert len({len(rows) for rows, _ in shares}) == 1
        assert all(rows[0] == first for rows, first in shares if first < n)
        # what the processes gathered (in process order), cut to n: the rows in order
        gathered = torch.tensor([row for rows, _ in shares for row in rows])
        launch = SimpleNamespace(gather=lambda rows, g=gathered: g)
        assert gather_rows(launch, gathered[: len(shares[0][0])], n).tolist() == list(range(n))
    assert share_of_rows(None, 3) == ([0, 1, 2], 0)  # not shared: all rows here


@pytest.mark.parametrize("written_sharded", [True, False])
def test_a_checkpoint_resumes_only_under_the_launch_kind_that_wrote_it(
    tmp_path: Path, written_sharded: bool
) -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from difftune.errors import UserError
    from difftune.training.state import SHARDED_MODEL, LoopState, restore_checkpoint

    state = tmp_path / "checkpoint-0000002" / "state"
    (state / SHARDED_MODEL if written_sharded else state).mkdir(parents=True)
    kind = DistributedType.NO if written_sharded else DistributedType.FSDP
    with pytest.raises(UserError, match="was written by a (sharded|launch without)") as err:
        restore_checkpoint(SimpleNamespace(distributed_type=kind), state.parent, LoopState(), None)
    assert "\n" not in str(err.value)
    assert ("fsdp2.yaml" in str(err.value)) == written_sharded


def _launch(result_dir: Path, args: list[str], processes: int = 2, **env_vars: str) -> list[dict]:
    cmd = torchrun_command(TESTS / "fsdp_worker.py", str(result_dir), *args, processes=processes)
    env = {**os.environ, **fsdp_launch_env(), "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", **env_vars}
    run_torchrun(cmd, env, cwd=TESTS.parent)
    return [json.loads((result_dir / f"rank-{i}.json").read_text()) for i in range(processes)]


def test_fsdp2_shards_matches_one_process_and_resumes_exactly(dit_dir: Path, tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    single_cfg = make_cfg(dit_dir, tmp_path / "single", bank)
    generate_bank(load_pretrained(str(dit_dir)), single_cfg.bank, progress=False)
    run = tmp_path / "fsdp"
    ranks = _launch(tmp_path / "ranks", overrides(dit_dir, run, bank))

    for rank in ranks:
        assert rank["distributed_type"].endswith("FSDP") and rank["num_processes"] == 2
        assert rank["sharded_parameters"] == rank["parameters"] and rank["ema_sharded"]
        # each process holds its half of every parameter (dim 0 split in two, rounded up on rank 0)
        assert rank["total_elements"] / 2 - 200 <= rank["local_elements"] <= rank["total_elements"] / 2 + 200
        assert "FSDPBasicTransformerBlock" in rank["wrapped"]
        assert "FSDPCombinedTimestepLabelEmbeddings" in rank["wrapped"]
    state = run / "checkpoints" / "checkpoint-0000002" / "state"
    assert (state / "pytorch_model_fsdp_0" / ".metadata").is_file()
    assert (state / "optimizer_0" / ".metadata").is_file()
    assert not (state / "model.safetensors").exists()

    single = Trainer(single_cfg).train()
    sharded = run / "final"
    assert_same_training(weights(single), weights(sharded), atol=1e-5, steps=4)
    torch.testing.assert_close(
        weights(single, "ema/transformer"), weights(sharded, "ema/transformer"), rtol=0, atol=1e-5
    )
    DiTTransformer2DModel.from_pretrained(sharded / "transformer")  # the saved model is stock

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-0000004")
    shutil.rmtree(resumed / "final")
    _launch(tmp_path / "ranks_resumed", [*overrides(dit_dir, resumed, bank), "train.resume=latest"])
    for sub in ("transformer", "ema/transformer"):
        uninterrupted, again = weights(sharded, sub), weights(resumed / "final", sub)
        assert uninterrupted.keys() == again.keys()
        for key in uninterrupted:
            assert torch.equal(uninterrupted[key], again[key]), (sub, key)

    # on another number of processes the checkpoint reshards as it loads: the same run up to float
    # summation order
    elsewhere = tmp_path / "one_process"
    shutil.copytree(resumed, elsewhere)
    shutil.rmtree(elsewhere / "checkpoints" / "checkpoint-0000004")
    shutil.rmtree(elsewhere / "final")
    _launch(
        tmp_path / "ranks_one", [*overrides(dit_dir, elsewhere, bank), "train.resume=latest"], processes=1
    )
    assert_same_training(weights(sharded), weights(elsewhere / "final"), atol=1e-5, steps=2)
    torch.testing.assert_close(
        weights(sharded, "ema/transformer"),
        weights(elsewhere / "final", "ema/transformer"),
        rtol=0,
        atol=1e-5,
    )


def test_fsdp2_samples_evaluates_and_keeps_the_best_as_one_process_does(
    dit_dir: Path, tmp_path: Path
) -> None:
    """Sample grids, evaluation (losses, FID and the forgetting score) and keep_best during sharded
    training: the processes share the sampling, the main one scores and writes; the grids, scores,
    best/ and final weights are a one-process run's."""
    import numpy as np
    from PIL import Image

    from test_training import metrics

    extra = (
        "train.sample_every=2",
        "train.sampling.steps=2",
        "train.eval_every=2",
        "train.evaluation.bins=3",
        "train.evaluation.holdout=5",
        "train.evaluation.samples=5",  # odd: the second process's share is padded
        "train.evaluation.bank_holdout=4",
        "train.evaluation.features=test_training_evaluation:mean_pixels",
        "train.keep_best=loss",
        "train.checkpoint_every=0",
    )
    bank = tmp_path / "bank"
    generate_bank(
        load_pretrained(str(dit_dir)), make_cfg(dit_dir, tmp_path / "unused", bank).bank, progress=False
    )
    _launch(tmp_path / "ranks", overrides(dit_dir, tmp_path / "fsdp", bank, *extra))
    Trainer(make_cfg(dit_dir, tmp_path / "single", bank, *extra)).train()
    runs = {name: tmp_path / name for name in ("single", "fsdp")}

    grids = {name: sorted(p.name for p in (run / "samples").iterdir()) for name, run in runs.items()}
    assert grids["fsdp"] == grids["single"] == ["step-0000002.png", "step-0000004.png"]
    for grid in grids["fsdp"]:
        a, b = (np.asarray(Image.open(run / "samples" / grid), dtype=np.int16) for run in runs.values())
        assert a.shape == b.shape and np.abs(a - b).max() <= 1, grid  # up to 8-bit rounding

    scores = {name: [row for row in metrics(run) if "eval/loss/target" in row] for name, run in runs.items()}
    assert [row["step"] for row in scores["fsdp"]] == [row["step"] for row in scores["single"]] == [0, 2, 4]
    for a, b in zip(scores["single"], scores["fsdp"], strict=True):
        assert a.keys() == b.keys() and {"eval/fid", "eval/forgetting", "eval/forgetting_fid"} <= a.keys()
        for key in a:
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key

    best = {name: json.loads((run / "best" / "best.json").read_text()) for name, run in runs.items()}
    assert best["fsdp"]["step"] == best["single"]["step"]
    torch.testing.assert_close(
        weights(runs["single"] / "best"), weights(runs["fsdp"] / "best"), rtol=0, atol=1e-5
    )
    DiTTransformer2DModel.from_pretrained(runs["fsdp"] / "best" / "transformer")  # stock, gathered whole
    # the evaluations left the training as it was (no stale units after their forward passes)
    assert_same_training(
        weights(runs["single"] / "final"), weights(runs["fsdp"] / "final"), atol=1e-5, steps=4
    )


def test_fsdp2_adapter_checkpoints_hold_the_adapters_only_and_resume_exactly(
    dit_dir: Path, tmp_path: Path
) -> None:
    """A sharded LoRA run's checkpoint holds the adapters' shards, not the frozen base's; resuming from it
    reads them in place (the base keeps the weights the run loaded) and gives the uninterrupted run's
    adapters bit for bit, as does one written before, with the whole sharded model."""
    from torch.distributed.checkpoint import FileSystemReader

    run = tmp_path / "fsdp"
    _launch(tmp_path / "ranks", overrides(dit_dir, run, None, "tuning.method=lora"))
    state = run / "checkpoints" / "checkpoint-0000002" / "state"
    held = FileSystemReader(str(state / "pytorch_model_fsdp_0")).read_metadata().state_dict_metadata
    assert held and all(key.startswith("model.") and ".lora_" in key for key in held), sorted(held)[:5]
    # as many elements as the adapters the run saves, none of the base's
    adapters = load_file(
        str(run / "checkpoints" / "checkpoint-0000002" / "model" / ADAPTER / ADAPTER_WEIGHTS)
    )
    assert sum(meta.size.numel() for meta in held.values()) == sum(t.numel() for t in adapters.values())

    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    shutil.rmtree(resumed / "checkpoints" / "checkpoint-0000004")
    shutil.rmtree(resumed / "final")
    _launch(
        tmp_path / "ranks_resumed",
        [*overrides(dit_dir, resumed, None, "tuning.method=lora"), "train.resume=latest"],
    )
    name = f"{ADAPTER}/{ADAPTER_WEIGHTS}"
    uninterrupted, again = load_file(str(run / "final" / name)), load_file(str(resumed / "final" / name))
    assert uninterrupted.keys() == again.keys() and uninterrupted
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], again[key]), key

    # a checkpoint written before, with the whole sharded model, resumes to the same adapters
    older = tmp_path / "older"
    _launch(tmp_path / "ranks_older", overrides(dit_dir, older, None, "tuning.method=lora"), **WHOLE)
    state = older / "checkpoints" / "checkpoint-0000002" / "state" / "pytorch_model_fsdp_0"
    assert any(
        ".lora_" not in key for key in FileSystemReader(str(state)).read_metadata().state_dict_metadata
    )
    shutil.rmtree(older / "checkpoints" / "checkpoint-0000004")
    shutil.rmtree(older / "final")
    _launch(
        tmp_path / "ranks_older2",
        [*overrides(dit_dir, older, None, "tuning.method=lora"), "train.resume=latest"],
    )
    again = load_file(str(older / "final" / name))
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], again[key]), key


WHOLE = {"DIFFTUNE_TEST_WHOLE_MODEL_CHECKPOINTS": "1"}  # fsdp_worker.py: checkpoints as written before


def test_fsdp2_skips_a_non_finite_step_on_every_process(dit_dir: Path, tmp_path: Path) -> None:
    """A NaN loss on one process's shard of step 2: both processes skip the step (fused AdamW's skip flag
    on sharded parameters), as under DDP."""
    run = tmp_path / "run"
    extra = ("train.checkpoint_every=1", "train.keep_checkpoints=5", "train.on_non_finite=skip")
    _launch(tmp_path / "ranks", overrides(dit_dir, run, None, *extra), DIFFTUNE_TEST_NAN_ON_RANK_1="2")
    at = {s: weights(run / "checkpoints" / f"checkpoint-{s:07d}" / "model") for s in (1, 2, 3)}
    for key in at[1]:
        assert torch.equal(at[1][key], at[2][key]), key
    assert any(not torch.equal(at[3][key], at[2][key]) for key in at[3])
    assert all(torch.isfinite(t).all() for t in weights(run / "final").values())


@pytest.mark.parametrize(
    ("tuning", "saved"),
    [("full", "transformer"), ("lora", "adapter")],
    ids=["full-frozen-copy-teacher", "lora-adapters-off-teacher"],
)
def test_fsdp2_distillation_matches_one_process(
    tuning: str, saved: str, dit_dir: Path, tmp_path: Path
) -> None:
    """Distillation under sharding: full fine-tuning distils from a whole frozen copy on every process,
    LoRA from the sharded model with its adapters switched off. With gradient accumulation; the full
    run also with fsdp_cpu_ram_efficient_loading (weights broadcast from the main process)."""
    extra = (
        f"tuning.method={tuning}",
        "objective.kind=distillation",
        "objective.retention_data=target",
        "objective.bank_share=0.2",
        "train.checkpoint_every=0",
        "train.gradient_accumulation=2",  # under FSDP every micro-batch reduce-scatters its gradients
    )
    loading = {"FSDP_CPU_RAM_EFFICIENT_LOADING": "true"} if tuning == "full" else {}
    ranks = _launch(tmp_path / "ranks", overrides(dit_dir, tmp_path / "fsdp", None, *extra), **loading)
    assert all(rank["sharded_parameters"] == rank["parameters"] for rank in ranks)
    single = Trainer(make_cfg(dit_dir, tmp_path / "single", None, *extra)).train()
    sharded = tmp_path / "fsdp" / "final"
    if saved == "adapter":
        name = "adapter/difftune_adapter.safetensors"
        a, b = load_file(str(single / name)), load_file(str(sharded / name))
        assert a.keys() == b.keys() and a
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-5)
    else:
        assert_same_training(weights(single), weights(sharded), atol=1e-5, steps=4)


def _caption_pipeline(tmp_path: Path, family: str) -> tuple[Path, list[str]]:
    """A tiny pipeline of ``family`` and the overrides that train it on captioned shapes."""
    from difftune.testing.flux import save_flux_pipeline
    from difftune.testing.models import save_sd_pipeline, save_sdxl_pipeline
    from difftune.testing.sd3 import save_sd3_pipeline
    from test_stable_diffusion import _caption_folder

    save = {
        "sd15": save_sd_pipeline,
        "sd15_controlnet": save_sd_pipeline,
        "sdxl": save_sdxl_pipeline,
        "sd3": save_sd3_pipeline,
        "flux": save_flux_pipeline,
    }[family]
    pipe = save(tmp_path / "pipe")
    extra = (
        # with the condition-fidelity check every step: every process runs it with the sharded ControlNet
        ["model.controlnet=from_unet", "data.annotator=canny", "train.validation_every=1"]
        if family.endswith("controlnet")
        else []
    )
    data = _caption_folder(tmp_path / "shapes")
    return pipe, ["data.source=captions", f"data.path={data}", "train.batch_size=4", *extra]


# SDXL, SD3 and Flux take the SD 1.5 path with other block lists: slow-marked to keep CI short
@pytest.mark.parametrize(
    "family",
    [
        "unet",
        "sd15",
        "sd15_controlnet",
        pytest.param("sdxl", marks=pytest.mark.slow),
        pytest.param("sd3", marks=pytest.mark.slow),
        pytest.param("flux", marks=pytest.mark.slow),
    ],
)
def test_fsdp2_trains_each_family_as_one_process_does(family: str, tmp_path: Path) -> None:
    from difftune.testing.models import save_pipeline_dir, tiny_unet

    if family == "unet":
        pipe, extra = save_pipeline_dir(tmp_path / "pipe", tiny_unet(), "unet"), []
        common = overrides(pipe, tmp_path / "unused", None)
    else:
        pipe, extra = _caption_pipeline(tmp_path, family)
        common = [f"model.pretrained={pipe}", "objective.bank_share=0", "train.log_every=1"]
    common += [*extra, "train.max_steps=2", "train.checkpoint_every=0", "train.sampling.steps=2"]
    ranks = _launch(tmp_path / "ranks", [*common, f"train.output_dir={tmp_path / 'fsdp'}"])
    assert all(rank["sharded_parameters"] == rank["parameters"] for rank in ranks)
    # the units are the models' own blocks, not every layer of a class that also occurs in them
    inner = {"FSDPResnetBlock2D", "FSDPTransformer2DModel", "FSDPAttention", "FSDPConv2d", "FSDPLinear"}
    assert not inner & set(ranks[0]["wrapped"]), ranks[0]["wrapped"]
    single = Trainer(load_config(None, [*common, f"train.output_dir={tmp_path / 'single'}"])).train()
    sharded = tmp_path / "fsdp" / "final"
    trained = next(p.name for p in single.iterdir() if p.name in ("transformer", "unet", "controlnet"))
    a, b = weights(single, trained), weights(sharded, trained)
    assert_same_training(a, b, atol=1e-5, steps=2)
    if family.endswith("controlnet"):  # the fidelity scores the main process wrote: one process's
        rows = [(run / "fidelity.jsonl").read_text().splitlines() for run in (single.parent, sharded.parent)]
        a_rows, b_rows = ([json.loads(line) for line in lines] for lines in rows)
        assert [r["step"] for r in b_rows] == [r["step"] for r in a_rows] == [0, 1, 2]
        for a_row, b_row in zip(a_rows, b_rows, strict=True):
            assert b_row == pytest.approx(a_row, rel=1e-4, abs=1e-6)
