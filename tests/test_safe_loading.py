"""Nothing difftune loads is unpickled: models are safetensors, resume state is JSON + safetensors,
and old-format checkpoints are read with ``weights_only=True``."""

from __future__ import annotations

import ast
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_dit
from difftune.backbones import load_pretrained
from difftune.cli import main
from difftune.errors import UserError
from difftune.training.loop import Trainer
from test_training import make_cfg, weights

SRC = Path(__file__).resolve().parents[1] / "src" / "difftune"


class Payload:
    """Unpickling this runs ``touch <marker>``: what a planted checkpoint file would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_only_model_is_refused_with_how_to_convert(tmp_path: Path, capsys) -> None:
    tiny_dit().save_pretrained(tmp_path / "m" / "transformer", safe_serialization=False)
    assert not list((tmp_path / "m").rglob("*.safetensors"))
    with pytest.raises(UserError, match=r"no safetensors weights.*use_safetensors=False\).save_pretrained"):
        load_pretrained(str(tmp_path / "m"))
    assert main(["sample", "--model", str(tmp_path / "m"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no safetensors weights" in err
    assert not (tmp_path / "s").exists()
    # the dry run finds it from the folder's listing, without reading the weights
    dry = ["train", "--dry-run", "--set", f"model.pretrained={tmp_path / 'm'}", "--set", "data.source=digits"]
    dry += [
        "--set",
        "data.classes=[5,6]",
        "--set",
        "objective.bank_share=0",
        "--set",
        f"train.output_dir={tmp_path / 'r'}",
    ]
    assert main(dry) == 2
    assert "no safetensors weights" in capsys.readouterr().err


def _checkpoint(dit_dir: Path, run: Path) -> Path:
    """A 2-step run with a checkpoint at step 1; returns that checkpoint."""
    Trainer(make_cfg(dit_dir, run, None, "train.max_steps=2", "train.checkpoint_every=1")).train()
    return run / "checkpoints" / "checkpoint-0000001"


def _to_old_format(checkpoint: Path, loop: object | None = None) -> None:
    """Rewrite difftune's part of ``state/`` as the pickles earlier versions wrote (EMA first, then the loop)."""
    state = checkpoint / "state"
    settings = json.loads((state / "difftune_ema.json").read_text())
    shadow = load_file(str(state / "difftune_ema.safetensors"))
    torch.save(
        {**settings, "shadow_params": [shadow[k] for k in sorted(shadow)]}, state / "custom_checkpoint_0.pkl"
    )
    torch.save(
        loop or json.loads((state / "difftune_loop.json").read_text()), state / "custom_checkpoint_1.pkl"
    )
    for name in ("difftune_loop.json", "difftune_ema.json", "difftune_ema.safetensors"):
        (state / name).unlink()


def _resume(dit_dir: Path, run: Path, checkpoint: Path) -> Path:
    cfg = make_cfg(
        dit_dir, run, None, "train.max_steps=2", "train.checkpoint_every=1", f"train.resume={checkpoint}"
    )
    return Trainer(cfg).train()


def test_resume_state_is_json_and_safetensors(dit_dir: Path, tmp_path: Path) -> None:
    state = _checkpoint(dit_dir, tmp_path / "run") / "state"
    assert json.loads((state / "difftune_loop.json").read_text())["step"] == 1
    assert (state / "difftune_ema.safetensors").is_file()
    assert not list(state.glob("custom_checkpoint_*"))  # accelerate's pickled custom objects are not used


def test_old_format_checkpoint_resumes_exactly(dit_dir: Path, tmp_path: Path) -> None:
    checkpoint = _checkpoint(dit_dir, tmp_path / "run")
    old = tmp_path / "old" / "checkpoint-0000001"
    shutil.copytree(checkpoint, old)
    _to_old_format(old)
    new_final = _resume(dit_dir, tmp_path / "a", checkpoint)
    old_final = _resume(dit_dir, tmp_path / "b", old)
    for sub in ("transformer", "ema/transformer"):
        a, b = weights(new_final, sub), weights(old_final, sub)
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def test_planted_payload_in_the_rng_state_never_runs(dit_dir: Path, tmp_path: Path) -> None:
    """accelerate reads its RNG file with weights_only=True and skips it when that fails; difftune's own
    randomness comes from per-step generators, so the run resumes and the payload never runs."""
    checkpoint = _checkpoint(dit_dir, tmp_path / "run")
    marker = tmp_path / "pwned"
    torch.save({"payload": Payload(marker)}, checkpoint / "state" / "random_states_0.pkl")
    final = _resume(dit_dir, tmp_path / "resumed", checkpoint)
    assert not marker.exists()
    clean = _resume(dit_dir, tmp_path / "clean", _checkpoint(dit_dir, tmp_path / "run2"))
    a, b = weights(final), weights(clean)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("where", ["custom_checkpoint_1.pkl", "optimizer.bin"])
def test_planted_payload_is_refused_and_never_runs(dit_dir: Path, tmp_path: Path, capsys, where: str) -> None:
    checkpoint = _checkpoint(dit_dir, tmp_path / "run")
    marker = tmp_path / "pwned"
    if where.startswith("custom"):
        _to_old_format(checkpoint, loop={"step": 1, "payload": Payload(marker)})
    else:
        torch.save({"payload": Payload(marker)}, checkpoint / "state" / where)
    with pytest.raises(UserError, match="could run code"):
        _resume(dit_dir, tmp_path / "resumed", checkpoint)
    assert not marker.exists()
    # the command line reports it in one line
    cfg = tmp_path / "c.yaml"
    make_cfg(dit_dir, tmp_path / "cli", None, "train.max_steps=2", f"train.resume={checkpoint}").save(cfg)
    assert main(["train", "--config", str(cfg)]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("difftune: error:")]
    assert len(errors) == 1 and "could run code" in errors[0] and "Traceback" not in err
    assert not marker.exists()


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
            owner = (
                func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else ""
            )
            keywords = {k.arg: k.value for k in node.keywords}
            yield owner, name, keywords, node


def _is_true(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def _is_false(node) -> bool:
    return isinstance(node, ast.Constant) and node.value is False


def test_every_load_call_in_the_code_is_safe() -> None:
    """A walk over the source: a new unsafe load call fails here, with its file and line."""
    problems = []
    checked = 0
    for path in sorted(SRC.rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                modules = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                # pickle itself may be imported, to catch UnpicklingError; its load calls are checked below
                bad = [m for m in modules if m in ("dill", "cloudpickle", "marshal", "joblib", "shelve")]
                if bad:
                    problems.append(f"{path.relative_to(SRC)}:{node.lineno} imports {bad[0]}")
        for owner, name, kw, node in _calls(tree):
            where = f"{path.relative_to(SRC)}:{node.lineno}"
            if owner == "torch" and name == "load":
                checked += 1
                if not _is_true(kw.get("weights_only")):
                    problems.append(f"{where} torch.load without weights_only=True")
            elif owner == "np" and name == "load":
                checked += 1
                if not _is_false(kw.get("allow_pickle")):
                    problems.append(f"{where} np.load without allow_pickle=False")
            elif name == "from_pretrained" and "okenizer" in owner:  # CLIPTokenizer, tokenizer_cls, ...
                checked += 1  # a tokenizer reads JSON and text files only: nothing to unpickle
            elif name == "from_pretrained":
                checked += 1
                if not _is_true(kw.get("use_safetensors")):
                    problems.append(f"{where} from_pretrained without use_safetensors=True")
            elif owner == "yaml" and name in ("load", "unsafe_load", "full_load"):
                checked += 1
                loader = kw.get("Loader")
                if not (isinstance(loader, ast.Name) and loader.id in ("_Loader", "SafeLoader")):
                    problems.append(f"{where} yaml.{name} without a safe loader")
            if kw.get("trust_remote_code") is not None and not _is_false(kw["trust_remote_code"]):
                problems.append(f"{where} trust_remote_code")
            if owner == "pickle" and name in ("load", "loads"):
                problems.append(f"{where} pickle.{name}")
    assert checked >= 5  # the walk sees the real load calls
    assert not problems, "\n".join(problems)
