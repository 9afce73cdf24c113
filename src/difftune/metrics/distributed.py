"""Features of many images, split over the processes of an accelerate launch and gathered in item order.

Item ``i`` (an image file, an in-memory image, or the ``i``-th sample to draw) goes to the process with
rank ``i mod P``. Each process runs the extractor on its share (:func:`run_extractor`) and leaves its
features ``(n_rank, D)`` with their item indices in a folder shared by all processes (:class:`WorkDir`);
the main process puts them back in item order, so the results do not depend on ``P`` or the batch size.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from difftune.backbones.conditioning import Conditioning
from difftune.config.sampling import SamplingSpec
from difftune.errors import UserError
from difftune.io.atomic import atomic_path
from difftune.io.images import load_image, to_uint8_rgb

__all__ = ["Batches", "WorkDir", "folder_batches", "progress", "run_extractor", "tensor_batches"]

Batches = Iterator[tuple[np.ndarray, Tensor]]  # (item indices (B,), uint8 images (B, 3, H, W))


def folder_batches(
    paths: Sequence[Path], indices: Sequence[int], batch_size: int, resize: int | None, workers: int
) -> Batches:
    """Decode ``paths[i]`` for ``i`` in ``indices`` in batches, on ``workers`` threads."""
    # every process checks against the same size: the first image's, unless resized
    expected = (resize, resize) if resize else tuple(load_image(paths[0]).shape[-2:])
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(indices), batch_size):
            idx = np.asarray(indices[start : start + batch_size], dtype=np.int64)
            images = list(pool.map(lambda i: load_image(paths[i], resize), idx))
            for i, im in zip(idx, images, strict=True):
                if tuple(im.shape[-2:]) != expected:
                    raise UserError(
                        f"image {str(paths[i])!r} is {im.shape[-1]}x{im.shape[-2]} but {str(paths[0])!r} is "
                        f"{expected[1]}x{expected[0]}: give --resize N to score images of different sizes"
                    )
            yield idx, torch.stack(images)


def tensor_batches(images: Tensor, indices: Sequence[int], batch_size: int, resize: int | None) -> Batches:
    """In-memory uint8 images ``images[i]`` for ``i`` in ``indices``, in batches, resized as files would be."""
    for start in range(0, len(indices), batch_size):
        idx = np.asarray(indices[start : start + batch_size], dtype=np.int64)
        batch = images[torch.from_numpy(idx)]
        yield idx, batch if resize is None else to_uint8_rgb(batch.float() / 255, resize)


class WorkDir:
    """Folder where each process leaves its features for the main process; a shared temporary one by default.

    Args:
        state: the accelerate ``PartialState`` of this process.
        requested: a folder every process can reach, or ``None`` for a temporary one made by the main
            process (and removed by :meth:`close`).
    """

    def __init__(self, state: Any, requested: str | None) -> None:
        self.state = state
        self.owned = requested is None
        path: str | None = requested
        if self.owned:
            path = tempfile.mkdtemp(prefix="difftune-eval-") if state.is_main_process else None
            if state.num_processes > 1:  # one folder for all processes (on one machine, or a shared disk)
                from accelerate.utils import broadcast_object_list

                box = [path]
                broadcast_object_list(box)
                path = box[0]
        self.path = Path(str(path))
        self.path.mkdir(parents=True, exist_ok=True)

    def gather(
        self,
        tag: str,
        total: int,
        indices: np.ndarray,
        feats: Tensor,
        images: Tensor | None,
        keep_images: bool,
    ) -> tuple[Tensor, Tensor | None] | None:
        """All processes' features ``(total, D)`` (and uint8 images) in item order, on the main process only."""
        rank, world = self.state.process_index, self.state.num_processes
        with atomic_path(self.path / f"{tag}-rank{rank:04d}.pt") as tmp:
            torch.save({"index": torch.from_numpy(indices), "features": feats, "images": images}, tmp)
        self.state.wait_for_everyone()
        if not self.state.is_main_process:
            return None
        files = [self.path / f"{tag}-rank{r:04d}.pt" for r in range(world)]
        parts = [p for p in (torch.load(f, weights_only=True) for f in files) if p["index"].numel()]
        for f in files:
            f.unlink(missing_ok=True)
        index = torch.cat([p["index"] for p in parts])
        order = torch.argsort(index)
        if not torch.equal(index[order], torch.arange(total)):
            raise RuntimeError(
                f"{tag}: the processes returned items {index.tolist()[:10]}..., expected 0..{total - 1}"
            )
        all_images = torch.cat([p["images"] for p in parts])[order] if keep_images else None
        return torch.cat([p["features"] for p in parts])[order], all_images

    def close(self, wait: bool = True) -> None:
        """Wait for every process (unless failing), then remove the folder if it was a temporary one."""
        if wait:
            self.state.wait_for_everyone()
        if self.owned and self.state.is_main_process:
            shutil.rmtree(self.path, ignore_errors=True)


@torch.no_grad()
def sampled_batches(
    loaded: Any,
    cond: Conditioning,
    indices: Sequence[int],
    scheduler: Any,
    spec: SamplingSpec,
    batch_size: int,
    resize: int | None,
    device: torch.device | str,
    guide: Any = None,
    dtype: torch.dtype | None = None,
) -> Batches:
    """Generate items ``indices`` of a model as uint8 RGB batches.

    Item ``i`` has condition ``cond[i]`` (a class label, a prompt, ...; made by the model's family) and
    seed ``spec.seed + i`` (guidance and steps from ``spec``;
    ``guide``: the pre-trained model for domain guidance), optionally resized; the images are rounded
    to 8 bits as PNG files are. ``dtype``: the models are cast to it to sample (``--dtype``; ``None``
    keeps them as loaded); the decoded images, and so the features, are float32 all the same.
    """
    from difftune.sampling.generate import generate, to_unit_range

    backbone = loaded.to(device, dtype).backbone.eval()
    guide = guide.to(device=device, dtype=dtype).eval() if guide is not None else None
    codec = loaded.codec
    for start in range(0, len(indices), batch_size):
        idx = np.asarray(indices[start : start + batch_size], dtype=np.int64)
        x = generate(
            backbone,
            scheduler,
            cond.select(torch.from_numpy(idx)),
            [spec.seed + int(i) for i in idx],
            guidance_scale=spec.guidance_scale,
            num_inference_steps=spec.steps,
            device=device,
            guide=guide,
        )
        yield idx, to_uint8_rgb(to_unit_range(codec.decode(x)), resize)


def run_extractor(
    batches: Batches, extractor: nn.Module, device: torch.device | str, keep_images: bool
) -> tuple[np.ndarray, Tensor, Tensor | None]:
    """Item indices ``(n,)``, float64 features ``(n, D)`` and (if kept) uint8 images ``(n, 3, H, W)``."""
    indices, feats, kept = [], [], []
    for idx, images in batches:
        out = extractor(images.to(device).float() / 255.0)  # (B, D)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != images.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UserError(
                f"the feature extractor must return (B, D) features with B={images.shape[0]}, got {shape}"
            )
        indices.append(idx)
        feats.append(out.detach().to("cpu", torch.float64))
        if keep_images:
            kept.append(images)
    if not feats:
        return np.zeros(0, dtype=np.int64), torch.zeros(0, 0, dtype=torch.float64), None
    return np.concatenate(indices), torch.cat(feats), torch.cat(kept) if keep_images else None


def progress(batches: Batches, n_items: int, batch_size: int, desc: str, enabled: bool) -> Batches:
    """``batches`` with a progress bar (shown when ``enabled``, i.e. on the main process)."""
    return tqdm(batches, total=math.ceil(n_items / batch_size), desc=desc, unit="batch", disable=not enabled)
