"""How ψ/ξ travel to a process: objective.power.axis, auto's recommended port, and the offsets port."""

from __future__ import annotations

import pytest
import torch

from difftune.backbones.dit import DiTBackbone
from difftune.config.experiment import section_from_dict
from difftune.errors import UserError
from difftune.objectives import build_objective
from difftune.process import build_process
from difftune.process.schedulers import make_scheduler
from difftune.schedules.base import build_schedule
from difftune.schedules.ports import OFFSET_SCHEDULES, RECOMMENDED_AXIS, concrete_axis, resolve_port
from difftune.testing.models import tiny_dit

PROCESS_CONFIGS = {
    "ddpm": {},
    "flow": {"shift": 3.0},
    "edm": {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5, "prediction_type": "epsilon"},
}


def _objective(process_name: str, **objective: object):
    process = build_process(
        dict(make_scheduler(process_name, **PROCESS_CONFIGS[process_name]).config), (1, 8, 8)
    )
    backbone = DiTBackbone(tiny_dit(learn_sigma=process_name == "ddpm"))
    return process, build_objective(section_from_dict("objective", objective), process, backbone)


def test_auto_is_the_recommended_port_of_each_process_and_explicit_axes_stay() -> None:
    assert set(RECOMMENDED_AXIS) == {"ddpm", "flow", "edm"}
    assert RECOMMENDED_AXIS["ddpm"] == "index"  # the paper's code, unchanged on DDPM
    for process, axis in RECOMMENDED_AXIS.items():
        assert concrete_axis("auto", process) == axis
        for explicit in ("index", "log_snr", "offsets"):
            assert concrete_axis(explicit, process) == explicit
    with pytest.raises(UserError, match="no recommended port for the 'vp' process"):
        concrete_axis("auto", "vp")
    cfg = section_from_dict("objective", {})
    assert cfg.power.axis == "auto"
    resolved = resolve_port(cfg, "flow")
    assert resolved.power.axis == RECOMMENDED_AXIS["flow"] and cfg.power.axis == "auto"  # a copy
    assert resolve_port(resolved, "flow") is resolved
    # the offsets port is saved as what it runs: the noise-level schedules with their offsets
    offsets = resolve_port(section_from_dict("objective", {"power": {"axis": "offsets"}}), "flow")
    assert (offsets.target_schedule, offsets.bank_schedule) == ("logit_normal_up", "logit_normal_down")
    assert offsets.power.axis == "index" and resolve_port(offsets, "flow") is offsets
    # the study recommends no port over the paper's on any process (docs/reproduction.md §14)
    assert all(resolve_port(cfg, p).power.axis == "index" for p in RECOMMENDED_AXIS)
    kept = resolve_port(
        section_from_dict("objective", {"power": {"axis": "offsets"}, "bank_schedule": "uniform"}), "edm"
    )
    assert (kept.target_schedule, kept.bank_schedule) == ("logit_normal_up", "uniform")


@pytest.mark.parametrize("process_name", ["ddpm", "flow", "edm"])
def test_each_port_builds_the_schedules_it_names(process_name: str) -> None:
    for axis in ("index", "log_snr", "offsets"):
        process, objective = _objective(process_name, power={"axis": axis}, logit_normal_up={"offset": 0.7})
        psi, xi = (s.probs() for s in objective.schedules)
        T, noise = process.num_timesteps, process.noise_levels()
        if axis == "offsets":  # the power schedules become the pre-training density moved by the offsets
            expected = (
                build_schedule(OFFSET_SCHEDULES["power_up"], T, noise=noise, offset=0.7),
                build_schedule(OFFSET_SCHEDULES["power_down"], T, noise=noise, offset=1.1),
            )
        else:
            expected = (
                build_schedule("power_up", T, noise=noise, axis=axis),
                build_schedule("power_down", T, noise=noise, axis=axis),
            )
        torch.testing.assert_close(psi, expected[0].probs(), rtol=0, atol=0)
        torch.testing.assert_close(xi, expected[1].probs(), rtol=0, atol=0)
    # auto is the recommended port exactly
    _, auto = _objective(process_name)
    _, named = _objective(process_name, power={"axis": RECOMMENDED_AXIS[process_name]})
    for a, b in zip(auto.schedules, named.schedules, strict=True):
        torch.testing.assert_close(a.probs(), b.probs(), rtol=0, atol=0)


def test_the_offsets_port_leaves_other_schedules_as_named() -> None:
    _, objective = _objective(
        "edm", power={"axis": "offsets"}, target_schedule="uniform", bank_schedule="min_snr"
    )
    uniform = objective.schedules[0].probs()
    assert torch.allclose(uniform, torch.full_like(uniform, uniform[0]))
    assert objective.schedules[1].name.startswith("min_snr")
