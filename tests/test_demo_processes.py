"""The digits demo on every forward process: sources, sampling, probes in log-SNR bins, the CLI."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import pytest
import torch

from difftune.analysis.forgetting import LOG_SNR_EDGES, log_snr_bins, step_log_snr, transfer_gap
from difftune.backbones import load_pretrained
from difftune.cli import main
from difftune.demos.digits import run_demo
from difftune.demos.report import study_finding
from difftune.demos.settings import DemoSettings
from difftune.demos.sources import PROCESSES, SAMPLERS, build_source_architecture
from difftune.errors import UserError
from difftune.process import build_process, process_name
from difftune.process.schedulers import make_scheduler
from difftune.sampling.generate import build_scheduler, handover_step
from difftune.schedules.binned_loss import Evaluation, binned_denoising_loss


@pytest.mark.parametrize("process", PROCESSES)
def test_each_source_is_of_its_process_and_of_the_demo_size(process: str) -> None:
    source = build_source_architecture(process, classes=5, width=32, layers=4, seed=0)
    assert process_name(dict(source.scheduler.config)) == process
    assert source.folder == ("unet" if process == "edm" else "transformer")
    parameters = sum(p.numel() for p in source.model.parameters())
    assert 1.0e6 < parameters < 2.0e6, parameters  # the three test beds' models are of one size
    # a learned variance only where the process has one (DDPM)
    assert source.model.config.out_channels == (2 if process == "ddpm" else 1)
    # the same seed builds the same weights
    again = build_source_architecture(process, classes=5, width=32, layers=4, seed=0)
    assert all(
        torch.equal(a, b) for a, b in zip(source.model.parameters(), again.model.parameters(), strict=True)
    )


def test_process_is_checked_and_keys_the_source_cache_without_moving_the_ddpm_key() -> None:
    with pytest.raises(UserError, match="process='vp' is unknown"):
        DemoSettings(process="vp")
    keys = {p: DemoSettings(process=p).source_key() for p in PROCESSES}
    assert keys["ddpm"] == "40ed8524dd75"  # the cached DDPM source predates the process setting
    assert len(set(keys.values())) == 3
    for process in PROCESSES:
        settings = DemoSettings(process=process)
        assert settings.sampling.scheduler == SAMPLERS[process]
        # the sampler belongs to the process the source is trained on
        assert process_name({"_class_name": settings.sampler}) == process


@pytest.mark.parametrize("process", ["flow", "edm"])
def test_demo_runs_end_to_end_on_a_continuous_time_source(tiny_demo: DemoSettings, process: str) -> None:
    settings = replace(
        tiny_demo,
        process=process,
        forgetting_method="plain",
        forgetting_fractions=[0.0, 0.5],
        methods={
            "plain": {"target_schedule": "uniform", "bank_share": 0.0},
            "diff-tuning": {},
            "log-snr": {"power": {"axis": "log_snr"}},
            "logit-normal": {"target_schedule": "logit_normal_up", "bank_schedule": "logit_normal_down"},
        },
    )
    results = run_demo(settings)
    for name in settings.methods:
        assert math.isfinite(results[name]["fid"]) and results[name]["fid"] >= 0
    source_dir = next(settings.cache_dir.glob("demo-source-*/run/final"))
    source = load_pretrained(str(source_dir), subfolder=f"ema/{settings.model_folder}")
    assert process_name(source.scheduler_config) == process
    assert source.backbone.sample_shape == (1, 8, 8)
    swap = json.loads((settings.out / "forgetting_swap.json").read_text())
    # f = 0 never hands over: the plain model's own final samples
    assert swap["rows"][0]["fid"] == pytest.approx(results["plain"]["fid"], rel=1e-6)
    # where the source took over: nowhere at f = 0; at f = 0.5 the log-SNR of the 2nd of 3 steps
    assert swap["rows"][0]["handover_log_snr"] is None
    sampler = build_scheduler(settings.sampler, source.scheduler_config, (1, 8, 8))
    steps = step_log_snr(sampler, settings.sample_steps)
    assert swap["rows"][1]["handover_log_snr"] == pytest.approx(
        steps[handover_step(settings.sample_steps, 0.5)]
    )
    gap = json.loads((settings.out / "forgetting_gap_log_snr.json").read_text())["rows"]
    assert len(gap) == len(LOG_SNR_EDGES) + 1  # every log-SNR bin has indices on the demo's processes
    assert gap[0]["t_low"] == 0 and gap[-1]["t_high"] == 999
    assert gap[0]["log_snr_high"] is None and gap[-1]["log_snr_low"] is None
    assert all(a["t_high"] + 1 == b["t_low"] for a, b in zip(gap, gap[1:], strict=False))
    assert all(r["ratio"] == pytest.approx(r["pretrained"] / r["finetuned"]) for r in gap)
    assert (settings.out / "forgetting_gap_log_snr.png").is_file()
    # the report quotes the study's verdict on this test bed, not another's
    report = (settings.out / "report.md").read_text()
    assert study_finding("digits", process) in report and study_finding("digits", "ddpm") not in report


@pytest.mark.parametrize("process", PROCESSES)
def test_log_snr_bins_partition_the_index_by_log_snr(process: str) -> None:
    config = dict(build_source_architecture(process, 5, 8, 1, 0).scheduler.config)
    proc = build_process(config, (1, 8, 8))
    bins = log_snr_bins(proc)
    log_snr = proc.log_snr()
    assert bins[0]["t_low"] == 0 and bins[-1]["t_high"] == proc.num_timesteps - 1
    for row in bins:
        inside = log_snr[row["t_low"] : row["t_high"] + 1]
        high = math.inf if row["log_snr_high"] is None else row["log_snr_high"]
        low = -math.inf if row["log_snr_low"] is None else row["log_snr_low"]
        assert bool((inside < high).all() and (inside >= low).all())
    assert all(a["t_high"] + 1 == b["t_low"] for a, b in zip(bins, bins[1:], strict=False))
    # bins no index falls in are left out
    assert [b["log_snr_high"] for b in log_snr_bins(proc, [100.0, 0.0])] == [100.0, 0.0]


@pytest.mark.parametrize("process", PROCESSES)
def test_sampling_steps_walk_up_in_log_snr_and_fractions_are_not_noise_levels(process: str) -> None:
    config = dict(build_source_architecture(process, 5, 8, 1, 0).scheduler.config)
    steps = step_log_snr(build_scheduler(SAMPLERS[process], config, (1, 8, 8)), 25)
    assert len(steps) == 25 and all(a < b for a, b in zip(steps, steps[1:], strict=False))
    # the last 10% of the steps starts at a different noise level on each process's sampler
    start = steps[handover_step(25, 0.1)]
    assert start == pytest.approx({"ddpm": 1.77, "flow": 4.77, "edm": 8.81}[process], abs=0.01)


def test_step_log_snr_of_a_scheduler_without_sigmas_reads_its_alphas() -> None:
    from diffusers import DDIMScheduler

    ddim = DDIMScheduler.from_config(dict(make_scheduler().config))
    steps = step_log_snr(ddim, 10)
    alpha = ddim.alphas_cumprod[ddim.timesteps.long()].double()
    assert steps == pytest.approx((alpha / (1 - alpha)).log().tolist())


def test_x0_space_loss_is_the_raw_loss_times_the_process_factor(dit_dir) -> None:
    # any denoiser serves the identity: the tiny DDPM DiT scored as if it were a flow model
    config = dict(build_source_architecture("flow", classes=5, width=8, layers=1, seed=0).scheduler.config)
    model = load_pretrained(str(dit_dir)).backbone.eval()
    x0 = torch.rand(6, 1, 8, 8) * 2 - 1
    ev = Evaluation(model, x0, model.unconditional(6))
    edges = torch.tensor([0, 1, 500, 999, 1000])
    raw = binned_denoising_loss([ev], config, 0, draws_per_bin=2, seed=3, edges=edges)
    x0_space = binned_denoising_loss([ev], config, 0, draws_per_bin=2, seed=3, edges=edges, x0_space=True)
    factor = build_process(config).x0_factor()
    # bins of one index: the x0-space loss is the raw loss times that index's factor exactly
    for b, t in ((0, 0), (3, 999)):
        assert x0_space.losses[b, 0].item() == pytest.approx(
            raw.losses[b, 0].item() * factor[t].item(), rel=1e-9
        )
    assert raw.edges.tolist() == edges.tolist()


def test_transfer_gap_of_a_model_with_itself_is_one_in_every_log_snr_bin(dit_dir) -> None:
    model = load_pretrained(str(dit_dir))
    x0 = torch.rand(5, 1, 8, 8) * 2 - 1
    backbone = model.backbone.eval()
    # unconditional for both: the same function, so the same loss in every bin
    rows = transfer_gap(
        backbone, backbone, model.scheduler_config, x0, backbone.unconditional(5), axis="log_snr", seed=1
    )
    assert len(rows) == len(LOG_SNR_EDGES) + 1
    assert all(r["ratio"] == pytest.approx(1.0) and r["gap"] == pytest.approx(0.0) for r in rows)
    with pytest.raises(UserError, match="transfer-gap axis 'sigma' is unknown"):
        transfer_gap(backbone, backbone, model.scheduler_config, x0, backbone.unconditional(5), axis="sigma")


def test_demo_cli_takes_the_process(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    assert main(["demo", "--process", "edm", "--dry-run", "--cache-dir", str(tmp_path)]) == 0
    plan = capsys.readouterr().out
    assert "EDM-preconditioned UNet" in plan and "demo_edm_out" in plan
    assert f"demo-source-{DemoSettings(process='edm').source_key()}" in plan
    assert main(["demo", "photos", "--process", "flow", "--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "rectified flow" in plan and "demo_photos_flow_out" in plan and "8000 steps" in plan
    assert main(["demo", "controlnet", "--process", "flow"]) != 0
    assert "the controlnet demo's model is fixed (a DDPM UNet)" in capsys.readouterr().err
