"""Re-run the reliability bugs of the "Reliability and safety" issue against a difftune checkout.

Each case sets up the faulty situation and reports what happened, as one JSON object per line.
Run it with this checkout's code, and with an older checkout's to see the old behaviour:

    python scripts/why_bugs.py                                  # this checkout
    PYTHONPATH=/path/to/old/checkout/src python scripts/why_bugs.py

Only APIs that both versions have are used (``Trainer``, ``load_config``, ``load_pretrained``,
the ``difftune`` command line). Nothing is downloaded.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler, DiTTransformer2DModel
from PIL import Image


def _tiny_dit(root: Path, classes: int = 5) -> Path:
    from difftune.testing.models import save_pipeline_dir, tiny_dit

    return save_pipeline_dir(root, tiny_dit(num_classes=classes), "transformer")


def _cfg(model: Path, out: Path, *extra: str):
    from difftune.config.experiment import load_config

    base = [
        f"model.pretrained={model}",
        "data.source=digits",
        "data.classes=[5,6,7,8,9]",
        "data.per_class=4",
        f"train.output_dir={out}",
        "train.batch_size=10",
        "train.log_every=1",
        "objective.bank_share=0",
    ]
    return load_config(None, base + list(extra))


def _train(cfg) -> str:
    from difftune.training.loop import Trainer

    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            Trainer(cfg).train()
        return "finished"
    except Exception as err:  # noqa: BLE001 - the outcome is what is reported
        return f"{type(err).__name__}: {str(err).splitlines()[0][:120]}"


def _weights(final: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(final / "transformer" / "diffusion_pytorch_model.safetensors"))


def _cli(args: list[str]) -> tuple[int, int]:
    """(exit code, lines on stderr) of ``difftune ARGS``."""
    from difftune.cli import main

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = main(args)
        except SystemExit as exit_:
            code = exit_.code
        except Exception:  # noqa: BLE001
            import traceback

            traceback.print_exc(file=err)
            code = 1
    return code, len(err.getvalue().strip().splitlines())


def fresh_run_into_old_folder(tmp: Path) -> dict:
    model = _tiny_dit(tmp / "m")
    run = tmp / "run"
    _train(_cfg(model, run, "train.max_steps=4", "train.checkpoint_every=1", "train.keep_checkpoints=2"))
    old_final = _weights(run / "final")
    outcome = _train(_cfg(model, run, "train.max_steps=2", "train.checkpoint_every=1", "train.seed=7"))
    published_old = (run / "final").is_dir() and all(
        torch.equal(v, old_final[k]) for k, v in _weights(run / "final").items()
    )
    return {"outcome": outcome, "final is the old run's weights": published_old}


def cache_dir_at_the_bank(tmp: Path) -> dict:
    from difftune.backbones import load_pretrained
    from difftune.bank import generate_bank

    model = _tiny_dit(tmp / "m")
    cfg = _cfg(
        model, tmp / "run", f"bank.path={tmp / 'bank'}", "bank.num_samples=6", "bank.num_inference_steps=2"
    )
    with contextlib.redirect_stderr(io.StringIO()):
        generate_bank(load_pretrained(str(model)), cfg.bank, progress=False)
    before = {p.name: p.read_bytes() for p in (tmp / "bank").iterdir()}
    outcome = _train(_cfg(model, tmp / "run", "train.max_steps=1", f"data.cache_dir={tmp / 'bank'}"))
    intact = [
        name
        for name, data in before.items()
        if (tmp / "bank" / name).is_file() and (tmp / "bank" / name).read_bytes() == data
    ]
    return {"outcome": outcome, "bank files": len(before), "bank files intact": len(intact)}


def non_finite_loss(tmp: Path) -> dict:
    model = _tiny_dit(tmp / "m")
    run = tmp / "run"
    outcome = _train(
        _cfg(model, run, "train.max_steps=4", "train.checkpoint_every=1", "train.learning_rate=1e30")
    )
    final_finite = (run / "final").is_dir() and all(
        torch.isfinite(t).all() for t in _weights(run / "final").values()
    )
    return {"outcome": outcome, "final/ written": (run / "final").is_dir(), "final/ finite": final_finite}


def resume_with_a_new_learning_rate(tmp: Path) -> dict:
    from difftune.training.loop import Trainer

    model = _tiny_dit(tmp / "m")
    run = tmp / "run"
    _train(_cfg(model, run, "train.max_steps=2", "train.checkpoint_every=1"))
    trainer = Trainer(
        _cfg(model, run, "train.max_steps=3", "train.resume=latest", "train.learning_rate=3e-5")
    )
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        trainer.train()
    return {"optimizer lr after resume": trainer.optimizer.param_groups[0]["lr"], "config asks": 3e-5}


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def resume_unpickles(tmp: Path) -> dict:
    model = _tiny_dit(tmp / "m")
    run = tmp / "run"
    _train(_cfg(model, run, "train.max_steps=1", "train.checkpoint_every=1"))
    state = run / "checkpoints" / "checkpoint-0000001" / "state"
    marker = tmp / "payload-ran"
    for pkl in state.glob("custom_checkpoint_*.pkl"):  # the files older versions unpickle on resume
        torch.save({"step": 1, "x": _Payload(marker)}, pkl)
    if not list(state.glob("custom_checkpoint_*.pkl")):  # this version writes none: plant an old-format one
        (state / "difftune_loop.json").unlink()
        torch.save({"step": 1, "x": _Payload(marker)}, state / "custom_checkpoint_0.pkl")
        torch.save({"step": 1, "x": _Payload(marker)}, state / "custom_checkpoint_1.pkl")
    outcome = _train(_cfg(model, run, "train.max_steps=2", "train.resume=latest"))
    return {"outcome": outcome, "payload ran": marker.exists()}


def sixteen_bit_grey(tmp: Path) -> dict:
    from difftune.config.experiment import DataConfig
    from difftune.data.targets import load_target_images

    (tmp / "d" / "a").mkdir(parents=True)
    Image.fromarray(np.full((8, 8), 32896, dtype=np.uint16)).save(tmp / "d" / "a" / "g.png")
    value = float(load_target_images(DataConfig(source="folder", path=str(tmp / "d")), 8, 1).images.mean())
    return {"mid-grey (should be ~0 in [-1, 1])": round(value, 3)}


def empty_class_folder(tmp: Path) -> dict:
    from difftune.config.experiment import DataConfig
    from difftune.data.targets import load_target_images

    for name in ("a", "b"):
        (tmp / "d" / name).mkdir(parents=True)
        Image.new("L", (8, 8), 10).save(tmp / "d" / name / "0.png")
    (tmp / "d" / ".ipynb_checkpoints").mkdir()
    try:
        labels = load_target_images(DataConfig(source="folder", path=str(tmp / "d")), 8, 1).labels.tolist()
        return {"labels of a/, b/ (should be [0, 1])": labels}
    except Exception as err:  # noqa: BLE001
        return {"outcome": f"{type(err).__name__}: {str(err)[:120]}"}


def batch_size_two_and_a_half(tmp: Path) -> dict:
    try:
        _cfg(tmp, tmp / "run", "train.batch_size=2.5", "model.pretrained=x/y")
        return {"outcome": "accepted"}
    except Exception as err:  # noqa: BLE001
        return {"outcome": f"{type(err).__name__}: {str(err)[:120]}"}


def model_path_is_a_file(tmp: Path) -> dict:
    (tmp / "model.safetensors").write_bytes(b"x")
    code, lines = _cli(["sample", "--model", str(tmp / "model.safetensors"), "--out", str(tmp / "s")])
    return {"exit code": code, "stderr lines": lines}


def dry_run_with_too_many_classes(tmp: Path) -> dict:
    model = _tiny_dit(tmp / "m", classes=3)
    cfg = _cfg(model, tmp / "run")
    cfg.save(tmp / "c.yaml")
    code, lines = _cli(["train", "--config", str(tmp / "c.yaml"), "--dry-run"])
    return {"exit code (5 target classes, 3 in the model)": code, "stderr lines": lines}


def single_model_schedule(tmp: Path) -> dict:
    from difftune.backbones import load_pretrained

    _tiny_dit(tmp / "m")
    DiTTransformer2DModel.from_pretrained(tmp / "m", subfolder="transformer").save_pretrained(tmp / "single")
    DDPMScheduler(num_train_timesteps=500).save_pretrained(tmp / "single")
    return {
        "T used (scheduler_config.json says 500)": load_pretrained(str(tmp / "single")).scheduler_config[
            "num_train_timesteps"
        ]
    }


CASES: dict[str, Callable[[Path], dict]] = {
    "fresh run into an old output folder": fresh_run_into_old_folder,
    "data.cache_dir pointed at the bank": cache_dir_at_the_bank,
    "non-finite loss (lr 1e30)": non_finite_loss,
    "resume with a changed learning rate": resume_with_a_new_learning_rate,
    "payload planted in the resume state": resume_unpickles,
    "16-bit grey PNG": sixteen_bit_grey,
    "hidden folder beside class folders": empty_class_folder,
    "train.batch_size: 2.5": batch_size_two_and_a_half,
    "a file as the model path": model_path_is_a_file,
    "dry run, more classes than the model": dry_run_with_too_many_classes,
    "scheduler_config.json beside a single model": single_model_schedule,
}


def main() -> int:
    import difftune

    print(json.dumps({"difftune": str(Path(difftune.__file__).parent)}))
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as tmp:
            print(json.dumps({"case": name, **case(Path(tmp))}, default=str), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
