"""Tiny random-init diffusers models built from configs; nothing is downloaded."""

from __future__ import annotations

import importlib
import logging
import os
import signal
import subprocess
import sys
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

from difftune.demos.settings import DemoSettings
from difftune.testing.models import save_pipeline_dir, tiny_dit, tiny_unet, tiny_vae


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tiny models gain nothing from intra-op threads; on a busy 2-core machine they cost 10-100x."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def captions(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A module's captioned folder: 4 drawings of circles and squares with their captions (a test module
    may define its own)."""
    from test_stable_diffusion import _caption_folder

    return _caption_folder(tmp_path_factory.mktemp("data") / "shapes", n=4)


def reset_accelerate() -> None:
    """Forget accelerate's per-process state, which refuses a second mixed precision in one process."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture
def fresh_accelerate() -> Iterator[None]:
    """accelerate's state reset around a test that trains in another mixed precision (bf16)."""
    reset_accelerate()
    yield
    reset_accelerate()


@pytest.fixture
def benchmark_script() -> Iterator[Callable[[str], ModuleType]]:
    """Imports a script of ``benchmarks/`` as a module (``benchmark_script("peer_sd")``); the
    process-wide settings a script's main() changes (environment, threads, matmul precision, logging,
    warning filters) are restored afterwards."""
    folder = str(Path(__file__).resolve().parents[1] / "benchmarks")
    sys.path.insert(0, folder)
    environ, threads = dict(os.environ), torch.get_num_threads()
    precision = torch.get_float32_matmul_precision()
    try:
        with warnings.catch_warnings():
            yield importlib.import_module
    finally:
        os.environ.clear()
        os.environ.update(environ)
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
        logging.disable(logging.NOTSET)
        sys.path.remove(folder)


@pytest.fixture
def tiny_demo(tmp_path: Path) -> DemoSettings:
    """The digits demo at toy size (seconds): outputs and source-model cache in ``tmp_path``."""
    return DemoSettings(
        out=tmp_path / "out",
        cache_dir=tmp_path / "cache",
        per_class=4,
        model_width=8,
        model_layers=1,
        pretrain_steps=6,
        pretrain_batch=16,
        bank_samples=12,
        finetune_steps=4,
        finetune_batch=10,
        eval_every=2,
        eval_per_class=4,
        sample_steps=3,
        classifier_steps=50,
    )


@pytest.fixture
def dit_dir(tmp_path: Path) -> Path:
    """A pixel-space tiny DiT (1 channel, 8x8, 5 classes, learned variance) saved as a pipeline dir."""
    return save_pipeline_dir(tmp_path / "dit", tiny_dit(), "transformer")


@pytest.fixture
def unet_dir(tmp_path: Path) -> Path:
    """A pixel-space tiny class-conditional UNet saved as a pipeline dir."""
    return save_pipeline_dir(tmp_path / "unet", tiny_unet(), "unet")


@pytest.fixture
def latent_dit_dir(tmp_path: Path) -> Path:
    """A latent-space tiny DiT (4 channels, 2x2 latents) with a tiny VAE for 16x16 images."""
    return save_pipeline_dir(
        tmp_path / "ldit", tiny_dit(in_channels=4, sample_size=2), "transformer", tiny_vae()
    )


def run_torchrun(
    cmd: list[str], env: dict[str, str], cwd: Path | None = None, timeout: int = 300, succeed: bool = True
) -> str:
    """Run a torchrun command in its own session (a hang is ended with its workers); returns its output.

    The timeout is a safety net, not a speed assertion. Fails the test on a non-zero exit (on a zero
    exit with ``succeed=False``) or on a hang.
    """
    proc = subprocess.Popen(
        cmd,
        env=env,
        cwd=cwd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s:\n{output[-5000:]}")
    assert (proc.returncode == 0) == succeed, output[-5000:]
    return output
