"""Kill trials: SIGKILL a real ``difftune train`` / ``difftune bank`` at random moments, resume, compare.

Each training trial starts ``difftune train`` as a subprocess (checkpoints at every step), kills it
with SIGKILL after a random delay (so the kill lands during a step, a checkpoint write or the
staging of ``final/``), then runs the same command with ``train.resume=latest`` until it finishes,
and compares the final weights (trained and EMA) and every per-step log (``metrics.jsonl``,
``fidelity.jsonl``) with those of an uninterrupted run, bit for bit. Each ControlNet trial does the
same for a tiny ControlNet that validates its fidelity at every step (its first trial is killed as
soon as the step-0 validation is logged, before any checkpoint). Each bank trial kills ``difftune bank`` the same way, checks that every shard on disk is complete,
reruns it, and compares the bank with an uninterrupted one byte for byte. Each latent-cache trial
kills a latent model's ``difftune train`` while it encodes the target set into its cache, reruns
it, and compares the cache with an uninterrupted one byte for byte. Each rotation trial kills
``difftune train`` in the middle of deleting an old checkpoint (at a random rotation, half of its
files gone), checks that the folder holds at most ``keep_checkpoints`` + 1 checkpoints, resumes,
and compares as the training trials do. Every training trial also checks that bound after its kill.

Usage (from the repository root, with the project's venv active)::

    python scripts/kill_trials.py                  # 10 training + 10 bank trials, about 3 minutes on 2 cores
    python scripts/kill_trials.py --trials 3 --seed 1

Prints one line per trial and, last, ``train N/T identical, controlnet C/T identical, bank M/T
identical, latent cache K/T identical, rotation R/T identical``; exits 1 unless all are.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

KEEP = 2  # train.keep_checkpoints of the trials
CONTROLNET_STEPS = 4  # train.max_steps of the ControlNet trials (a validation at each, and at step 0)


def _tiny_model(root: Path) -> Path:
    from difftune.testing.models import save_pipeline_dir, tiny_dit

    return save_pipeline_dir(root / "model", tiny_dit(), "transformer")


def _tiny_latent_model(root: Path) -> Path:
    from difftune.testing.models import save_pipeline_dir, tiny_dit, tiny_vae

    return save_pipeline_dir(
        root / "latent", tiny_dit(in_channels=4, sample_size=2), "transformer", tiny_vae()
    )


def _tiny_sd_model(root: Path) -> Path:
    from difftune.testing.models import save_sd_pipeline

    return save_sd_pipeline(root / "sd")


def _save(cfg: dict, out: Path) -> Path:
    """Write a run's config beside its output folder (``<out>.yaml``); returns its path."""
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return path


def _cache_config(model: Path, out: Path, cache: Path) -> Path:
    """One training step of a latent model on all of digits 5-9 (about 900 images, mirrored too)."""
    cfg = {
        "model": {"pretrained": str(model)},
        "data": {
            "source": "digits",
            "classes": [5, 6, 7, 8, 9],
            "resolution": 16,
            "hflip": True,
            "cache_dir": str(cache),
        },
        "objective": {"bank_share": 0.0},
        "train": {"output_dir": str(out), "max_steps": 1, "batch_size": 4},
    }
    return _save(cfg, out)


def _config(root: Path, model: Path, out: Path, bank: Path, steps: int) -> Path:
    cfg = {
        "model": {"pretrained": str(model)},
        "data": {
            "source": "digits",
            "classes": [5, 6, 7, 8, 9],
            "per_class": 4,
            "cache_dir": str(root / "cache"),
        },
        "bank": {
            "path": str(bank),
            "num_samples": 48,
            "shard_size": 3,
            "sampling": {"steps": 8},
            "batch_size": 3,
        },
        "objective": {"bank_share": 0.2},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 10,
            "checkpoint_every": 1,
            "keep_checkpoints": KEEP,
            "log_every": 1,
            "ema_decay": 0.9,
        },
    }
    return _save(cfg, out)


def _controlnet_config(model: Path, out: Path, cache: Path, steps: int) -> Path:
    """A ControlNet made from a tiny Stable Diffusion UNet, on captioned digits and their Canny edges,
    its fidelity validated at every step (step 0 included)."""
    cfg = {
        "model": {"pretrained": str(model), "controlnet": "from_unet"},
        "data": {
            "source": "digits",
            "classes": [5, 6, 7, 8, 9],
            "per_class": 2,
            "resolution": 32,
            "caption_template": "digit {}",
            "annotator": "canny",
            "cache_dir": str(cache),
        },
        "objective": {"bank_share": 0.0},
        "train": {
            "output_dir": str(out),
            "max_steps": steps,
            "batch_size": 4,
            "learning_rate": 1e-3,
            "checkpoint_every": 1,
            "keep_checkpoints": KEEP,
            "log_every": 1,
            "ema_decay": 0.9,
            "sampling": {"steps": 2},
            "validation_every": 1,
            "validation_samples": 2,
        },
    }
    return _save(cfg, out)


# ``difftune`` whose N-th deletion of a checkpoint (KILL_AT_ROTATION=N) stops dead half-way: half of
# the checkpoint's files deleted, then SIGKILL, as a kill or a power cut in the middle of rotation
_DIE_IN_ROTATION = """
import os, re, shutil, signal, sys
from pathlib import Path
real_rmtree, calls = shutil.rmtree, []
def rmtree(path, *args, **kwargs):
    path = Path(path)
    if re.fullmatch(r"checkpoint-[0-9]+([.]deleting)?", path.name):
        calls.append(path)
        if len(calls) == int(os.environ["KILL_AT_ROTATION"]):
            files = sorted(p for p in path.rglob("*") if p.is_file())
            for f in files[: len(files) // 2]:
                f.unlink()
            os.kill(os.getpid(), signal.SIGKILL)
    return real_rmtree(path, *args, **kwargs)
shutil.rmtree = rmtree
from difftune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _run(
    args: list[str],
    marker: Path,
    kill_after: float | None = None,
    until: Path | None = None,
    kill_at_rotation: int | None = None,
) -> tuple[int, float]:
    """Run ``python -m difftune ARGS``; with ``kill_after``, SIGKILL it that many seconds after ``marker``
    appears (the file a command writes when its real work starts); with ``kill_at_rotation``, it kills
    itself half-way through that deletion of an old checkpoint. Returns (exit code, seconds of work:
    until the process ends, or until ``until`` appears)."""
    env = {**os.environ, "TQDM_DISABLE": "1"}
    launcher = ["-m", "difftune"]
    if kill_at_rotation is not None:
        env["KILL_AT_ROTATION"] = str(kill_at_rotation)
        launcher = ["-c", _DIE_IN_ROTATION]
    proc = subprocess.Popen(
        [sys.executable, *launcher, *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    started = ended = None
    while proc.poll() is None:
        now = time.perf_counter()
        if started is None and marker.exists():
            started = now
        if until is not None and ended is None and until.exists():
            ended = now
        if kill_after is not None and started is not None and now - started >= kill_after:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.005)
    _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"difftune {' '.join(args)} failed:\n{err.decode()[-3000:]}")
    end = ended or time.perf_counter()
    return proc.returncode, end - (started or end)


def _outputs(out: Path) -> dict[str, object]:
    """What a finished run leaves to compare: the tensors of every weights file of ``final/`` (trained
    and EMA), and the bytes of every per-step log, by file."""
    from safetensors.torch import load_file

    from difftune.training.run_dir import LOG_FILES

    found: dict[str, object] = {}
    for path in sorted((out / "final").rglob("*.safetensors")):
        tensors = load_file(str(path))
        found[str(path.relative_to(out))] = {name: t.numpy().tobytes() for name, t in tensors.items()}
    for name in LOG_FILES:
        if (out / name).is_file():
            found[name] = (out / name).read_bytes()
    return found


def _differences(found: dict[str, object], expected: dict[str, object]) -> list[str]:
    """The files in which a run differs from the uninterrupted one (see :func:`_outputs`)."""
    return sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))


def _identical(differ: list[str]) -> str:
    """``True``, or ``False`` and the files that differ."""
    return f"False ({', '.join(differ)})" if differ else "True"


def _shards(bank: Path) -> dict[str, bytes]:
    from safetensors.torch import load_file

    for shard in bank.glob("shard-*.safetensors"):
        load_file(str(shard))  # every shard on disk is complete (raises otherwise)
    return {p.name: p.read_bytes() for p in sorted(bank.glob("*")) if p.is_file()}


def _train_trial(
    cfg: Path, out: Path, marker: Path, kill_after: float, expected: dict[str, object]
) -> tuple[bool, bool, str]:
    """Run ``difftune train``, SIGKILL it ``kill_after`` seconds after ``marker`` appears, resume it
    until it finishes, and compare it with the uninterrupted run.

    Returns:
        (identical, with at most ``KEEP`` + 1 checkpoints after the kill; killed before it finished;
        the trial's report).
    """
    code, _ = _run(["train", "--config", str(cfg)], marker, kill_after)
    where = "finished before the kill" if code == 0 else f"killed during {_where(out)}"
    bounded = len(_checkpoint_dirs(out)) <= KEEP + 1
    resumes = 0
    while not (out / "final").is_dir() or code != 0:
        code, _ = _run(["train", "--config", str(cfg), "--set", "train.resume=latest"], out / "config.yaml")
        resumes += 1
    differ = _differences(_outputs(out), expected)
    report = (
        f"{where}; at most {KEEP} + 1 checkpoints: {bounded}; {resumes} resume(s); "
        f"identical: {_identical(differ)}"
    )
    return not differ and bounded, resumes > 0, report


def _checkpoint_dirs(out: Path) -> list[str]:
    """Every checkpoint directory on disk, complete or not (what counts against the disk)."""
    root = out / "checkpoints"
    return sorted(p.name for p in root.glob("checkpoint-*") if p.is_dir()) if root.is_dir() else []


def _where(out: Path) -> str:
    """What the kill interrupted, from what it left behind."""
    checkpoints = out / "checkpoints"
    if any(p.name.startswith(".final") for p in out.glob(".*")):
        return "staging final/"
    if checkpoints.is_dir() and any(p.name.endswith(".tmp") for p in checkpoints.iterdir()):
        return "checkpoint write"
    done = sorted(p.name for p in checkpoints.glob("checkpoint-*")) if checkpoints.is_dir() else []
    return f"a step (newest {done[-1]})" if done else "the steps before the first checkpoint"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory(prefix="difftune-kill-") as tmp:
        root = Path(tmp)
        model = _tiny_model(root)
        reference_bank = root / "bank-ref"
        ref_cfg = _config(root, model, root / "ref", reference_bank, args.steps)
        # the work spans from the first file a command writes to its last (the exit after it is not work)
        last_shard = reference_bank / "shard-00015.safetensors"
        _, bank_seconds = _run(
            ["bank", "--config", str(ref_cfg)], reference_bank / "manifest.json", until=last_shard
        )
        _, train_seconds = _run(
            ["train", "--config", str(ref_cfg)], root / "ref" / "config.yaml", until=root / "ref" / "final"
        )
        expected, expected_bank = _outputs(root / "ref"), _shards(reference_bank)
        print(f"reference: bank {bank_seconds:.2f} s, train {train_seconds:.2f} s of work (after start-up)")

        train_ok = train_killed = 0
        for trial in range(args.trials):
            out = root / f"train-{trial}"
            cfg = _config(root, model, out, reference_bank, args.steps)
            ok, killed, report = _train_trial(
                cfg, out, out / "config.yaml", rng.uniform(0, train_seconds), expected
            )
            train_ok += ok
            train_killed += killed
            print(f"train trial {trial}: {report}")

        sd_model, cn_cache = _tiny_sd_model(root), root / "controlnet-cache"
        cn_ref = root / "controlnet-ref"
        _, cn_seconds = _run(
            ["train", "--config", str(_controlnet_config(sd_model, cn_ref, cn_cache, CONTROLNET_STEPS))],
            cn_ref / "config.yaml",
            until=cn_ref / "final",
        )
        expected_cn = _outputs(cn_ref)
        print(f"reference: controlnet train {cn_seconds:.2f} s of work")
        cn_ok = cn_killed = 0
        for trial in range(args.trials):
            out = root / f"controlnet-{trial}"
            cfg = _controlnet_config(sd_model, out, cn_cache, CONTROLNET_STEPS)
            # the first is killed as soon as step 0's validation is logged (before any checkpoint)
            marker, delay = (out / "fidelity.jsonl", 0.0) if trial == 0 else (out / "config.yaml", None)
            delay = rng.uniform(0, cn_seconds) if delay is None else delay
            ok, killed, report = _train_trial(cfg, out, marker, delay, expected_cn)
            cn_ok += ok
            cn_killed += killed
            print(f"controlnet trial {trial}: {report}")

        rotation_ok = 0
        for trial in range(args.trials):
            out = root / f"rotation-{trial}"
            cfg = _config(root, model, out, reference_bank, args.steps)
            at = rng.randint(1, args.steps - KEEP)  # the checkpoint-per-step run rotates steps - keep times
            code, _ = _run(["train", "--config", str(cfg)], out / "config.yaml", kill_at_rotation=at)
            left = _checkpoint_dirs(out)
            _run(["train", "--config", str(cfg), "--set", "train.resume=latest"], out / "config.yaml")
            differ = _differences(_outputs(out), expected)
            after = _checkpoint_dirs(out)
            ok = code == -signal.SIGKILL and len(left) <= KEEP + 1 and len(after) == KEEP and not differ
            rotation_ok += ok
            print(
                f"rotation trial {trial}: killed in rotation {at} with {left} on disk; after resuming "
                f"{after}; identical: {_identical(differ)}"
            )

        bank_ok = bank_killed = 0
        for trial in range(args.trials):
            bank = root / f"bank-{trial}"
            cfg = _config(root, model, root / f"unused-{trial}", bank, args.steps)
            code, _ = _run(
                ["bank", "--config", str(cfg)], bank / "manifest.json", rng.uniform(0, bank_seconds)
            )
            partial = len(list(bank.glob("shard-*.safetensors"))) if bank.is_dir() else 0
            complete_on_disk = _shards(bank) is not None if bank.is_dir() else True
            _run(["bank", "--config", str(cfg)], bank / "manifest.json")
            same = {k: v for k, v in _shards(bank).items() if k != "manifest.json"} == {
                k: v for k, v in expected_bank.items() if k != "manifest.json"
            }
            bank_ok += same and complete_on_disk
            bank_killed += partial < 16
            print(
                f"bank trial {trial}: killed with {partial} of 16 shards on disk, all complete; identical: {same}"
            )
        latent = _tiny_latent_model(root)
        reference_cache = root / "cache-ref"
        cache_cfg = _cache_config(latent, root / "cache-run", reference_cache)
        shard = reference_cache / "shard-00000.safetensors"
        _, cache_seconds = _run(
            ["train", "--config", str(cache_cfg)], reference_cache / "manifest.json", until=shard
        )
        print(f"reference: encoding the latent cache {cache_seconds:.2f} s")
        expected_cache = _shards(reference_cache)
        cache_ok = cache_killed = 0
        for trial in range(args.trials):
            cache = root / f"cache-{trial}"
            cfg = _cache_config(latent, root / f"cache-run-{trial}", cache)
            _run(["train", "--config", str(cfg)], cache / "manifest.json", rng.uniform(0, cache_seconds))
            shards = len(list(cache.glob("shard-*.safetensors")))
            _shards(cache)  # whatever is on disk is complete
            _run(["train", "--config", str(cfg), "--set", "train.overwrite=true"], cache / "manifest.json")
            same = _shards(cache) == expected_cache
            cache_ok += same
            cache_killed += shards == 0
            print(
                f"cache trial {trial}: killed with {shards} of 1 shard on disk, all complete; identical: {same}"
            )
    print(
        f"killed mid-work: train {train_killed}, controlnet {cn_killed}, bank {bank_killed}, latent cache "
        f"{cache_killed} of {args.trials} each (the others finished before their kill)"
    )
    print(
        f"train {train_ok}/{args.trials} identical, controlnet {cn_ok}/{args.trials} identical, "
        f"bank {bank_ok}/{args.trials} identical, latent cache {cache_ok}/{args.trials} identical, "
        f"rotation {rotation_ok}/{args.trials} identical"
    )
    return 0 if train_ok == cn_ok == bank_ok == cache_ok == rotation_ok == args.trials else 1


if __name__ == "__main__":
    raise SystemExit(main())
