"""Tests for the knowledge bank (difftune.bank, difftune.io.store) and per-sample seeded generation."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch
from accelerate import PartialState

import difftune.bank.generate as bank_generate
from conftest import save_pipeline_dir, tiny_dit
from difftune.backbones import LoadedModel, load_pretrained, model_fingerprint
from difftune.bank import generate_bank, load_bank
from difftune.config.experiment import BankConfig, load_config
from difftune.config.sampling import SamplingSpec
from difftune.errors import UserError
from difftune.io.store import LatentStore
from difftune.sampling.generate import build_scheduler, generate
from difftune.training.loop import Trainer

NUM, SHARD, STEPS, SEED = 20, 8, 3, 7  # 3 shards: 8 + 8 + 4 samples
DROP = object()  # a manifest edit that removes the field


def bank_cfg(path: Path, **kwargs) -> BankConfig:
    """The test bank's settings; ``scheduler``, ``steps``, ``guidance_scale`` and ``seed`` are its ``sampling``."""
    sampling = {"steps": STEPS, "seed": SEED}
    settings = {"num_samples": NUM, "shard_size": SHARD, "batch_size": 8}
    for key, value in kwargs.items():
        (sampling if key in ("scheduler", "steps", "guidance_scale", "seed") else settings)[key] = value
    return BankConfig(path=str(path), sampling=SamplingSpec(**sampling), **settings)


def assert_banks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    """Labels and seeds always equal; samples bit-identical, or to float32 rounding when not ``exact``."""
    assert a.keys() == b.keys() == {"samples", "labels", "seeds"}
    for key in ("labels", "seeds"):
        assert torch.equal(a[key], b[key]), key
    if exact:
        assert torch.equal(a["samples"], b["samples"])
    else:
        torch.testing.assert_close(a["samples"], b["samples"], rtol=1e-5, atol=1e-5)


@pytest.fixture
def loaded(dit_dir: Path) -> LoadedModel:
    return load_pretrained(str(dit_dir))


@pytest.fixture
def bank_a(loaded: LoadedModel, tmp_path: Path) -> dict[str, torch.Tensor]:
    """A complete reference bank (batch size 8) and its path."""
    generate_bank(loaded, bank_cfg(tmp_path / "bank_a"), progress=False)
    return load_bank(tmp_path / "bank_a", loaded)


def count_writes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the shard indices written from now on."""
    written: list[int] = []
    original = LatentStore.write_shard

    def recording(self: LatentStore, index: int, tensors: dict[str, torch.Tensor]) -> None:
        written.append(index)
        original(self, index, tensors)

    monkeypatch.setattr(LatentStore, "write_shard", recording)
    return written


def test_bank_is_independent_of_batch_size(loaded: LoadedModel, tmp_path: Path) -> None:
    store3 = generate_bank(loaded, bank_cfg(tmp_path / "b3", batch_size=3), progress=False)
    store8 = generate_bank(loaded, bank_cfg(tmp_path / "b8", batch_size=8), progress=False)
    b3, b8 = load_bank(tmp_path / "b3", loaded), load_bank(tmp_path / "b8", loaded)
    # every sample has its own generator and the model treats rows independently; CPU matmul
    # kernels still round differently by batch size (measured: a few float32 ulps on values ~70)
    assert_banks_equal(b3, b8, exact=False)
    assert b3["samples"].shape == (NUM, 1, 8, 8) and b3["samples"].dtype == torch.float32
    assert torch.equal(b3["labels"], torch.arange(NUM) % 5)
    assert torch.equal(b3["seeds"], SEED + torch.arange(NUM))
    assert torch.isfinite(b3["samples"]).all()
    assert not torch.allclose(b3["samples"][0], b3["samples"][5])  # same label, other seed

    manifest = store3.manifest
    assert manifest == store8.manifest  # the batch size is not part of what the bank is
    assert manifest["source_fingerprint"] == model_fingerprint(loaded.backbone.inner)
    assert manifest["shape"] == [1, 8, 8]
    assert manifest["space"] == "pixel"
    assert manifest["scheduler"] == "DPMSolverMultistepScheduler"
    assert manifest["num_inference_steps"] == STEPS
    assert manifest["guidance_scale"] == 1.5
    assert manifest["num_shards"] == 3
    assert manifest["num_classes"] == 5
    assert sorted(p.name for p in (tmp_path / "b3").glob("shard-*")) == [
        f"shard-0000{i}.safetensors" for i in range(3)
    ]

    # sample i is a pure function of (label i mod K, seed + i)
    scheduler = build_scheduler("DPMSolverMultistepScheduler", loaded.scheduler_config)
    alone = generate(loaded.backbone, scheduler, loaded.backbone.condition([13 % 5]), [SEED + 13], 1.5, STEPS)
    torch.testing.assert_close(alone[0], b3["samples"][13], rtol=1e-5, atol=1e-5)


def test_resume_after_crash(
    loaded: LoadedModel, bank_a: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bank_b"
    original = LatentStore.write_shard
    calls = []

    def crash_after_one(self: LatentStore, index: int, tensors: dict[str, torch.Tensor]) -> None:
        if calls:
            raise RuntimeError("simulated crash")
        calls.append(index)
        original(self, index, tensors)

    with monkeypatch.context() as m:
        m.setattr(LatentStore, "write_shard", crash_after_one)
        with pytest.raises(RuntimeError, match="simulated crash"):
            generate_bank(loaded, bank_cfg(path), progress=False)
    store = LatentStore(path)
    assert store.missing_shards() == [1, 2]
    with pytest.raises(ValueError, match="incomplete"):
        load_bank(path, loaded)
    # a writer killed mid-write leaves a temporary file: it is not a shard
    (path / "shard-00001.safetensors.tmp999999").write_bytes(os.urandom(64))
    assert store.missing_shards() == [1, 2]
    done = store.shard_path(0).stat().st_mtime_ns

    written = count_writes(monkeypatch)
    generate_bank(loaded, bank_cfg(path), progress=False)
    assert written == [1, 2]  # the finished shard is not regenerated
    assert store.shard_path(0).stat().st_mtime_ns == done
    assert_banks_equal(load_bank(path, loaded), bank_a)

    # running it once more is a no-op
    generate_bank(loaded, bank_cfg(path), progress=False)
    assert written == [1, 2]


def test_resume_regenerates_a_damaged_shard(
    loaded: LoadedModel,
    bank_a: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A finished shard truncated afterwards is written again on resuming; the whole ones are left alone."""
    path = tmp_path / "bank_a"
    store = LatentStore(path)
    whole = {i: store.shard_path(i).stat().st_mtime_ns for i in (0, 2)}
    data = store.shard_path(1).read_bytes()
    store.shard_path(1).write_bytes(data[: len(data) // 2])
    assert store.missing_shards() == [] and store.damaged_shards() == [1]
    written = count_writes(monkeypatch)
    with caplog.at_level("WARNING", logger="difftune.io.store"):
        generate_bank(loaded, bank_cfg(path), progress=False)
    assert written == [1]
    assert {i: store.shard_path(i).stat().st_mtime_ns for i in (0, 2)} == whole
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "shard-00001.safetensors" in warnings[0], warnings
    assert store.damaged_shards() == []
    assert_banks_equal(load_bank(path, loaded), bank_a)


@pytest.mark.parametrize(
    "edit,message",
    [
        ({"num_shards": "three"}, r"num_shards='three', which must be a whole number > 0"),
        ({"num_shards": 4}, r"num_shards=4, but num_samples=20 in shards of shard_size=8 make 3"),
        ({"num_samples": 30}, r"num_shards=3, but num_samples=30 in shards of shard_size=8 make 4"),
        ({"shard_size": 0}, r"shard_size=0, which must be a whole number > 0"),
        ({"num_samples": 2.5}, r"num_samples=2.5, which must be a whole number"),
        ({"shape": "1x8x8"}, r"shape='1x8x8', which must be a list of sizes > 0"),
        ({"source_fingerprint": None}, r"source_fingerprint=None, which must be a non-empty string"),
        ({"num_shards": DROP}, r"no 'num_shards' field"),
        ({"kind": ["bank"]}, r"kind=\['bank'\], which must be 'bank' or 'target'"),
    ],
    ids=[
        "num_shards=three",
        "num_shards=4",
        "num_samples=30",
        "shard_size=0",
        "num_samples=2.5",
        "shape=text",
        "no_fingerprint",
        "no_num_shards",
        "kind=list",
    ],
)
def test_manifest_with_a_wrong_field_refused(
    loaded: LoadedModel,
    bank_a: dict[str, torch.Tensor],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    edit: dict,
    message: str,
) -> None:
    """Reading, resuming or loading a bank whose manifest has a wrong field: one refusal that names the
    file, the field and the fix; nothing written."""
    path = tmp_path / "bank_a"
    manifest = json.loads((path / "manifest.json").read_text())
    for key, value in edit.items():
        if value is DROP:
            del manifest[key]
        else:
            manifest[key] = value
    (path / "manifest.json").write_text(json.dumps(manifest))
    full = rf"{re.escape(str(path / 'manifest.json'))} has {message}.*; regenerate the bank: delete "
    written = count_writes(monkeypatch)
    for attempt in (
        lambda: load_bank(path, loaded),
        lambda: generate_bank(loaded, bank_cfg(path), progress=False),
    ):
        with pytest.raises(UserError, match=full):
            attempt()
    assert written == []


@pytest.mark.parametrize(
    "key,value,named",
    [
        ("steps", 4, "num_inference_steps"),
        ("guidance_scale", 2.0, "guidance_scale"),
        ("seed", 8, "seed"),
        ("scheduler", "DDIMScheduler", "scheduler"),
        ("num_samples", 24, "num_samples"),
        (
            "shard_size",
            4,
            "num_shards",
        ),  # the first differing key in sorted order: num_shards follows from it
    ],
)
def test_other_settings_into_existing_bank_refused(
    key: str, value: object, named: str, loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bank"
    LatentStore.create(path, bank_generate.bank_manifest(loaded, bank_cfg(path)))  # as a first run would
    written = count_writes(monkeypatch)
    with pytest.raises(
        ValueError, match=rf"other settings \({named}: .* there vs .* now\); use another path"
    ):
        generate_bank(loaded, bank_cfg(path, **{key: value}), progress=False)
    assert written == []


def test_other_model_into_existing_bank_refused(loaded: LoadedModel, tmp_path: Path) -> None:
    path = tmp_path / "bank"
    LatentStore.create(path, bank_generate.bank_manifest(loaded, bank_cfg(path)))
    other = load_pretrained(str(save_pipeline_dir(tmp_path / "other", tiny_dit(seed=1), "transformer")))
    with pytest.raises(ValueError, match=r"other settings \(source"):
        generate_bank(other, bank_cfg(path), progress=False)
    # same path, other weights: the fingerprint alone tells them apart
    other.source = loaded.source
    with pytest.raises(ValueError, match=r"other settings \(source_fingerprint"):
        generate_bank(other, bank_cfg(path), progress=False)


def test_batch_size_change_resumes_same_bank(
    loaded: LoadedModel, bank_a: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = count_writes(monkeypatch)
    generate_bank(loaded, bank_cfg(tmp_path / "bank_a", batch_size=5), progress=False)
    assert written == []
    assert_banks_equal(load_bank(tmp_path / "bank_a", loaded), bank_a)


def test_load_bank_refuses_other_model(bank_a: dict[str, torch.Tensor], tmp_path: Path) -> None:
    other = load_pretrained(str(save_pipeline_dir(tmp_path / "other", tiny_dit(seed=1), "transformer")))
    with pytest.raises(ValueError, match=r"generated by another model.*regenerate the bank"):
        load_bank(tmp_path / "bank_a", other)


def test_load_bank_refuses_other_shape(bank_a: dict[str, torch.Tensor], tmp_path: Path) -> None:
    small = load_pretrained(
        str(save_pipeline_dir(tmp_path / "small", tiny_dit(sample_size=4), "transformer"))
    )
    with pytest.raises(ValueError, match=r"shape \[1, 8, 8\].*works on \[1, 4, 4\].*regenerate"):
        load_bank(tmp_path / "bank_a", small)


def test_load_bank_refuses_edited_manifest(
    loaded: LoadedModel, bank_a: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    manifest_path = tmp_path / "bank_a" / "manifest.json"
    original = json.loads(manifest_path.read_text())
    for edit, message in [
        ({"shape": [1, 16, 16]}, r"shape \[1, 16, 16\].*regenerate"),
        ({"space": "latent"}, r"latent space but the model works in pixel space"),
        ({"kind": "target"}, r"not a knowledge bank"),
    ]:
        manifest_path.write_text(json.dumps({**original, **edit}))
        with pytest.raises(ValueError, match=message):
            load_bank(tmp_path / "bank_a", loaded)
    manifest_path.write_text("{not json")
    with pytest.raises(ValueError, match="corrupt.*regenerate"):
        load_bank(tmp_path / "bank_a", loaded)


def test_load_bank_refuses_missing_dir(loaded: LoadedModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"does not exist: generate it"):
        load_bank(tmp_path / "nowhere", loaded)


def test_load_bank_refuses_incomplete_or_corrupt(
    loaded: LoadedModel, bank_a: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    store = LatentStore(tmp_path / "bank_a")
    store.shard_path(1).unlink()
    with pytest.raises(
        ValueError, match=r"incomplete: 1 of 3 shards missing \(first: 1\).*run the same generation"
    ):
        load_bank(tmp_path / "bank_a", loaded)
    store.shard_path(1).write_bytes(os.urandom(100))
    with pytest.raises(ValueError, match=r"shard-00001.safetensors is corrupt.*rerun generation"):
        load_bank(tmp_path / "bank_a", loaded)


def test_training_with_mismatched_bank_fails(dit_dir: Path, tmp_path: Path) -> None:
    other = load_pretrained(str(save_pipeline_dir(tmp_path / "other", tiny_dit(seed=1), "transformer")))
    generate_bank(other, bank_cfg(tmp_path / "other_bank"), progress=False)
    cfg = load_config(
        None,
        [
            f"model.pretrained={dit_dir}",
            "data.source=digits",
            "data.classes=[5,6,7,8,9]",
            "data.per_class=4",
            f"bank.path={tmp_path / 'other_bank'}",
            f"train.output_dir={tmp_path / 'run'}",
            "train.batch_size=10",
        ],
    )
    with pytest.raises(ValueError, match=r"generated by another model.*regenerate the bank"):
        Trainer(cfg)


class _FakeState:
    """What generate_bank uses of accelerate's PartialState, for rank ``index`` of ``count``."""

    device = torch.device("cpu")

    def __init__(self, index: int, count: int) -> None:
        self.process_index, self.num_processes = index, count
        self.is_main_process = self.is_local_main_process = index == 0

    def wait_for_everyone(self) -> None:
        pass


def test_single_process_generates_every_shard(
    loaded: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert PartialState().num_processes == 1
    written = count_writes(monkeypatch)
    generate_bank(loaded, bank_cfg(tmp_path / "bank"), progress=False)
    assert written == [0, 1, 2]
    assert LatentStore(tmp_path / "bank").missing_shards() == []


def test_shards_split_by_process_index(
    loaded: LoadedModel, bank_a: dict[str, torch.Tensor], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank k of P writes shards k, k + P, ...; together the ranks write the single-process bank."""
    written = count_writes(monkeypatch)
    path = tmp_path / "split"
    for rank, expected in [(0, [0, 2]), (1, [1])]:
        monkeypatch.setattr(bank_generate, "PartialState", lambda cpu=False, r=rank: _FakeState(r, 2))
        generate_bank(loaded, bank_cfg(path), progress=False)
        assert written == expected
        written.clear()
    assert_banks_equal(load_bank(path, loaded), bank_a)


@pytest.mark.parametrize(
    "scheduler_name,guidance",
    [
        ("DPMSolverMultistepScheduler", 1.0),
        ("DPMSolverMultistepScheduler", 1.5),
        ("DDPMScheduler", 1.0),
        ("DDPMScheduler", 1.5),
    ],
)
def test_generate_is_per_sample_deterministic(
    loaded: LoadedModel, scheduler_name: str, guidance: float
) -> None:
    backbone = loaded.backbone.eval()
    scheduler = build_scheduler(scheduler_name, loaded.scheduler_config)
    labels, seeds = torch.tensor([0, 1, 2, 4, 5]), [10, 11, 12, 13, 14]  # 5 = the null label

    def run(lab: torch.Tensor, sd: list[int], global_seed: int = 0) -> torch.Tensor:
        torch.manual_seed(global_seed)  # the global generator must play no part
        return generate(backbone, scheduler, backbone.condition(lab), sd, guidance, 4)

    batch = run(labels, seeds)
    assert batch.shape == (5, 1, 8, 8)
    for i in (0, 2, 4):
        alone = run(labels[i : i + 1], seeds[i : i + 1], global_seed=123)
        torch.testing.assert_close(alone[0], batch[i], rtol=1e-5, atol=1e-5)
    # permuting the batch permutes the samples
    perm = torch.tensor([3, 1, 4, 0, 2])
    torch.testing.assert_close(run(labels[perm], [seeds[i] for i in perm]), batch[perm], rtol=1e-5, atol=1e-5)
    # and the seed matters (for DDPM also through the noise added at every step)
    other = run(labels[:1], [99])
    assert (other[0] - batch[0]).abs().max() > 1e-2


def test_ddpm_step_noise_comes_from_the_sample_generator(loaded: LoadedModel) -> None:
    """Two rows with the same seed stay equal through every stochastic DDPM step."""
    backbone = loaded.backbone.eval()
    ddpm = build_scheduler("DDPMScheduler", loaded.scheduler_config)
    a = generate(backbone, ddpm, backbone.condition([1, 1]), [5, 5], 1.0, 3)
    assert torch.equal(a[0], a[1])  # shared step noise would make the rows differ
    with pytest.raises(ValueError, match="one seed per sample"):
        generate(backbone, ddpm, backbone.condition([1, 1]), [1], 1.0, 3)
